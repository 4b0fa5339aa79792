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
- weights are *frozen* into the graph (Inductor's ``freezing``): constant-folded and, on CPU,
  repacked once for oneDNN's matrix kernels, which is where most of the gain over eager comes from
  at small batch.

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

import itertools
import math
import types
import weakref
from typing import Any

import torch
from torch import nn

from llamalab.model.llama import Llama, TransformerBlock, rotate_half

LENGTH_BUCKET = 64  # cache lengths are rounded up to a multiple of this (fewer recompilations)


def bucket_length(length: int) -> int:
    """``length`` rounded up to a multiple of :data:`LENGTH_BUCKET`."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


class _DecodeStep(nn.Module):
    """One token for every row: ``(tokens (B,), positions (B,), caches, write_at (1,), bias) ->
    logits (B, vocab)`` in float32. ``bias (B, 1, 1, M)`` is 0 where a row may attend."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model
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
    ) -> torch.Tensor:
        m = self.model
        B = tokens.shape[0]
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
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
        return m.output(m.norm(h)).float()


def _weights_version(model: nn.Module) -> tuple[Any, ...]:
    """Changes whenever a parameter is modified in place or a buffer (RoPE tables) replaced."""
    params = tuple(p._version for p in model.parameters())
    buffers = tuple((b.data_ptr(), b._version, tuple(b.shape)) for b in model.buffers())
    return params + buffers


class CompiledDecoder:
    """The compiled decode step of one model, rebuilt when its weights change (module doc).

    Obtain it with :func:`compiled_decoder` (one per model, kept while the model lives). Call
    :meth:`current` once per generation (it checks the weights' versions), then call the step
    it returns for every token inside :meth:`compiling` (Inductor's freezing must be on when the
    graph is built, which happens at the step's first call).
    """

    def __init__(self, model: Llama) -> None:
        self._model = weakref.ref(model)  # the registry below is keyed weakly by the model
        self.version: tuple[Any, ...] | None = None
        self.step: Any = None
        self.compilations = 0

    def current(self) -> Any:
        """The compiled step for the model's weights as they are now."""
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this compiled decoder no longer exists")
        version = _weights_version(model)
        if self.step is None or version != self.version:
            self.step = torch.compile(_unique_entry(_DecodeStep(model).eval()), dynamic=False)
            self.version = version
            self.compilations += 1
        return self.step

    @staticmethod
    def compiling() -> Any:
        """Context for calling the step: Inductor freezing on (constant weights, prepacked)."""
        import torch._inductor.config as inductor_config

        return inductor_config.patch(freezing=True)


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
