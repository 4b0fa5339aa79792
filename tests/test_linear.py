"""``llamalab.model.linear``: float32 CPU products on oneDNN, equal to ``F.linear``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from llamalab.model import linear as lin

pytestmark = pytest.mark.skipif(not lin.ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_mode() -> Iterator[None]:
    """These tests exercise the oneDNN route whatever the default of this machine is."""
    previous = lin.cpu_matmul()
    lin.set_cpu_matmul("onednn")
    yield
    lin.set_cpu_matmul(previous)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the oneDNN products actually run."""
    calls = [0]
    product = lin.onednn_product

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return product(a, b)

    monkeypatch.setattr(lin, "onednn_product", counting)
    return calls


def _grads(fn, x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):  # type: ignore[no-untyped-def]
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def test_forward_and_both_gradients_equal_f_linear(counted: list[int]) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 48), torch.randn(80, 48)
    g = torch.randn(3, 7, 80)
    ours = _grads(lin.linear, x, w, g)
    assert counted[0] == 3  # y = x W^T, dx = dy W, dW = dy^T x: all three on oneDNN
    for a, b in zip(ours, _grads(F.linear, x, w, g)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_input_or_weight_computes_only_the_gradient_needed(counted: list[int]) -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 8, requires_grad=True)
    lin.linear(torch.randn(5, 8), w).sum().backward()  # no grad for the input
    assert counted[0] == 2 and w.grad is not None
    x = torch.randn(5, 8, requires_grad=True)
    lin.linear(x, torch.randn(16, 8)).sum().backward()
    assert counted[0] == 4 and x.grad is not None
    with torch.no_grad():
        lin.linear(x, w)
    assert counted[0] == 5


def test_what_onednn_does_not_take_goes_to_f_linear(counted: list[int]) -> None:
    x, w, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6)
    torch.testing.assert_close(lin.linear(x, w, b), F.linear(x, w, b))  # a bias
    assert torch.equal(lin.linear(x.double(), w.double()), F.linear(x.double(), w.double()))
    assert torch.equal(lin.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    assert lin.linear(torch.empty(0, 8), w).shape == (0, 6)  # empty input
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision casts to bf16
        assert lin.linear(x, w).dtype == torch.bfloat16
    meta = lin.linear(x.to("meta"), w.to("meta"))
    assert meta.device.type == "meta" and meta.shape == (4, 6)
    assert counted[0] == 0


def test_aten_mode_is_exactly_f_linear(counted: list[int]) -> None:
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    lin.set_cpu_matmul("aten")
    try:
        assert lin.cpu_matmul() == "aten"
        assert torch.equal(lin.linear(x, w), F.linear(x, w))
    finally:
        lin.set_cpu_matmul("onednn")
    assert counted[0] == 0
    with pytest.raises(ValueError, match="LLAMALAB_CPU_MATMUL must be one of"):
        lin.set_cpu_matmul("mkl")


def test_linear_module_keeps_nn_linear_state_dict() -> None:
    layer = lin.Linear(8, 6, bias=False)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    """Under torch.compile the product is the ``llamalab::onednn_linear`` custom operator (its
    weights are graph inputs); forward and gradients match the eager layer."""
    torch.manual_seed(2)
    x, w = torch.randn(2, 5, 32), torch.randn(24, 32)
    g = torch.randn(2, 5, 24)
    compiled = torch.compile(lambda a, b: lin.linear(a, b), fullgraph=True)
    for a, b in zip(_grads(compiled, x, w, g), _grads(lin.linear, x, w, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
