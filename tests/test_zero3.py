"""ZeRO-3 on 2 CPU processes, for real: partitioned building and loading, the gathered copy
(export and generation), the lockstep fallback; then whole runs through ``src/train.py`` under
ddp, fsdp and deepspeed_zero3: one step's loss equals the single-process run's, the consolidated
export equals the weights in the shards, and a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import compose_config, lazy_import, run_train
from helpers.rlhf import tiny_config

from llamalab.checkpoint import load_model
from llamalab.model import Llama
from llamalab.runner.run import architecture
from llamalab.scale.plan_cfg import plan_from_config
from llamalab.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
EXT_DIR = str(REPO / ".cache" / "torch_extensions")  # DeepSpeed's shm_comm, compiled once
EXPORT_SHARD = "60KB"  # below the tiny models' embedding (64 KiB): one shard per unit or so
transformers = lazy_import("transformers")
pytestmark = [pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- in-process ZeRO-3
def _zero3_worker(rank: int, world: dict[str, str], port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_PORT=str(port),
                      MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    from llamalab.checkpoint import save_hf
    from llamalab.generation import generate
    from llamalab.scale.build import build_pretrained, full_shape
    from llamalab.scale.zero_gen import LockstepModel, consolidated, host_tensors, sharded_forwards
    from llamalab.stages.ppo_config import actor_parameters

    deepspeed.init_distributed("gloo")
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3,
           "stage3_param_persistence_threshold": 0}}  # fmt: skip
    with deepspeed.zero.Init(config_dict_or_path=cfg):  # what Lightning wraps configure_model in
        models = {
            "actor": build_pretrained(world["sft"], "lm", "zero3", trainable=True),
            "reference": build_pretrained(world["sft"], "lm", "zero3", trainable=False),
            "reward": build_pretrained(world["rm"], "scalar", "zero3", trainable=False),
            "critic_from_lm": build_pretrained(world["sft"], "scalar", "zero3", trainable=True),
        }
    parts = {}
    for role, model in models.items():
        for name, p in model.named_parameters():
            full = torch.Size(full_shape(p)).numel()
            # each rank holds ceil(numel / 2) elements (its partition), never the whole tensor
            parts[f"{role}.{name}"] = (p.ds_tensor.numel(), full, p.numel())
    counts = {role: (actor_parameters(m), sum(p.numel() for p in m.parameters()))
              for role, m in models.items()}  # fmt: skip
    # Outside any engine (rejection sampling's frozen models): forwards gather unit by unit.
    ids = torch.tensor(SCORED[rank])
    with torch.no_grad(), sharded_forwards([models["reward"], models["reference"]], "zero3"):
        sharded = (models["reward"](ids), models["reference"](ids))
    assert all(p.numel() == 0 for p in models["reward"].parameters())  # released after
    engine, *_ = deepspeed.initialize(model=torch.nn.ModuleDict(models), config=cfg,
                                      model_parameters=[])  # fmt: skip
    actor = engine.module["actor"].eval()
    prompts = [[1, 5, 9, 11], [1, 7]] if rank == 0 else [[1, 4, 4]]
    with torch.no_grad(), consolidated(actor, "zero3") as copy:
        fast = generate(copy, prompts, 6, temperature=0.0, eos_id=None).tokens  # type: ignore[arg-type]
        state = {k: v.clone() for k, v in copy.state_dict().items()}  # type: ignore[union-attr]
    lockstep = LockstepModel(actor)
    with torch.no_grad():
        # rank 1 stops after 2 tokens: rank 0's longer generation must not hang
        slow = generate(lockstep, prompts, 6 if rank == 0 else 2, temperature=0.0).tokens  # type: ignore[arg-type]
    lockstep.finish()
    with consolidated(engine.module["reward"], "zero3", rank0_only=True) as rm_copy:
        rm_state = None if rm_copy is None else rm_copy.state_dict()
    for role in ("actor", "reward"):  # the export's path: streamed, small shards, rank 0 writes
        tensors = host_tensors(engine.module[role], "zero3", keep=rank == 0)
        if rank == 0:
            save_hf(engine.module[role], None, f"{out}/{role}_hf", max_shard_size=EXPORT_SHARD,
                    tensors=tensors)  # fmt: skip
        for _ in tensors:  # rank 1 takes part in every gather
            pass
    torch.save({"parts": parts, "counts": counts, "sharded": sharded, "fast": fast, "slow": slow, "actor": state, "rm": rm_state,
                "out": out}, f"{out}/rank{rank}.pt")  # fmt: skip


SCORED = ([[1, 5, 9, 11], [1, 7, 7, 3]], [[1, 4, 4, 2]])  # each rank's rows, different


@pytest.fixture(scope="module")
def world(tiny_checkpoints: dict) -> dict[str, str]:
    return {
        "tokenizer": str(tiny_checkpoints["tokenizer"].model_path),
        "sft": str(tiny_checkpoints["sft"]),
        "rm": str(tiny_checkpoints["rm"]),
    }


@pytest.fixture(scope="module")
def zero3_results(world: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("z3_out")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", EXT_DIR)
    mp.spawn(_zero3_worker, args=(world, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_each_rank_holds_only_its_half_of_every_parameter(zero3_results: list[dict]) -> None:
    for result in zero3_results:
        assert len(result["parts"]) > 4 * 10  # four models, every parameter
        for name, (local, full, visible) in result["parts"].items():
            assert local == -(-full // 2), name  # ceil(full / 2): a partition, not the tensor
            assert visible == 0, name  # outside a gather the parameter holds nothing


@pytest.mark.slow
def test_parameter_counts_are_the_true_ones_under_zero3(
    zero3_results: list[dict], world: dict[str, str]
) -> None:
    """What ``kl_coef: null`` sizes beta by: the actor's true count, not the 0 a partitioned
    parameter's ``numel()`` reads."""
    expected = sum(p.numel() for p in load_model(world["sft"]).parameters())
    for result in zero3_results:
        true, naive = result["counts"]["actor"]
        assert (true, naive) == (expected, 0)


@pytest.mark.slow
def test_partitioned_load_and_gathered_copy_equal_the_checkpoint(
    zero3_results: list[dict], world: dict[str, str]
) -> None:
    expected = load_model(world["sft"]).state_dict()
    for result in zero3_results:
        assert result["actor"].keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(result["actor"][name], tensor, rtol=0, atol=0)
    rm = load_model(world["rm"]).state_dict()
    assert zero3_results[1]["rm"] is None  # rank0_only: the other ranks keep nothing
    for name, tensor in rm.items():
        torch.testing.assert_close(zero3_results[0]["rm"][name], tensor, rtol=0, atol=0)


@pytest.mark.slow
def test_gathered_and_per_layer_generation_agree_with_a_plain_model(
    zero3_results: list[dict], world: dict[str, str]
) -> None:
    from llamalab.generation import generate

    plain = load_model(world["sft"])
    for rank, prompts in ((0, [[1, 5, 9, 11], [1, 7]]), (1, [[1, 4, 4]])):
        with torch.no_grad():
            ref = generate(plain, prompts, 6, temperature=0.0, eos_id=None).tokens  # type: ignore[arg-type]
        assert zero3_results[rank]["fast"] == ref
        n = 6 if rank == 0 else 2
        assert [row[:n] for row in zero3_results[rank]["slow"]] == [row[:n] for row in ref]


@pytest.mark.slow
def test_sharded_forwards_outside_the_engine_equal_the_whole_models(
    zero3_results: list[dict], world: dict[str, str]
) -> None:
    """Partitioned frozen models that no DeepSpeed engine hooks (rejection sampling's sampler
    and reward models) run forwards one gathered unit at a time: the values equal the whole
    models', while each rank feeds its own rows."""
    reward, lm = load_model(world["rm"]), load_model(world["sft"])
    for rank, result in enumerate(zero3_results):
        ids = torch.tensor(SCORED[rank])
        with torch.no_grad():
            torch.testing.assert_close(result["sharded"][0], reward(ids), rtol=0, atol=1e-5)
            torch.testing.assert_close(result["sharded"][1], lm(ids), rtol=0, atol=1e-5)


def shard_files(folder: Path, limit: int) -> list[str]:
    """The files named by ``folder``'s safetensors index (exactly the ones there); each holds at
    most ``limit`` bytes of tensors unless it holds a single larger tensor."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == sorted(p.name for p in folder.glob("*.safetensors"))
    for file in files:
        names = [n for n, f in index["weight_map"].items() if f == file]
        header = 8 + int.from_bytes((folder / file).read_bytes()[:8], "little")
        assert len(names) == 1 or (folder / file).stat().st_size - header <= limit, file
    return files


@pytest.mark.slow
def test_streamed_zero3_export_loads_in_transformers_with_equal_logits(
    zero3_results: list[dict], world: dict[str, str]
) -> None:
    """The export path under ZeRO-3 (units gathered one at a time, copied to the host, written in
    shards of at most 60KB): several shards and an index that transformers loads, as a causal
    LM and as a one-label sequence classifier, with our models' logits."""
    out = Path(zero3_results[0]["out"])
    ids = torch.tensor([[1, 5, 9, 11, 300, 7, 2], [1, 4, 4, 17, 60, 3, 2]])
    loaders = {"actor": (world["sft"], transformers.AutoModelForCausalLM),
               "reward": (world["rm"], transformers.AutoModelForSequenceClassification)}  # fmt: skip
    for role, (source, auto) in loaders.items():
        assert len(shard_files(out / f"{role}_hf", 60_000)) > 1
        ours = load_model(source)
        theirs = auto.from_pretrained(out / f"{role}_hf").eval()
        with torch.no_grad():
            expected = ours(ids) if role == "actor" else ours.score_sequences(ids)  # type: ignore[operator]
            got = theirs(ids).logits
        torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- src/train.py runs
def train(args: list[str], cache: Path, timeout: int = 600) -> str:
    """Run ``src/train.py``; its output (stdout and stderr) when it succeeded."""
    proc = run_train(args, cache, timeout=timeout)  # TORCH_EXTENSIONS_DIR: helpers.train_env
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def pretrain_args(out: Path, *extra: str) -> list[str]:
    # Batches are global: one 256-token sequence per rank, on one process and on two.
    tokens = 512 if "trainer.devices=2" in extra else 256
    return [
        "logger=none", "plan.check=false", f"paths.output_dir={out}",
        f"paths.outputs_root={out.parent / 'outs'}", "data.batch_size=1", f"stage.batch_tokens={tokens}",
        "trainer.limit_val_batches=0", "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1", "~callbacks.progress_bar", *extra,
    ]  # fmt: skip


def distributed(strategy: str) -> list[str]:
    return [f"strategy={strategy}", "trainer.devices=2", "trainer.accelerator=cpu"]


def first_loss(run: Path) -> float:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return float(rows[0]["train/loss"])


def same_weights(a: str | Path, b: str | Path) -> None:
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """ddp pretraining from scratch (its export is everyone's init), then 2 steps from that init
    single-process, under deepspeed_zero3 and under fsdp, and a ZeRO-3 run resumed at step 1."""
    root = tmp_path_factory.mktemp("scale_runs")
    r = {name: root / name for name in ("ddp", "single", "zero3", "fsdp", "resumed")}
    train(pretrain_args(r["ddp"], "trainer.max_steps=2", *distributed("ddp")), cache_dir)
    init = f"stage.init={r['ddp'] / 'export'}"
    train(pretrain_args(r["single"], init, "trainer.max_steps=1"), cache_dir)
    shards = "export.max_shard_size=5MB"  # the tiny model's 21 MB export in several shards
    train(
        pretrain_args(
            r["zero3"], init, shards, "trainer.max_steps=2", *distributed("deepspeed_zero3")
        ),
        cache_dir,
    )
    train(pretrain_args(r["fsdp"], init, shards, "trainer.max_steps=2", *distributed("fsdp")),
          cache_dir)  # fmt: skip
    resume = f"ckpt_path={r['zero3'] / 'checkpoints' / 'step000001.ckpt'}"
    train(pretrain_args(r["resumed"], init, resume, "trainer.max_steps=2", *distributed("deepspeed_zero3")),
          cache_dir)  # fmt: skip
    return r


@pytest.mark.integration
@pytest.mark.slow
def test_one_step_loss_matches_the_single_process_run(runs: dict[str, Path]) -> None:
    single = first_loss(runs["single"])
    for name in ("zero3", "fsdp"):  # rank 0's first micro-batch is the single run's first
        assert first_loss(runs[name]) == pytest.approx(single, rel=1e-5), name


@pytest.mark.integration
@pytest.mark.slow
def test_zero3_logs_the_gradient_norm_deepspeed_computed(runs: dict[str, Path]) -> None:
    """ZeRO-3 keeps no ``p.grad``: the norm is DeepSpeed's own, logged at every step."""
    with open(runs["zero3"] / "csv" / "metrics.csv", newline="") as f:
        norms = [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]
    assert len(norms) == 2 and all(0 < n < 1e3 for n in norms), norms


@pytest.mark.integration
@pytest.mark.slow
def test_a_nonfinite_gradient_stops_a_zero3_run(tmp_path: Path, cache_dir: Path) -> None:
    """lr 1e30: the first update throws the weights to ~1e30 and the next gradient is not
    finite. DeepSpeed skips that update on its own; the run must stop, naming the step."""
    out = tmp_path / "nan"
    args = pretrain_args(
        out, *distributed("deepspeed_zero3"), "model.dim=64", "model.n_layers=2",
        "model.n_heads=4", "stage.optim.lr=1e30", "stage.optim.warmup_steps=0",
        "trainer.max_steps=4",
    )  # fmt: skip
    proc = run_train(args, cache_dir, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: non-finite gradient norm (inf) at step" in proc.stderr, proc.stderr[-3000:]
    assert "of stage 'pretrain'. Last good checkpoint:" in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_consolidated_export_equals_the_weights_in_the_shards(runs: dict[str, Path]) -> None:
    zero3_last = runs["zero3"] / "checkpoints" / "step000002.ckpt"
    assert (zero3_last / "latest").is_file()  # a DeepSpeed directory of per-rank partitions
    same_weights(zero3_last, runs["zero3"] / "export")
    fsdp_last = runs["fsdp"] / "checkpoints" / "step000002.ckpt"
    assert (fsdp_last / ".metadata").is_file()  # a torch.distributed.checkpoint directory
    same_weights(fsdp_last, runs["fsdp"] / "export")
    for name in ("zero3", "fsdp"):  # export.max_shard_size=5MB: streamed into shards + index
        assert len(shard_files(runs[name] / "export", 5_000_000)) > 2, name


@pytest.mark.integration
@pytest.mark.slow
def test_resume_under_zero3_continues_exactly(runs: dict[str, Path]) -> None:
    same_weights(runs["resumed"] / "export", runs["zero3"] / "export")
    with pytest.raises(AssertionError):  # and the step did change the weights
        same_weights(runs["zero3"] / "checkpoints" / "step000001.ckpt", runs["zero3"] / "export")


@pytest.mark.integration
@pytest.mark.slow
def test_plan_checkpoint_bytes_are_the_bytes_written(runs: dict[str, Path]) -> None:
    """``dry_run``'s checkpoint figures against the runs' real checkpoints: the bytes of one save
    (all ranks' files, within 2%: Lightning's loop and callback states, DeepSpeed's shape tables
    and padding are not counted) and the number kept (``save_top_k=-1``: one per step here)."""
    for name, strategy in (("ddp", "ddp"), ("zero3", "deepspeed_zero3"), ("fsdp", "fsdp")):
        cfg = compose_config([*pretrain_args(runs[name], *distributed(strategy)),
                              "trainer.max_steps=2"], runs[name])  # fmt: skip
        plan = plan_from_config(cfg, architecture(cfg), {})
        saves = sorted((runs[name] / "checkpoints").glob("step*.ckpt"))
        assert plan.checkpoints_kept == len(saves) == 2, name
        last = saves[-1]
        files = [f for f in last.rglob("*") if f.is_file()] if last.is_dir() else [last]
        written = sum(f.stat().st_size for f in files)
        assert written == pytest.approx(plan.checkpoint_bytes, rel=0.02), name
        assert plan.checkpoint_disk_bytes == 3 * plan.checkpoint_bytes


# ---------------------------------------------------------------------------- PPO
@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp", "ddp"])
def test_ppo_runs_on_two_processes(
    strategy: str, world: dict[str, str], tmp_path: Path, cache_dir: Path
) -> None:
    out = tmp_path / strategy
    args = [
        "stage=ppo", "logger=none", "callbacks=none", "plan.check=false", f"paths.output_dir={out}",
        f"paths.outputs_root={tmp_path / 'outs'}", f"stage.init={world['sft']}",
        "stage.reference=${stage.init}", f"stage.critic_init={world['rm']}",
        f"stage.reward_helpful={world['rm']}", f"stage.reward_safety={world['rm']}", "stage.rollout_batch=4", "stage.mini_batch=4",
        "stage.ppo_epochs=1", "stage.max_new_tokens=6", "stage.generation_batch=4",
        "stage.eval_every=null", "stage.iterations=2", *distributed(strategy),
    ]  # fmt: skip
    train(args, cache_dir)
    exported = load_model(out / "export")
    assert isinstance(exported, Llama)
    assert exported.config.vocab_size == Tokenizer(world["tokenizer"]).vocab_size
    assert exported.config.dim == tiny_config(exported.config.vocab_size).dim
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r.get("train/kl")) == 2  # two iterations logged
    # One optimizer step per iteration, each with its gradient norm (DeepSpeed's own under ZeRO-3)
    assert sum(1 for r in rows if r.get("train/grad_norm")) == 2, strategy


# ---------------------------------------------------------------------------- rejection sampling
@pytest.mark.slow
@pytest.mark.integration
def test_rejection_sampling_runs_under_zero3_on_two_processes(
    world: dict[str, str], tmp_path: Path, cache_dir: Path
) -> None:
    """The sampling policy and both reward models loaded partitioned (the one role loader) and
    never gathered whole: best-of-K through the TP engine at TP 2 (the group samples both
    ranks' prompts together), scoring with sharded forwards over shares padded to equal length
    (5 prompts on 2 ranks: one padded), a ZeRO-3 fine-tune, held-out prompts judged through the
    engine too, and the consolidated export loads."""
    out = tmp_path / "rs"
    args = [
        "stage=rejection_sampling", "logger=none", "callbacks=none", "plan.check=false",
        f"paths.output_dir={out}", f"paths.outputs_root={tmp_path / 'outs'}",
        f"stage.init={world['sft']}", f"stage.reward_helpful={world['rm']}",
        f"stage.reward_safety={world['rm']}", "stage.num_samples=2", "stage.max_prompts=5",
        "stage.max_new_tokens=6", "stage.batch_size=2", "data.batch_size=1", "stage.epochs=1",
        "stage.rollout_engine=tensor_parallel", "stage.rollout_tp_size=2",
        "trainer.limit_val_batches=1", *distributed("deepspeed_zero3"),
    ]  # fmt: skip
    logs = train(args, cache_dir)
    assert "rejection sampling: best-of-K with the tensor_parallel rollout engine" in logs
    assert "rollout engine tensor_parallel: TP 2" in logs
    assert "held-out evaluation samples with the tensor_parallel" in logs
    chosen = [json.loads(line) for line in (out / "best_samples.jsonl").read_text().splitlines()]
    assert len(chosen) == 5  # both ranks' shares, the padding dropped, gathered by rank 0
    prompts = [json.dumps(c["messages"][:-1]) for c in chosen]
    assert len(set(prompts)) == 5  # every prompt once
    assert all(0.0 < c["reward"] < 1.0 and c["messages"][-1]["content"] for c in chosen)
    assert isinstance(load_model(out / "export"), Llama)
    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/loss") for r in rows) and any(r.get("eval/reward") for r in rows)
    assert any(r.get("eval/kl_to_ref") for r in rows)  # the sampler, read by sharded forwards
