"""Lightning strategies from the `strategy=` config group.

``auto`` and ``ddp`` are Lightning's; ``fsdp`` is Lightning's ``ModelParallelStrategy`` (FSDP2,
applied by the stages in ``configure_model``, :mod:`llamalab.scale.build`); the ``deepspeed_*``
configs build :class:`llamalab.scale.deepspeed_cpu.LlamaDeepSpeedStrategy` with the DeepSpeed
config written in the YAML. All of them run on CPU processes (gloo) as well as on GPUs.
"""

from __future__ import annotations

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
