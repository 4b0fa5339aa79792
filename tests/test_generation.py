"""Sampling with the KV cache: exactness against full forwards and transformers, sampling rules."""

from __future__ import annotations

import pytest
import torch

from llamalab.checkpoint.hf import to_hf_state_dict
from llamalab.generation import generate, left_pad, sample_next, sample_top_p
from llamalab.model import KVCache, Llama, LlamaConfig

VOCAB = 128
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]


def tiny_model(n_kv_heads: int | None = 2, seed: int = 0) -> Llama:
    config = LlamaConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, multiple_of=16,
        max_seq_len=64,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(config)
    model.init_weights(std=0.1)  # peaked enough that greedy choices are not near-ties
    return model.eval()


def full_forward_logprobs(
    model: Llama, prompt: list[int], new: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(new[i] | prompt + new[:i]) under logits / temperature, one uncached forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    steps = torch.arange(len(new)) + len(prompt) - 1
    return logprobs[steps, torch.tensor(new)]


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_cached_decoding_equals_full_forward_at_every_step(n_kv_heads):
    """Left-padded prompts of different lengths: every cached step's logits equal a full
    forward over prompt + generated tokens (same padding) at that position."""
    model = tiny_model(n_kv_heads)
    ids, mask = left_pad(PROMPTS, pad_id=0, device=torch.device("cpu"))
    batch, prompt_len = ids.shape
    steps = 6
    cache = KVCache.allocate(model.config, batch, prompt_len + steps)
    with torch.no_grad():
        step_logits = [model(ids, attention_mask=mask, kv_cache=cache)[:, -1]]
        for _ in range(steps - 1):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            step_logits.append(model(nxt, attention_mask=mask, kv_cache=cache)[:, -1])
        full = model(ids, attention_mask=mask)[:, prompt_len - 1 :]
    assert (torch.stack(step_logits, 1) - full).abs().max() <= 1e-4
    for row, prompt in enumerate(PROMPTS):  # and padding changed nothing
        alone = model(ids[row : row + 1, prompt_len - len(prompt) :])
        assert (full[row] - alone[0, len(prompt) - 1 :]).abs().max() <= 1e-4


def test_greedy_generate_equals_transformers():
    import transformers  # a dev dependency: missing, this fails (make test installs it)

    model = tiny_model(2)
    cfg = model.config.to_hf_config()
    for key in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(key)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    theirs.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    ours = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_id=None)
    for prompt, tokens in zip(PROMPTS, ours.tokens):
        out = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )  # fmt: skip
        assert tokens == out[0, len(prompt) :].tolist()
    assert ours.finished == [False, False, False]


def test_logprobs_are_tempered_log_softmax_of_a_full_forward():
    """Log-probs of the distribution sampled from, logits / temperature (before top-k / top-p
    truncation): what PPO's ratio reads (issue #18)."""
    model = tiny_model(2)
    out = generate(model, PROMPTS, max_new_tokens=7, temperature=1.3, top_p=0.8, top_k=20, seed=3)
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        assert len(tokens) == len(logprobs) == 7
        expected = full_forward_logprobs(model, prompt, tokens, temperature=1.3)
        assert (torch.tensor(logprobs) - expected).abs().max() <= 1e-4
        raw = full_forward_logprobs(model, prompt, tokens)
        assert (torch.tensor(logprobs) - raw).abs().max() > 1e-3


def test_eos_stops_each_row_independently():
    model = tiny_model(2)
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0).tokens
    eos = free[0][2]  # row 0 says "EOS" at its third step
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_id=eos)
    for row, tokens in enumerate(free):
        if eos in tokens:
            cut = tokens.index(eos) + 1
            assert out.tokens[row] == tokens[:cut] and out.finished[row]
        else:  # rows that go on are unaffected by the others leaving the batch
            assert out.tokens[row] == tokens and not out.finished[row]
    assert len(out.tokens[0]) <= 3 and out.finished[0]
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        expected = full_forward_logprobs(model, prompt, tokens)
        assert (torch.tensor(logprobs) - expected).abs().max() <= 1e-4


def test_seed_makes_sampling_reproducible():
    model = tiny_model(2)
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=None)
    first = generate(model, PROMPTS, seed=7, **kwargs)
    again = generate(model, PROMPTS, seed=7, **kwargs)
    other = generate(model, PROMPTS, seed=8, **kwargs)
    assert first.tokens == again.tokens and first.logprobs == again.logprobs
    assert first.tokens != other.tokens


def test_top_p_follows_meta_sample_top_p():
    """Meta keeps a token when the mass *before* it is <= p: here tokens 0 and 3 (0.5 + 0.3)."""
    probs = torch.tensor([[0.5, 0.05, 0.15, 0.3]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_top_p(probs.clone(), 0.75, generator)
    counts = torch.bincount(drawn, minlength=4)
    assert counts[1] == counts[2] == 0  # outside the nucleus: never sampled
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised inside it
    # p = 0.5 exactly: mass before token 3 is 0.5, not > 0.5, so token 3 stays in
    drawn = sample_top_p(probs.clone(), 0.5, generator)
    assert set(drawn.tolist()) == {0, 3}
    # through sample_next (temperature 1): the same nucleus
    logits = probs.log()
    drawn = sample_next(logits, temperature=1.0, top_p=0.75, top_k=None, generator=generator)
    assert set(drawn.tolist()) == {0, 3}


def test_top_k_and_temperature_zero():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 2.8]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=5.0, top_p=None, top_k=2, generator=generator)
    assert set(drawn.tolist()) == {1, 2}
    greedy = sample_next(logits[:3], temperature=0, top_p=0.1, top_k=1, generator=None)
    assert greedy.tolist() == [1, 1, 1]
    mixed = torch.tensor([[0.0, 1.0, 5.0], [7.0, 1.0, 5.0]])
    assert sample_next(mixed, 0, None, None, None).tolist() == [2, 0]


def test_bad_arguments_are_refused():
    model = tiny_model(2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], max_new_tokens=2, temperature=-1.0)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager_and_follows_weight_updates():
    """generate(compile=True): the compiled static-shape step (llamalab.generation.compiled) gives
    eager's greedy tokens, EOS handling and raw log-probs on a left-padded GQA batch, and
    recompiles (never decodes with stale frozen weights) after the weights change in place."""
    from llamalab.generation.compiled import bucket_length, compiled_decoder

    model = tiny_model(2)
    free = generate(model, PROMPTS, max_new_tokens=12, temperature=0).tokens
    eos = free[0][2]
    eager = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos)
    fast = generate(model, PROMPTS, max_new_tokens=12, temperature=0, eos_id=eos, compile=True)
    assert fast.tokens == eager.tokens and fast.finished == eager.finished
    for prompt, tokens, logprobs in zip(PROMPTS, fast.tokens, fast.logprobs):
        expected = full_forward_logprobs(model, prompt, tokens)
        assert (torch.tensor(logprobs) - expected).abs().max() <= 1e-4
    # Sampling (the graph returns logits, the host samples): same draws as eager for one seed.
    sampled = [
        generate(model, PROMPTS, max_new_tokens=12, temperature=0.8, seed=3, compile=c).tokens
        for c in (False, True)
    ]
    assert sampled[0] == sampled[1]
    decoder = compiled_decoder(model)
    assert decoder.compilations == 2  # one greedy step, one sampling step
    # Same batch and length bucket: the graph is reused, even with other prompts.
    generate(model, [[1, 2, 3], [4], [5, 6]], max_new_tokens=12, temperature=0, compile=True)
    assert decoder.compilations == 2
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(-3.0)  # an in-place update, as AdamW makes
    updated = generate(model, PROMPTS, max_new_tokens=12, temperature=0).tokens
    assert updated != free
    assert (
        generate(model, PROMPTS, max_new_tokens=12, temperature=0, compile=True).tokens == updated
    )
    assert decoder.compilations == 3
    other = tiny_model(2, seed=1)  # same shapes, other weights: never served model's graph
    other_eager = generate(other, PROMPTS, max_new_tokens=12, temperature=0).tokens
    assert other_eager != updated
    assert generate(other, PROMPTS, max_new_tokens=12, temperature=0, compile=True).tokens == (
        other_eager
    )
    assert bucket_length(1) == bucket_length(64) == 64 and bucket_length(65) == 128
