"""Experiment tracking: W&B online when the user is logged in, offline otherwise.

Offline runs are written under the run directory (``<run>/wandb/offline-run-*``) and can be
uploaded later with ``wandb sync <dir>``; nothing in the code changes between the two modes.

What a run carries (issue 8): one group per sweep (``sweep_group``), the run name and tags from
the config (stage, model, attention, strategy, seed: ``run_tags``), the full resolved config,
every ``train/*`` and ``val/*`` metric plotted against ``train/tokens_seen`` (``WandbTracking``)
and, for pretraining, a ``val/samples`` table of greedy continuations (the other stages log
their own sample tables).
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from llamalab.data.pretrain import PretrainDataModule
from llamalab.generation import generate
from llamalab.scale.wrap import uncompiled
from llamalab.stages.base import LlamaStage

# The x-axis of every step metric: tokens are what a token budget and throughput are measured in.
TOKENS_AXIS = "train/tokens_seen"
# Metrics every LM stage logs; defined by name up front (a name beats any glob, Lightning's "*"
# included), later ones as they appear.
KNOWN_METRICS = (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/mfu",
    "train/target_tokens",
    "val/loss",
    "val/ppl",
)
SAMPLE_COLUMNS = ["step", "tokens_seen", "prompt", "continuation"]


def wandb_logged_in() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(str(Path.home() / ".netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
    return rc.authenticators(host) is not None


def wandb_offline(logger_cfg: DictConfig) -> bool:
    """``logger.wandb.offline`` when set; else WANDB_MODE; else offline unless logged in."""
    if logger_cfg.get("offline") is not None:
        return bool(logger_cfg.offline)
    mode = os.environ.get("WANDB_MODE")
    return mode in ("offline", "dryrun") or (mode != "online" and not wandb_logged_in())


def wandb_kwargs(cfg: DictConfig, logger_cfg: DictConfig) -> dict[str, Any]:
    """Mode, group and tags for ``WandbLogger`` (extra keyword arguments to ``instantiate``).

    The resolved config is not passed here: ``hydra.utils.instantiate`` has a parameter named
    ``config`` that would swallow it; ``WandbTracking`` writes it into the run instead.
    """
    finish_previous_run()
    kwargs: dict[str, Any] = {
        "offline": wandb_offline(logger_cfg),
        "tags": run_tags(cfg, logger_cfg),
    }
    group = sweep_group(cfg)
    if group:
        kwargs["group"] = group
    return kwargs


def run_tags(cfg: DictConfig, logger_cfg: DictConfig | None = None) -> list[str]:
    """The configured tags plus ``strategy:<name>`` and ``seed:<n>``, without duplicates.

    The configured ones (``tags`` in train.yaml) are stage, model and attention; the strategy and
    the seed are added here because they are what tells apart the runs of a sweep.
    """
    configured = (
        (logger_cfg.get("tags") if logger_cfg is not None else None) or cfg.get("tags") or []
    )
    tags = [str(t) for t in configured]
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("name"):
        tags.append(f"strategy:{strategy.name}")
    if cfg.get("seed") is not None:
        tags.append(f"seed:{cfg.seed}")
    return list(dict.fromkeys(tags))


def sweep_group(cfg: DictConfig) -> str | None:
    """In a Hydra multirun every job of the sweep shares one W&B group (the sweep directory)."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # no Hydra (a test or script with a composed config)
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(hc.sweep.dir).name}-{cfg.stage.run_name}"


def finish_previous_run() -> None:
    """End a W&B run left open by an earlier job of the same process.

    Hydra's multirun and the Optuna sweeper run their jobs one after another in one process, and
    Lightning never calls ``wandb.finish()``: without this every job would log into the first
    job's run (``WandbLogger`` reuses ``wandb.run`` when one is open).
    """
    wandb = sys.modules.get("wandb")  # not imported yet = no run can be open
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def wandb_loggers(trainer: L.Trainer) -> list[Any]:
    """The trainer's W&B loggers, on every rank (on ranks other than 0 Lightning gives them a
    dummy ``experiment``: use :func:`wandb_runs` to touch the run itself)."""
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def wandb_runs(trainer: L.Trainer) -> list[Any]:
    """The W&B runs this process may write to: rank 0's, none on other ranks.

    Lightning creates the run on global rank 0 only; elsewhere ``WandbLogger.experiment`` is a
    ``DummyExperiment`` whose attributes are functions, so ``run.config.update`` would crash.
    """
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in wandb_loggers(trainer)]


class WandbTracking(L.Callback):
    """Config, x-axis and sample tables of the W&B run; does nothing without a ``WandbLogger``.

    Args:
        config: the full resolved run config, written into the run's config at set-up.
        samples: pretraining continuations logged as ``val/samples`` after each validation.
        prompt_tokens: tokens of a validation window used as the prompt of a sample.
        new_tokens: greedy tokens generated per sample.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        samples: int = 4,
        prompt_tokens: int = 16,
        new_tokens: int = 32,
    ) -> None:
        self.config = config or {}
        self.samples, self.prompt_tokens, self.new_tokens = samples, prompt_tokens, new_tokens
        self._defined: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for run in wandb_runs(trainer):  # created by Lightning before callbacks' setup
            if self.config:
                run.config.update(self.config, allow_val_change=True)
            run.define_metric(TOKENS_AXIS)
            for pattern in ("train/*", "val/*"):
                run.define_metric(pattern, step_metric=TOKENS_AXIS, step_sync=True)
        self.define_metrics(trainer, KNOWN_METRICS)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.define_metrics(trainer, trainer.callback_metrics)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(pl_module, LlamaStage) and not trainer.sanity_checking:
            # In the validation row too, so val curves (W&B and CSV) have their x value.
            pl_module.log(TOKENS_AXIS, float(pl_module.tokens_seen), on_step=False, on_epoch=True)
        if wandb_loggers(trainer) and not trainer.sanity_checking:
            # Every rank generates (under ZeRO-3 / FSDP each forward is collective); only rank 0
            # writes the table.
            self.log_samples(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.define_metrics(trainer, trainer.callback_metrics)

    # ------------------------------------------------------------------ pieces
    def define_metrics(self, trainer: L.Trainer, names: Any) -> None:
        """Plot each new ``train/*`` / ``val/*`` metric against ``train/tokens_seen``."""
        new = [
            str(n)
            for n in names
            if str(n).startswith(("train/", "val/")) and n != TOKENS_AXIS and n not in self._defined
        ]
        if not new:
            return
        for run in wandb_runs(trainer):
            for name in new:
                run.define_metric(name, step_metric=TOKENS_AXIS, step_sync=True)
        self._defined.update(new)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Greedy continuations of the first validation windows, as table ``val/samples``."""
        rows = pretrain_samples(
            trainer, pl_module, self.samples, self.prompt_tokens, self.new_tokens
        )
        if rows and isinstance(pl_module, LlamaStage):
            pl_module.log_table("val/samples", SAMPLE_COLUMNS, rows)  # rank 0 writes it


def pretrain_samples(
    trainer: L.Trainer, pl_module: L.LightningModule, n: int, prompt_tokens: int, new_tokens: int
) -> list[list[Any]]:
    """Rows ``[step, tokens_seen, prompt, continuation]``; empty for stages that publish their
    own samples (``continuation_samples`` unset: SFT, reward, PPO) or without validation
    windows."""
    if n <= 0 or not isinstance(pl_module, LlamaStage) or not pl_module.continuation_samples:
        return []
    datamodule = pl_module.datamodule  # None: fit on plain dataloaders
    if not isinstance(datamodule, PretrainDataModule):
        return []
    val_set, tokenizer, model = datamodule.val_set, datamodule.tokenizer, pl_module.model
    if val_set is None or tokenizer is None or model is None or len(val_set) == 0:
        return []
    prompts = [
        val_set[i]["input_ids"][:prompt_tokens].tolist() for i in range(min(n, len(val_set)))
    ]
    out = generate(uncompiled(model), prompts, new_tokens, temperature=0.0, top_p=None)
    step, seen = trainer.global_step, int(pl_module.tokens_seen)
    return [
        [step, seen, tokenizer.decode(p), tokenizer.decode(t)] for p, t in zip(prompts, out.tokens)
    ]


def tracking_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """``WandbTracking`` with the resolved config when the W&B logger is configured."""
    loggers = cfg.get("logger") or {}
    wandb_cfg = loggers.get("wandb") if isinstance(loggers, DictConfig) else None
    if wandb_cfg is None or "_target_" not in wandb_cfg:
        return []
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    return [WandbTracking(config={str(k): v for k, v in config.items()})]


# ---------------------------------------------------------------------------- reading runs back
# An offline run's ``run-<id>.wandb`` is a LevelDB-style log of protobuf ``Record``s: a 7-byte
# header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte
# header (CRC32C, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4). The SDK no
# longer ships a Python reader (wandb-core writes the file), so this is one, for tests and for
# collecting offline runs without uploading them.
_BLOCK, _CHUNK_HEADER, _FILE_HEADER = 32768, 7, b":W&B\xe1\xbe\x00"


@dataclass
class OfflineRun:
    """What an offline run recorded: run info, config, history rows, summary, metric definitions."""

    name: str
    group: str
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]]  # nested keys flattened: "val/samples/_type"
    summary: dict[str, Any]
    step_metrics: dict[str, str]  # metric name or glob -> its x-axis metric


def wandb_records(path: str | Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` file, in write order."""
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: heavy, only to read runs back

    data = Path(path).read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos, parts = len(_FILE_HEADER), list[bytes]()
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # the writer pads a block's tail shorter than a header
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        payload = data[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        parts = [payload] if kind in (1, 2) else [*parts, payload]
        if kind in (1, 4):
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(b"".join(parts))
            yield record


def _items(items: Any) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Read ``<run>/wandb/offline-run-*`` (or that folder itself, or its ``.wandb`` file)."""
    path = Path(run_dir)
    if path.is_dir() and not path.name.startswith(("offline-run-", "run-")):
        found = sorted(path.glob("wandb/offline-run-*/run-*.wandb")) or sorted(
            path.glob("offline-run-*/run-*.wandb")
        )
        if not found:
            raise FileNotFoundError(f"no offline W&B run under {run_dir}")
        path = found[-1]
    elif path.is_dir():
        path = next(path.glob("run-*.wandb"))
    run = OfflineRun("", "", [], {}, [], {}, {})
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.tags = (
                record.run.display_name,
                record.run.run_group,
                list(record.run.tags),
            )
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "metric" and record.metric.step_metric:
            run.step_metrics[record.metric.name or record.metric.glob_name] = (
                record.metric.step_metric
            )
    return run
