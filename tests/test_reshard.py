"""Resuming on another world size (``llamalab.runner.reshard``, the samplers' resume).

Unit tests: the data order on another number of ranks (pretraining windows and the resumable
sampler of the other stages), Lightning's batch counters rescaled, the detection of the saved
world size and the cache of a conversion.

Integration, the default pretraining job under ``deepspeed_zero3`` (2 processes -> 1 -> 2, one
chain of runs) and ``fsdp`` (2 -> 1), compared with an uninterrupted 2-process run:

- the universal conversion equals the checkpoint's own partitions exactly (fp32 weights, both
  Adam moments, the step);
- after each resumed step, weights, Adam moments and step counts equal the uninterrupted run's
  up to fp32 reduction order (another world size sums gradients in another order; the
  tolerances below are 10-100x the measured differences and 100-1000x below what one step,
  or moments lost, changes), the first losses of the 1 -> 2 resume equal the reference's, the
  2 -> 1 resume steps on the same global batches (tokens seen), and every checkpoint records
  the data position (windows consumed) that the uninterrupted run records.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import run_train
from lightning.pytorch.loops.progress import _BatchProgress

from llamalab.data.pretrain import PretrainDataModule, ResumableSampler
from llamalab.data.sampling import ResumableRandomSampler
from llamalab.runner.checkpoints import resume_candidates
from llamalab.runner.reshard import (
    LATEST_UNIVERSAL,
    STAMP,
    ReshardError,
    cached_universal,
    rescale_batch_progress,
    saved_dp_world,
    saved_world,
    source_stamp,
    to_universal,
)
from llamalab.tokenizer import Tokenizer

WEIGHTS_ATOL = 1e-6  # measured: 7.5e-9 (ZeRO-3), 1.2e-7 (FSDP); one step moves them ~1e-4
MOMENTS_RTOL = (
    1e-4  # of the tensor's max: measured <= 2.6e-7 (ZeRO-3), 7.7e-6 (FSDP); one step ~0.5
)
LOSS_RTOL = 1e-5  # measured: equal to the last bit


# ---------------------------------------------------------------------------- data order
def _fake_trainer(world: int, rank: int, processed: int = 0) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress))
    return SimpleNamespace(world_size=world, global_rank=rank, current_epoch=0, fit_loop=loop)


@pytest.fixture(scope="module")
def windows_module(tmp_path_factory: pytest.TempPathFactory, small_tok: Tokenizer):
    """A pretraining datamodule over a small text file: 2-rank-sized batches of 8-token windows."""
    root = tmp_path_factory.mktemp("windows")
    text = "\n\n".join(f"document {i} says {' '.join(['word'] * (i % 7 + 3))}." for i in range(60))
    (root / "corpus.txt").write_text(text)

    def make(batch_size: int) -> PretrainDataModule:
        dm = PretrainDataModule(
            path=str(root / "corpus.txt"),
            tokenizer_path=str(small_tok.model_path),
            seq_len=8,
            batch_size=batch_size,
            val_fraction=0.1,
            cache_dir=str(root / "cache"),
        )
        dm.setup("fit")
        return dm

    return make


def _windows(make, world: int, batch: int, state: dict | None, batches: int | None = None):
    """Window indices the ranks of ``world`` train (each rank's first ``batches`` batches, all
    when None), resumed from ``state``; and each rank's datamodule."""
    seen, modules = [], []
    for rank in range(world):
        dm = make(batch)
        dm.trainer = _fake_trainer(world, rank)  # type: ignore[assignment]
        if state:
            dm.load_state_dict(state)
        loader = dm.train_dataloader()
        per_rank = list(loader.batch_sampler)  # type: ignore[union-attr, arg-type]
        seen.extend(i for b in per_rank[:batches] for i in b)
        modules.append(dm)
    return seen, modules


@pytest.mark.parametrize(
    ("old_world", "new_world", "old_batch", "new_batch", "steps"),
    [(2, 1, 1, 1, 5), (1, 2, 1, 1, 6), (2, 3, 2, 1, 3), (4, 2, 1, 2, 2)],
)
def test_pretraining_windows_resume_on_another_world_size(
    windows_module, old_world: int, new_world: int, old_batch: int, new_batch: int, steps: int
) -> None:
    """The windows before the interruption and after the resume on other ranks are the epoch
    once: none twice, none left out but the tail that cannot fill one batch on every rank."""
    make = windows_module
    before, modules = _windows(make, old_world, old_batch, None, batches=steps)
    dm = modules[0]
    n = len(dm.train_set)
    dm.trainer = _fake_trainer(old_world, 0, processed=steps)  # type: ignore[assignment]
    state = dm.state_dict()
    assert state["samples_consumed"] == len(before) == steps * old_batch * old_world
    after, _ = _windows(make, new_world, new_batch, state)
    assert len(set(before) | set(after)) == len(before) + len(after)  # nothing twice
    order = ResumableSampler(n, seed=dm.seed).global_order(0).tolist()
    epoch = order[: n // new_world * new_world]  # the new ranks' epoch (equal shards)
    assert order[: len(before)] == sorted(before, key=order.index)  # the old ranks took a prefix
    left_out = [w for w in epoch if w not in set(before) | set(after)]
    assert left_out == epoch[len(epoch) - len(left_out) :]  # only the epoch's tail ...
    assert len(left_out) < new_world * new_batch  # ... shorter than one batch per rank


def test_other_stages_sampler_resumes_on_another_world_size() -> None:
    """``ResumableRandomSampler`` (SFT, reward, PPO prompts): what the old ranks consumed never
    comes again, everything else comes; on the same world size the rest is exactly the
    uninterrupted ranks' rest."""
    for n, old, new in [(13, 2, 1), (13, 1, 2), (12, 3, 2), (7, 2, 3), (8, 4, 4)]:
        per_rank = math.ceil(n / old)
        for consumed in range(per_rank + 1):
            before = [i for r in range(old) for i in list(ResumableRandomSampler(n, 3, True, old, r))[:consumed]]  # fmt: skip
            state = {"seed": 3, "epoch": 0, "consumed": consumed, "num_replicas": old}
            after = []
            for rank in range(new):
                sampler = ResumableRandomSampler(n, 3, True, new, rank)
                sampler.load_state_dict(state)
                rest = list(sampler)
                after.append(rest)
                if old == new:
                    assert rest == list(ResumableRandomSampler(n, 3, True, old, rank))[consumed:]
            assert set(before) | {i for rest in after for i in rest} == set(range(n))
            # repeats only from padding to a multiple of the ranks (as in every epoch)
            assert len(before) + sum(map(len, after)) - n <= (old - 1) + (new - 1)
            assert len({len(rest) for rest in after}) == 1  # equal shares: no rank waits


def test_batch_counters_are_rescaled_to_the_new_ranks() -> None:
    progress = _BatchProgress()
    for tracker in (progress.total, progress.current):  # saved in on_train_batch_end
        tracker.ready = tracker.started = tracker.processed = 6
        tracker.completed = 5
    progress.total.ready = progress.total.started = progress.total.processed = 10
    progress.total.completed = 9
    rescale_batch_progress(progress, Fraction(2, 1))  # 2 ranks -> 1: twice the batches each
    assert (progress.current.processed, progress.current.completed) == (12, 11)
    assert (progress.total.processed, progress.total.completed) == (20, 19)
    rescale_batch_progress(progress, Fraction(1, 4))  # -> 4 ranks; 12 / 4 = 3 batches each
    assert (progress.current.ready, progress.current.processed, progress.current.completed) == (
        3,
        3,
        2,
    )


# ---------------------------------------------------------------------------- files and cache
def _fake_deepspeed(root: Path, ranks: int, tag: str = "checkpoint") -> Path:
    (root / tag).mkdir(parents=True)
    (root / "latest").write_text(tag)
    for r in range(ranks):
        (root / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x")
        (root / tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
    return root


def test_saved_world_size_is_read_from_the_files(tmp_path: Path) -> None:
    assert saved_dp_world(_fake_deepspeed(tmp_path / "ds", 3)) == 3
    dcp = tmp_path / "dcp"
    dcp.mkdir()
    for name in ("__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"):
        (dcp / name).write_bytes(b"x")
    assert saved_world(dcp) == 2 and saved_dp_world(dcp) is None
    (tmp_path / "one.ckpt").write_bytes(b"x")
    assert saved_world(tmp_path / "one.ckpt") is None


def test_a_cached_conversion_is_dropped_when_its_source_changes(tmp_path: Path) -> None:
    root = _fake_deepspeed(tmp_path / "last.ckpt", 2)
    cached = root / "checkpoint_universal"
    cached.mkdir()
    (cached / STAMP).write_text(json.dumps(source_stamp(root / "checkpoint")))
    assert cached_universal(root, "checkpoint") == cached
    (root / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"newer")
    assert cached_universal(root, "checkpoint") is None  # last.ckpt rewritten: convert again


def test_a_conversion_beside_a_checkpoint_does_not_make_it_the_newest(tmp_path: Path) -> None:
    """``ckpt_path=auto`` orders sharded checkpoints by when they were saved (their ``latest``),
    not by the directory's mtime, which the universal copy written into it later changes."""
    folder = tmp_path / "checkpoints"
    for step, saved in ((2, 1000.0), (4, 2000.0)):
        ckpt = folder / f"step00000{step}.ckpt"
        (ckpt / "checkpoint").mkdir(parents=True)
        (ckpt / "latest").write_text("checkpoint")
        os.utime(ckpt / "latest", (saved, saved))
    (
        folder / "step000002.ckpt" / "checkpoint_universal"
    ).mkdir()  # a resume from step 2 converted it
    assert [p.name for p in resume_candidates(tmp_path)] == ["step000004.ckpt", "step000002.ckpt"]


@pytest.mark.slow  # DeepSpeed's converter in a subprocess: a few seconds
def test_a_failed_conversion_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    root = _fake_deepspeed(tmp_path / "bad.ckpt", 2)
    with pytest.raises(ReshardError, match=r"could not convert .*bad.ckpt/checkpoint"):
        to_universal(root)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint", "latest"]


# ---------------------------------------------------------------------------- reading checkpoints
def read_zero3(ckpt: Path) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    """{parameter: {fp32, exp_avg, exp_avg_sq}} and the Adam step(s) of a ZeRO-3 checkpoint
    written by any number of ranks, rebuilt from its own partitions (each rank holds
    ``ceil(numel / ranks)`` elements of every parameter, in order; as DeepSpeed's zero_to_fp32)."""
    folder = ckpt / (ckpt / "latest").read_text().strip()
    rank = re.compile(r"zero_pp_rank_(\d+)_mp")
    files = sorted(folder.glob("*optim_states.pt"), key=lambda f: int(rank.search(f.name)[1]))  # type: ignore[index]
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]  # fmt: skip
    shapes = torch.load(
        folder / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )["param_shapes"]
    out: dict[str, dict[str, torch.Tensor]] = {}
    steps = set()
    for g, group in enumerate(shapes):
        flat = {"fp32": [s["fp32_flat_groups"][g] for s in states]}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = [s["optimizer_state_dict"]["state"][g][key] for s in states]
        steps |= {int(s["optimizer_state_dict"]["state"][g]["step"]) for s in states}
        offset = 0
        for name, shape in group.items():
            numel, size = math.prod(shape), math.ceil(math.prod(shape) / len(files))
            out[name] = {
                k: torch.cat([part[offset : offset + size] for part in v])[:numel].view(shape)
                for k, v in flat.items()
            }
            offset += size
    return out, steps


def read_universal(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    zero = folder / "zero"
    out = {
        p.name: {k: torch.load(p / f"{k}.pt", weights_only=False) for k in ("fp32", "exp_avg", "exp_avg_sq")}
        for p in zero.iterdir() if p.is_dir()
    }  # fmt: skip
    common = torch.load(zero / "optimizer_state.pt", weights_only=False)["optimizer_state_dict"]
    return out, {int(s["step"]) for s in common["state"].values()}


def read_dcp(ckpt: Path, tmp: Path) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
    """The same view of an FSDP2 (torch distributed checkpoint) directory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save  # lazy: FSDP test only

    dcp_to_torch_save(ckpt, tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt")
    full = torch.load(tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt", weights_only=False)
    optim = full["optimizer_0"]["state"]
    out = {name: {"fp32": w, **{k: optim[name][k] for k in ("exp_avg", "exp_avg_sq")}}
           for name, w in full["state_dict"].items()}  # fmt: skip
    return out, {int(s["step"]) for s in optim.values()}


def assert_same_state(got: tuple, ref: tuple, exact: bool = False) -> dict[str, float]:
    """Weights, both moments and the step of ``got`` against ``ref``; returns max |diff|s."""
    (a, steps_a), (b, steps_b) = got, ref
    assert steps_a == steps_b and len(steps_a) == 1, (steps_a, steps_b)
    assert a.keys() == b.keys()
    worst = {}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        diff = max((a[n][key].reshape(-1) - b[n][key].reshape(-1)).abs().max().item() for n in b)
        scale = max(b[n][key].abs().max().item() for n in b)
        bound = 0.0 if exact else (WEIGHTS_ATOL if key == "fp32" else MOMENTS_RTOL * scale)
        assert diff <= bound, f"{key}: max |diff| {diff:.3g} > {bound:.3g}"
        worst[key] = diff
    return worst


def client_state(ckpt: Path) -> dict:
    """Lightning's own state (loops, callbacks, datamodule) of a sharded checkpoint."""
    if (ckpt / "meta.pt").is_file():
        return torch.load(ckpt / "meta.pt", weights_only=False)
    tag = (ckpt / "latest").read_text().strip()
    return torch.load(ckpt / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)


def losses(run: Path) -> dict[int, tuple[float, float]]:
    """Logged step -> (train/loss, train/tokens_seen) of rank 0's last micro-batch of it."""
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): (float(r["train/loss"]), float(r["train/tokens_seen"])) for r in rows}


# ---------------------------------------------------------------------------- the runs
def pretrain(run: Path, cache: Path, devices: int, strategy: str, steps: int, *extra: str) -> Path:
    """The default pretraining job, shortened: 2-window global batches (one window per rank and
    micro-batch), ``steps`` steps, a checkpoint after every step."""
    args = [
        f"strategy={strategy}", f"trainer.devices={devices}", "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}", f"paths.output_dir={run}",
        f"paths.outputs_root={run.parent / 'outputs'}", "data.batch_size=1",
        "stage.batch_tokens=512", "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1", *extra,
    ]  # fmt: skip
    result = run_train(args, cache, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return run


def step_ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:06d}.ckpt"


@pytest.fixture(scope="module")
def zero3_chain(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """``straight``: 2 processes, 4 steps. ``one``: 1 process resumed from its step 1 to step 3.
    ``two``: 2 processes resumed from ``one``'s step 2 to step 4."""
    root = tmp_path_factory.mktemp("reshard_zero3")
    z3 = "deepspeed_zero3"
    straight = pretrain(root / "straight", cache_dir, 2, z3, 4)
    one = pretrain(root / "one", cache_dir, 1, z3, 3, f"ckpt_path={step_ckpt(straight, 1)}")
    two = pretrain(root / "two", cache_dir, 2, z3, 4, f"ckpt_path={step_ckpt(one, 2)}")
    return {"straight": straight, "one": one, "two": two}


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_universal_conversion_equals_the_partitions(zero3_chain: dict[str, Path]) -> None:
    for ckpt in (step_ckpt(zero3_chain["straight"], 1), step_ckpt(zero3_chain["one"], 2)):
        universal = ckpt / "checkpoint_universal"
        assert (ckpt / LATEST_UNIVERSAL).read_text() == universal.name
        assert cached_universal(ckpt, "checkpoint") == universal  # cached beside its source
        assert not list(ckpt.glob("*.tmp-*"))
        assert_same_state(read_universal(universal), read_zero3(ckpt), exact=True)


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_resumes_from_two_ranks_on_one_and_back(zero3_chain: dict[str, Path]) -> None:
    straight, one, two = zero3_chain["straight"], zero3_chain["one"], zero3_chain["two"]
    ref = losses(straight)
    for run, steps in ((one, (2, 3)), (two, (3, 4))):
        for step in steps:
            assert_same_state(
                read_zero3(step_ckpt(run, step)), read_zero3(step_ckpt(straight, step))
            )
            state, expected = (
                client_state(step_ckpt(run, step)),
                client_state(step_ckpt(straight, step)),
            )
            assert state["global_step"] == step
            # the data position: windows consumed in the epoch (2 per step), whatever the ranks
            assert state["PretrainDataModule"] == expected["PretrainDataModule"]
            assert state["PretrainDataModule"]["samples_consumed"] == 2 * step
            ranks = 1 if run is one else 2
            assert state["callbacks"]["llamalab.WorldSizeChange"] == {"world_size": ranks, "micro_batch": 1}  # fmt: skip
    # 2 -> 1: two micro-batches per step, on the same global batches (tokens seen per step)
    assert [tokens for _, tokens in losses(one).values()] == [ref[s][1] for s in (1, 2)]
    # 1 -> 2: rank 0 trains the window the uninterrupted rank 0 trained; losses equal
    got = losses(two)
    assert sorted(got) == [2, 3]
    for s in (2, 3):
        assert got[s][0] == pytest.approx(ref[s][0], rel=LOSS_RTOL) and got[s][1] == ref[s][1]


@pytest.fixture(scope="module")
def fsdp_pair(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """``straight``: FSDP2 on 2 processes, 2 steps; ``one``: 1 process resumed from its step 1."""
    root = tmp_path_factory.mktemp("reshard_fsdp")
    straight = pretrain(root / "straight", cache_dir, 2, "fsdp", 2)
    one = pretrain(root / "one", cache_dir, 1, "fsdp", 2, f"ckpt_path={step_ckpt(straight, 1)}")
    return {"straight": straight, "one": one, "tmp": root}


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_resumes_from_two_ranks_on_one(fsdp_pair: dict[str, Path]) -> None:
    """torch distributed checkpoint reshards by itself; Lightning creates the Adam state before
    loading it, and the batch counters follow the new ranks (two micro-batches per step)."""
    got = step_ckpt(fsdp_pair["one"], 2)
    ref = step_ckpt(fsdp_pair["straight"], 2)
    assert_same_state(read_dcp(got, fsdp_pair["tmp"]), read_dcp(ref, fsdp_pair["tmp"]))
    assert client_state(got)["PretrainDataModule"] == client_state(ref)["PretrainDataModule"]
