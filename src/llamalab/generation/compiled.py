"""A compiled, static-shape decode step for :func:`llamalab.generation.generate` (``compile=True``).

Eager decoding of a small model is dominated by per-operator overhead and by small matrix
products: one token through ``tiny`` is about 40 kernel launches whose work is microseconds each.
Here one decode step (embedding, every block, the final norm and the LM head) is a single
``torch.compile`` graph with static shapes:

- the KV cache is one preallocated tensor per layer of a fixed length (the prompt plus the new
  tokens, rounded up to :data:`LENGTH_BUCKET` so prompts of nearby lengths share one graph);
  the step writes its key and value at a position given as a tensor (``index_copy_``), so every
  step of a generation, and every generation of the same (batch, bucket), reuses one graph;
- attention reads the whole cache under an additive mask (``0`` for real tokens written so far,
  ``-inf`` for padding and the future), so its shape never changes either;
- weights are *frozen* into the graph (Inductor's ``freezing``): constants, so the float32
  projections on CPU go into the graph as oneDNN products on constant weights
  (:mod:`llamalab.model.linear`) and the rest is constant-folded;
- the host's work between tokens is nearly nothing: with ``greedy`` the graph also picks the
  token and its log-probability, it marks the new cache slot visible itself, and Dynamo's guards
  are evaluated on a generation's first call only (:meth:`CompiledDecoder.trusted`).

Frozen weights are constants: a step compiled before the weights changed would decode with stale
ones. :class:`CompiledDecoder` records every parameter's in-place version counter
(``Tensor._version``, bumped by optimizer steps, ``copy_`` and ``load_state_dict``) and rebuilds
its graph when any has moved. A rebuild costs a compilation (seconds on CPU), so the compiled
step suits inference (``src/generate.py``, ``src/chat.py``, evaluation), not a PPO rollout whose
weights change every iteration: PPO keeps the eager path.

The step computes exactly the eager model's maths (RMSNorm and RoPE in float32, softmax attention
with GQA groups broadcast rather than repeated); greedy tokens match eager decoding (tests).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import types
import weakref
from typing import Any

import torch
from torch import nn

from llamalab.model.linear import frozen_weights
from llamalab.model.llama import Llama, TransformerBlock, rotate_half

LENGTH_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer recompilations)


def bucket_length(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`LENGTH_BUCKET`."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class _DecodeStep(nn.Module):
    """One token for every row of the batch, as one graph.

    Inputs: ``tokens (B,)``, ``positions (B,)``, the per-layer ``keys`` / ``values`` caches,
    ``write_at (1,)`` (the cache slot of this token) and ``bias (B, 1, 1, M)`` (0 where a row may
    attend, ``-inf`` elsewhere). The step marks ``write_at`` visible in ``bias`` itself, so the
    host does nothing between steps but sample.

    Returns ``(logits (B, vocab) float32, positions + 1)``; with ``greedy`` the graph also picks
    the token (first maximum, as ``argmax``) and its raw log-probability, and returns
    ``(next_tokens (B,), logprobs (B,), positions + 1)`` instead of the logits.
    """

    def __init__(self, model: Llama, greedy: bool) -> None:
        super().__init__()
        self.model = model
        self.greedy = greedy
        config = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.kv_heads,
            config.head_dim,
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        write_at: torch.Tensor,
        bias: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        m = self.model
        B = tokens.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        bias.index_fill_(3, write_at, 0.0)  # this token's slot becomes visible to every row
        h = m.tok_embeddings(tokens)  # (B, dim)
        cos = m.rope.cos[positions].unsqueeze(1)  # (B, 1, hd), float32
        sin = m.rope.sin[positions].unsqueeze(1)
        scale = 1.0 / math.sqrt(hd)
        for i, layer in enumerate(m.layers):
            assert isinstance(layer, TransformerBlock)
            attn = layer.attention
            x = layer.attention_norm(h)
            q = attn.wq(x).view(B, H, hd).float()
            k = attn.wk(x).view(B, Hkv, hd).float()
            v = attn.wv(x).view(B, Hkv, hd)
            q = (q * cos + rotate_half(q) * sin).to(v.dtype)
            k = (k * cos + rotate_half(k) * sin).to(v.dtype)
            keys[i].index_copy_(2, write_at, k.unsqueeze(2).to(keys[i].dtype))
            values[i].index_copy_(2, write_at, v.unsqueeze(2).to(values[i].dtype))
            # (B, Hkv, G, hd) x (B, Hkv, hd, M): each K/V head serves its G query heads.
            scores = torch.matmul(q.view(B, Hkv, H // Hkv, hd), keys[i].transpose(-1, -2))
            probs = torch.softmax(scores.float() * scale + bias, dim=-1).to(values[i].dtype)
            out = torch.matmul(probs, values[i]).reshape(B, H * hd)
            h = h + attn.wo(out.to(h.dtype))
            h = h + layer.feed_forward(layer.ffn_norm(h))
        logits = m.output(m.norm(h)).float()
        if not self.greedy:
            return logits, positions + 1
        next_tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None])[:, 0]
        return next_tokens, logprobs, positions + 1


def _weights_version(model: nn.Module) -> tuple[Any, ...]:
    """Changes whenever a parameter is modified in place or a buffer (RoPE tables) replaced."""
    params = tuple(p._version for p in model.parameters())
    buffers = tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in model.buffers())
    return params + buffers


class CompiledDecoder:
    """The compiled decode steps of one model, rebuilt when its weights change (module doc).

    Obtain it with :func:`compiled_decoder` (one per model, kept while the model lives). Call
    :meth:`current` once per generation (it checks the weights' versions), then call the step
    it returns for every token inside :meth:`compiling` (Inductor's freezing must be on when the
    graph is built, which happens at the step's first call). After the first call of a
    generation has passed Dynamo's guards, the remaining calls of that generation may run inside
    :meth:`trusted`, which skips re-checking them.
    """

    def __init__(self, model: Llama) -> None:
        self._model = weakref.ref(model)  # the registry below is keyed weakly by the model
        self.version: tuple[Any, ...] | None = None
        self.steps: dict[bool, Any] = {}  # greedy or not -> compiled step
        self.compilations = 0

    def current(self, greedy: bool = False) -> Any:
        """The compiled step for the model's weights as they are now (see :class:`_DecodeStep`
        for what ``greedy`` changes)."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this compiled decoder no longer exists")
        version = _weights_version(model)
        if version != self.version:
            self.steps.clear()
            self.version = version
        if greedy not in self.steps:
            step = _unique_entry(_DecodeStep(model, greedy).eval())
            self.steps[greedy] = torch.compile(step, dynamic=False, fullgraph=True)
            self.compilations += 1
        return self.steps[greedy]

    @staticmethod
    def compiling() -> Any:
        """Context for calling the step: Inductor freezing on (constant weights), and the linear
        layers traced as raw oneDNN products on those constants (``frozen_weights``)."""
        # lazy: importing Inductor's config costs ~1 s, only a compiled decode needs it
        import torch._inductor.config as inductor_config

        stack = contextlib.ExitStack()
        stack.enter_context(inductor_config.patch(freezing=True))
        stack.enter_context(frozen_weights())  # linear layers: the raw oneDNN product, frozen
        return stack

    @staticmethod
    def trusted() -> Any:
        """Context for the second and later calls of one generation: Dynamo's guards skipped.

        Within a generation every call passes tensors of the same shapes, dtypes and devices
        (the same cache and mask tensors, tokens and positions made by the previous call), so the
        guards that the first call evaluated hold for all of them. Checking them again costs
        about 0.1-0.2 ms per token on CPU, 10-15% of a ``tiny`` decode step. Only the step is
        called inside this context (the stance is global while it is active).
        """
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


_BUILDS = itertools.count()


def _unique_entry(step: nn.Module) -> Any:
    """A function calling ``step`` whose code object is new on every build.

    Dynamo keeps compiled graphs per code object and its guards do not pin the weights' values
    (nor, once inlined, which module holds them). With frozen weights a graph compiled for one
    model, or for these weights before an update, must never be served again: a code object of
    its own per build guarantees that.
    """

    def call(*args: Any) -> torch.Tensor:
        return step(*args)

    code = call.__code__.replace(co_name=f"llamalab_decode_step_{next(_BUILDS)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


_DECODERS: weakref.WeakKeyDictionary[nn.Module, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: Llama) -> CompiledDecoder:
    """The :class:`CompiledDecoder` of ``model`` (created on first use, dropped with the model)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = CompiledDecoder(model)
    return decoder
