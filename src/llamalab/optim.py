"""Optimizer and learning-rate schedule shared by every stage (PAPER.md §2.2).

AdamW (beta1 0.9, beta2 0.95, eps 1e-5), weight decay 0.1, cosine decay to a fraction of the peak
after a linear warmup. Weight decay applies to every matrix (attention, FFN, embeddings, heads)
and not to the RMSNorm weights: decaying a norm's gain towards 0 only fights the norm (the common
practice of GPT-2, nanoGPT and torchtitan; the paper does not say).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float, lr: float | None = None
) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (decayed) and 1-D tensors such as norm weights (not decayed).

    A parameter partitioned by ZeRO-3 holds an empty 1-D tensor between gathers: its real
    shape is ``ds_shape``.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return [g for g in groups if g["params"]]


def build_adamw(
    groups: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-5,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW; ``fused=None`` uses the fused kernel when every parameter is on CUDA."""
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, fused=fused or None
    )


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, min_ratio: float, schedule: str
) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Linear warmup from ``1/warmup`` to 1 over ``warmup_steps``, then ``cosine`` decay to
    ``min_ratio`` at ``total_steps`` (PAPER.md: 10% of peak), or ``constant``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}: use cosine or constant")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.1,
    schedule: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio, schedule)
    )
