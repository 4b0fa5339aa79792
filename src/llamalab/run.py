"""What ``src/train.py`` does with a composed config: check, plan, build, fit, export, link.

The order is the contract: everything that can be wrong with the config, the data, the inputs
or the memory plan is found before any model is built; a run that cannot fit stops with its plan.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from llamalab.model import LlamaConfig
from llamalab.model.config import ConfigError
from llamalab.scale.build import is_rank_zero
from llamalab.scale.strategies import world_size

log = logging.getLogger("llamalab")

_STARTED = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
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
# Inputs each stage loads, and the command that produces each default.
STAGE_INPUTS = {
    "pretrain": {},
    "sft": {"init": "python src/train.py  (pretraining)"},
    "reward": {"init": "python src/train.py stage=sft"},
    "ppo": {
        "init": "python src/train.py stage=sft",
        "critic_init": "python src/train.py stage=reward rm=helpful",
        "reward_helpful": "python src/train.py stage=reward rm=helpful",
        "reward_safety": "python src/train.py stage=reward rm=safety",
    },
    "rejection_sampling": {
        "init": "python src/train.py stage=sft",
        "reward_helpful": "python src/train.py stage=reward rm=helpful",
        "reward_safety": "python src/train.py stage=reward rm=safety",
    },
}


class MissingInputError(FileNotFoundError):
    """A stage started without the output of the stage it builds on."""


# ---------------------------------------------------------------------------- Hydra plumbing
def _run_dir(output_dir: Any, outputs_root: str, run_name: str) -> str:
    """``paths.output_dir`` when given, else ``outputs/<stage>/<timestamp>``."""
    if output_dir not in (None, "", "None", "null"):
        return str(output_dir)
    return f"{outputs_root}/{run_name}/{_STARTED}"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)


def output_dir() -> Path:
    """This run's directory (Hydra's run directory, shared by every DDP rank)."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # no Hydra (a test calling train() with a composed config)
        return Path(os.getcwd())


def print_config(cfg: DictConfig) -> None:
    """The composed config as a rich tree (rank 0 only)."""
    if not is_rank_zero():
        return
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rprint(tree)


# ---------------------------------------------------------------------------- inputs
def architecture(cfg: DictConfig) -> LlamaConfig:
    """The model size's architecture (validated now: an impossible config stops here)."""
    values = {k: cfg.model[k] for k in ARCH_KEYS}
    return LlamaConfig.from_dict(values)


def resolve_export_dir(path: str | Path) -> Path:
    """A run directory (or its ``latest`` link) -> its ``export/``; other paths unchanged."""
    p = Path(path)
    if (p / "export" / "config.json").exists():
        return p / "export"
    return p


def stage_inputs(cfg: DictConfig) -> dict[str, str]:
    """Role -> path of every checkpoint the stage would load (for the plan and the checks)."""
    out = {}
    for role in STAGE_INPUTS.get(cfg.stage.name, {}):
        value = cfg.stage.get(role)
        if value:
            out[role] = str(value)
    if cfg.stage.name == "pretrain" and cfg.stage.get("init"):
        out["init"] = str(cfg.stage.init)
    return out


def check_inputs(cfg: DictConfig) -> dict[str, Path]:
    """Every input must exist; the message names it and the command that produces it."""
    found, missing = {}, []
    hints = STAGE_INPUTS.get(cfg.stage.name, {})
    inputs = stage_inputs(cfg)
    for role in hints:  # a required input set to null is as missing as a wrong path
        if role not in inputs:
            missing.append(
                f"  stage.{role} is not set: produce it with `{hints[role]}` or point "
                f"stage.{role} at a checkpoint"
            )
    for role, path in inputs.items():
        p = Path(path)
        if not p.exists():
            hint = hints.get(role, "")
            missing.append(
                f"  stage.{role}={path} does not exist"
                + (
                    f": produce it with `{hint}` or point stage.{role} at a checkpoint"
                    if hint
                    else ""
                )
            )
        else:
            found[role] = resolve_export_dir(p)
    if missing:
        raise MissingInputError(
            f"stage={cfg.stage.name} cannot start, inputs missing:\n" + "\n".join(missing)
        )
    return found


def checkpoint_architecture(path: Path) -> LlamaConfig:
    """The architecture stored with a checkpoint, read without loading its weights."""
    import json

    import torch

    if (path / "config.json").exists():
        return LlamaConfig.from_hf_config(json.loads((path / "config.json").read_text()))
    if path.is_file() and path.suffix == ".ckpt":
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        if "llamalab" in ckpt:
            return LlamaConfig.from_dict(ckpt["llamalab"]["model_config"])
    from llamalab.checkpoint import load_model

    return load_model(path).config


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
    from llamalab.reliability import check_resume_checkpoint, resolve_ckpt_path

    path = resolve_ckpt_path(cfg.get("ckpt_path"), out)
    if path is not None:
        check_resume_checkpoint(path, arch, cfg.stage.name)
    return path


# ---------------------------------------------------------------------------- building
def build_loggers(cfg: DictConfig, out: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out), name="csv", version="")]
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        if lg_cfg is None or "_target_" not in lg_cfg:
            continue
        values = OmegaConf.to_container(lg_cfg, resolve=True)
        assert isinstance(values, dict)
        if name == "wandb":
            from llamalab.tracking import wandb_kwargs

            values.update(wandb_kwargs(cfg, lg_cfg))  # mode, full config, sweep group
        loggers.append(instantiate(values, _convert_="all"))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[Any]:
    callbacks = []
    for cb_cfg in (cfg.get("callbacks") or {}).values():
        if cb_cfg is not None and "_target_" in cb_cfg:
            callbacks.append(instantiate(cb_cfg))
    from llamalab.callbacks import default_callbacks

    callbacks.extend(default_callbacks(cfg))
    return callbacks


def build_strategy(cfg: DictConfig) -> Any:
    from llamalab.scale.strategies import build_strategy as _build

    return _build(cfg.strategy, cfg)


def accumulation(cfg: DictConfig, world: int) -> int:
    """Micro-batches per optimizer step to reach the stage's target batch (tokens or items)."""
    if cfg.trainer.get("accumulate_grad_batches"):
        return int(cfg.trainer.accumulate_grad_batches)
    stage, data = cfg.stage, cfg.data
    micro = data.get("batch_size", 1) * world
    if stage.get("batch_tokens"):
        target = stage.batch_tokens / (micro * data.seq_len)
    elif stage.get("batch_size") and stage.name != "ppo":
        target = stage.batch_size / micro
    else:
        return 1
    return max(1, round(target))


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
def plan_for(cfg: DictConfig, arch: LlamaConfig, inputs: dict[str, str]) -> Any:
    from llamalab.scale.plan_cfg import plan_from_config

    return plan_from_config(cfg, arch, inputs)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one stage as configured; returns the final validation metrics."""
    out = output_dir()
    print_config(cfg)
    arch = architecture(cfg)  # impossible architectures stop here
    L.seed_everything(cfg.seed, workers=True)

    inputs = stage_inputs(cfg)
    if cfg.dry_run:
        plan = plan_for(cfg, arch, inputs)
        print(plan.render())
        plan.write_json(out / "plan.json")
        return {"plan": plan.to_dict()}

    resolved = check_inputs(cfg)
    init = resolved.get("init")
    if init is not None:
        arch = checkpoint_architecture(init)  # a checkpoint fixes its own architecture
    ckpt_path = resume_checkpoint(cfg, out, arch)
    if cfg.plan.get("check", True):
        from llamalab.scale.plan_cfg import check_machine

        check_machine(plan_for(cfg, arch, inputs), cfg)

    tokenizer_path = tokenizer_for(cfg, resolved)
    datamodule = instantiate(cfg.data, tokenizer_path=tokenizer_path, _convert_="all")
    # PretrainDataModule can build the built-in tokenizer; the others take the one of `init`.
    load = getattr(datamodule, "load_tokenizer", None)
    tokenizer = load() if load is not None else datamodule.tokenizer
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
    if hasattr(datamodule, "validate"):
        datamodule.validate()  # bad data stops here, before the model is built

    from llamalab.reliability import checkpoint_plugins, fit

    strategy = build_strategy(cfg)
    accumulate = accumulation(cfg, world_size(cfg))
    trainer_overrides: dict[str, Any] = {
        "logger": build_loggers(cfg, out),
        "callbacks": build_callbacks(cfg),
        "strategy": strategy,
        "plugins": checkpoint_plugins(strategy),  # crash-safe checkpoint files
        "accumulate_grad_batches": accumulate,
        **validation_schedule(cfg.trainer, accumulate if module.automatic_optimization else 1),
    }
    if cfg.trainer.get("max_steps", -1) == -1 and cfg.trainer.get("max_epochs") is None:
        trainer_overrides["max_epochs"] = int(cfg.stage.get("epochs", 1))
    if not module.automatic_optimization:
        trainer_overrides.update(gradient_clip_val=None, accumulate_grad_batches=1)
    if hasattr(module, "trainer_overrides"):  # e.g. PPO: max_steps from its iterations
        trainer_overrides.update(module.trainer_overrides(cfg.trainer))
    trainer = instantiate(cfg.trainer, **trainer_overrides, _convert_="all")

    fit(trainer, module, datamodule, ckpt_path)  # a preempted run exits here, checkpoint saved
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if not cfg.trainer.get("fast_dev_run") and module.automatic_optimization:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        if results:
            metrics.update({k: float(v) for k, v in results[0].items()})

    from llamalab.scale.strategies import export_from_trainer

    export_dir = export_from_trainer(trainer, module, out / "export")
    from llamalab.tracking import finish_previous_run

    finish_previous_run()  # flush and close the W&B run now, not in an exit hook
    if trainer.is_global_zero:
        link_latest(cfg, out)
        log.info("run finished: %s (export: %s)", out, export_dir)
    return metrics


def link_latest(cfg: DictConfig, out: Path) -> None:
    """Point ``outputs/<stage>/latest`` at this run (a relative symlink, replaced atomically)."""
    root = Path(cfg.paths.outputs_root).resolve()
    out = out.resolve()
    if root not in out.parents:
        return  # runs put elsewhere with paths.output_dir do not move `latest`
    stage_root = root / cfg.stage.run_name
    stage_root.mkdir(parents=True, exist_ok=True)
    link = stage_root / "latest"
    tmp = stage_root / f".latest.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(out, stage_root))
    os.replace(tmp, link)
