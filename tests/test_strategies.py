"""The `strategy=` configs, the strategy objects they build, the paper sizes' defaults, and the
single-process parts of sharded building (lazy checkpoint reading, loading, the gathered copy)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import compose_config
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from llamalab.checkpoint import CheckpointError, load_model
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.optim import param_groups
from llamalab.scale.build import (
    LazyState,
    build,
    build_pretrained,
    load_weights,
    sharding_mode,
    units,
)
from llamalab.scale.deepspeed_cpu import LlamaDeepSpeedStrategy
from llamalab.scale.strategies import build_strategy
from llamalab.scale.zero_gen import consolidated, full_bytes, should_gather

STRATEGIES = [
    "auto",
    "ddp",
    "fsdp",
    "deepspeed_zero2",
    "deepspeed_zero3",
    "deepspeed_zero3_offload",
]


@pytest.fixture(scope="module")
def world(tiny_checkpoints: dict) -> dict[str, Path]:
    return tiny_checkpoints


# ---------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_config_builds_its_strategy(name: str, tmp_path: Path) -> None:
    cfg = compose_config(
        [f"strategy={name}", "trainer.devices=2", "trainer.accelerator=cpu"], tmp_path
    )
    assert cfg.strategy.name == name
    strategy = build_strategy(cfg.strategy, cfg)
    expected = {"auto": str, "ddp": DDPStrategy, "fsdp": ModelParallelStrategy}
    assert isinstance(strategy, expected.get(name, LlamaDeepSpeedStrategy))
    mode = {"fsdp": "fsdp", "deepspeed_zero3": "zero3", "deepspeed_zero3_offload": "zero3"}
    assert sharding_mode(strategy) == mode.get(name, "none")


def test_deepspeed_settings_are_the_yaml_ones(tmp_path: Path) -> None:
    cfg = compose_config(["strategy=deepspeed_zero3_offload"], tmp_path)
    ds = build_strategy(cfg.strategy, cfg).config
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and ds["gradient_clipping"] == 1.0
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 200_000_000  # inherited from deepspeed_zero3.yaml
    zero2 = build_strategy(compose_config(["strategy=deepspeed_zero2"], tmp_path).strategy).config
    assert (
        zero2["zero_optimization"]["stage"] == 2
        and "offload_param" not in zero2["zero_optimization"]
    )


def test_fsdp_shards_over_every_rank(tmp_path: Path) -> None:
    cfg = compose_config(["strategy=fsdp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    strategy = build_strategy(cfg.strategy, cfg)
    assert strategy._data_parallel_size == 8 and strategy._tensor_parallel_size == 1


@pytest.mark.parametrize("model", ["7b", "13b", "70b"])
def test_paper_sizes_default_to_zero3_bf16_and_the_command_line_wins(
    model: str, tmp_path: Path
) -> None:
    cfg = compose_config([f"model={model}"], tmp_path)
    assert (cfg.strategy.name, cfg.trainer.precision) == ("deepspeed_zero3", "bf16-mixed")
    cfg = compose_config([f"model={model}", "strategy=ddp", "precision=32-true"], tmp_path)
    assert (cfg.strategy.name, cfg.trainer.precision) == ("ddp", "32-true")
    tiny = compose_config(["model=tiny"], tmp_path)
    assert (tiny.strategy.name, str(tiny.trainer.precision)) == ("auto", "32")


def test_70b_ppo_plan_fits_the_default_cluster_under_its_default_strategy(tmp_path: Path) -> None:
    from llamalab.runner.run import architecture
    from llamalab.scale.plan_cfg import plan_from_config

    cfg = compose_config(
        ["model=70b", "stage=ppo", "stage.activation_checkpointing=true"], tmp_path
    )
    plan = plan_from_config(cfg, architecture(cfg), {})
    assert (plan.strategy, plan.world_size) == ("deepspeed_zero3", 64)
    assert plan.fits, plan.reason


# ---------------------------------------------------------------------------- building, loading
def test_lazy_state_reads_names_shapes_and_head(world: dict[str, Path]) -> None:
    state = LazyState(world["sft"])
    model = load_model(world["sft"])
    assert state.head == "lm" and state.config == model.config
    assert set(state) == set(dict(model.named_parameters()))
    name = "layers.0.attention.wq.weight"
    assert state.shape(name) == tuple(model.get_parameter(name).shape)
    torch.testing.assert_close(state[name], model.get_parameter(name), rtol=0, atol=0)
    assert LazyState(world["rm"]).head == "scalar"


def test_units_cover_every_parameter_once(world: dict[str, Path]) -> None:
    model = load_model(world["sft"])
    names = [prefix + n for prefix, unit in units(model) for n, _ in unit.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_unit_by_unit_loading_equals_load_model(world: dict[str, Path]) -> None:
    expected = load_model(world["sft"]).state_dict()
    model = build("lm", LazyState(world["sft"]).config, "none")
    load_weights(model, LazyState(world["sft"]), "none", "test")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_critic_from_a_language_model_keeps_its_own_head(world: dict[str, Path]) -> None:
    critic = build_pretrained(world["sft"], "scalar", "none", trainable=True)
    lm = load_model(world["sft"])
    assert isinstance(critic, LlamaScalar) and critic.training
    torch.testing.assert_close(critic.tok_embeddings.weight, lm.tok_embeddings.weight)
    assert all(p.requires_grad for p in critic.parameters())


def test_frozen_models_and_head_mismatches(world: dict[str, Path]) -> None:
    rm = build_pretrained(world["rm"], "scalar", "none", trainable=False, role="reward_helpful")
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    with pytest.raises(CheckpointError, match="not a reward model"):
        build_pretrained(world["sft"], "scalar", "none", trainable=False, role="reward_safety")
    with pytest.raises(CheckpointError, match="not a language model"):
        build_pretrained(world["rm"], "lm", "none", trainable=False)


# ---------------------------------------------------------------------------- generation choice
def test_unsharded_models_are_used_as_they_are(world: dict[str, Path]) -> None:
    model = load_model(world["sft"])
    with consolidated(model, "none") as same:
        assert same is model


def test_gather_verdicts() -> None:
    model = Llama.from_config(
        LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    )
    assert full_bytes(model) == 4 * sum(p.numel() for p in model.parameters())
    assert should_gather(model, "always") and not should_gather(model, "never")
    assert should_gather(model, "auto")  # a few KB always fits
    with pytest.raises(ValueError, match="gather_for_generation"):
        should_gather(model, "sometimes")


def test_slurm_launcher_config_takes_the_cluster_of_the_model(tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm", "model=13b"], tmp_path)
    launcher = cfg.hydra.launcher
    # submitit's launcher whose requeued jobs resume (tests/test_crash_safety.py runs its requeue)
    assert launcher._target_ == "llamalab.runner.slurm_launcher.ResumingSlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_zero3_partitioned_matrices_are_weight_decayed() -> None:
    """Under ZeRO-3 a parameter is an empty 1-D tensor between gathers; its shape is
    ``ds_shape``, and the decay groups follow it (they once put every matrix in the no-decay
    group, so ZeRO-3 runs trained without weight decay)."""
    matrix, norm = torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0))
    matrix.ds_shape, norm.ds_shape = torch.Size([8, 4]), torch.Size([8])  # type: ignore[attr-defined]
    decay, no_decay = param_groups([("w", matrix), ("norm", norm)], weight_decay=0.1)
    assert decay["params"] == [matrix] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [norm] and no_decay["weight_decay"] == 0.0
