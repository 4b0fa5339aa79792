"""Batched sampling with the KV cache: greedy, temperature, top-k, top-p (Meta's ``sample_top_p``).

``generate`` left-pads the prompts, prefills the cache once, then decodes one token per step for
the whole batch. Each sequence stops at its own EOS; finished rows are dropped from the batch (and
the cache) as soon as they finish, so they cost no further compute. The log-probability of every
sampled token is taken under the tempered distribution ``logits / temperature`` the token was drawn
from (the raw one at temperature 0 and 1), before top-k and top-p truncation: what PPO's ratio and
KL use (issue #18; PPO refuses top-p, so there it is exactly the sampling distribution).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from llamalab.generation.compiled import bucket_length, compiled_decoder
from llamalab.model.kv_cache import KVCache
from llamalab.model.llama import Llama


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including EOS
    logprobs: list[list[float]]  # log p(token) under logits / temperature, aligned with tokens
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
    compile: bool = False,
) -> GenerationOutput:
    """Sample up to ``max_new_tokens`` per prompt; defaults are Meta's (temperature 0.6, top-p 0.9).

    ``eos_id=None`` means no early stop. ``seed`` makes sampling reproducible. ``compile=True``
    decodes with one compiled, static-shape step (:mod:`llamalab.generation.compiled`): faster for
    repeated inference with fixed weights, a compilation whenever the weights changed.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if compile:
        return _generate_compiled(
            model,
            prompts,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            eos_id,
            generator,
            pad_id,
            cache_dtype,
        )
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
        logprobs[active, step] = _token_logprobs(logits, next_tokens, temperature)
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
    return _output(tokens.tolist(), logprobs.tolist(), n_new, eos_id)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, the distribution a token is sampled from before top-k / top-p;
    the logits themselves at temperature 0 (greedy) and 1 (so the default stays bit-identical)."""
    if temperature in (0.0, 1.0):
        return logits
    return logits / temperature


def _token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(token) under ``tempered(logits (B, V), temperature)``: ``(B,)``."""
    logprobs = torch.log_softmax(tempered(logits, temperature), dim=-1)
    return logprobs.gather(1, tokens[:, None])[:, 0]


def _output(
    token_rows: list[list[int]],
    logprob_rows: list[list[float]],
    n_new: list[int],
    eos_id: int | None,
) -> GenerationOutput:
    """Rows cut to their first ``n_new`` tokens (up to and including EOS)."""
    return GenerationOutput(
        [row[:n] for row, n in zip(token_rows, n_new)],
        [row[:n] for row, n in zip(logprob_rows, n_new)],
        [
            eos_id is not None and n > 0 and row[n - 1] == eos_id
            for row, n in zip(token_rows, n_new)
        ],
    )


_EOS_CHECK_EVERY = 8  # compiled path: steps between checks that every row has ended


def _generate_compiled(
    model: Llama,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    eos_id: int | None,
    generator: torch.Generator | None,
    pad_id: int,
    cache_dtype: torch.dtype | None,
) -> GenerationOutput:
    """``generate(compile=True)``: eager prefill, then the compiled static-shape decode step.

    The batch keeps its shape to the end (finished rows are not dropped: a new batch size would
    be a new graph); the loop stops once every row has produced EOS, checked every
    ``_EOS_CHECK_EVERY`` steps so the host does not wait on the device each token.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    batch, prompt_len = input_ids.shape
    dtype = cache_dtype or next(model.parameters()).dtype
    max_len = bucket_length(prompt_len + max_new_tokens)
    cache = KVCache.allocate(model.config, batch, max_len, device, dtype)
    padded = any(len(p) != prompt_len for p in prompts)
    if model.rope.cos.shape[0] < max_len:  # the compiled step indexes the tables directly
        model.rope.reset(max_len, device=device)
    logits = model(input_ids, attention_mask=attention_mask if padded else None, kv_cache=cache)[
        :, -1
    ]
    keys = [k.clone() for k in cache.k.unbind(0)]  # one tensor per layer: mutated in place
    values = [v.clone() for v in cache.v.unbind(0)]
    del cache
    bias = torch.full((batch, 1, 1, max_len), float("-inf"), device=device)
    bias[:, 0, 0, :prompt_len].masked_fill_(attention_mask.bool(), 0.0)
    position = attention_mask.sum(-1)  # (B,): position of the next new token
    decoder = compiled_decoder(model)
    greedy = temperature == 0  # the graph then picks the token itself
    step_fn = decoder.current(greedy)  # weights cannot change during one generation: check once
    tokens = torch.zeros((batch, max_new_tokens), dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    write_index = torch.arange(prompt_len, prompt_len + max_new_tokens, device=device)
    steps = max_new_tokens
    next_tokens = sample_next(logits, temperature, top_p, top_k, generator)
    token_logprobs = _token_logprobs(logits, next_tokens, temperature)
    with contextlib.ExitStack() as context:
        context.enter_context(decoder.compiling())
        for step in range(max_new_tokens):
            tokens[:, step] = next_tokens
            logprobs[:, step] = token_logprobs
            if eos_id is not None:
                done |= next_tokens == eos_id
                if step % _EOS_CHECK_EVERY == _EOS_CHECK_EVERY - 1 and bool(done.all()):
                    steps = step + 1
                    break
            if step == max_new_tokens - 1:
                break
            out = step_fn(next_tokens, position, keys, values, write_index[step : step + 1], bias)
            if step == 0:  # the guards held for this call, so they hold for the rest
                context.enter_context(decoder.trusted())
            if greedy:
                next_tokens, token_logprobs, position = out
            else:
                logits, position = out
                next_tokens = sample_next(logits, temperature, top_p, top_k, generator)
                token_logprobs = _token_logprobs(logits, next_tokens, temperature)
    token_rows = tokens[:, :steps].tolist()
    n_new = [row.index(eos_id) + 1 if eos_id in row else len(row) for row in token_rows]
    return _output(token_rows, logprobs[:, :steps].tolist(), n_new, eos_id)
