"""The Hydra config: every option of every group composes, resolves and instantiates."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONFIGS, compose_config
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from llamalab.model import LlamaConfig
from llamalab.model.config import ConfigError
from llamalab.runner.run import accumulation, architecture, stage_inputs
from llamalab.scale.strategies import world_size


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


STAGES = options("stage")
MODELS = options("model")
STRATEGIES = options("strategy")


def test_default_job_is_tiny_pretraining() -> None:
    cfg = compose_config()
    assert cfg.stage.name == "pretrain"
    assert cfg.model.name == "tiny"
    assert cfg.strategy.name == "auto"
    assert cfg.logger.wandb._target_.endswith("WandbLogger")
    assert architecture(cfg).num_params() == LlamaConfig.from_name("tiny").num_params()
    for key in ("seed", "ckpt_path", "dry_run", "compile"):
        assert key in cfg
    assert "output_dir" in cfg.paths and "path" in cfg.data and "init" in cfg.stage


@pytest.mark.parametrize("group", [
    "model", "attention", "stage", "strategy", "precision", "trainer", "logger", "callbacks",
    "paths", "debug", "experiment", "hparams_search",
])  # fmt: skip
def test_every_option_of_every_group_composes_and_resolves(group: str) -> None:
    """Each option composes, every interpolation resolves, and the option is what the job runs:
    the resolved job differs from the default job exactly when the option is not the default.
    (hydra-optuna-sweeper is a dev dependency: without it this fails, it does not skip.)"""
    assert options(group), f"configs/{group}/ has no options"
    default = compose_config()
    default_choice, default_job = default.hydra.runtime.choices[group], resolved_job(default)
    for option in options(group):
        cfg = compose_config([f"{group}='{option}'"])
        assert cfg.hydra.runtime.choices[group] == option
        assert (resolved_job(cfg) == default_job) == (option == default_choice), option
        if group == "hparams_search":  # the override swaps in the Optuna sweeper and its space
            assert cfg.hydra.sweeper._target_.endswith("optuna_sweeper.OptunaSweeper")
            assert cfg.hydra.sweeper.direction == "minimize"
            assert set(cfg.hydra.sweeper.params) == {"stage.optim.lr", "stage.optim.warmup_steps"}


def resolved_job(cfg: DictConfig) -> dict:
    """The resolved config without the hydra node (which records the overrides themselves)."""
    job = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(job, dict)
    job.pop("hydra")
    return job


@pytest.mark.parametrize("model", MODELS)
def test_every_model_size_is_a_valid_architecture(model: str) -> None:
    cfg = compose_config([f"model={model}"])
    arch = architecture(cfg)
    assert arch.num_params() == LlamaConfig.from_name(model).num_params()


def test_paper_sizes_have_exact_parameter_counts() -> None:
    counts = {"7b": 6_738_415_616, "13b": 13_015_864_320, "70b": 68_976_648_192}
    for name, expected in counts.items():
        assert architecture(compose_config([f"model={name}"])).num_params() == expected


def test_attention_group_overrides_only_kv_heads() -> None:
    assert architecture(compose_config(["model=70b"])).kv_heads == 8  # 70B's own GQA
    assert architecture(compose_config(["model=7b"])).kv_heads == 32  # 7B's own MHA
    base = compose_config(["model=70b"]).model
    for attention, kv in (("mha", 64), ("gqa", 8), ("mqa", 1)):
        cfg = compose_config(["model=70b", f"attention={attention}"])
        assert architecture(cfg).kv_heads == kv
        assert cfg.model.attention == attention
        changed = {
            k for k in base if k not in ("n_kv_heads", "attention") and base[k] != cfg.model[k]
        }
        assert not changed
    assert architecture(compose_config(["attention=gqa"])).kv_heads == 2  # tiny's GQA count


def test_override_typos_fail_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_config(["model=tinyy"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["stage=pretrainn"])
    with pytest.raises(ConfigCompositionException):
        compose_config(["trainer.max_stepz=3"])


def test_impossible_architecture_is_caught_when_composed() -> None:
    cfg = compose_config(["model.n_kv_heads=3"])
    with pytest.raises(
        ConfigError, match="n_heads \\(8\\) must be divisible by n_kv_heads \\(3\\)"
    ):
        architecture(cfg)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_config_has_its_inputs_and_output_folder(stage: str) -> None:
    cfg = compose_config([f"stage={stage}", "rm=safety"])
    from hydra.utils import get_class

    assert issubclass(get_class(cfg.data._target_), __import__("lightning").LightningDataModule)
    expected_folder = "reward_safety" if stage == "reward" else stage
    assert cfg.stage.run_name == expected_folder
    inputs = stage_inputs(cfg)
    if stage != "pretrain":
        assert "init" in inputs and inputs["init"].endswith("latest")


def test_run_directory_is_outputs_stage_timestamp_or_output_dir(tmp_path: Path) -> None:
    cfg = compose_config(["stage=reward", "rm=safety"])
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]  # type: ignore[index]
    assert run_dir.startswith("outputs/reward_safety/")
    cfg = compose_config([f"paths.output_dir={tmp_path}"])
    assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"] == str(tmp_path)  # type: ignore[index]


def test_gradient_accumulation_reaches_the_target_batch() -> None:
    cfg = compose_config()  # tiny: 4096 tokens per step of 16 x 256 micro-batches
    assert accumulation(cfg, world_size(cfg)) == cfg.stage.batch_tokens // (
        cfg.data.batch_size * cfg.data.seq_len
    )
    cfg = compose_config(["model=7b"])  # paper: 4M tokens per step on 8 GPUs
    expected = round(4_194_304 / (cfg.data.batch_size * 8 * 4096))
    assert accumulation(cfg, world_size(cfg)) == expected


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_loggers_instantiate_offline(logger: str, tmp_path: Path) -> None:
    cfg = compose_config([f"logger={logger}"], output_dir=tmp_path)
    (lg_cfg,) = cfg.logger.values()
    extra = {"offline": True} if logger == "wandb" else {}
    instance = instantiate(lg_cfg, **extra)
    assert isinstance(instance, {"wandb": WandbLogger, "tensorboard": TensorBoardLogger}[logger])
    assert Path(instance.save_dir).is_relative_to(tmp_path)  # logs land in the run directory
    if logger == "wandb":
        assert instance._offline and instance._project == "llamalab"
        assert instance._wandb_init["name"] == "pretrain-tiny-mha-s1234"


def test_callbacks_instantiate(tmp_path: Path) -> None:
    cfg = compose_config(output_dir=tmp_path)
    names = {type(instantiate(c)).__name__ for c in cfg.callbacks.values()}
    assert {"AtomicModelCheckpoint", "LearningRateMonitor", "RichProgressBar"} <= names
