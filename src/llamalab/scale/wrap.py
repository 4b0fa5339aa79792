"""Wrappers applied to a built model from outside (the model file has no such code).

Both keep parameter names unchanged, so checkpoints and exports are unaffected.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no transformer `layers` to wrap")
    return list(layers)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (memory for compute: about
    one extra forward; the plan's activation figures with ``activation_checkpointing``)."""
    for block in transformer_blocks(model):
        if getattr(block, "_llamalab_checkpointed", False):
            continue
        forward = block.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):  # type: ignore[no-untyped-def]
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed  # type: ignore[method-assign]
        block._llamalab_checkpointed = True  # type: ignore[assignment]


def uncompiled(model: Any) -> Any:
    """``model`` without ``torch.compile``'s whole-model wrapper (a user's ``torch.compile(model)``
    puts the real module in ``_orig_mod``); our own per-block compile adds none."""
    return getattr(model, "_orig_mod", model)


def compile_blocks(
    model: nn.Module, mode: str | None = None, dynamic: bool | None = None
) -> nn.Module:
    """``torch.compile`` each transformer block in place and return ``model`` (torchtitan's
    per-block compile).

    ``nn.Module.compile`` adds no ``_orig_mod.`` prefix, so checkpoints and strategies see the
    plain model. Blocks share code and one graph: every layer after the first reuses it (the
    block reads nothing layer-specific without a KV cache); the compiled code is cached under
    ``TORCHINDUCTOR_CACHE_DIR`` between runs. ``dynamic=None`` (Dynamo's automatic dynamic
    shapes): a fixed-shape run (pretraining, packed SFT) keeps one static graph, and the first
    new sequence length (reward pairs, PPO batches) brings one graph with a symbolic length
    instead of a compilation per length, which past Dynamo's recompile limit (8) would leave
    the blocks eager. ``mode``: ``None``, ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune"``.
    """
    for block in transformer_blocks(model):
        block.compile(mode=mode, dynamic=dynamic)
    return model
