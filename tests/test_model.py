"""The backbone: exact sizes, config validation, parity with transformers, masks, RoPE, heads."""

from __future__ import annotations

import time

import pytest
import torch
from helpers import lazy_import

from llamalab.checkpoint.hf import from_hf_state_dict, to_hf_state_dict
from llamalab.model import (
    NAMED_CONFIGS,
    ConfigError,
    KVCache,
    Llama,
    LlamaConfig,
    LlamaScalar,
    last_token_values,
)

# Imported on first use by the tests that compare with transformers, not by the others; a dev
# dependency, so without it those tests fail instead of the whole file being skipped (README).
transformers = lazy_import("transformers")

VOCAB = 128
ATTENTION = {"mha": None, "gqa": 2, "mqa": 1}


def tiny_config(n_kv_heads: int | None = None, **overrides) -> LlamaConfig:
    values = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, multiple_of=16,
        max_seq_len=64,
    )  # fmt: skip
    return LlamaConfig(**{**values, **overrides})


def build(config: LlamaConfig, cls=Llama, seed: int = 0, std: float = 0.1):
    """Random weights with a larger std than training's 0.02, so logits vary visibly."""
    torch.manual_seed(seed)
    model = cls(config)
    model.init_weights(std=std)
    return model.eval()


def hf_config(config: LlamaConfig, **extra):
    cfg = config.to_hf_config(**extra)
    for key in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(key)
    return transformers.LlamaConfig(**cfg)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    """Ids in [3, VOCAB): never the pad id 0, BOS or EOS."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(ATTENTION), ids=sorted(ATTENTION))
def pair(request):
    """(ours, transformers' LlamaForCausalLM) with the same weights, for MHA, GQA and MQA."""
    ours = build(tiny_config(ATTENTION[request.param]))
    theirs = transformers.LlamaForCausalLM(hf_config(ours.config)).eval()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    return ours, theirs


# ---- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [("7b", 6_738_415_616), ("13b", 13_015_864_320), ("70b", 68_976_648_192)],
)
def test_paper_sizes_have_exact_parameter_counts(name, expected):
    """PAPER.md's table, counted on a model built on ``meta`` (no memory, well under 1 s).

    torch imports its meta-device kernels (``torch._refs``, about 3 s) on the first meta op of a
    process; a tiny build pays that once, outside the timing.
    """
    Llama.from_config(tiny_config(), device="meta")
    start = time.perf_counter()
    model = Llama.from_config(LlamaConfig.from_name(name), device="meta")
    count = sum(p.numel() for p in model.parameters())
    assert time.perf_counter() - start < 1.0
    assert count == expected == model.config.num_params()


def test_paper_ffn_sizes():
    assert [LlamaConfig.from_name(n).hidden_dim for n in ("7b", "13b", "70b")] == [
        11008,
        13824,
        28672,
    ]


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_num_params_matches_the_built_model(name):
    config = LlamaConfig.from_name(name)
    for cls, head in ((Llama, "lm"), (LlamaScalar, "scalar")):
        with torch.device("meta"):
            model = cls(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params(head), head


# ---- config validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dim": 66, "n_heads": 4}, "dim (66) must be divisible by n_heads (4)"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads (4) must be divisible by n_kv_heads (3)"),
        ({"dim": 0}, "dim must be a positive integer, got 0"),
        ({"n_layers": -2}, "n_layers must be a positive integer, got -2"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer or None, got 0"),
        ({"dim": 12, "n_heads": 4}, "head_dim = dim / n_heads = 3 must be even for RoPE"),
    ],
)
def test_invalid_configs_give_one_clear_message(overrides, message):
    with pytest.raises(ConfigError) as err:
        tiny_config(**overrides)
    assert str(err.value) == f"invalid LlamaConfig: {message}"


def test_hf_config_round_trip():
    for config in (tiny_config(2, rope_theta=500.0), LlamaConfig.from_name("70b")):
        theirs = hf_config(config).to_dict()
        back = LlamaConfig.from_hf_config(theirs)
        assert back.hidden_dim == config.hidden_dim and back.kv_heads == config.kv_heads
        assert (back.dim, back.n_layers, back.n_heads, back.vocab_size) == (
            config.dim,
            config.n_layers,
            config.n_heads,
            config.vocab_size,
        )
        assert (back.rope_theta, back.norm_eps, back.max_seq_len) == (
            config.rope_theta,
            config.norm_eps,
            config.max_seq_len,
        )
        assert back.num_params() == config.num_params()


# ---- parity with transformers -------------------------------------------------------------------
def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids = random_ids(3, 20)
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_transformers_weights_load_into_ours():
    for n_kv_heads in ATTENTION.values():
        torch.manual_seed(2)
        config = tiny_config(n_kv_heads)
        theirs = transformers.LlamaForCausalLM(hf_config(config)).eval()
        ours = Llama(config).eval()
        ours.load_state_dict(from_hf_state_dict(theirs.state_dict()), strict=True)
        ids = random_ids(2, 16)
        with torch.no_grad():
            assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4


def test_left_padded_batch_matches_transformers(pair):
    ours, theirs = pair
    ids = random_ids(3, 20)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers needs them; ours derives them
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert (got[real] - want[real]).abs().max() <= 1e-4
        alone = ours(ids[0:1, 5:])  # the padded row equals the same prompt unpadded
        assert (got[0, 5:] - alone[0]).abs().max() <= 1e-4


def test_packed_row_equals_each_sample_alone():
    model = build(tiny_config(2))
    a, b, c = random_ids(1, 7, seed=1), random_ids(1, 5, seed=2), random_ids(1, 4, seed=3)
    packed = torch.cat([a, b, c], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5 + [2] * 4])
    positions = torch.cat([torch.arange(7), torch.arange(5), torch.arange(4)])[None]
    with torch.no_grad():
        got = model(packed, segment_ids=segments, position_ids=positions)
        parts = [model(a), model(b), model(c)]
    assert (got - torch.cat(parts, dim=1)).abs().max() <= 1e-5


# ---- RoPE, initialisation, cache ----------------------------------------------------------------
def test_rope_tables_are_not_saved_and_extend_past_max_seq_len():
    config = tiny_config(2, max_seq_len=16)
    model = build(config)
    assert not any("rope" in name for name in model.state_dict())
    assert model.rope.cos.shape == (16, config.head_dim)
    ids = random_ids(1, 40)
    theirs = transformers.LlamaForCausalLM(hf_config(replace_len(config, 64))).eval()
    theirs.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        got = model(ids)
        assert model.rope.cos.shape[0] >= 40
        assert (got - theirs(ids).logits).abs().max() <= 1e-4
        assert (got[:, :16] - model(ids[:, :16])).abs().max() <= 1e-5


def replace_len(config: LlamaConfig, length: int) -> LlamaConfig:
    return LlamaConfig.from_dict({**config.to_dict(), "max_seq_len": length})


def test_meta_build_then_materialise_and_init_is_finite():
    model = Llama.from_config(tiny_config(2), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    logits = model(random_ids(2, 10))
    assert torch.isfinite(logits).all() and logits.dtype == torch.float32
    norm = model.layers[0].attention_norm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    wo_std = model.layers[0].attention.wo.weight.std().item()
    assert wo_std == pytest.approx(0.02 / (2 * 2) ** 0.5, rel=0.2)  # scaled by 1/sqrt(2 layers)


def test_kv_cache_shows_the_gqa_saving():
    sizes = {kind: tiny_config(kv).kv_cache_bytes_per_token() for kind, kv in ATTENTION.items()}
    assert sizes["mha"] == 2 * 2 * 4 * 16 * 2  # K and V x layers x heads x head_dim x bf16
    assert sizes["mha"] / sizes["gqa"] == 2 and sizes["mha"] / sizes["mqa"] == 4
    for kind, kv in ATTENTION.items():
        cache = KVCache.allocate(tiny_config(kv), batch_size=3, max_len=10, dtype=torch.bfloat16)
        assert cache.bytes_per_token == sizes[kind]
        assert (cache.k.nbytes + cache.v.nbytes) == sizes[kind] * 3 * 10
    # 70B with 8 KV heads stores 8x less than it would with MHA: 320 KiB per token in bf16.
    big = LlamaConfig.from_name("70b")
    assert big.kv_cache_bytes_per_token() == 327_680
    assert LlamaConfig.from_name("70b", n_kv_heads=None).kv_cache_bytes_per_token() == 8 * 327_680


# ---- scalar head --------------------------------------------------------------------------------
def test_last_token_values_ignore_padding_side_and_batch_mates():
    model = build(tiny_config(2), cls=LlamaScalar)
    seqs = [random_ids(1, n, seed=n)[0] for n in (6, 9, 4)]
    with torch.no_grad():
        alone = torch.stack([model.score_sequences(s[None])[0] for s in seqs])
        for side in ("left", "right"):
            ids = torch.zeros((3, 9), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                span = slice(9 - len(s), 9) if side == "left" else slice(0, len(s))
                ids[row, span], mask[row, span] = s, 1
            batched = model.score_sequences(ids, mask)
            assert (batched - alone).abs().max() <= 1e-5, side
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_values(values, mask).tolist() == [2.0, 6.0]
