"""The tensor-parallel rollout engine on 2 CPU processes (gloo): the TP copy generates what the
whole model generates (greedy tokens equal, log-probs within 1e-5, left-padded ragged prompts,
grouped-query attention, EOS), both ranks of a group draw the same sampled tokens, each rank
gets back its own prompts' rows, the copy is rebuilt only when the weights change, and its
bytes per rank are the plan's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compose_config, run_train
from safetensors.torch import load_file

from llamalab.generation import generate, sample_responses
from llamalab.model import KVCache, Llama, LlamaConfig
from llamalab.runner.run import architecture
from llamalab.scale.memory import PlanError
from llamalab.scale.plan_cfg import plan_from_config
from llamalab.scale.plan_gen import check_engine, generation_plan, tp_copy_bytes
from llamalab.scale.rollout_engine import RolloutEngine, resolve_engine
from llamalab.scale.tensor_parallel import TPError, build_tp_copy, check_tp, resident_bytes

pytestmark = [pytest.mark.distributed]

# GQA (4 query heads on 2 KV heads), FFN and vocabulary divisible by 2
CONFIG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32)
PROMPTS = [[1, 5, 9, 11, 3], [1, 7], [1, 4, 4, 8], [1, 2, 3]]  # ragged: left-padded
NEW = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> Llama:
    torch.manual_seed(0)
    return Llama.from_config(CONFIG).eval()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model()
    engine = RolloutEngine("tensor_parallel", tp_size=2)
    group = engine.group(2)
    copy = build_tp_copy(model, "none", 2, rank, group)
    ref = generate(model, PROMPTS, NEW, temperature=0.0, eos_id=None)
    eos = ref.tokens[0][2]  # row 0 stops at its third token: rows end at different steps
    result = {
        "bytes": resident_bytes(copy),
        "kv": KVCache.allocate(copy.config, 4, 16).k.nbytes * 2,  # type: ignore[arg-type]
        "greedy": generate(copy, PROMPTS, NEW, temperature=0.0, eos_id=eos),
        "sampled": generate(copy, PROMPTS, NEW, temperature=1.0, eos_id=eos, seed=3),
        "eos": eos,
    }
    # the engine: each rank brings its own prompts and gets back its own rows
    mine = PROMPTS[:3] if rank == 0 else PROMPTS[3:]
    common = dict(max_new_tokens=NEW, temperature=1.0, top_p=None, eos_id=eos, pad_id=0,
                  chunk_size=2)  # fmt: skip
    result["engine"] = engine.sample(
        model, None, mine, seed_of=lambda r: 100 + r, version=0, keep=True, **common
    )
    engine.sample(model, None, mine, seed_of=lambda r: 100 + r, version=0, keep=True, **common)
    result["builds_same_version"] = engine.builds
    engine.sample(model, None, mine, seed_of=lambda r: 100 + r, version=1, **common)
    result["builds_new_version"] = engine.builds
    result["released"] = engine.copy is None
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_tp2_greedy_generation_equals_the_whole_model(tp_results: list[dict]) -> None:
    eos = tp_results[0]["eos"]
    ref = generate(_model(), PROMPTS, NEW, temperature=0.0, eos_id=eos)
    assert ref.finished[0] and len(ref.tokens[0]) == 3  # EOS really stops a row early
    assert len({len(t) for t in ref.tokens}) > 1
    for result in tp_results:
        got = result["greedy"]
        assert got.tokens == ref.tokens and got.finished == ref.finished
        for a, b in zip(got.logprobs, ref.logprobs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-5)


def test_both_ranks_of_a_group_sample_the_same_tokens(tp_results: list[dict]) -> None:
    a, b = tp_results[0]["sampled"], tp_results[1]["sampled"]
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    ref = generate(_model(), PROMPTS, NEW, temperature=1.0, eos_id=tp_results[0]["eos"], seed=3)
    assert a.tokens == ref.tokens


def test_engine_returns_each_ranks_own_rows_with_the_group_seed(tp_results: list[dict]) -> None:
    eos = tp_results[0]["eos"]
    # the group generates all 4 prompts together, seeded as its leader (rank 0) would be
    ref = sample_responses(_model(), PROMPTS, max_new_tokens=NEW, temperature=1.0, top_p=None,
                           eos_id=eos, pad_id=0, seed=100, chunk_size=2)  # fmt: skip
    assert tp_results[0]["engine"].tokens == ref.tokens[:3]
    assert tp_results[1]["engine"].tokens == ref.tokens[3:]


def test_copy_is_rebuilt_only_when_the_weights_change(tp_results: list[dict]) -> None:
    for result in tp_results:
        assert result["builds_same_version"] == 1  # the second rollout reused the copy
        assert result["builds_new_version"] == 2
        assert result["released"]  # freed after a rollout that does not keep it


def test_tp_copy_bytes_per_rank_equal_the_plan(tp_results: list[dict]) -> None:
    whole = CONFIG.num_params("lm") * 4
    for result in tp_results:
        assert result["bytes"] == tp_copy_bytes(CONFIG, 2, 4)
        assert result["bytes"] < whole  # blocks and head split, embedding whole
    plan = generation_plan(CONFIG, 4, 2, 1, "tensor_parallel", 2, 2, 64, 16, 10**9)
    assert plan["weights_bytes_per_gpu"] == tp_results[0]["bytes"]
    # KV cache: the group's 4 rows x 16 tokens, this rank's 1 of 2 KV heads, as generate
    # allocates it from the copy's config
    assert plan["kv_cache_bytes_per_gpu"] == tp_results[0]["kv"]
    assert plan["kv_cache_bytes_per_gpu"] == 4 * 16 * CONFIG.kv_cache_bytes_per_token(4) // 2


def test_70b_ppo_plans_the_tp_engine_and_refuses_gather(tmp_path: Path) -> None:
    """`model=70b stage=ppo dry_run=true`: TP 8 inside each node of 8, 1/8 of the bf16 blocks
    per GPU (about 17 GB), and a verdict that counts the rollout phase; `gather` is refused with
    the engine that fits named."""
    cfg = compose_config(["model=70b", "stage=ppo", "dry_run=true"], tmp_path)
    plan = plan_from_config(cfg, architecture(cfg), {})
    gen = plan.generation
    assert gen is not None and gen["engine"] == "tensor_parallel" and gen["tp_size"] == 8
    arch = architecture(cfg)
    assert gen["weights_bytes_per_gpu"] == tp_copy_bytes(arch, 8, 2)
    assert 16e9 < gen["weights_bytes_per_gpu"] < 18e9
    assert gen["kv_cache_bytes_per_gpu"] > 0
    speed = gen["seconds_per_token"]
    assert speed["tensor_parallel"] < speed["gather"] < speed["layerwise"]
    json_keys = plan.to_dict()["generation"]
    assert {"engine", "tp_size", "weights_bytes_per_gpu", "kv_cache_bytes_per_gpu"} <= set(
        json_keys
    )
    assert (
        plan.phase_bytes["rollout"] > gen["weights_bytes_per_gpu"] + gen["kv_cache_bytes_per_gpu"]
    )
    assert plan.fits, plan.reason
    check_engine(gen)  # fits: no error
    cfg = compose_config(["model=70b", "stage=ppo", "stage.rollout_engine=gather"], tmp_path)
    plan = plan_from_config(cfg, architecture(cfg), {})
    assert not plan.fits and "stage.rollout_engine=tensor_parallel" in plan.reason
    with pytest.raises(PlanError, match=r"the engine that fits: stage\.rollout_engine=tensor_par"):
        check_engine(plan.generation)


def test_70b_rejection_sampling_plans_the_tp_engine_and_refuses_gather(tmp_path: Path) -> None:
    """`model=70b stage=rejection_sampling dry_run=true`: best-of-K samples through the TP
    engine (TP 8, its slice, the KV cache of generation_batch rows split by KV heads), the frozen
    sampler counted beside the trained policy, and a verdict with the rollout phase; `gather`
    (three whole copies before) is refused, naming the engine that fits."""
    cfg = compose_config(["model=70b", "stage=rejection_sampling", "dry_run=true"], tmp_path)
    arch = architecture(cfg)
    plan = plan_from_config(cfg, arch, {})
    gen = plan.generation
    assert gen is not None and (gen["engine"], gen["tp_size"]) == ("tensor_parallel", 8)
    assert gen["weights_bytes_per_gpu"] == tp_copy_bytes(arch, 8, 2)
    rows = int(cfg.stage.generation_batch)  # K x 6 prompts per rank, 8 ranks: 64-row calls
    assert gen["rows_per_call"] == rows and plan.rollout_batch == 60
    assert gen["kv_cache_bytes_per_gpu"] == rows * 640 * arch.kv_cache_bytes_per_token(2) // 8
    assert [r.role for r in plan.models] == ["policy", "sampler", "reward_helpful", "reward_safety"]
    assert plan.phase_bytes["rollout"] > gen["weights_bytes_per_gpu"] + plan.kv_cache_bytes
    assert plan.fits and plan.peak_bytes_per_gpu < 60 * 2**30, plan.reason
    gather = ["model=70b", "stage=rejection_sampling", "stage.rollout_engine=gather"]
    cfg = compose_config(gather, tmp_path)
    plan = plan_from_config(cfg, architecture(cfg), {})
    assert not plan.fits and "stage.rollout_engine=tensor_parallel" in plan.reason
    with pytest.raises(PlanError, match=r"the engine that fits: stage\.rollout_engine=tensor_par"):
        check_engine(plan.generation)


def test_refusals_and_old_spelling() -> None:
    with pytest.raises(TPError, match="KV heads \\(2\\) is not divisible by the TP size 4"):
        check_tp(CONFIG, 4, 4)
    with pytest.raises(TPError, match="world size \\(3\\)"):
        check_tp(CONFIG, 2, 3)
    with pytest.warns(DeprecationWarning, match="rollout_engine=gather"):
        assert resolve_engine("auto", "always") == "gather"
    with pytest.warns(DeprecationWarning):
        assert resolve_engine("auto", "never") == "layerwise"
    with pytest.raises(ValueError, match="rollout_engine must be one of"):
        resolve_engine("vllm")


# ---------------------------------------------------------------------------- a whole PPO run
def _ppo(out: Path, inputs: dict, *extra: str) -> list[str]:
    """The default PPO config under ZeRO-3 on 2 processes with the TP engine at TP 2; only
    length (tiny rollouts, 2 iterations, a held-out evaluation of 4 prompts after each, a
    checkpoint each step) and paths are set."""
    return [
        "stage=ppo", "strategy=deepspeed_zero3", "trainer.devices=2", "trainer.accelerator=cpu",
        "stage.rollout_engine=tensor_parallel", "stage.rollout_tp_size=2",
        "logger=none", "~callbacks.progress_bar", f"paths.output_dir={out}",
        f"paths.outputs_root={out.parent / 'outs'}", f"stage.init={inputs['sft']}",
        f"stage.reference={inputs['sft']}", f"stage.critic_init={inputs['rm']}",
        f"stage.reward_helpful={inputs['rm']}", f"stage.reward_safety={inputs['rm']}",
        "stage.iterations=2", "stage.rollout_batch=4", "stage.mini_batch=4",
        "stage.max_new_tokens=6", "stage.generation_batch=4", "stage.eval_every=1",
        "stage.eval_prompts=4", "stage.eval_max_new_tokens=4",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.save_top_k=-1", *extra,
    ]  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_zero3_ppo_with_the_tp_engine_runs_and_resumes_exactly(
    tmp_path: Path, cache_dir: Path, tiny_checkpoints: dict
) -> None:
    """2 iterations straight; then the same run resumed from the checkpoint after iteration 1:
    the exported actors are bit-identical (the TP rollouts are seeded per group leader and
    iteration, so the resumed iteration samples what the straight one did)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_train(_ppo(straight, tiny_checkpoints), cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    assert "rollout engine tensor_parallel: TP 2" in result.stdout + result.stderr
    assert "held-out evaluation samples with the tensor_parallel" in result.stdout + result.stderr
    saves = sorted((straight / "checkpoints").glob("step*.ckpt"))
    assert len(saves) == 2, saves  # one per iteration
    first = saves[0]
    result = run_train(_ppo(resumed, tiny_checkpoints, f"ckpt_path={first}"), cache_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    a = load_file(straight / "export" / "model.safetensors")
    b = load_file(resumed / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed TP-engine PPO run differs"
