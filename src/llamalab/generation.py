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
    dtype = cache_dtype or next(model.parameters()).dtype
    cache = KVCache.allocate(model.config, batch, prompt_len + max_new_tokens, device, dtype)
    # Equal-length prompts need no mask: plain causal prefill, then unmasked one-token decode.
    full_mask = None
    if any(len(p) != prompt_len for p in prompts):
        full_mask = torch.zeros((batch, cache.max_len), dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = attention_mask
    position = attention_mask.sum(-1, keepdim=True)  # (B, 1): position of the next new token
    # Tokens and log-probs stay on the device, one column per step; Python reads them once.
    tokens = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    n_new = [max_new_tokens] * batch  # tokens kept per row, up to and including its EOS
    active = torch.arange(batch, device=device)  # original row index of each live row
    prefill_mask = None if full_mask is None else attention_mask
    logits = model(input_ids, attention_mask=prefill_mask, kv_cache=cache)[:, -1]
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, temperature, top_p, top_k, generator)
        tokens[active, step] = next_tokens
        logprobs[active, step] = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None])[
            :, 0
        ]
        if step == max_new_tokens - 1:
            break
        if eos_id is not None:
            done = next_tokens == eos_id
            if bool(done.any()):  # one sync per step, only when EOS can stop rows
                for row in active[done].tolist():
                    n_new[row] = step + 1
                keep = (~done).nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                active, next_tokens, position = active[keep], next_tokens[keep], position[keep]
                full_mask = None if full_mask is None else full_mask[keep]
                cache.select(keep)  # finished rows cost no further compute
        decode_mask = None
        if full_mask is not None:
            full_mask[:, prompt_len + step] = 1
            decode_mask = full_mask[:, : cache.length + 1]
        logits = model(
            next_tokens[:, None], attention_mask=decode_mask, position_ids=position, kv_cache=cache
        )[:, -1]
        position = position + 1
    token_rows, logprob_rows = tokens.tolist(), logprobs.tolist()
    return GenerationOutput(
        [row[:n] for row, n in zip(token_rows, n_new)],
        [row[:n] for row, n in zip(logprob_rows, n_new)],
        [
            eos_id is not None and n > 0 and row[n - 1] == eos_id
            for row, n in zip(token_rows, n_new)
        ],
    )
