"""``Linear``: ``nn.Linear`` whose float32 matrix products on CPU run on oneDNN.

On CPU, ``F.linear`` / ``torch.mm`` in float32 go to the BLAS PyTorch was built with (MKL on
x86). MKL picks its kernels by CPU vendor: on AMD processors it runs its AVX2 code even where
the core has full-width AVX-512 (Zen 4 / Zen 5). oneDNN, which PyTorch also ships (the
``torch.ops.mkldnn`` operators Inductor uses for bf16), dispatches on the instruction set. On
the 2-core AMD EPYC (Zen 5) these numbers were measured on, a float32 GEMM ran at about 187
GFLOP/s through MKL and 435-450 GFLOP/s through oneDNN, and a whole linear layer's forward and
backward 1.2-1.9x faster (``experiments/bench/README.md``). Both accumulate in float32: results
differ from MKL's by summation order only (relative 1e-6), as two BLAS libraries do.

``Linear`` keeps ``nn.Linear``'s parameters and state-dict keys (checkpoints, Hugging Face and
Meta interop unchanged) and routes only what oneDNN handles exactly: float32, plain strided CPU
tensors, no bias. Everything else (CUDA, bf16/fp16, DTensor shards under FSDP, DeepSpeed ZeRO-3
parameters, meta tensors, a bias, empty inputs, CPU autocast) goes to ``F.linear`` unchanged.
With gradients the three products of a layer (``y = x W^T``, ``dx = dy W``, ``dW = dy^T x``)
all run on oneDNN.

``LLAMALAB_CPU_MATMUL`` (or :func:`set_cpu_matmul`): ``auto`` (default: oneDNN on x86-64,
``F.linear`` on other CPUs), ``onednn``, or ``aten`` (the routing off, e.g. to compare against
``F.linear`` or on a CPU where oneDNN is not the faster one).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_CHOICES = ("auto", "onednn", "aten")


def _resolve(mode: str) -> str:
    """``auto``: oneDNN on x86-64 (where it was measured faster), ``F.linear`` elsewhere (ARM
    laptops have their own BLAS, e.g. Accelerate, that oneDNN was not measured against)."""
    if mode not in _CHOICES:
        raise ValueError(f"LLAMALAB_CPU_MATMUL must be one of {_CHOICES}, got {mode!r}")
    if mode == "auto":
        return "onednn" if platform.machine().lower() in ("x86_64", "amd64") else "aten"
    return mode


_mode = _resolve(os.environ.get("LLAMALAB_CPU_MATMUL", "auto").strip().lower())


def set_cpu_matmul(mode: str) -> None:
    """``"auto"`` (default), ``"onednn"`` or ``"aten"``: which library runs float32 ``Linear``
    on CPU."""
    global _mode
    _mode = _resolve(mode)


def cpu_matmul() -> str:
    """The current choice (see :func:`set_cpu_matmul`)."""
    return _mode


def _onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


ONEDNN_AVAILABLE = _onednn_available()  # this torch build has oneDNN's linear operator


def _plain_cpu_float32(t: torch.Tensor) -> bool:
    return (
        type(t) in (torch.Tensor, nn.Parameter)
        and t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.layout == torch.strided
        and not hasattr(t, "ds_id")  # DeepSpeed ZeRO-3 gathers and frees it around F.linear
    )


def onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (M, K) @ b (N, K)^T -> (M, N)`` on oneDNN (either operand may be strided; float32 or
    bf16 CPU tensors; requires :data:`ONEDNN_AVAILABLE`). No autograd: see :func:`linear`."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


def _backward_products(
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grad: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``dx = dy W`` and ``dW = dy^T x`` (each only if needed), as ``product`` calls on views."""
    g2 = grad.reshape(-1, grad.shape[-1])
    dx = product(g2, weight.t()) if needs[0] else None
    dw = product(g2.t(), x2.t()) if needs[1] else None
    return dx, dw


class _OneDNNLinear(torch.autograd.Function):
    """Eager autograd: the three products of the layer on oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return onednn_product(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x2, weight = ctx.saved_tensors
        dx, dw = _backward_products(onednn_product, grad, x2, weight, ctx.needs_input_grad)
        return (None if dx is None else dx.view(ctx.x_shape)), dw


# Inside torch.compile the product is an opaque custom operator: Inductor's own lowering of
# ``mkldnn._linear_pointwise`` accepts only frozen (constant) weights, and a training graph's
# weights are inputs. The operator's cost (a Python call, microseconds) is nothing next to a
# training-sized product; decoding graphs with frozen weights use the raw operator instead.
@torch.library.custom_op("llamalab::onednn_linear", mutates_args=())
def _onednn_linear_op(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return onednn_product(x2, weight)


@_onednn_linear_op.register_fake
def _(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def _setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: Any) -> None:
    ctx.save_for_backward(*inputs)


def _op_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    x2, weight = ctx.saved_tensors
    return _backward_products(_onednn_linear_op, grad, x2, weight, ctx.needs_input_grad)


_onednn_linear_op.register_autograd(_op_backward, setup_context=_setup_context)

_frozen = False  # set while a graph with frozen (constant) weights is being traced


class frozen_weights:
    """Context for tracing a graph whose weights Inductor freezes (``llamalab.generation.compiled``):
    the raw oneDNN operator then goes into the graph with the weight as a constant."""

    def __enter__(self) -> None:
        global _frozen
        self._previous, _frozen = _frozen, True

    def __exit__(self, *exc: object) -> None:
        global _frozen
        _frozen = self._previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, on oneDNN where that applies (module doc)."""
    if (
        bias is None
        and _mode == "onednn"
        and ONEDNN_AVAILABLE
        and x.dim() >= 2
        and x.numel() > 0
        and _plain_cpu_float32(x)
        and _plain_cpu_float32(weight)
        and not torch.is_autocast_enabled("cpu")  # autocast casts F.linear's inputs: keep it
    ):
        out_shape = (*x.shape[:-1], weight.shape[0])
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            if _frozen:
                return onednn_product(x2, weight).view(out_shape)
            return _onednn_linear_op(x2, weight).view(out_shape)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _OneDNNLinear.apply(x, weight)
        return onednn_product(x2, weight).view(out_shape)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
