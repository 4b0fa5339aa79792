"""Checkpoint I/O that streams: the lazy readers and the shard writer, then their host memory
measured on a model of about 97M parameters.

Each measurement runs in a fresh process (``helpers/memory_probe.py``, whose docstring defines
the two measures: ``hwm``, the exact peak resident set over the phase's start, which includes
the pages of memory-mapped checkpoint files that were read; ``anon``, the sampled peak of
anonymous memory, i.e. copies). The bounds, with ``M`` the model's weight bytes, ``F`` the Meta
checkpoint's file bytes, ``T`` its largest tensor, ``S`` the export's shard size and ``B`` the
largest gathered unit (a block), plus 4 MiB for Python objects:

- reading the architecture touches no weight: ``hwm <= 4 MiB`` (the old path loaded the model);
- ``load_meta`` (a fresh model): ``anon <= M + 2T`` (the model and the merged tensor being
  converted) and ``hwm <= M + F + 2T``: no second copy of the weights;
- loading into a model that already exists, one parameter at a time (what rank 0 does under
  ZeRO-3 inside ``GatheredParameters``, and every process in the unsharded stages):
  ``anon <= 2T`` and ``hwm <= F + 2T``, where the old path read the whole model first (``+M``);
- the export of an FSDP2 model, gathered unit by unit into shards of ``S``: ``anon`` and
  ``hwm <= S + 2B``, where the old path made a whole consolidated copy (``+M``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.memory_probe import PROBE_CONFIG
from omegaconf import OmegaConf

from llamalab.checkpoint import CheckpointError, load_model, save_hf, save_meta
from llamalab.checkpoint.lazy import LazyCheckpoint
from llamalab.checkpoint.loader import checkpoint_config
from llamalab.checkpoint.meta import MetaCheckpoint
from llamalab.checkpoint.shards import parse_size
from llamalab.model import ConfigError, Llama, LlamaConfig, LlamaScalar
from llamalab.runner.run import export_shard_size

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "helpers" / "memory_probe.py"
MIB = 2**20
SLACK = 4 * MIB
SHARD = "32MB"


def probe(*args: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "MALLOC_MMAP_THRESHOLD_": "65536",  # freed tensors go back to the system at once
        "PROBE_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def within(measured: int | None, bound: int, what: str) -> None:
    if measured is not None:  # hwm is None where /proc/self/clear_refs cannot be written
        assert measured <= bound, f"{what}: {measured / MIB:.1f} MiB > {bound / MIB:.1f} MiB"


@pytest.mark.slow
def test_meta_import_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Llama(PROBE_CONFIG)
    model.init_weights()
    save_meta(model, tmp_path / "meta", n_shards=2, dtype=torch.bfloat16)  # like Meta's release
    del model
    file_bytes = sum(p.stat().st_size for p in (tmp_path / "meta").glob("consolidated.*.pth"))
    r = probe("import", str(tmp_path / "meta"))
    m, t = r["model_bytes"], r["largest_tensor_bytes"]
    assert m > 180 * MIB and t < m / 10  # the model is large beside its largest tensor
    within(r["config"]["hwm"], SLACK, "architecture")
    within(r["config"]["anon"], SLACK, "architecture (anonymous)")
    within(r["load"]["anon"], m + 2 * t + SLACK, "load_meta (anonymous)")
    within(r["load"]["hwm"], m + file_bytes + 2 * t + SLACK, "load_meta")
    within(r["fill"]["anon"], 2 * t + SLACK, "fill in place (anonymous)")
    within(r["fill"]["hwm"], file_bytes + 2 * t + SLACK, "fill in place")


@pytest.mark.slow
def test_sharded_export_holds_one_shard_not_the_model(tmp_path: Path) -> None:
    r = probe("export", str(tmp_path / "export"), SHARD)
    assert r["equal"], "the export differs from the model's weights"
    m, b, s = r["model_bytes"], r["largest_block_bytes"], parse_size(SHARD)
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(list((tmp_path / "export").glob("*.safetensors"))) > m // s
    assert index["metadata"]["total_size"] == m
    assert all((tmp_path / "export" / f).stat().st_size <= s + 4096 for f in files)  # + header
    bound = s + 2 * b + SLACK
    assert bound < m / 4
    within(r["export"]["anon"], bound, "export (anonymous)")
    within(r["export"]["hwm"], bound, "export")


# ---------------------------------------------------------------------------- the pieces, small
def small_model(cls: type = Llama, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = cls(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                            multiple_of=16, max_seq_len=64))  # fmt: skip
    model.init_weights(std=0.1)
    return model.eval()


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_checkpoint_reads_tensors_and_rows_lazily(tmp_path: Path, n_shards: int) -> None:
    model = small_model()
    save_meta(model, tmp_path / "meta", n_shards=n_shards)
    ckpt = MetaCheckpoint(tmp_path / "meta", max_seq_len=64)  # params.json has no context size
    assert ckpt.config == model.config and set(ckpt) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert ckpt.shape(name) == tuple(tensor.shape), name
        assert torch.equal(ckpt[name], tensor), name
        rows = tensor.shape[0]
        for start, stop in ((0, rows), (1, rows // 2 + 1), (rows // 3, rows)):
            assert torch.equal(ckpt.rows(name, start, stop), tensor[start:stop]), name
    lazy = LazyCheckpoint(tmp_path / "meta")  # what a sharded load reads from
    assert lazy.config == replace(model.config, max_seq_len=4096) and lazy.head == "lm"
    assert torch.equal(lazy.rows("layers.1.attention.wk.weight", 3, 11),
                       model.layers[1].attention.wk.weight[3:11])  # fmt: skip


def test_hf_rows_and_the_architecture_of_every_format(tmp_path: Path) -> None:
    model = small_model()
    save_hf(model, None, tmp_path / "hf", max_shard_size="20KB")
    lazy = LazyCheckpoint(tmp_path / "hf")
    name = "layers.0.feed_forward.w1.weight"
    assert torch.equal(lazy.rows(name, 5, 40), model.get_parameter(name)[5:40])
    save_meta(model, tmp_path / "meta", n_shards=2)
    for path in (tmp_path / "hf", tmp_path / "meta"):
        assert checkpoint_config(path).to_dict() == load_model(path).config.to_dict(), path
    header = {"llamalab": {"model_config": model.config.to_dict(), "head": "lm"}}
    torch.save({**header, "state_dict": {}}, tmp_path / "weightless.ckpt")
    assert checkpoint_config(tmp_path / "weightless.ckpt") == model.config  # header only


def test_export_streams_given_tensors_and_refuses_a_wrong_set(tmp_path: Path) -> None:
    model = small_model(LlamaScalar)
    state = model.state_dict()
    save_hf(model, None, tmp_path / "rm", max_shard_size="16KB", tensors=iter(state.items()))
    index = json.loads((tmp_path / "rm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and "score.weight" in index["weight_map"]
    assert not list((tmp_path / "rm").glob("*.part"))
    back = load_model(tmp_path / "rm")
    assert isinstance(back, LlamaScalar)
    assert all(torch.equal(back.state_dict()[n], t) for n, t in state.items())
    partial = [(n, t) for n, t in state.items() if n != "norm.weight"]
    with pytest.raises(CheckpointError, match=r"tensors missing: \['norm.weight'\]"):
        save_hf(model, None, tmp_path / "bad", tensors=iter(partial))
    with pytest.raises(CheckpointError, match=r"unexpected or repeated tensor output\.weight"):
        save_hf(
            model, None, tmp_path / "bad", tensors=iter([("output.weight", state["score.weight"])])
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # nothing half-written left


def test_an_interrupted_export_leaves_the_previous_one(tmp_path: Path) -> None:
    old, new = small_model(seed=0), small_model(seed=1)
    save_hf(old, None, tmp_path / "export")

    def dies_half_way():  # a gather that fails after some shards were written
        for i, item in enumerate(new.state_dict().items()):
            if i == 10:
                raise RuntimeError("rank 1 died")
            yield item

    with pytest.raises(RuntimeError, match="rank 1 died"):
        save_hf(new, None, tmp_path / "export", max_shard_size="8KB", tensors=dies_half_way())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    back = load_model(tmp_path / "export").state_dict()
    assert all(torch.equal(back[n], t) for n, t in old.state_dict().items())


@pytest.mark.parametrize("value, expected", [("5GB", 5 * 10**9), ("200KB", 200_000),
                                             ("2GiB", 2 * 2**30), (1000, 1000)])  # fmt: skip
def test_export_shard_size_from_the_config(value: object, expected: int) -> None:
    assert export_shard_size(OmegaConf.create({"export": {"max_shard_size": value}})) == expected
    assert export_shard_size(OmegaConf.create({})) == 5 * 10**9  # the Hugging Face default


@pytest.mark.parametrize("value", ["5 gigs", "0", -3, True])
def test_a_bad_export_shard_size_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"export\.max_shard_size="):
        export_shard_size(OmegaConf.create({"export": {"max_shard_size": value}}))
