"""Our model as an lm-evaluation-harness ``LM`` (registered as ``llamalab``): any lm-eval task runs on
it, scored on our own forward pass and our KV-cache ``generate``.

It reproduces lm-eval's ``hf`` backend request by request (tested on the same Hugging Face
export: equal log-likelihoods within 1e-4, equal accuracy):

- Text is encoded with SentencePiece exactly as ``Tokenizer.encode`` does, BOS first; lm-eval moves
  a context's trailing spaces into the continuation, encodes context + continuation whole, and the
  continuation is what follows the context's tokens (``TemplateLM._encode_pair``).
- ``<s>`` and ``</s>`` in a text are BOS and EOS (as the Hugging Face tokenizer parses them), so
  the chat format rendered by :meth:`LlamalabLM.apply_chat_template` (the same string as the
  exported ``chat_template``: ``<s> [INST] user [/INST] answer </s>``) encodes to
  ``encode_dialog``'s ids. A text after ``<s>`` / ``</s>`` that starts with a space gets that
  space as SentencePiece's dummy prefix.
- ``loglikelihood_rolling`` scores every token of the text after a BOS. lm-eval's ``hf`` backend
  also scores an extra BOS it adds to the text (EleutherAI/lm-evaluation-harness#3333);
  ``bos_in_rolling=True`` does the same, for comparisons with published ``hf`` numbers.
- ``generate_until`` is greedy unless the task asks ``do_sample`` (then temperature, no top-p),
  stops at EOS, cuts at the first stop string.

Ranks: under ``torchrun`` (a ``torch.distributed`` group is initialised) with ``tp_size=1`` each
rank is one lm-eval rank and holds a whole model; lm-eval splits the requests and gathers the
results. With ``tp_size=T`` consecutive groups of ``T`` ranks each hold one tensor-parallel copy
(:func:`llamalab.scale.tensor_parallel.load_tp_copy`: every rank reads only its slices of the
checkpoint, the whole model is never in one process); lm-eval's rank and world size are the group
index and ``world / T``. Every rank of a group serves the same requests (the copy's all-reduces
and logits all-gather leave identical values on each), lm-eval gathers across groups over the
data-parallel groups (the ranks at the same place in every group), and only global rank 0
reports results.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from llamalab.checkpoint.hf import LLAMA2_CHAT_TEMPLATE
from llamalab.evaluation.common import device_of, load_policy, open_policy, policy_tokenizer
from llamalab.generation import generate
from llamalab.model import Llama
from llamalab.scale.tensor_parallel import check_tp, load_tp_copy, tp_and_dp_groups
from llamalab.tokenizer import B_INST, E_INST, Tokenizer, dialog_pairs

BOS_TEXT, EOS_TEXT = "<s>", "</s>"
TP_HINT = "launched as torchrun --nproc-per-node=N with N a multiple of eval.tp_size"
_SPECIAL = re.compile(f"({re.escape(BOS_TEXT)}|{re.escape(EOS_TEXT)})")

Request = tuple[tuple[str | None, str], list[int], list[int]]


@register_model("llamalab")
class LlamalabLM(TemplateLM):
    """A llamalab ``Llama`` + SentencePiece tokenizer for lm-eval.

    Args:
        pretrained: a model path ``load_model`` reads (used when ``model`` is None).
        model, tokenizer: an already loaded model and tokenizer.
        batch_size: requests per forward pass / per ``generate`` call.
        device: ``cpu`` / ``cuda`` / ``auto``.
        max_gen_toks: default answer length of ``generate_until``.
        bos_in_rolling: score an extra BOS in ``loglikelihood_rolling`` like the ``hf`` backend.
        tp_size: ranks per tensor-parallel copy (``eval.tp_size``; module docstring). Checked
            against the world size and the model's heads, KV heads and FFN before any weight is
            read; needs ``pretrained``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        model: Llama | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 8,
        device: str | None = None,
        max_gen_toks: int = 256,
        bos_in_rolling: bool = False,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.global_rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():
            self.global_rank, world = dist.get_rank(), dist.get_world_size()
        self.tp_size, self._dp_group = int(tp_size), None
        self._rank, self._world_size = self.global_rank, world
        if self.tp_size != 1:
            if pretrained is None:
                raise ValueError("LlamalabLM with tp_size > 1 needs pretrained=PATH")
            model, tokenizer = self._load_tp(pretrained, device_of(device), world)
        elif model is None or tokenizer is None:
            if pretrained is None:
                raise ValueError("LlamalabLM needs pretrained=PATH or a model and a tokenizer")
            model, tokenizer = load_policy(pretrained, device_of(device))
        self.model, self.sp = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.max_gen_toks, self.bos_in_rolling = int(max_gen_toks), bool(bos_in_rolling)
        self.max_length = model.config.max_seq_len

    def _load_tp(self, path: str, device: torch.device, world: int) -> tuple[Llama, Tokenizer]:
        """This rank's slices of the model at ``path`` (checked first), its groups and ranks."""
        source = open_policy(path)
        check_tp(source.config, self.tp_size, world, "eval.tp_size", TP_HINT)
        tp_group, self._dp_group = tp_and_dp_groups(self.tp_size)
        tp_rank = self.global_rank % self.tp_size
        self._rank, self._world_size = self.global_rank // self.tp_size, world // self.tp_size
        model = load_tp_copy(source, self.tp_size, tp_rank, tp_group, device)
        return model, policy_tokenizer(path, model)

    # ---------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.sp.model_path)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """BOS (unless ``add_special_tokens=False`` or the text starts with ``<s>``) + the
        SentencePiece ids of the text, ``<s>``/``</s>`` read as BOS/EOS (module docstring)."""
        parts = _SPECIAL.split(string)
        add_bos = add_special_tokens is not False and not string.startswith(BOS_TEXT)
        ids = [self.sp.bos_id] if add_bos else []
        after_special = False
        for part in parts:
            if part in (BOS_TEXT, EOS_TEXT):
                ids.append(self.sp.bos_id if part == BOS_TEXT else self.sp.eos_id)
                after_special = True
            elif part:
                text = part[1:] if after_special and part.startswith(" ") else part
                ids += self.sp.encode(text)
                after_special = False
        return ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.sp.decode([t for t in tokens if t != self.sp.eos_id])

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Meta's chat format as text (``<s> [INST] user [/INST] answer </s>...``); without
        ``add_generation_prompt`` a final assistant message is left open (a prefilled answer)."""
        pairs = dialog_pairs(chat_history)
        text = ""
        for i, (user, answer) in enumerate(pairs):
            text += f"{BOS_TEXT} {B_INST} {user.strip()} {E_INST}"
            if answer is not None:
                last_open = i == len(pairs) - 1 and not add_generation_prompt
                text += f" {answer.strip()}" + ("" if last_open else f" {EOS_TEXT}")
        return text

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return chat_template if isinstance(chat_template, str) else LLAMA2_CHAT_TEMPLATE

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: list[Request],
        disable_tqdm: bool = False,
        cache: bool = True,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding produces it; longest
        requests first (batches of similar length), results in request order."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or self.global_rank != 0, desc="loglik"
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                whole = (context + continuation)[-(self.max_length + 1) :]
                rows.append(whole[:-1])
                spans.append(continuation[-len(whole) + 1 :] if continuation else [])
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.sp.pad_id, dtype=torch.long)
            for r, row in enumerate(rows):  # right padding: causal attention never sees it
                ids[r, : len(row)] = torch.tensor(row)
            logprobs = torch.log_softmax(self.model(ids.to(self._device)).float(), dim=-1)
            for r, i in enumerate(chunk):
                target = torch.tensor(spans[r], device=self._device)
                n, end = len(spans[r]), len(rows[r])
                step = logprobs[r, end - n : end]  # (n, vocab)
                value = float(step.gather(1, target[:, None]).sum())
                greedy = bool((step.argmax(-1) == target).all())
                results[i] = (value, greedy)
                if cache and requests[i][0][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (value, greedy))
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in windows of the model's context (lm-eval's rule)."""
        windows: list[Request] = []
        owner: list[int] = []
        for k, request in enumerate(requests):
            (string,) = request.args
            tokens = self.tok_encode(string, add_special_tokens=self.bos_in_rolling)
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1),
            ):
                windows.append(((None, ""), context, continuation))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, cache=False)
        totals = [0.0] * len(requests)
        for k, (value, _) in zip(owner, scores, strict=True):
            totals[k] += value
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Answers up to the first stop string (EOS included), batched by equal settings."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        results = [""] * len(requests)
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or self.global_rank != 0, desc="generate"
        )
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=EOS_TEXT)
            max_new = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            budget = self.max_length - max_new
            if budget <= 0:
                raise ValueError(
                    f"max_gen_toks={max_new} leaves no room for a prompt in the model's "
                    f"context of {self.max_length} tokens"
                )
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in chunk]
                out = generate(
                    self.model,
                    prompts,
                    max_new,
                    temperature=temperature,
                    top_p=None,
                    eos_id=self.sp.eos_id,
                    seed=start if temperature > 0 else None,
                    pad_id=self.sp.pad_id,
                )
                for i, tokens in zip(chunk, out.tokens, strict=True):
                    text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results

    # ---------------------------------------------------------------- ranks
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self._dp_group)  # None: the whole world
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        every: list[Any] = [None] * self.world_size
        dist.all_gather_object(every, obj, group=self._dp_group)
        return every

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
