"""What every stage shares: building the model in ``configure_model``, loading ``init`` weights,
AdamW + warmup/cosine schedule, per-step throughput/MFU logging, non-finite guards, the
checkpoint contract and the Hugging Face export.

A stage subclass says which head it trains (``head = "lm"`` or ``"scalar"``) and implements
``training_step`` / ``validation_step``; everything else lives here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from llamalab.checkpoint import save_hf
from llamalab.checkpoint.io import check_state_shapes
from llamalab.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE
from llamalab.data.base import StageDataModule
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.model.config import ConfigError
from llamalab.optim import build_adamw, param_groups, warmup_cosine_scheduler
from llamalab.perf import measure_peak_flops
from llamalab.scale.build import (
    LazyState,
    build,
    load_weights,
    module_sharding,
    stage_device,
    stage_mesh,
)
from llamalab.scale.wrap import apply_activation_checkpointing, compile_blocks, uncompiled
from llamalab.scale.zero_gen import generation_model
from llamalab.tokenizer import Tokenizer


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm: the run stops, naming the step and the last checkpoint."""


class LlamaStage(L.LightningModule):
    """Base LightningModule of every stage.

    Args:
        arch: the architecture (``LlamaConfig`` fields), already resolved by the entry point
            (from the checkpoint in ``init``, or the model size with the tokenizer's vocabulary).
        optim: optimizer/schedule settings (``lr, betas, eps, weight_decay, warmup_steps,
            min_lr_ratio, schedule, fused``).
        init: weights to start from (HF / Meta directory, ``.ckpt``, a run directory) or None.
        tokenizer_path: the SentencePiece model exported next to the weights.
        activation_checkpointing: recompute each block in the backward pass.
        compile: ``torch.compile`` each transformer block.
        nonfinite: ``stop`` (raise with the step and last checkpoint) or ``skip`` (zero the
            update of that batch and count it as ``train/skipped_batches``).
    """

    head = "lm"
    # A chat model (SFT and what follows it): its export carries the Llama 2 chat template.
    chat_model = False
    # The W&B callback logs greedy continuations of validation windows as `val/samples` for
    # stages that set this (pretraining); the others publish their own sample tables.
    continuation_samples = False

    def __init__(
        self,
        arch: dict[str, Any],
        optim: dict[str, Any],
        init: str | None = None,
        tokenizer_path: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        nonfinite: str = "stop",
        name: str = "stage",
        run_name: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:  # a typo in a stage key must not pass silently
            raise ConfigError(
                f"unknown stage setting(s) {sorted(unused)} for {type(self).__name__} "
                f"(stage={name}); check the spelling against configs/stage/{name}.yaml"
            )
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"stage.nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        self.save_hyperparameters(ignore=["unused"])
        self.arch = LlamaConfig.from_dict(dict(arch))
        self.optim_cfg = dict(optim)
        self.init_path = init
        self.tokenizer_path = tokenizer_path
        self.stage_name = name
        self.model: nn.Module | None = None
        self.skipped_batches = 0
        self._step_t0: float | None = None
        self._peak_flops: float | None = None
        self.tokens_seen = 0
        self._norm_step = 0  # the optimizer step whose DeepSpeed gradient norm was checked

    @property
    def datamodule(self) -> StageDataModule | None:
        """The trainer's datamodule (the runner checks it is a ``StageDataModule``); None when
        fitting on plain dataloaders. Lightning sets ``trainer.datamodule`` on every trainer but
        does not declare it."""
        return self.trainer.datamodule  # type: ignore[attr-defined]

    def trainer_overrides(self, trainer_cfg: Any) -> dict[str, Any]:
        """Trainer settings this stage needs on top of ``trainer=`` (the runner applies them
        last); none by default (PPO: ``max_steps`` from its iterations, its evaluation)."""
        return {}

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """The stage's model, initialised; sharded from birth under ZeRO-3 / FSDP
        (:mod:`llamalab.scale.build`)."""
        mode = module_sharding(self)
        if mode != "none":
            return build(
                self.head, self.arch, mode, stage_mesh(self, mode), stage_device(self, mode)
            )
        cls = Llama if self.head == "lm" else LlamaScalar
        model = cls(self.arch)
        if not any(p.is_meta for p in model.parameters()):
            model.init_weights()
        return model

    def generation_context(self, model: nn.Module | None = None, how: str = "auto") -> Any:
        """The model to sample with (default: the stage's own): under ZeRO-3 / FSDP gathered once
        per call (PAPER.md §3.2.3: per-token gathering is ~20x slower) or, when it does not fit,
        per layer in lockstep across ranks (:func:`llamalab.scale.zero_gen.generation_model`).
        Every rank must enter."""
        model = self.export_model() if model is None else model
        if self._trainer is None or not self.sharded:
            return contextlib.nullcontext(model)
        return generation_model(model, self.trainer.strategy, how)

    @property
    def sharded(self) -> bool:
        """True under ZeRO-3 or FSDP: parameters are partitioned across ranks."""
        return module_sharding(self) != "none"

    def load_init(self, model: nn.Module) -> None:
        """Copy ``init`` weights into ``model``, one tensor at a time from a memory-mapped
        checkpoint where the format allows (an LM checkpoint into a scalar model keeps all but
        the head; under ZeRO-3 / FSDP one module, or shard, at a time)."""
        if not self.init_path:
            return
        mode = module_sharding(self)
        load_weights(model, LazyState(self.init_path), mode, self.init_path)

    def configure_model(self) -> None:
        """Build the model once (Lightning may call this more than once)."""
        if self.model is not None:
            return
        model = self.build_model()
        self.load_init(model)
        self.model = self.wrap_model(model)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Activation checkpointing and compile, applied from outside the model file."""
        if self.hparams["activation_checkpointing"]:
            apply_activation_checkpointing(model)
        if self.hparams["compile"]:
            compile_blocks(model)
        return model

    # ------------------------------------------------------------------ optimisation
    def total_steps(self) -> int:
        steps = self.trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) else 1

    def warmup_steps(self, total: int) -> int:
        o = self.optim_cfg
        if "warmup_ratio" in o:  # reward models: 3% of steps, at least 5 (PAPER.md §3.2.2)
            return min(
                total, max(int(o.get("min_warmup_steps", 0)), round(o["warmup_ratio"] * total))
            )
        return int(o.get("warmup_steps", 0))

    def configure_optimizers(self) -> Any:
        assert self.model is not None
        o = self.optim_cfg
        optimizer = build_adamw(
            param_groups(self.model.named_parameters(), o["weight_decay"]),
            lr=o["lr"],
            betas=tuple(o.get("betas", (0.9, 0.95))),
            eps=o.get("eps", 1e-5),
            fused=o.get("fused"),
        )
        total = self.total_steps()
        scheduler = warmup_cosine_scheduler(
            optimizer,
            self.warmup_steps(total),
            total,
            o.get("min_lr_ratio", 0.1),
            o.get("schedule", "cosine"),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ guards and logging
    def check_finite(self, value: torch.Tensor, what: str) -> bool:
        """True when finite. Otherwise raise (``nonfinite=stop``) or return False (``skip``)."""
        if torch.isfinite(value).all():
            return True
        if self.hparams["nonfinite"] == "skip":
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches))
            return False
        last = self.last_checkpoint()
        raise NonFiniteError(
            f"non-finite {what} ({value.item()}) at step {self.global_step} of stage "
            f"'{self.stage_name}'. Last good checkpoint: {last or 'none saved yet'}"
            + (f" (resume with ckpt_path={last})" if last else "")
        )

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over every rank (itself on one process); every rank must call."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    def last_checkpoint(self) -> str | None:
        cb = self._trainer.checkpoint_callback if self._trainer is not None else None
        if not isinstance(cb, ModelCheckpoint):
            return None
        return cb.last_model_path or cb.best_model_path or None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the gradient norm (before clipping) and refuse a non-finite one. Under DeepSpeed
        the gradients live in its partitions (``p.grad`` is None under ZeRO-3): its own norm is
        read after its step instead (:meth:`check_engine_grad_norm`)."""
        if self.deepspeed_engine() is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        if not self.check_finite(norm, "gradient norm"):
            for p in self.parameters():  # AdamW leaves gradient-less parameters untouched
                p.grad = None  # (no momentum, no weight decay): a true skip, not a zero step

    def deepspeed_engine(self) -> Any:
        """The DeepSpeed engine training this module, or None under any other strategy."""
        if self._trainer is None:
            return None
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.check_engine_grad_norm()

    def check_engine_grad_norm(self) -> None:
        """Under DeepSpeed, after each optimizer step: the global gradient norm its step computed
        over every partition (``engine.get_global_grad_norm()``), logged as ``train/grad_norm``.
        A non-finite norm stops the run (``nonfinite=stop``) or is counted as skipped: DeepSpeed
        has already left the weights alone for that step."""
        engine = self.deepspeed_engine()
        if engine is None or self.global_step == self._norm_step:
            return
        self._norm_step = self.global_step
        norm = engine.get_global_grad_norm()
        if norm is None:
            return
        norm = torch.as_tensor(float(norm))
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        self.check_finite(norm, "gradient norm")

    def peak_flops(self) -> float | None:
        if self._peak_flops is None:
            try:
                self._peak_flops = measure_peak_flops(self.dtype_for_peak(), self.device)
            except Exception:
                self._peak_flops = float("nan")
        return self._peak_flops

    def dtype_for_peak(self) -> torch.dtype:
        precision = str(self.trainer.precision)
        return (
            torch.bfloat16
            if "bf16" in precision
            else torch.float16
            if "16" in precision
            else torch.float32
        )

    # ------------------------------------------------------------------ W&B tables
    def table_loggers(self) -> list[WandbLogger]:
        """The W&B loggers this process may write tables to: every one on global rank 0, none
        elsewhere (Lightning gives other ranks a dummy run) or without W&B."""
        if self._trainer is None or not self.trainer.is_global_zero:
            return []
        return [lg for lg in self.loggers if isinstance(lg, WandbLogger)]

    def log_table(
        self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None
    ) -> None:
        """A table of samples (``rows`` of ``columns``) in each W&B run, from rank 0 only."""
        for logger in self.table_loggers():
            logger.log_table(key=key, columns=columns, data=rows, step=step)

    def log_throughput(self, tokens: int, flops_per_token: float | None = None) -> None:
        """tokens/s, tokens seen and MFU for this optimizer step (all ranks together)."""
        now = time.perf_counter()
        world = self.trainer.world_size if self._trainer is not None else 1
        self.tokens_seen += tokens * world
        self.log("train/tokens_seen", float(self.tokens_seen), on_step=True, on_epoch=False)
        if self._step_t0 is not None:
            tps = tokens * world / max(now - self._step_t0, 1e-9)
            self.log("train/tokens_per_s", tps, on_step=True, on_epoch=False, prog_bar=True)
            if flops_per_token:
                peak = self.peak_flops()
                if peak and math.isfinite(peak):
                    self.log("train/mfu", tps / world * flops_per_token / peak, on_step=True)
        self._step_t0 = now

    # ------------------------------------------------------------------ checkpoints and export
    # Frozen submodules (pipeline's ``frozen_attributes``: PPO's reference and reward models,
    # DPO's reference) are reloaded from their paths on resume and left out of checkpoints
    # (DeepSpeed: ``exclude_frozen_parameters``), except under FSDP, whose DCP load needs every key.
    frozen: tuple[str, ...] = ()

    @property
    def strict_loading(self) -> bool:
        """False under DeepSpeed with frozen submodules: its checkpoint lacks them."""
        ds = self._trainer is not None and "DeepSpeed" in type(self.trainer.strategy).__name__
        return not (self.frozen and ds) and self._strict_loading in (None, True)

    @strict_loading.setter
    def strict_loading(self, strict_loading: bool) -> None:
        self._strict_loading = strict_loading

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["llamalab"] = {
            "model_config": self.arch.to_dict(),
            "head": self.head,
            "prefix": "model.",
            "stage": self.stage_name,
            "tokens_seen": self.tokens_seen,
            "skipped_batches": self.skipped_batches,
        }
        if self.frozen and module_sharding(self) != "fsdp":
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.split(".", 1)[0] in self.frozen]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.frozen:  # the frozen weights as loaded from their paths
            state = checkpoint.setdefault("state_dict", {})
            for name, tensor in self.state_dict().items():
                if name.split(".", 1)[0] in self.frozen:
                    state.setdefault(name, tensor)
        if "state_dict" in checkpoint:  # another architecture: name the tensor and both shapes
            source = self._trainer.ckpt_path if self._trainer else None
            check_state_shapes(self, checkpoint["state_dict"], str(source or "being resumed"))
        meta = checkpoint.get("llamalab", {})
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.skipped_batches = int(meta.get("skipped_batches", 0))

    def export_model(self) -> nn.Module:
        """The model to export (PPO exports its actor)."""
        assert self.model is not None
        return self.model

    def export(
        self,
        path: str | Path,
        model: nn.Module | None = None,
        tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> Path:
        """Write the Hugging Face directory (config.json + safetensors shards of at most
        ``max_shard_size`` + tokenizer) of ``model`` (default :meth:`export_model`). A sharded
        run passes its weights as ``tensors``, gathered one unit at a time
        (:func:`llamalab.runner.checkpoints.export_from_trainer`)."""
        tokenizer = Tokenizer(self.tokenizer_path) if self.tokenizer_path else None
        model = self.export_model() if model is None else model
        model = uncompiled(model)
        save_hf(
            model,  # type: ignore[arg-type]
            tokenizer,
            path,
            max_shard_size=max_shard_size,
            tensors=tensors,
            chat=self.chat_model,
        )
        return Path(path)
