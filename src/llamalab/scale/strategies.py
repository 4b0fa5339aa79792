"""Lightning strategies from the `strategy=` config group.

``auto`` and ``ddp`` are Lightning's; ``fsdp`` is :class:`LlamaModelParallelStrategy`, Lightning's
``ModelParallelStrategy`` (FSDP2, applied by the stages in ``configure_model``,
:mod:`llamalab.scale.build`) with atomic checkpoints; the ``deepspeed_*`` configs build
:class:`llamalab.scale.deepspeed_cpu.LlamaDeepSpeedStrategy` with the DeepSpeed config written in
the YAML. All of them run on CPU processes (gloo) as well as on GPUs. Sharded checkpoints are
written under a fresh name and committed by rank 0 once every rank is done
(:mod:`llamalab.checkpoint.commit`).
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from llamalab.checkpoint.commit import CommittedCheckpoints


class LlamaModelParallelStrategy(CommittedCheckpoints, ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` whose checkpoints (a torch distributed checkpoint
    directory, or one file with ``save_distributed_checkpoint: false``) are committed atomically
    once every rank has written its shard."""


def devices_per_node(cfg: DictConfig) -> int:
    """``trainer.devices`` when it is a count, else 1 (``auto``, a list of ids)."""
    devices = cfg.trainer.get("devices", 1)
    return devices if isinstance(devices, int) and devices > 0 else 1


def num_nodes(cfg: DictConfig) -> int:
    return int(cfg.trainer.get("num_nodes", 1) or 1)


def world_size(cfg: DictConfig | None) -> int:
    """Processes of the run: devices per node x nodes (1 without a config)."""
    if cfg is None:
        return 1
    return devices_per_node(cfg) * num_nodes(cfg)


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
