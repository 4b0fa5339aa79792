"""The memory planner: exact parameter counts, DeepSpeed parity, activations measured, verdicts."""

from __future__ import annotations

import itertools
import json
import math
import time
import tracemalloc

import pytest
import torch
import torch.nn.functional as F
from deepspeed.runtime.zero import stage3 as ds_stage3
from deepspeed.runtime.zero import stage_1_and_2 as ds_stage12

from llamalab.model import KVCache, Llama, LlamaConfig, LlamaScalar
from llamalab.scale.memory import (
    GIB,
    Numerics,
    PlanError,
    activation_breakdown,
    activation_bytes_per_gpu,
    frozen_weight_bytes,
    fsdp_unit_params,
    kv_cache_bytes,
    largest_layer_params,
    model_state_bytes,
    model_state_bytes_per_gpu,
    normalize_precision,
    zero2_model_states_mem_needs,
    zero3_model_states_mem_needs,
)
from llamalab.scale.plan import Plan, StageModels, check_fits, default_cluster, make_plan

# PAPER.md table: Meta's released sizes, LM head included.
PAPER_PARAMS = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
TINY_GQA = LlamaConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64
)


def plan_70b_ppo(devices: int = 8, nodes: int = 8, **overrides) -> Plan:
    settings = dict(
        stage="ppo", strategy="deepspeed_zero3", precision="bf16-mixed", devices=devices,
        num_nodes=nodes, micro_batch=1, seq_len=4096, activation_checkpointing=True,
        model_name="70b",
    )  # fmt: skip
    settings.update(overrides)
    return make_plan(LlamaConfig.from_name("70b"), **settings)


# ---- parameter counts and stage models ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_ppo_plan_counts_every_model_exactly(name: str) -> None:
    cfg = LlamaConfig.from_name(name)
    plan = make_plan(cfg, "ppo", "deepspeed_zero3", "bf16-mixed", 8, 8, 1, 4096, True)
    lm = PAPER_PARAMS[name]
    scalar = lm - cfg.vocab_size * cfg.dim + cfg.dim  # LM head (vocab x dim) -> score (dim)
    assert [(r.role, r.n_params) for r in plan.models] == [
        ("actor", lm),
        ("critic", scalar),
        ("reference", lm),
        ("reward_helpful", scalar),
        ("reward_safety", scalar),
    ]
    assert plan.total_params == 2 * lm + 3 * scalar
    assert all(type(r.n_params) is int for r in plan.models)


def test_70b_ppo_holds_five_70b_class_models() -> None:
    rows = plan_70b_ppo().models
    lm, scalar = 68_976_648_192, 68_714_512_384
    assert [r.n_params for r in rows] == [lm, scalar, lm, scalar, scalar]
    assert [r.trainable for r in rows] == [True, True, False, False, False]
    assert [r.head for r in rows] == ["lm", "scalar", "lm", "scalar", "scalar"]


def test_stage_models_roles_and_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMALAB_OUTPUTS", raising=False)
    table = {
        stage: [(m.role, m.head, m.trainable) for m in StageModels.for_stage(stage).models]
        for stage in ("pretrain", "sft", "reward", "rejection_sampling")
    }
    assert table == {
        "pretrain": [("model", "lm", True)],
        "sft": [("model", "lm", True)],
        "reward": [("reward", "scalar", True)],
        "rejection_sampling": [
            ("policy", "lm", True),
            ("sampler", "lm", False),
            ("reward_helpful", "scalar", False),
            ("reward_safety", "scalar", False),
        ],
    }
    ppo = StageModels.for_stage("ppo", {"actor": "/ckpt/meta-70b-chat"})
    assert ppo.models[0].input == "/ckpt/meta-70b-chat"
    assert ppo.models[2].input == "outputs/sft/latest"  # reference: SFT's latest run
    monkeypatch.setenv("LLAMALAB_OUTPUTS", "/runs")  # what paths.outputs_root defaults to
    assert StageModels.for_stage("ppo").models[1].input == "/runs/reward_helpful/latest"
    assert StageModels.for_stage("pretrain").models[0].input is None
    with pytest.raises(PlanError, match="no model"):
        StageModels.for_stage("ppo", {"policy": "x"})
    with pytest.raises(PlanError, match="unknown stage"):
        StageModels.for_stage("kto")


# ---- layer sizes and ZeRO parity ---------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [TINY_GQA, LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=32, multiple_of=32)],
    ids=["embedding-largest", "ffn-largest"],
)
@pytest.mark.parametrize("cls,head", [(Llama, "lm"), (LlamaScalar, "scalar")])
def test_layer_sizes_match_deepspeed_and_modules(cfg: LlamaConfig, cls: type, head: str) -> None:
    model = cls(cfg)
    total, largest = ds_stage3.model_to_params(model)
    assert (total, largest) == (cfg.num_params(head), largest_layer_params(cfg, head))
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = total - cfg.n_layers * block
    assert fsdp_unit_params(cfg, head) == max(block, root)


PARAM_GRID = [6_738_415_616, 68_976_648_192, 68_714_512_384, 1_234_567_891, 5_276_416]
LARGEST_GRID = [262_144_000, 131_072_000, 1_048_576]


def test_zero3_formula_equals_deepspeed_exactly() -> None:
    grid = itertools.product(
        PARAM_GRID, LARGEST_GRID, [1, 2, 8, 16], [1, 2, 3, 8, 64], *[[True, False]] * 3, [1.5, 1.0]
    )
    for total, largest, gpn, nodes, offload, offload_params, zero_init, factor in grid:
        args = (total, largest, gpn, nodes, offload, offload_params, zero_init, factor)
        ours = zero3_model_states_mem_needs(*args)
        assert ours == ds_stage3.estimate_zero3_model_states_mem_needs(*args), args


def test_zero2_formula_equals_deepspeed_exactly() -> None:
    grid = itertools.product(PARAM_GRID, [1, 2, 8, 16], [1, 2, 3, 8, 64], [True, False], [1.5, 1.0])
    for total, gpn, nodes, offload, factor in grid:
        args = (total, gpn, nodes, offload, factor)
        assert zero2_model_states_mem_needs(*args) == (
            ds_stage12.estimate_zero2_model_states_mem_needs(*args)
        ), args


@pytest.mark.parametrize("gpn,nodes", [(1, 1), (8, 1), (8, 8), (4, 3)])
def test_deepspeed_strategies_use_deepspeeds_figures(gpn: int, nodes: int) -> None:
    n, largest = 68_976_648_192, 262_144_000
    estimate3 = ds_stage3.estimate_zero3_model_states_mem_needs
    cpu, gpu, _ = estimate3(n, largest, gpn, nodes, False, False, True)
    assert model_state_bytes(n, largest, "deepspeed_zero3", gpn, nodes, "bf16-mixed") == (gpu, cpu)
    cpu, gpu, _ = estimate3(n, largest, gpn, nodes, True, True, True)
    assert model_state_bytes(n, largest, "deepspeed_zero3_offload", gpn, nodes, "bf16") == (
        gpu,
        cpu,
    )
    assert model_state_bytes(n, largest, "deepspeed_zero3", gpn, nodes, "bf16", True) == (gpu, cpu)
    cpu, gpu = ds_stage12.estimate_zero2_model_states_mem_needs(n, gpn, nodes, False)
    assert model_state_bytes(n, 0, "deepspeed_zero2", gpn, nodes, "bf16-mixed") == (gpu, cpu)


def test_replicated_and_fsdp_model_states_hand_computed() -> None:
    n, unit = 1000, 100
    per_gpu = model_state_bytes_per_gpu
    assert per_gpu(n, unit, "ddp", 4, 1, "32-true") == 16_000  # 4 param + 4 grad + 8 Adam
    assert per_gpu(n, unit, "ddp", 4, 1, "bf16-mixed") == 18_000  # + 2 autocast weight copy
    assert per_gpu(n, unit, "auto", 1, 1, "16-mixed") == 18_000
    assert per_gpu(n, unit, "ddp", 4, 1, "bf16-true") == 8_000  # 2 + 2 + 4 (bf16 Adam states)
    assert per_gpu(n, unit, "fsdp", 4, 1, "bf16-mixed") == 16_000 // 4 + 4 * unit
    assert per_gpu(n, unit, "fsdp", 3, 1, "32-true") == math.ceil(16_000 / 3) + 8 * unit
    assert per_gpu(n, unit, "fsdp", 2, 2, "bf16-true") == 8_000 // 4 + 4 * unit
    with pytest.raises(PlanError, match="no offload"):
        per_gpu(n, unit, "ddp", 4, 1, "bf16-mixed", offload=True)


def test_frozen_models_cost_weights_only() -> None:
    n, largest = 1001, 100
    assert frozen_weight_bytes(n, largest, "ddp", 8, 1, "bf16-mixed") == (2 * n, 0)
    assert frozen_weight_bytes(n, largest, "deepspeed_zero2", 8, 1, "32-true") == (4 * n, 0)
    assert frozen_weight_bytes(n, largest, "deepspeed_zero3", 8, 2, "bf16-mixed") == (
        math.ceil(2 * n / 16) + 2 * largest,
        0,
    )
    assert frozen_weight_bytes(n, largest, "deepspeed_zero3_offload", 8, 2, "bf16") == (
        2 * largest,
        math.ceil(2 * n / 2),
    )


# ---- activations: the formula against what autograd really saves ------------------------------
def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor, autocast: bool, lm: bool) -> int:
    """Bytes of every distinct non-parameter storage autograd saves, plus the model's output."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.dim() > 0:  # skip the loss's scalar weight
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = model(ids)
        if lm:  # the training loss: cross-entropy keeps its float32 log-softmax
            loss = F.cross_entropy(out.flatten(0, 1), torch.roll(ids, 1, 1).flatten())
        else:
            loss = out.sum()
    loss.backward()
    return sum(saved.values()) + out.nbytes


@pytest.mark.parametrize("mode", ["bf16-true", "32-true", "ddp-autocast"])
@pytest.mark.parametrize("cls,head", [(Llama, "lm"), (LlamaScalar, "scalar")])
def test_activation_formula_equals_saved_tensors(mode: str, cls: type, head: str) -> None:
    torch.manual_seed(0)
    model = cls(TINY_GQA)
    if mode == "bf16-true":
        model = model.to(torch.bfloat16)
    batch, seq = 2, 16
    ids = torch.randint(3, TINY_GQA.vocab_size, (batch, seq))
    measured = _saved_bytes(model, ids, mode == "ddp-autocast", head == "lm")
    num = {
        "bf16-true": Numerics(2, 2, False),
        "32-true": Numerics(4, 4, False),
        "ddp-autocast": Numerics(2, 4, True),
    }[mode]
    expected = activation_breakdown(TINY_GQA, batch, seq, num, head).full
    if mode == "ddp-autocast":  # autocast's bf16 weight copies: counted as model states (+2/param)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        expected += 2 * sum(m.weight.numel() for m in linears)
    assert measured == expected


def test_activation_formula_hand_computed_7b() -> None:
    cfg = LlamaConfig.from_name("7b")
    h, f = 4096, 11008
    acts = activation_breakdown(cfg, 1, 1, Numerics(2, 2, False), "lm")
    # norms 2*(4h+4+2h+2h), q,k,v 2*(3h), attention out 2h, log-sum-exp 4*32, SwiGLU 4*2f
    assert acts.per_layer == 2 * (8 * h + 4) + 6 * h + 2 * h + 4 * 32 + 8 * f
    assert acts.head == 8 * 32000 + 8  # float32 logits and log-softmax, int64 targets
    full = activation_bytes_per_gpu(cfg, 2, 4096, 2, checkpointing=False)
    ckpt = activation_bytes_per_gpu(cfg, 2, 4096, 2, checkpointing=True)
    tokens = 2 * 4096
    assert full == tokens * (32 * acts.per_layer + acts.outside + acts.head)
    assert ckpt == tokens * (32 * 2 * h + acts.per_layer + acts.outside + acts.head)


def test_kv_cache_matches_allocated_cache() -> None:
    assert kv_cache_bytes(LlamaConfig.from_name("70b"), 8, 4096, 2) == 8 * 4096 * 327_680
    cache = KVCache.allocate(TINY_GQA, 3, 40, dtype=torch.bfloat16)
    assert kv_cache_bytes(TINY_GQA, 3, 40, 2) == cache.k.nbytes + cache.v.nbytes


# ---- plans and verdicts ------------------------------------------------------------------------
def test_70b_ppo_on_8x8_zero3_fits_and_adds_up() -> None:
    plan = plan_70b_ppo()
    assert plan.world_size == 64 and plan.fits
    actor = ds_stage3.estimate_zero3_model_states_mem_needs(
        68_976_648_192, 262_144_000, 8, 8, False, False, True
    )
    assert (plan.models[0].gpu_bytes, plan.models[0].cpu_bytes) == (actor[1], actor[0])
    assert plan.models[0].gpu_bytes == 20_448_258_304  # about 19 GB, as ENV.md says
    assert plan.model_state_bytes == sum(r.gpu_bytes for r in plan.models)
    assert plan.phase_bytes["train"] == plan.activation_bytes == plan.activation_bytes_checkpointed
    # the tensor-parallel engine (auto: the whole bf16 copy does not fit): one row per generate
    # call here, each GPU holding 1/8 of its KV heads
    assert plan.generation is not None and plan.generation["engine"] == "tensor_parallel"
    assert plan.kv_cache_bytes == plan.generation["kv_cache_bytes_per_gpu"] == 4096 * 327_680 // 8
    assert plan.peak_phase == "rollout"  # the TP copy (about 17 GB) beside the ZeRO-3 shards
    assert plan.total_bytes_per_gpu == plan.model_state_bytes + plan.phase_bytes["rollout"]
    assert 40 * GIB < plan.total_bytes_per_gpu < 80 * GIB
    check_fits(plan)  # does not raise
    no_ckpt = plan_70b_ppo(activation_checkpointing=False)
    assert not no_ckpt.fits and "activation_checkpointing=true" in no_ckpt.reason


def test_70b_ppo_checkpoint_disk() -> None:
    """One save holds the actor and the critic (fp32 master weights + AdamW moments, 12 bytes a
    parameter; the frozen models are reloaded, not saved), each rank writes 1/64 of it, and the
    disk holds the kept checkpoints plus the one being written (last.ckpt is a link)."""
    plan = plan_70b_ppo()
    trained = 68_976_648_192 + 68_714_512_384  # actor (LM head) + critic (scalar head)
    assert plan.checkpoint_bytes == 12 * trained  # about 1.65 TB
    assert plan.checkpoint_bytes_per_gpu == -(-12 * trained // 64)
    assert (plan.checkpoints_kept, plan.checkpoint_disk_bytes) == (1, 2 * 12 * trained)
    zero2 = plan_70b_ppo(strategy="deepspeed_zero2", checkpoints_kept=3)  # + bf16 module weights
    assert (
        zero2.checkpoint_bytes == 14 * trained and zero2.checkpoint_disk_bytes == 4 * 14 * trained
    )
    assert zero2.checkpoint_bytes_per_gpu == -(-12 * trained // 64) + 2 * trained
    true16 = plan_70b_ppo(strategy="fsdp", precision="bf16-true")
    assert true16.checkpoint_bytes == 6 * trained
    assert "1538.82 GiB on disk" in plan.render()


def test_70b_ppo_on_one_gpu_stops_with_the_reason() -> None:
    plan = plan_70b_ppo(devices=1, nodes=1)
    assert not plan.fits
    assert "needs" in plan.reason and "80.00 GiB" in plan.reason
    with pytest.raises(PlanError) as err:
        check_fits(plan)
    message = str(err.value)
    assert plan.reason in message and "68,976,648,192" in message and "DOES NOT FIT" in message
    gpus = int(plan.reason.split("fits on ")[1].split(" GPUs")[0])
    assert plan_70b_ppo(devices=8, nodes=gpus // 8).fits
    assert not plan_70b_ppo(devices=8, nodes=gpus // 8 - 1).fits


def test_ddp_replication_is_named_as_the_reason() -> None:
    plan = plan_70b_ppo(strategy="ddp")
    assert not plan.fits and "replicates model states" in plan.reason


def test_reward_stage_batches_chosen_and_rejected_rows() -> None:
    cfg = LlamaConfig.from_name("7b")
    plan = make_plan(cfg, "reward", "deepspeed_zero3", "bf16", 8, 1, 4, 1024, False)
    expected = activation_breakdown(cfg, 8, 1024, Numerics(2, 2, False), "scalar").full
    assert plan.activation_bytes == expected and plan.kv_cache_bytes == 0
    assert list(plan.phase_bytes) == ["train"]


def test_json_round_trip(tmp_path) -> None:
    plan = plan_70b_ppo()
    path = plan.write_json(tmp_path / "run" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left over
    loaded = Plan.from_dict(json.loads(path.read_text()))
    assert loaded == plan
    assert json.loads(path.read_text())["models"][0]["n_params"] == 68_976_648_192


def test_render_prints_every_exact_integer() -> None:
    plan = plan_70b_ppo()
    text = plan.render()
    for row in plan.models:
        assert f"{row.n_params:,}" in text and row.role in text and str(row.input) in text
    assert "344,096,833,536" in text and "FITS" in text and "of 80.00 GiB" in text


def test_70b_plan_is_instant_and_builds_no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the planner built a module")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)
    tracemalloc.start()
    start = time.perf_counter()
    plan_70b_ppo()
    plan_70b_ppo(devices=1, nodes=1)  # includes the search for the smallest cluster
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.2
    assert peak < 1_000_000  # bytes of Python objects, nowhere near a tensor


def test_default_clusters_and_precision_names() -> None:
    assert [default_cluster(n) for n in ("7b", "13b", "70B", "1b", "tiny")] == [
        (1, 8),
        (2, 8),
        (8, 8),
        (1, 1),
        (1, 1),
    ]
    with pytest.raises(PlanError, match="no default cluster"):
        default_cluster("34b")
    assert normalize_precision("bf16") == "bf16-mixed" and normalize_precision(32) == "32-true"
    with pytest.raises(PlanError, match="precision"):
        normalize_precision("64-true")


def test_bad_inputs_are_refused() -> None:
    cfg = LlamaConfig.from_name("tiny")
    with pytest.raises(PlanError, match="unknown strategy"):
        make_plan(cfg, "sft", "zero3", "bf16", 1, 1, 1, 128, False)
    with pytest.raises(PlanError, match="devices=0"):
        make_plan(cfg, "sft", "ddp", "bf16", 0, 1, 1, 128, False)
    with pytest.raises(PlanError, match="gpu_memory_gb"):
        make_plan(cfg, "sft", "ddp", "bf16", 1, 1, 1, 128, False, gpu_memory_gb=0)
