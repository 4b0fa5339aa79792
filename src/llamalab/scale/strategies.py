"""Lightning strategies from the `strategy=` config group, and the export at the end of a run.

``auto`` and ``ddp`` are Lightning's; ``fsdp`` is Lightning's ``ModelParallelStrategy`` (FSDP2,
applied by the stages in ``configure_model``, :mod:`llamalab.scale.build`); the ``deepspeed_*``
configs build :class:`llamalab.scale.deepspeed_cpu.LlamaDeepSpeedStrategy` with the DeepSpeed
config written in the YAML. All of them run on CPU processes (gloo) as well as on GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def world_size(cfg: DictConfig | None) -> int:
    if cfg is None:
        return 1
    devices = cfg.trainer.get("devices", 1)
    n = devices if isinstance(devices, int) and devices > 0 else 1
    return n * int(cfg.trainer.get("num_nodes", 1) or 1)


def build_strategy(strategy_cfg: DictConfig, cfg: DictConfig | None = None) -> Any:
    """``auto`` -> Lightning's choice; otherwise the configured strategy object.

    ``fsdp``: ``data_parallel_size: auto`` means every rank (pure FSDP; Lightning's own ``auto``
    would mean one replica per node with tensor parallelism inside it).
    """
    if strategy_cfg.get("name", "auto") == "auto" or "_target_" not in strategy_cfg:
        return "auto"
    kwargs = OmegaConf.to_container(strategy_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    name = kwargs.pop("name", None)
    if name == "fsdp" and kwargs.get("data_parallel_size", "auto") == "auto":
        tp = kwargs.get("tensor_parallel_size", 1)
        kwargs["data_parallel_size"] = world_size(cfg) // (tp if isinstance(tp, int) else 1)
    return instantiate(kwargs, _convert_="all")


def export_from_trainer(trainer: Any, module: Any, path: Path) -> Path | None:
    """Write the Hugging Face export from rank 0 (every rank must call this).

    Under ZeRO-3 / FSDP the weights are consolidated first, one unit at a time, with every rank
    taking part in each gather and only rank 0 keeping the result
    (:func:`llamalab.scale.zero_gen.consolidated`).
    """
    from llamalab.scale.build import sharding_mode
    from llamalab.scale.zero_gen import consolidated, settle_zero3

    mode = sharding_mode(trainer.strategy)
    settle_zero3(trainer.strategy)
    model = module.export_model()
    model = getattr(model, "_orig_mod", model)
    with consolidated(model, mode, rank0_only=True) as full:
        if trainer.is_global_zero:
            module.export(path, model=full)
    trainer.strategy.barrier("llamalab-export")
    return path if trainer.is_global_zero else None
