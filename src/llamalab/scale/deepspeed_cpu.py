"""Lightning's ``DeepSpeedStrategy``, also on CPU processes (gloo), so tests run ZeRO for real.

Lightning refuses DeepSpeed without CUDA (``setup_environment``), checks CUDA device indices
(``setup_distributed``) and hands DeepSpeed ``root_device.index`` (None on a bare ``cpu``).
DeepSpeed itself runs ZeRO-2/3 on CPU over gloo and really partitions parameters
(/work/shared/ENV.md). On a CUDA accelerator this class behaves exactly as Lightning's.

One more adaptation, on GPUs: ZeRO-Offload wants DeepSpeed's CPU Adam (a C++ AdamW over the
offloaded fp32 master weights); the stages build a torch AdamW, which this class swaps for
``DeepSpeedCPUAdam`` with the same parameter groups when the optimizer is offloaded on CUDA. On
CPU the torch AdamW is kept (``zero_force_ds_cpu_optimizer: false`` in the YAML): compiling
``cpu_adam`` costs minutes and the test models are tiny.

Checkpoints (on CPU and CUDA alike): every save goes to a fresh directory that rank 0 renames
into place once every rank has written its partition (:mod:`llamalab.checkpoint.commit`), instead
of DeepSpeed rewriting ``<name>/checkpoint/`` in place; removals are atomic renames too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from llamalab.checkpoint.commit import CommittedCheckpoints

# Test hook, "RANK:STEP": that rank dies (os._exit) when it starts writing its first file of the
# checkpoint saved at that global step, after the other ranks began theirs. Unset in real runs.
DIE_IN_SAVE_ENV = "LLAMALAB_TEST_DIE_IN_SAVE"


class LlamaDeepSpeedStrategy(CommittedCheckpoints, DeepSpeedStrategy):
    """``DeepSpeedStrategy(config=...)`` that also runs on ``accelerator=cpu``.

    Args: those of ``DeepSpeedStrategy``; the YAML configs pass the whole DeepSpeed ``config``
    dict (ZeRO stage, offload, bucket sizes, clipping), so every setting is visible there.
    """

    @property
    def on_cuda(self) -> bool:
        return isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if self.on_cuda:
            super().setup_environment()
        else:  # skip Lightning's CUDA-only check, keep everything DDP sets up
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self.on_cuda:
            super().setup_distributed()
            return
        # Lightning's body without `_validate_device_index_selection` (CUDA indices only).
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or ("nccl" if self.on_cuda else "gloo")

    @property
    def root_device(self) -> torch.device:
        device = super().root_device
        # DeepSpeed reads `device_rank=root_device.index`: a bare `cpu` has none.
        return torch.device("cpu", 0) if device.type == "cpu" else device

    def _setup_model_and_optimizer(
        self, model: Any, optimizer: Any, lr_scheduler: Any = None
    ) -> tuple[Any, Any]:
        if optimizer is not None and self.on_cuda and self.offloads_optimizer:
            optimizer = cpu_adam_like(optimizer)
            if lr_scheduler is not None:
                lr_scheduler.optimizer = optimizer
        return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def save_checkpoint(
        self, checkpoint: dict, filepath: Any, storage_options: Any | None = None
    ) -> None:
        """DeepSpeed's checkpoint of all ranks, committed atomically under ``filepath``."""
        self._die_in_save_hook()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _die_in_save_hook(self) -> None:
        spec = os.environ.get(DIE_IN_SAVE_ENV)
        module = self.lightning_module
        if not spec or module is None:
            return
        rank, step = (int(v) for v in spec.split(":"))
        if self.global_rank != rank or module.trainer.global_step != step:
            return
        engine = self.deepspeed_engine.checkpoint_engine

        def die(*args: Any, **kwargs: Any) -> None:
            os._exit(17)

        engine.save = die

    @property
    def offloads_optimizer(self) -> bool:
        zero = (self.config or {}).get("zero_optimization", {})
        return zero.get("offload_optimizer", {}).get("device", "none") == "cpu"


def cpu_adam_like(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """DeepSpeed's CPU AdamW with ``optimizer``'s parameter groups and hyperparameters."""
    # lazy: deepspeed is an optional heavy dependency, only CPU-offloaded ZeRO needs it
    from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore[import-not-found]

    defaults = optimizer.defaults
    groups = [dict(g) for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(
        groups,
        lr=defaults["lr"],
        betas=defaults.get("betas", (0.9, 0.999)),
        eps=defaults.get("eps", 1e-8),
        weight_decay=defaults.get("weight_decay", 0.0),
        adamw_mode=True,
    )
