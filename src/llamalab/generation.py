"""Batched sampling with the KV cache: greedy, temperature, top-k, top-p (Meta's ``sample_top_p``).

``generate`` left-pads the prompts, prefills the cache once, then decodes one token per step for
the whole batch. Each sequence stops at its own EOS; finished rows are dropped from the batch (and
the cache) as soon as they finish, so they cost no further compute. The log-probability of every
sampled token is taken under the model's raw distribution (before temperature, top-k and top-p),
which is what PPO's ratio needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llamalab.model.kv_cache import KVCache
from llamalab.model.llama import Llama


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including EOS
    logprobs: list[list[float]]  # log p(token) under the raw distribution, aligned with tokens
    finished: list[bool] = field(default_factory=list)  # True where the sequence ended with EOS


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Meta's nucleus sampling: keep the smallest prefix of sorted tokens whose mass reaches p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(probs_sort, dim=-1)
    probs_sort[(cumulative - probs_sort) > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice).squeeze(-1)


def sample_next(
    logits: torch.Tensor,  # (B, V) float32, raw
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids ``(B,)``. ``temperature == 0`` is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1.0:
        return sample_top_p(probs, top_p, generator)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ``input_ids (B, P)`` left-padded with ``pad_id`` and ``attention_mask (B, P)``."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.6,
    top_p: float | None = 0.9,
    top_k: int | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    pad_id: int = 0,
    cache_dtype: torch.dtype | None = None,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` per prompt; defaults are Meta's (temperature 0.6, top-p 0.9).

    ``eos_id=None`` means no early stop. ``seed`` makes sampling reproducible.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    dtype = cache_dtype or next(model.parameters()).dtype
    cache = KVCache.allocate(model.config, batch, total, device, dtype)
    full_mask = torch.zeros((batch, total), dtype=torch.long, device=device)
    full_mask[:, :prompt_len] = attention_mask

    out_tokens: list[list[int]] = [[] for _ in prompts]
    out_logprobs: list[list[float]] = [[] for _ in prompts]
    finished = [False] * batch
    active = torch.arange(batch, device=device)  # original row index of each live row
    logits = model(input_ids, attention_mask=attention_mask, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_p, top_k, generator)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)
        rows, toks, lps = active.tolist(), next_tokens.tolist(), logprobs.tolist()
        keep = []
        for i, (row, tok, lp) in enumerate(zip(rows, toks, lps)):
            out_tokens[row].append(tok)
            out_logprobs[row].append(lp)
            if eos_id is not None and tok == eos_id:
                finished[row] = True
            else:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # drop finished rows from the batch and the cache
            keep_t = torch.tensor(keep, device=device)
            active, next_tokens = active[keep_t], next_tokens[keep_t]
            full_mask = full_mask[keep_t]
            cache.select(keep_t)
        full_mask[:, prompt_len + step] = 1
        logits = model(
            next_tokens[:, None], attention_mask=full_mask[:, : cache.length + 1], kv_cache=cache
        )[:, -1]
    return GenerationOutput(out_tokens, out_logprobs, finished)
