"""What every checkpoint format shares: strict state-dict loading, building, atomic directories.

``load_state_into`` is the one place a tensor enters a model: it checks names and shapes first
and names the checkpoint, the tensor and both shapes when they disagree, so a wrong ``model=``
override fails with a sentence instead of a traceback from ``load_state_dict``.
``build_from_state`` materialises a model built on the ``meta`` device straight from the
checkpoint's tensors (``assign``), so loading never holds two copies of the weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from llamalab.model import Llama, LlamaConfig, LlamaScalar

HEADS: dict[str, type[Llama] | type[LlamaScalar]] = {"lm": Llama, "scalar": LlamaScalar}
HEAD_WEIGHTS = ("output.weight", "score.weight")  # the only tensors that differ between heads


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into a model: unknown format, wrong names or shapes."""


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def stored_shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape in ``state`` without reading it when ``state`` is lazy (a mapping with a
    ``shape(name)`` method: a memory-mapped checkpoint read one tensor at a time)."""
    shape = getattr(state, "shape", None)
    return tuple(shape(name)) if callable(shape) else _shape(state[name])


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has exactly the model's names and shapes.

    Only persistent entries count (the RoPE tables are recomputed, never saved). A lazy
    ``state`` (:func:`stored_shape`) is checked without reading its tensors.
    """
    expected = model.state_dict()
    problems = []
    for name in state:
        if name in expected and stored_shape(state, name) != _shape(expected[name]):
            problems.append(
                f"tensor {name} has shape {stored_shape(state, name)}, "
                f"model expects {_shape(expected[name])}"
            )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(f"checkpoint {source}: " + "; ".join(problems))


def check_state_shapes(
    module: torch.nn.Module, state: dict[str, torch.Tensor], source: str
) -> None:
    """Every tensor of ``state`` the module also has must have the module's shape; names the
    module lacks are errors. Missing names are left to the caller (PPO refills its frozen
    models). Sharded placeholders (ZeRO-3's empty tensors, meta) are not compared."""
    expected = module.state_dict()
    problems = []
    for name, tensor in state.items():
        if name not in expected:
            problems.append(f"unexpected tensor {name}")
            continue
        want = expected[name]
        if want.numel() == 0 or want.is_meta or not hasattr(tensor, "shape"):
            continue
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(
                f"tensor {name} has shape {tuple(tensor.shape)}, model expects {tuple(want.shape)}"
            )
    if problems:
        shown = "; ".join(problems[:6]) + (
            f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else ""
        )
        raise CheckpointError(f"checkpoint {source}: {shown}")


def load_state_into(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, assign: bool = False
) -> nn.Module:
    """Load ``state_dict`` (our names) into ``model`` after strict name and shape checks.

    ``source`` names the checkpoint in error messages. ``assign=True`` makes the checkpoint's
    tensors the parameters (for a model built on ``meta``); otherwise they are copied in, cast to
    the model's dtype and device. Returns ``model``.
    """
    check_state(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)
    return model


def load_backbone_into(
    scalar_model: LlamaScalar, lm_state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> LlamaScalar:
    """Initialise a reward / value model from a language model (PAPER.md §3.2.2).

    Everything but the heads is copied from ``lm_state`` (a ``Llama`` state dict); the LM's
    ``output`` projection is dropped and the scalar ``score`` head keeps its own initialisation.
    """
    backbone = {k: v for k, v in lm_state.items() if k not in HEAD_WEIGHTS}
    own_head = {"score.weight": scalar_model.score.weight.detach()}
    check_state(scalar_model, {**backbone, **own_head}, source)
    scalar_model.load_state_dict({**backbone, **own_head}, strict=True)
    return scalar_model


def head_of(state: Mapping[str, torch.Tensor], source: str) -> str:
    """``"lm"`` or ``"scalar"``, read from which head tensor the state dict holds."""
    heads = [name for name in HEAD_WEIGHTS if name in state]
    if len(heads) != 1:
        raise CheckpointError(
            f"checkpoint {source}: expected exactly one head tensor of {list(HEAD_WEIGHTS)}, "
            f"found {heads or 'none'}"
        )
    return "lm" if heads[0] == "output.weight" else "scalar"


def convert(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None
) -> torch.Tensor:
    """A fresh copy on ``device`` (floating tensors cast to ``dtype`` when given).

    Always a copy, so no parameter stays backed by a memory-mapped checkpoint file.
    """
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target, copy=True)


def build_from_state(
    config: LlamaConfig,
    head: str,
    state: Mapping[str, torch.Tensor],
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Llama | LlamaScalar:
    """Build ``Llama`` / ``LlamaScalar`` on ``meta`` and take ``state``'s tensors as parameters.

    Tensors are taken one at a time, converted to ``device``/``dtype`` (``dtype=None`` keeps the
    stored dtype) and released: a ``dict`` is consumed (each tensor popped), a lazy mapping
    (a memory-mapped checkpoint) is read name by name. So peak memory is the model plus one
    tensor beyond whatever the caller holds.
    """
    if head not in HEADS:
        raise CheckpointError(
            f"checkpoint {source}: head must be one of {sorted(HEADS)}, got {head!r}"
        )
    with torch.device("meta"):
        model = HEADS[head](config)
    check_state(model, state, source)
    take = state.pop if isinstance(state, dict) else state.__getitem__
    converted = {name: convert(take(name), device, dtype) for name in list(state)}
    model.load_state_dict(converted, strict=True, assign=True)
    model.rope.reset(config.max_seq_len, device=torch.device(device))
    return model.eval()


def clean_name(name: str) -> str:
    """Drop wrapper segments that training adds to parameter names.

    ``_orig_mod.`` (torch.compile), ``_forward_module.`` (old Lightning + DeepSpeed),
    ``_fsdp_wrapped_module.`` (FSDP1) and ``_checkpoint_wrapped_module.`` (activation
    checkpointing) are not part of the model's own names.
    """
    for wrapper in (
        "_forward_module.",
        "_orig_mod.",
        "_fsdp_wrapped_module.",
        "_checkpoint_wrapped_module.",
    ):
        name = name.replace(wrapper, "")
    return name


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory ``<path>.tmp-<pid>``; on success it replaces ``path``.

    If the body raises, the temporary directory is deleted and an existing ``path`` is left
    untouched. On success an existing ``path`` is first renamed aside, the new directory renamed
    into place, and only then the old one deleted (restored if the second rename fails), so at
    every moment there is one complete export on disk.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
