"""Checkpoint interop: Meta shards, Hugging Face exports, our Lightning / distributed checkpoints.

Every checkpoint here is written by the test itself from random weights (no downloads). Meta's
format is checked against an independent re-implementation of Meta's forward pass (complex RoPE
on adjacent pairs), so the wq/wk row permutation is verified, not just round-tripped.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import lazy_import

from llamalab.checkpoint import (
    CheckpointError,
    load_backbone_into,
    load_hf,
    load_meta,
    load_model,
    load_state_into,
    save_hf,
    save_meta,
)
from llamalab.checkpoint import shards as shards_module
from llamalab.checkpoint.hf import to_hf_state_dict
from llamalab.checkpoint.meta import halves_to_interleaved, interleaved_to_halves
from llamalab.model import Llama, LlamaConfig, LlamaScalar

# Imported on first use by the tests that compare with transformers, not by the others; a dev
# dependency, so without it those tests fail instead of the whole file being skipped (README).
transformers = lazy_import("transformers")

VOCAB = 128


def tiny_config(n_kv_heads: int | None = 2, **overrides) -> LlamaConfig:
    values = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=VOCAB, multiple_of=16,
        max_seq_len=64,
    )  # fmt: skip
    return LlamaConfig(**{**values, **overrides})


def tiny_model(cls=Llama, seed: int = 0, **overrides) -> Llama | LlamaScalar:
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = cls(tiny_config(**overrides))
    model.init_weights(std=0.1)  # larger than 0.02 so that logits differ visibly between tokens
    return model.eval()


def tokens(batch: int = 2, length: int = 12, seed: int = 1, low: int = 3) -> torch.Tensor:
    """Random ids in ``[low, VOCAB)``: never 0 (the pad id) nor BOS/EOS."""
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- Meta's forward pass, re-implemented from llama/model.py (interleaved RoPE) ---------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _meta_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's ``apply_rotary_emb``: adjacent pairs as complex numbers. x: (B, T, H, hd)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3)


def meta_reference_logits(state: dict, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of Meta's ``Transformer.forward`` on a merged Meta-layout state dict."""
    dim, n_heads, eps = params["dim"], params["n_heads"], params["norm_eps"]
    n_kv = params.get("n_kv_heads", n_heads)
    hd, (B, T) = dim // n_heads, ids.shape
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    angles = torch.outer(torch.arange(T).float(), freqs)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    causal = torch.full((T, T), float("-inf")).triu(1)
    h = state["tok_embeddings.weight"][ids]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = _rms(h, state[p + "attention_norm.weight"], eps)
        q = (x @ state[p + "attention.wq.weight"].T).view(B, T, n_heads, hd)
        k = (x @ state[p + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (x @ state[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = _meta_rope(q, freqs_cis), _meta_rope(k, freqs_cis)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)  # Meta's repeat_kv
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + causal
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, dim)
        h = h + out @ state[p + "attention.wo.weight"].T
        x = _rms(h, state[p + "ffn_norm.weight"], eps)
        gate = F.silu(x @ state[p + "feed_forward.w1.weight"].T) * (
            x @ state[p + "feed_forward.w3.weight"].T
        )
        h = h + gate @ state[p + "feed_forward.w2.weight"].T
    return _rms(h, state["norm.weight"], eps) @ state["output.weight"].T


def read_meta_shards_by_hand(path: Path) -> tuple[dict, dict]:
    """Merge shards with PAPER.md's rules written out here, independently of meta.py."""
    params = json.loads((path / "params.json").read_text())
    shards = [torch.load(p, weights_only=True) for p in sorted(path.glob("consolidated.*.pth"))]
    merged = {}
    for name in shards[0]:
        if name == "rope.freqs":
            continue
        pieces = [s[name] for s in shards]
        if "norm" in name:
            merged[name] = pieces[0]
        elif name.startswith("tok_embeddings") or name.endswith(("wo.weight", "w2.weight")):
            merged[name] = torch.cat(pieces, dim=1)
        else:
            merged[name] = torch.cat(pieces, dim=0)
    return merged, params


def hf_twin(model: Llama) -> torch.nn.Module:
    """A ``transformers.LlamaForCausalLM`` holding ``model``'s weights."""
    cfg = {
        k: v
        for k, v in model.config.to_hf_config().items()
        if k not in ("architectures", "model_type", "torch_dtype")
    }
    twin = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    twin.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return twin


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A small LLaMA-style SentencePiece model trained on stdlib prose (400 pieces)."""
    from pydoc_data.topics import topics

    from llamalab.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer.train(list(topics.values())[:10], path, vocab_size=400)


# ---- Meta ---------------------------------------------------------------------------------------
def test_meta_permutation_is_the_hf_conversion_permute():
    """Row 2i of a head goes to row i, row 2i+1 to i + head_dim/2; the inverse undoes it."""
    w = torch.arange(2 * 8).float().view(2 * 8, 1)  # 2 heads, head_dim 8, one column
    halves = interleaved_to_halves(w, n_heads=2).flatten().tolist()
    assert halves == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(w, 2), 2), w)


@pytest.mark.parametrize(
    "n_kv_heads, n_shards",
    [(2, 1), (2, 2), (None, 4), (1, 1)],
    ids=["gqa1", "gqa2", "mha4", "mqa1"],
)
def test_meta_checkpoint_matches_meta_forward_ours_and_hf(tmp_path, n_kv_heads, n_shards):
    model = tiny_model(n_kv_heads=n_kv_heads)
    save_meta(model, tmp_path / "meta", n_shards=n_shards)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["vocab_size"] == -1  # like Meta's release: read from the embedding
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == n_shards

    ids = tokens()
    with torch.no_grad():
        expected = model(ids)
        merged, params = read_meta_shards_by_hand(tmp_path / "meta")
        reference = meta_reference_logits(merged, {**params, "n_kv_heads": n_kv_heads or 4}, ids)
        loaded = load_meta(tmp_path / "meta")
        twin = hf_twin(loaded)
        assert (reference - expected).abs().max() <= 1e-4
        assert torch.equal(loaded(ids), expected)
        assert (twin(ids).logits - expected).abs().max() <= 1e-4
    assert loaded.config.vocab_size == VOCAB and loaded.config.kv_heads == (n_kv_heads or 4)
    assert isinstance(load_model(tmp_path / "meta"), Llama)


def test_meta_shards_are_memory_light_and_checked(tmp_path):
    model = tiny_model(n_kv_heads=2)
    save_meta(model, tmp_path / "meta", n_shards=2)
    shard1 = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert shard1["tok_embeddings.weight"].shape == (VOCAB, 32)  # split along dim 1
    assert shard1["layers.0.attention.wk.weight"].shape == (16, 64)  # one whole KV head
    assert shard1["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel
    assert "rope.freqs" in shard1
    shard1["norm.weight"] = shard1["norm.weight"] + 1  # replicated tensors must agree
    torch.save(shard1, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"replicated tensor norm\.weight differs"):
        load_meta(tmp_path / "meta")


def test_save_meta_refuses_shards_that_split_a_kv_head(tmp_path):
    with pytest.raises(CheckpointError, match="n_kv_heads = 1"):
        save_meta(tiny_model(n_kv_heads=1), tmp_path / "meta", n_shards=2)
    assert not (tmp_path / "meta").exists()


# ---- Hugging Face -------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_save_hf_loads_in_transformers_and_back(tmp_path, n_kv_heads):
    model = tiny_model(n_kv_heads=n_kv_heads, rope_theta=500.0)  # a non-default theta travels
    save_hf(model, None, tmp_path / "hf")
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors"]
    ids = tokens()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-4
        assert torch.equal(back(ids), model(ids))
    # HF states the FFN size explicitly (intermediate_size) instead of Meta's rounding rule
    assert back.config == replace(
        model.config, multiple_of=256, ffn_hidden_dim=model.config.hidden_dim
    )


def test_sharded_safetensors_with_index(tmp_path):
    model = tiny_model()
    save_hf(model, None, tmp_path / "hf", max_shard_size=40_000)  # bytes: several shards
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == 4 * model.config.num_params()
    ids = tokens()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() <= 1e-4
        assert torch.equal(load_hf(tmp_path / "hf")(ids), model(ids))


def test_scalar_model_exports_as_sequence_classification(tmp_path):
    model = tiny_model(LlamaScalar)
    save_hf(model, None, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] != config["eos_token_id"]
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    theirs.eval()
    assert theirs.config.num_labels == 1

    ids = tokens(batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0  # right padding with the pad id
    padded = ids.masked_fill(mask == 0, config["pad_token_id"])
    with torch.no_grad():
        ours_plain = model.score_sequences(ids)
        assert (theirs(ids).logits.squeeze(-1) - ours_plain).abs().max() <= 1e-4
        ours = model.score_sequences(padded, mask)
        hf_scores = theirs(padded, attention_mask=mask).logits.squeeze(-1)
        assert (hf_scores - ours).abs().max() <= 1e-4
        back = load_model(tmp_path / "rm")
        assert isinstance(back, LlamaScalar)
        assert torch.equal(back.score_sequences(padded, mask), ours)


def test_tokenizer_export_loads_as_llama_tokenizer(tmp_path, sp_tokenizer):
    model = tiny_model(vocab_size=sp_tokenizer.vocab_size)
    save_hf(model, sp_tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(hf_tok).__name__.startswith("LlamaTokenizer")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (sp_tokenizer.bos_id, sp_tokenizer.eos_id)
    assert hf_tok.pad_token_id == sp_tokenizer.pad_id != sp_tokenizer.eos_id
    text = "The import statement finds a module, 42 times."
    assert hf_tok(text)["input_ids"] == sp_tokenizer.encode(text, bos=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["bos_token_id"] == generation["bos_token_id"] == sp_tokenizer.bos_id
    assert (generation["temperature"], generation["top_p"]) == (0.6, 0.9)  # Meta's defaults


def test_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, sp_tokenizer):
    with pytest.raises(CheckpointError, match="400 pieces but the model's vocabulary is 128"):
        save_hf(tiny_model(), sp_tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_failed_save_keeps_the_previous_export(tmp_path, monkeypatch):
    old = tiny_model(seed=0)
    save_hf(old, None, tmp_path / "export")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(shards_module, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_hf(tiny_model(seed=1), None, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left behind
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "export")(ids), old(ids))

    monkeypatch.undo()
    new = tiny_model(seed=1)
    save_hf(new, None, tmp_path / "export")  # a successful save replaces it
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "export")(ids), new(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# ---- errors -------------------------------------------------------------------------------------
def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    small = tiny_model(n_kv_heads=None)
    big = tiny_model(n_kv_heads=None, n_heads=2, dim=128)
    with pytest.raises(CheckpointError) as err:
        load_state_into(big, small.state_dict(), "ckpt.pt")
    message = str(err.value)
    assert message.startswith("checkpoint ckpt.pt: ")
    assert "tensor layers.0.attention.wq.weight has shape (64, 64), model expects (128, 128)" in (
        message
    )

    save_hf(small, None, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "hf")
    message = str(err.value)
    assert message.startswith(f"checkpoint {tmp_path / 'hf'}: ")
    assert "tensor layers.1.feed_forward.w1.weight has shape (176, 64), model expects (96, 64)" in (
        message
    )


def test_missing_and_unexpected_names_are_listed():
    model = tiny_model()
    state = dict(model.state_dict())
    del state["layers.1.ffn_norm.weight"]
    state["layers.9.attention.wq.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        load_state_into(model, state, "x")
    assert "missing tensors: layers.1.ffn_norm.weight" in str(err.value)
    assert "unexpected tensors: layers.9.attention.wq.weight" in str(err.value)


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json.*params\.json.*\.ckpt"):
        load_model(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "notes.txt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a llamalab training checkpoint"):
        load_model(tmp_path / "foreign.ckpt")


# ---- our training checkpoints -------------------------------------------------------------------
def lightning_checkpoint(model, prefix: str = "model.", extra_state: dict | None = None) -> dict:
    """The dict a LightningModule of ours saves (docs/interfaces.md, checkpoint contract)."""
    head = "scalar" if isinstance(model, LlamaScalar) else "lm"
    state = {prefix + k: v for k, v in model.state_dict().items()}
    return {
        "epoch": 0,
        "global_step": 3,
        "state_dict": {**state, **(extra_state or {})},
        "optimizer_states": [],
        "hyper_parameters": {"lr": 3e-4},
        "llamalab": {"model_config": model.config.to_dict(), "head": head, "prefix": prefix},
    }


def test_lightning_ckpt_loads_by_contract(tmp_path):
    from omegaconf import OmegaConf

    model = tiny_model()
    ckpt = lightning_checkpoint(model)
    ckpt["hyper_parameters"] = OmegaConf.create({"lr": 3e-4})  # not loadable with weights_only
    torch.save(ckpt, tmp_path / "last.ckpt")
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "last.ckpt")(ids), model(ids))

    # PPO: the policy under "actor.", next to a value model and a compiled-module prefix.
    policy, critic = tiny_model(seed=3), tiny_model(LlamaScalar, seed=4)
    others = {"critic." + k: v for k, v in critic.state_dict().items()}
    ckpt = lightning_checkpoint(policy, prefix="actor.", extra_state=others)
    ckpt["state_dict"] = {
        k.replace("actor.", "actor._orig_mod.", 1): v for k, v in ckpt["state_dict"].items()
    }
    torch.save(ckpt, tmp_path / "ppo.ckpt")
    loaded = load_model(tmp_path / "ppo.ckpt", dtype=torch.bfloat16)
    assert isinstance(loaded, Llama) and loaded.output.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.output.weight, policy.output.weight.bfloat16())

    ckpt = lightning_checkpoint(critic)
    del ckpt["llamalab"]["head"]  # without the record, the head is read from the weights
    torch.save(ckpt, tmp_path / "rm.ckpt")
    assert isinstance(load_model(tmp_path / "rm.ckpt"), LlamaScalar)


def test_distributed_checkpoint_directory(tmp_path):
    """The layout of Lightning's ModelParallelStrategy: DCP files + meta.pt with the rest."""
    import torch.distributed.checkpoint as dcp

    model = tiny_model()
    ckpt = lightning_checkpoint(model)
    state = {"state_dict": ckpt.pop("state_dict"), "optimizer_0": {"step": torch.tensor(3.0)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=tmp_path / "step=3.ckpt")
    torch.save(ckpt, tmp_path / "step=3.ckpt" / "meta.pt")
    ids = tokens()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        assert torch.equal(load_model(tmp_path / "step=3.ckpt")(ids), model(ids))


def test_run_directory_with_export(tmp_path):
    model = tiny_model()
    save_hf(model, None, tmp_path / "run" / "export")
    (tmp_path / "run" / "checkpoints").mkdir()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run")(ids), model(ids))


def test_reward_model_initialised_from_language_model():
    lm = tiny_model(seed=0)
    rm = tiny_model(LlamaScalar, seed=5)
    head_before = rm.score.weight.clone()
    load_backbone_into(rm, lm.state_dict())
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(rm.hidden_states(ids), lm.hidden_states(ids))
    assert torch.equal(rm.score.weight, head_before)
    with pytest.raises(CheckpointError, match=r"missing tensors: norm\.weight"):
        load_backbone_into(rm, {k: v for k, v in lm.state_dict().items() if k != "norm.weight"})


def test_deepspeed_directory_is_consolidated_with_zero_to_fp32(tmp_path, monkeypatch):
    """Lightning's DeepSpeed layout (``latest`` + tag folder). The partitioned states are
    gathered by DeepSpeed's own ``zero_to_fp32``, stubbed here: a real ZeRO-3 checkpoint needs
    a DeepSpeed run (covered by the scale tests); this checks the detection and plumbing."""
    from deepspeed.utils import zero_to_fp32  # a core dependency: never skipped

    model = tiny_model(LlamaScalar)
    ckpt = lightning_checkpoint(model)
    root = tmp_path / "epoch=0-step=3.ckpt"
    (root / "checkpoint").mkdir(parents=True)
    (root / "latest").write_text("checkpoint")
    client_state = {"module": None, "llamalab": ckpt["llamalab"], "global_steps": 3}
    torch.save(client_state, root / "checkpoint" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    gathered = {"_forward_module." + k: v for k, v in ckpt["state_dict"].items()}
    calls = []

    def fake_gather(checkpoint_dir, tag=None, **kwargs):
        calls.append(checkpoint_dir)
        return gathered

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", fake_gather)
    loaded = load_model(root)
    assert calls == [str(root)] and isinstance(loaded, LlamaScalar)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
