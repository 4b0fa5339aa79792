"""What ``src/train.py`` does with a composed config: check, plan, build, fit, export, link.

The order is the contract: everything that can be wrong with the config, the data, the inputs
or the memory plan is found before any model is built; a run that cannot fit stops with its plan.
Which inputs a stage needs, and what produces them, is :mod:`llamalab.pipeline`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from rich import print as rprint
from rich.syntax import Syntax
from rich.tree import Tree

from llamalab import pipeline
from llamalab.checkpoint.loader import checkpoint_config
from llamalab.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from llamalab.data.base import StageDataModule
from llamalab.model import LlamaConfig
from llamalab.model.config import ConfigError
from llamalab.pipeline import MissingInputError
from llamalab.runner.callbacks import default_callbacks, fit
from llamalab.runner.checkpoints import (
    check_resume_checkpoint,
    checkpoint_plugins,
    export_from_trainer,
    resolve_ckpt_path,
)
from llamalab.runner.paths import export_dir, link_latest, output_dir, resolve_export_dir
from llamalab.runner.reshard import WorldSizeChange
from llamalab.runner.tracking import finish_previous_run, wandb_kwargs
from llamalab.scale.batches import batch_layout
from llamalab.scale.build import is_rank_zero
from llamalab.scale.plan import Plan
from llamalab.scale.plan_cfg import check_machine, plan_from_config
from llamalab.scale.plan_gen import check_engine
from llamalab.scale.strategies import build_strategy, world_size
from llamalab.stages.base import LlamaStage

log = logging.getLogger("llamalab")

# Stages whose loss is a mean over answer tokens: every micro-batch of an optimizer step learns
# how many tokens the whole step has, on every rank (llamalab.data.sampling.StepBatches).
TOKEN_MEAN_STAGES = ("sft", "rejection_sampling")

ARCH_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "ffn_hidden_dim",
    "norm_eps",
    "rope_theta",
    "max_seq_len",
)


# ---------------------------------------------------------------------------- the config
def print_config(cfg: DictConfig) -> None:
    """The composed config as a rich tree (rank 0 only)."""
    if not is_rank_zero():
        return
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rprint(tree)


# ---------------------------------------------------------------------------- inputs
def export_shard_size(cfg: DictConfig) -> int:
    """``export.max_shard_size`` in bytes (absent: the Hugging Face default); a bad value stops
    here, before any model is built."""
    value = (cfg.get("export") or {}).get("max_shard_size", DEFAULT_MAX_SHARD_SIZE)
    try:
        size = parse_size(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"export.max_shard_size={value!r}: {err}") from err
    if size <= 0:
        raise ConfigError(f"export.max_shard_size={value!r}: must be more than 0 bytes")
    return size


def architecture(cfg: DictConfig) -> LlamaConfig:
    """The model size's architecture (validated now: an impossible config stops here)."""
    values = {k: cfg.model[k] for k in ARCH_KEYS}
    return LlamaConfig.from_dict(values)


def stage_inputs(cfg: DictConfig) -> dict[str, str]:
    """Config key -> path of every checkpoint the stage would load (for the plan and the checks)."""
    out = {}
    for item in pipeline.inputs_of(cfg.stage.name):
        value = cfg.stage.get(item.key)
        if value:
            out[item.key] = str(value)
    return out


def check_inputs(cfg: DictConfig) -> dict[str, Path]:
    """Every input must exist; the message names it and the command that produces it."""
    found, missing = {}, []
    declared = {item.key: item for item in pipeline.inputs_of(cfg.stage.name)}
    hints = {key: pipeline.input_command(cfg.stage.name, key) or "" for key in declared}
    inputs = stage_inputs(cfg)
    for key, item in declared.items():  # a required input set to null is as missing as a wrong path
        if item.required and key not in inputs:
            missing.append(
                f"  stage.{key} is not set: produce it with `{hints[key]}` or point "
                f"stage.{key} at a checkpoint"
            )
    for key, path in inputs.items():
        p = Path(path)
        if not p.exists():
            hint = hints.get(key, "")
            missing.append(
                f"  stage.{key}={path} does not exist"
                + (
                    f": produce it with `{hint}` or point stage.{key} at a checkpoint"
                    if hint
                    else ""
                )
            )
        else:
            found[key] = resolve_export_dir(p)
    if missing:
        raise MissingInputError(
            f"stage={cfg.stage.name} cannot start, inputs missing:\n" + "\n".join(missing)
        )
    return found


def checkpoint_architecture(path: Path) -> LlamaConfig:
    """The architecture stored with a checkpoint, read without loading its weights."""
    return checkpoint_config(path)


def tokenizer_for(cfg: DictConfig, inputs: dict[str, Path]) -> str | None:
    """The tokenizer a stage uses: ``data.tokenizer_path``, else the one exported with
    ``stage.init``, else None (the datamodule builds the built-in one)."""
    if cfg.data.get("tokenizer_path"):
        return str(cfg.data.tokenizer_path)
    init = inputs.get("init")
    if init is not None:
        for candidate in (init / "tokenizer.model", init.parent / "tokenizer.model"):
            if candidate.exists():
                return str(candidate)
    return None


def check_vocab(arch: LlamaConfig, vocab_size: int, tokenizer_path: str) -> None:
    if arch.vocab_size != vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer_path} has {vocab_size} pieces but the model's vocabulary is "
            f"{arch.vocab_size}: use the tokenizer the model was trained with (data.tokenizer_path)"
        )


def resume_checkpoint(cfg: DictConfig, out: Path, arch: LlamaConfig) -> str | None:
    """``ckpt_path`` (a file, ``last``, ``auto`` or null) -> the checkpoint to resume, refused
    now if it is missing, torn, or of another stage / architecture (docs/reliability.md)."""
    path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
    if path is not None:
        check_resume_checkpoint(path, arch, cfg.stage.name)
    return path


# ---------------------------------------------------------------------------- building
def build_loggers(cfg: DictConfig, out: Path) -> list[Any]:
    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv", version="")]
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        values = OmegaConf.to_container(lg_cfg, resolve=True)
        assert isinstance(values, dict)
        if name == "wandb":
            values.update(wandb_kwargs(cfg, lg_cfg))  # mode, full config, sweep group
        loggers.append(instantiate(values, _convert_="all"))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is not None and "_target_" in cb_cfg:
            callbacks.append(instantiate(cb_cfg))
    callbacks.extend(default_callbacks(cfg))
    return callbacks


def accumulation(cfg: DictConfig, world: int) -> int:
    """Micro-batches per optimizer step on each rank (:func:`llamalab.scale.batches.batch_layout`:
    the stage's batch is global, ``data.batch_size`` is the micro-batch per GPU); 1 for PPO,
    which makes its optimizer steps itself. Sizes that do not divide stop here."""
    layout = batch_layout(cfg, world)
    if cfg.trainer.get("accumulate_grad_batches"):
        return int(cfg.trainer.accumulate_grad_batches)
    if layout is None or not _lightning_accumulates(cfg.stage.name):
        return 1
    return layout.accumulation


def _lightning_accumulates(stage_name: str) -> bool:
    """Whether the stage's ``batch_size`` is reached by Lightning's accumulation (a stage the
    pipeline does not declare: yes)."""
    spec = pipeline.stage(stage_name)
    return spec.lightning_accumulates if spec is not None else True


def data_overrides(cfg: DictConfig, world: int) -> dict[str, Any]:
    """Datamodule arguments the batch rule sets: PPO's prompts per rank per iteration
    (``stage.rollout_batch`` / world size)."""
    layout = batch_layout(cfg, world)
    if layout is not None and cfg.stage.name == "ppo":
        return {"batch_size": layout.per_rank}
    return {}


def validation_schedule(trainer_cfg: DictConfig, accumulate: int) -> dict[str, Any]:
    """``trainer.val_check_interval`` as Lightning needs it, valid for any number of ranks.

    - null: once per epoch (``check_val_every_n_epoch`` epochs);
    - a float in (0, 1]: that fraction of each rank's epoch;
    - an int N: every N optimizer steps, counted across epochs. Lightning counts training
      batches per rank, so it gets ``N * accumulate`` with ``check_val_every_n_epoch=None``:
      the interval no longer has to fit in one rank's share of an epoch (with 2 ranks each sees
      half the batches, and a fixed interval of 50 failed against 41 batches per rank).
    A value that can never work stops here, naming the key.
    """
    interval = trainer_cfg.get("val_check_interval")
    if interval is None:
        return {}
    if isinstance(interval, bool) or not isinstance(interval, (int, float)):
        raise ConfigError(
            f"trainer.val_check_interval={interval!r}: use null (every epoch), a fraction of an "
            "epoch in (0, 1], or a whole number of optimizer steps"
        )
    if isinstance(interval, float) and not interval.is_integer():
        if not 0.0 < interval <= 1.0:
            raise ConfigError(
                f"trainer.val_check_interval={interval}: a fraction of an epoch must be in (0, 1]; "
                "a whole number means optimizer steps"
            )
        return {"val_check_interval": interval}
    if interval < 1:
        raise ConfigError(
            f"trainer.val_check_interval={interval}: a number of optimizer steps must be >= 1 "
            "(null validates once per epoch)"
        )
    return {"val_check_interval": int(interval) * accumulate, "check_val_every_n_epoch": None}


# ---------------------------------------------------------------------------- the run
def plan_for(cfg: DictConfig, arch: LlamaConfig, inputs: dict[str, str]) -> Plan:
    return plan_from_config(cfg, arch, inputs)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage as configured; returns the final validation metrics."""
    out = output_dir()
    print_config(cfg)
    arch = architecture(cfg)  # impossible architectures stop here
    shard_size = export_shard_size(cfg)
    world = world_size(cfg)
    accumulate = accumulation(cfg, world)  # batch sizes that do not divide stop here
    L.seed_everything(cfg.seed, workers=True)

    inputs = stage_inputs(cfg)
    if cfg.dry_run:
        plan = plan_for(cfg, arch, inputs)
        print(plan.render())
        plan.write_json(out / "plan.json")
        return {"plan": plan.to_dict()}

    if cfg.plan.get("check", True):  # a rollout engine that cannot fit stops before anything
        check_engine(plan_for(cfg, arch, inputs).generation)
    resolved = check_inputs(cfg)
    init = resolved.get("init")
    if init is not None:
        arch = checkpoint_architecture(init)  # a checkpoint fixes its own architecture
    ckpt_path = resume_checkpoint(cfg, out, arch)
    if cfg.plan.get("check", True):
        check_machine(plan_for(cfg, arch, inputs), cfg)

    tokenizer_path = tokenizer_for(cfg, resolved)
    datamodule = instantiate(
        cfg.data, tokenizer_path=tokenizer_path, **data_overrides(cfg, world), _convert_="all"
    )
    _check_protocol("data", datamodule, StageDataModule)
    if cfg.stage.name in TOKEN_MEAN_STAGES:  # the loss is the token mean of the whole step
        datamodule.set_step_rows(accumulate * int(cfg.data.batch_size))
    # PretrainDataModule can build the built-in tokenizer; the others take the one of `init`.
    tokenizer = datamodule.load_tokenizer()
    check_vocab(arch, tokenizer.vocab_size, str(tokenizer.model_path))

    stage_values = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(stage_values, dict)
    stage_kwargs: dict[str, Any] = {
        str(k): (str(resolved[str(k)]) if str(k) in resolved else v)
        for k, v in stage_values.items()
    }
    stage_kwargs.pop("_target_")
    module = instantiate(
        {"_target_": cfg.stage._target_},
        arch=arch.to_dict(),
        tokenizer_path=str(tokenizer.model_path),
        compile=cfg.compile,
        **stage_kwargs,
        _convert_="all",
    )  # cheap (the model is built in configure_model): bad stage settings stop here
    _check_protocol("stage", module, LlamaStage)
    datamodule.validate()  # bad data stops here, before the model is built

    strategy = build_strategy(cfg.strategy, cfg)
    trainer_overrides: dict[str, Any] = {
        "logger": build_loggers(cfg, out),
        # another world size than the checkpoint's: optimizer state and counters carried over
        "callbacks": [*build_callbacks(cfg), WorldSizeChange(ckpt_path)],
        "strategy": strategy,
        "plugins": checkpoint_plugins(strategy),  # crash-safe checkpoint files
        "accumulate_grad_batches": accumulate,
        **validation_schedule(cfg.trainer, accumulate if module.automatic_optimization else 1),
    }
    if cfg.trainer.get("max_steps", -1) == -1 and cfg.trainer.get("max_epochs") is None:
        trainer_overrides["max_epochs"] = int(cfg.stage.get("epochs", 1))
    if not module.automatic_optimization:
        trainer_overrides.update(gradient_clip_val=None, accumulate_grad_batches=1)
    trainer_overrides.update(module.trainer_overrides(cfg.trainer))  # PPO: max_steps, eval
    trainer = instantiate(cfg.trainer, **trainer_overrides, _convert_="all")

    fit(trainer, module, datamodule, ckpt_path)  # a preempted run exits here, checkpoint saved
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not cfg.trainer.get("fast_dev_run") and module.automatic_optimization:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        if results:
            metrics.update({k: float(v) for k, v in results[0].items()})

    exported = export_from_trainer(trainer, module, export_dir(out), shard_size)
    finish_previous_run()  # flush and close the W&B run now, not in an exit hook
    if trainer.is_global_zero:
        link_latest(cfg, out)
        log.info("run finished: %s (export: %s)", out, exported)
    return metrics


def _check_protocol(group: str, obj: Any, base: type) -> None:
    """The runner calls only what ``base`` declares: a ``_target_`` outside it stops here."""
    if not isinstance(obj, base):
        raise ConfigError(
            f"{group}._target_ builds {type(obj).__module__}.{type(obj).__name__}, which is not a "
            f"{base.__module__}.{base.__name__} (the methods the runner calls)"
        )
