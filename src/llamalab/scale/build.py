"""Building models sharded from birth, and loading checkpoints into them shard by shard.

Called from the stages' ``configure_model`` (Lightning runs it once per process, before the
strategy wraps the module). Three modes, read from the trainer's strategy:

- ``"zero3"`` (DeepSpeed stage 3): Lightning runs ``configure_model`` inside
  ``deepspeed.zero.Init``, so each module's parameters are partitioned as soon as it is built.
  Initialisation and loading gather one module (a block, the embedding, ...) at a time with
  ``GatheredParameters(modifier_rank=0)``: rank 0 writes, DeepSpeed re-partitions.
- ``"fsdp"`` (FSDP2 via ``ModelParallelStrategy``): the model is built on ``meta``, every
  ``TransformerBlock`` and then the root are ``fully_shard``-ed, each rank materialises its own
  shard (``to_empty``) and initialises it; loaded tensors are cut to the local shard.
- ``"none"`` (auto, DDP, ZeRO-2): plain modules.

So no process ever holds a whole model beyond one module. Hugging Face and Meta checkpoints are
memory-mapped and read one tensor at a time (:class:`llamalab.checkpoint.lazy.LazyCheckpoint`):
under ZeRO-3 only rank 0 reads (one tensor of host memory at a time), under FSDP2 each rank
reads only its own rows. Our ``.ckpt``, ZeRO and distributed checkpoints are read whole into CPU
memory first (documented in docs/scale.md).

:func:`build_pretrained` is the one loader of the models a stage plays with (policy, reference,
critic, reward models) in every mode, and :func:`load_roles` loads a stage's set of them
sharded like the stage's own model (PPO, rejection sampling).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llamalab.checkpoint import CheckpointError, load_backbone_into, load_model
from llamalab.checkpoint.lazy import LazyCheckpoint
from llamalab.model import Llama, LlamaConfig, LlamaScalar

HEADS = {"lm": Llama, "scalar": LlamaScalar}
HEAD_WEIGHTS = {"lm": "output.weight", "scalar": "score.weight"}


# ---------------------------------------------------------------------------- which mode
def sharding_mode(strategy: Any) -> str:
    """``"zero3"``, ``"fsdp"`` or ``"none"`` for a Lightning strategy (or None)."""
    name = type(strategy).__name__
    if "DeepSpeed" in name and getattr(strategy, "zero_stage_3", False):
        return "zero3"
    if "ModelParallelStrategy" in name:  # Lightning's, or llamalab.scale.strategies' subclass
        return "fsdp"
    return "none"


def module_sharding(module: Any) -> str:
    """The sharding mode of a LightningModule's trainer (``"none"`` without a trainer)."""
    trainer = module._trainer
    return "none" if trainer is None else sharding_mode(trainer.strategy)


def fsdp_mesh(module: Any) -> Any:
    """The data-parallel device mesh Lightning's ModelParallelStrategy gives the module."""
    mesh = module.device_mesh
    return mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape (ZeRO-3 partitions keep it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def is_rank_zero() -> bool:
    """Rank 0 of the process group, or of the launch before the group exists (every rank
    variable a launcher sets is 0 or unset: torchrun's ``RANK``, srun's ``SLURM_PROCID``,
    Lightning's ``LOCAL_RANK`` / ``NODE_RANK``); True in a single process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    names = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    return all(int(os.environ.get(name) or 0) == 0 for name in names)


# ---------------------------------------------------------------------------- units
def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(prefix, module) pieces gathered one at a time: every direct child, blocks one by one."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            out.extend((f"{name}.{i}.", block) for i, block in enumerate(child))
        else:
            out.append((f"{name}.", child))
    return out


@contextlib.contextmanager
def gathered(module: nn.Module, mode: str, modifier_rank: int | None = 0) -> Iterator[None]:
    """Under ZeRO-3, ``module``'s whole parameters for the duration (rank ``modifier_rank``'s
    changes are kept); nothing to do in the other modes."""
    if mode != "zero3":
        yield
        return
    import deepspeed  # type: ignore[import-not-found]  # lazy: optional heavy dependency (ZeRO-3)

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend an active ``deepspeed.zero.Init`` (modules built here stay whole, e.g. a
    checkpoint read into CPU memory by the fallback loader)."""
    try:  # lazy: deepspeed is an optional heavy dependency
        from deepspeed.runtime.zero import (
            partition_parameters as pp,  # type: ignore[import-not-found]
        )
    except ImportError:
        yield
        return
    active = pp.top_level_context is not None
    if active:
        pp.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            pp.restore_init_context()


# ---------------------------------------------------------------------------- building
def shard_fsdp(model: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` each TransformerBlock, then the root (the embedding, norm and head)."""
    for block in model.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def init_weights(model: nn.Module, mode: str) -> None:
    """``model.init_weights()`` for any mode.

    Under ZeRO-3 a partitioned parameter's ``data`` is an empty tensor, on which the model's
    in-place initialisers are no-ops: calling ``init_weights`` while one unit is gathered
    initialises exactly that unit, so the model's own rule is used without a whole copy.
    """
    if mode != "zero3":
        model.init_weights()  # type: ignore[operator]
        return
    for _, unit in units(model):
        if not any(True for _ in unit.parameters()):
            continue
        with gathered(unit, mode, modifier_rank=0):
            if is_rank_zero():
                model.init_weights()  # type: ignore[operator]
    model.rope.reset(model.config.max_seq_len)  # type: ignore[union-attr, operator]


def build(
    head: str, config: LlamaConfig, mode: str, mesh: Any = None, device: Any = "cpu"
) -> Llama | LlamaScalar:
    """A freshly initialised ``Llama`` / ``LlamaScalar``, sharded per ``mode``."""
    cls = HEADS[head]
    if mode == "fsdp":
        with torch.device("meta"):
            model = cls(config)
        shard_fsdp(model, mesh)
        model.to_empty(device=device)
    else:
        model = cls(config)  # under zero.Init (ZeRO-3) it is partitioned module by module
    init_weights(model, mode)
    return model  # type: ignore[return-value]


# ---------------------------------------------------------------------------- reading
class LazyState(LazyCheckpoint):
    """A checkpoint's tensors read one at a time (:class:`~llamalab.checkpoint.lazy.
    LazyCheckpoint`); a format read whole is built outside an active ``deepspeed.zero.Init``, so
    it is a plain CPU model and not partitioned as it is built."""

    def _load_whole(self, path: Path) -> nn.Module:
        with outside_zero_init():
            return load_model(path)


# ---------------------------------------------------------------------------- loading
def _expected(model: nn.Module, state: LazyState, source: str) -> set[str]:
    """The names to load; an LM checkpoint into a scalar model skips the heads (the score head
    keeps its initialisation, PAPER.md §3.2.2). Raises CheckpointError on any mismatch."""
    model_head = "scalar" if isinstance(model, LlamaScalar) else "lm"
    ours = {n: full_shape(p) for n, p in model.named_parameters()}
    theirs = set(state)
    if model_head != state.head:
        if model_head == "lm":
            raise CheckpointError(f"{source} holds a scalar model, not a language model")
        ours.pop(HEAD_WEIGHTS["scalar"])
        theirs.discard(HEAD_WEIGHTS["lm"])
    problems = [
        f"tensor {n} has shape {state.shape(n)}, model expects {ours[n]}"
        for n in sorted(theirs & set(ours))
        if state.shape(n) != ours[n]
    ]
    if set(ours) - theirs:
        problems.append(f"missing tensors: {sorted(set(ours) - theirs)[:8]}")
    if theirs - set(ours):
        problems.append(f"unexpected tensors: {sorted(theirs - set(ours))[:8]}")
    if problems:
        raise CheckpointError(f"checkpoint {source}: " + "; ".join(problems))
    return set(ours)


def local_rows(param: DTensor) -> tuple[int, int] | None:
    """The rows ``start, stop`` of the whole tensor that this rank's shard of ``param`` holds,
    when it is a block of whole rows (FSDP2's ``Shard(0)``); None for any other layout."""
    full = tuple(param.shape)
    local, offset = compute_local_shape_and_global_offset(full, param.device_mesh, param.placements)
    if tuple(local[1:]) != full[1:] or any(offset[1:]) or tuple(param.to_local().shape) != local:
        return None
    return offset[0], offset[0] + local[0]


@torch.no_grad()
def fill(param: torch.Tensor, state: LazyState, name: str) -> None:
    """Copy checkpoint tensor ``name`` into ``param``: an FSDP2 shard reads only its own rows
    from the (memory-mapped) checkpoint; a gathered ZeRO-3 or plain parameter takes it whole."""
    if isinstance(param, DTensor) and (bounds := local_rows(param)) is not None:
        param.to_local().copy_(state.rows(name, *bounds))
    else:
        copy_into(param, state[name])


@torch.no_grad()
def copy_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter: into its local shard when it is an FSDP2 DTensor
    (cut on this rank, no communication), else in full (a gathered ZeRO-3 or plain parameter)."""
    if isinstance(param, DTensor):
        local = distribute_tensor(
            tensor.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(tensor)


def load_weights(model: nn.Module, state: LazyState, mode: str, source: str) -> None:
    """Load ``state`` into ``model`` one unit (a block, the embedding, ...) at a time, one
    tensor read from the checkpoint at a time: under ZeRO-3 rank 0 reads and DeepSpeed
    scatters, under FSDP2 each rank reads its own rows (:func:`fill`)."""
    names = _expected(model, state, source)
    writes = mode != "zero3" or is_rank_zero()  # under ZeRO-3 rank 0 writes, DeepSpeed scatters
    for prefix, unit in units(model):
        todo = [(prefix + n, p) for n, p in unit.named_parameters() if prefix + n in names]
        if not todo:
            continue
        with gathered(unit, mode, modifier_rank=0):
            if writes:
                for name, param in todo:
                    fill(param, state, name)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the model only scores."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_whole(path: str | Path, head: str, trainable: bool, source: str) -> nn.Module:
    """Unsharded: :func:`load_model` as stored (its dtype kept); a language model as a trainable
    scalar model keeps its backbone under a fresh head (the critic's usual start)."""
    model = load_model(path)
    if head == "lm" and not isinstance(model, Llama):
        raise CheckpointError(f"{source} holds a scalar model, not a language model")
    if head == "scalar" and not isinstance(model, LlamaScalar):
        if not trainable:
            raise CheckpointError(_not_a_reward_model(source))
        critic = LlamaScalar(model.config)
        critic.init_weights()
        load_backbone_into(critic, model.state_dict(), source=str(path))
        model = critic
    return model


def _not_a_reward_model(source: str) -> str:
    key = source.split("=", 1)[0]
    return (
        f"{source} is a language model, not a reward model (scalar head): train one with "
        f"`python src/train.py stage=reward` and point {key} at it"
    )


def build_pretrained(
    path: str | Path,
    head: str,
    mode: str,
    mesh: Any = None,
    *,
    trainable: bool,
    role: str = "init",
    device: Any = "cpu",
) -> Llama | LlamaScalar:
    """The model of ``head`` in ``path``: whole (``mode="none"``), or built sharded per ``mode``
    and loaded shard by shard. ``role`` is the stage setting that named ``path`` (for errors).

    A frozen scalar model (a reward model) must come from a scalar checkpoint; a trainable one
    (the critic) may start from a language model's backbone. Trainable models are returned in
    train mode with gradients, the others frozen (:func:`freeze`).
    """
    source = f"stage.{role}={path}"
    if mode == "none":
        model = _load_whole(path, head, trainable, source)
    else:
        state = LazyState(path)
        if head == "scalar" and state.head == "lm" and not trainable:
            raise CheckpointError(_not_a_reward_model(source))
        model = build(head, state.config, mode, mesh, device)
        load_weights(model, state, mode, source)
    if not trainable:
        return freeze(model)  # type: ignore[return-value]
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model  # type: ignore[return-value]


def stage_mesh(module: Any, mode: str) -> Any:
    return fsdp_mesh(module) if mode == "fsdp" else None


def stage_device(module: Any, mode: str) -> Any:
    return module.trainer.strategy.root_device if mode == "fsdp" else "cpu"


@dataclass(frozen=True)
class Role:
    """One model a stage loads: its checkpoint, head (``"lm"`` / ``"scalar"``), whether it
    trains, and the stage setting that names it (``init``, ``critic_init``, ``reward_helpful``)."""

    path: str
    head: str
    trainable: bool
    key: str


def load_roles(module: Any, roles: Mapping[str, Role]) -> dict[str, nn.Module]:
    """Each role's model, in order, sharded like the stage ``module``'s own (ZeRO-3 / FSDP, from
    its trainer's strategy) or whole."""
    mode = module_sharding(module)
    kw = {"mode": mode, "mesh": stage_mesh(module, mode), "device": stage_device(module, mode)}
    # Frozen roles are left out of checkpoints and loaded non-strictly on resume under
    # DeepSpeed: llamalab.stages.base.LlamaStage.frozen / strict_loading.
    return {
        name: build_pretrained(r.path, r.head, trainable=r.trainable, role=r.key, **kw)
        for name, r in roles.items()
    }


def check_same_vocabulary(models: Mapping[str, nn.Module]) -> None:
    """Every model must read the same token ids (policy, reference, critic, reward models)."""
    sizes = {role: m.config.vocab_size for role, m in models.items()}  # type: ignore[union-attr]
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{role}: {size}" for role, size in sizes.items())
        raise CheckpointError(
            "the RLHF models do not share one vocabulary "
            f"({listing}): train the reward models from the same SFT model as the policy"
        )
