"""Generation (and export) from a sharded model: gather once, or per layer in lockstep.

Under ZeRO-3 (and FSDP) every module's forward all-gathers its parameters and frees them after;
autoregressive sampling runs the whole model once per token, so a 512-token rollout gathers
every weight 512 times: the slowness PAPER.md §3.2.3 reports (about 20x) and every RLHF
codebase met. The paper's fix, for FSDP: consolidate the weights on each GPU once per rollout
batch, generate, free them. Here:

- :func:`consolidated` builds a plain (unsharded) copy of the model, gathered one unit at a
  time; generation then runs locally with no communication at all.
- :func:`host_tensors` is the export's source: each unit is gathered, copied straight to host
  memory and handed on, so the export (:func:`llamalab.checkpoint.save_hf`, which writes shard
  by shard) never holds the whole model, on the device or on the host.
- :func:`sharded_forwards` runs forwards of ZeRO-3 models outside the DeepSpeed engine (its
  hooks gather nothing for them), one unit gathered at a time.
- :class:`LockstepModel` is the fallback when the copy does not fit: the sharded model itself
  (DeepSpeed / FSDP gather per module per forward), with every rank doing the same number of
  forwards, since a rank whose rows all hit EOS early would otherwise leave the others waiting
  in an all-gather forever (what Hugging Face's ``synced_gpus`` is for).
- :func:`generation_model` picks one (``gather_for_generation``: auto | always | never); in
  ``auto`` the copy is used when the whole weights take at most half the free memory, and all
  ranks agree on the verdict (a collective: both paths must be the same on every rank).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import wait_tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from llamalab.scale.build import (
    full_numel,
    gathered,
    is_rank_zero,
    outside_zero_init,
    sharding_mode,
    units,
)

GATHER_MODES = ("auto", "always", "never")


# ---------------------------------------------------------------------------- the gathered copy
def unit_state(unit: nn.Module, prefix: str, mode: str, keep: bool) -> dict[str, torch.Tensor]:
    """One unit's whole parameters (a collective in both sharded modes), cloned when ``keep``."""
    out: dict[str, torch.Tensor] = {}
    with gathered(unit, mode, modifier_rank=None):
        for name, p in unit.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            if keep:
                out[prefix + name] = full.detach().clone()
    return out


def host_tensors(
    model: nn.Module, mode: str, keep: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, whole tensor in host memory)`` for every parameter, one unit at a time.

    Under ZeRO-3 / FSDP each unit is gathered (a collective: every rank must run this generator
    to its end) and, where ``keep``, copied to the host inside the gather; the gather is released
    before the unit's tensors are handed on, so at most one unit is held beyond the consumer's
    own buffer. Ranks with ``keep=False`` take part in the gathers and get nothing. Unsharded
    (``mode="none"``), the parameters themselves are handed on (a device tensor is copied to
    the host by the consumer).
    """
    if mode == "fsdp":  # the same sharded state on every rank (a root left unsharded after
        # its forward holds plain tensors on one rank and DTensors on another once something,
        # e.g. state_dict(), reshards it there: the gathers below would then differ by rank)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()
    for prefix, unit in units(model):
        if mode == "none":
            if keep:
                yield from ((prefix + n, p.detach()) for n, p in unit.named_parameters())
            continue
        out: list[tuple[str, torch.Tensor]] = []
        with torch.no_grad(), gathered(unit, mode, modifier_rank=None):
            for name, p in unit.named_parameters():
                full = p.full_tensor() if isinstance(p, DTensor) else p  # FSDP: a collective
                if keep:  # a copy: DeepSpeed reuses or frees the gathered buffer
                    out.append((prefix + name, full.detach().to("cpu", copy=True)))
                elif isinstance(p, DTensor):  # FSDP's gather is asynchronous: finish it here
                    wait_tensor(full)
        yield from out


@contextlib.contextmanager
def consolidated(
    model: nn.Module, mode: str, rank0_only: bool = False
) -> Iterator[nn.Module | None]:
    """A plain copy of a ZeRO-3 / FSDP ``model`` (``model`` itself when ``mode="none"``).

    Every rank must enter (the gathers are collectives); with ``rank0_only`` only rank 0 keeps
    the copy (the export) and the others get None. Peak memory: the copy plus one unit.
    """
    if mode == "none":
        yield model
        return
    keep = not rank0_only or is_rank_zero()
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for prefix, unit in units(model):
            state.update(unit_state(unit, prefix, mode, keep))
    if not keep:
        yield None
        return
    with outside_zero_init(), torch.device("meta"):
        copy = type(model)(model.config)  # type: ignore[call-arg]
    copy.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    copy.rope.reset(model.config.max_seq_len, device=device)  # type: ignore[union-attr, operator]
    state.clear()
    try:
        yield copy.eval()
    finally:
        del copy


# ---------------------------------------------------------------------------- sharded forwards
@contextlib.contextmanager
def sharded_forwards(models: list[nn.Module], mode: str) -> Iterator[None]:
    """Forwards of sharded ``models`` that no DeepSpeed engine hooks: under ZeRO-3 a model
    built under ``deepspeed.zero.Init`` outside the engine (rejection sampling's frozen models)
    gets each unit's parameters gathered for its forward and released after it, so no rank ever
    holds more than one unit whole. Every forward is then a collective: every rank must run the
    same forwards. FSDP's own hooks do this already and unsharded models need nothing."""
    if mode != "zero3":
        yield
        return
    entered: dict[int, Any] = {}

    def gather(unit: nn.Module, args: Any) -> None:
        entered[id(unit)] = gathered(unit, mode, modifier_rank=None)
        entered[id(unit)].__enter__()

    def release(unit: nn.Module, args: Any, output: Any) -> None:
        entered.pop(id(unit)).__exit__(None, None, None)

    handles = [
        hook
        for model in models
        for _, unit in units(model)
        if any(True for _ in unit.parameters())
        for hook in (unit.register_forward_pre_hook(gather), unit.register_forward_hook(release))
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for context in entered.values():  # a forward that raised
            context.__exit__(None, None, None)


# ---------------------------------------------------------------------------- the fallback
def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: int, op: Any) -> int:
    t = torch.tensor([value], device=_flag_device())
    dist.all_reduce(t, op=op)
    return int(t.item())


class LockstepModel(nn.Module):
    """The sharded model, made to run the same number of forwards on every rank.

    Each forward first says "I still compute" (an all-reduce); a rank that has finished calls
    :meth:`finish`, which answers "I do not" and runs dummy one-token forwards (the same
    gathers) for as long as another rank still computes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.forwards = 0

    @property
    def config(self) -> Any:
        return self.inner.config

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        _all_reduce(1, dist.ReduceOp.SUM)
        self.forwards += 1
        return self.inner(*args, **kwargs)

    @torch.no_grad()
    def finish(self) -> None:
        device = next(self.inner.parameters()).device
        dummy = torch.zeros((1, 1), dtype=torch.long, device=device)
        while _all_reduce(0, dist.ReduceOp.SUM) > 0:
            self.inner(dummy)


# ---------------------------------------------------------------------------- choosing
def free_memory_bytes() -> int:
    """Free accelerator memory, or this process's share of the machine's available RAM."""
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return info.get("MemAvailable", info["MemTotal"]) // max(1, local)


def full_bytes(model: nn.Module) -> int:
    """Bytes of the model's whole weights in their dtype (what the copy holds)."""
    return sum(full_numel(p) * p.element_size() for p in model.parameters())


def should_gather(model: nn.Module, how: str, fraction: float = 0.5) -> bool:
    """The verdict of ``gather_for_generation``, the same on every rank."""
    if how not in GATHER_MODES:
        raise ValueError(f"gather_for_generation must be one of {GATHER_MODES}, got {how!r}")
    if how != "auto":
        return how == "always"
    fits = full_bytes(model) <= fraction * free_memory_bytes()
    if dist.is_initialized():
        return bool(_all_reduce(int(fits), dist.ReduceOp.MIN))
    return fits


def settle_zero3(strategy: Any) -> None:
    """Release every ZeRO-3 parameter, waiting for the all-gathers DeepSpeed prefetched for a
    next training forward: gathering a parameter still in flight fails ("Cannot partition a
    param in flight"). A no-op outside DeepSpeed."""
    engine = getattr(strategy, "deepspeed_engine", None)
    if engine is not None and hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()


@contextlib.contextmanager
def generation_model(model: nn.Module, strategy: Any, how: str = "auto") -> Iterator[nn.Module]:
    """The module to generate with: ``model`` itself (no sharding), its gathered copy, or
    ``model`` in lockstep (per-layer gathering). Every rank must enter."""
    mode = sharding_mode(strategy)
    if mode == "none":
        yield model
        return
    settle_zero3(strategy)
    if should_gather(model, how):
        with consolidated(model, mode) as copy:
            assert copy is not None
            yield copy
        return
    lockstep = LockstepModel(model)
    try:
        yield lockstep
    finally:
        lockstep.finish()
