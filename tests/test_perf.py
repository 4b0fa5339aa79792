"""FLOPs accounting, MFU arithmetic and the throughput window (no timed assertions)."""

from __future__ import annotations

import math

import pytest
import torch

from llamalab.model import Llama, LlamaConfig
from llamalab.perf import (
    Throughput,
    datasheet_peak_flops,
    flops_per_token,
    matmul_params,
    measure_peak_flops,
    mfu,
    ppo_flops_per_token,
)
from llamalab.scale.wrap import compile_blocks

# dim 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), FFN hidden 176 (int(8*64/3)=170 -> 176).
CONFIG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16)


def test_matmul_params_by_hand() -> None:
    # per layer: wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 = 12288; FFN 3*64*176 = 33792
    per_layer = 12288 + 33792
    assert CONFIG.hidden_dim == 176
    assert matmul_params(CONFIG) == 2 * per_layer + 100 * 64  # + LM head, no embedding/norms
    assert matmul_params(CONFIG, head="scalar") == 2 * per_layer + 64


def test_matmul_params_counts_the_linear_weights_of_a_real_model() -> None:
    model = Llama.from_config(CONFIG, device="meta")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(CONFIG) == linear


def test_flops_per_token_by_hand() -> None:
    n = 2 * (12288 + 33792) + 6400  # 98560
    attention = 4 * 2 * 64 * 128  # 4 * layers * dim * seq_len = 65536
    assert flops_per_token(CONFIG, 128, training=False) == 2 * n + attention
    assert flops_per_token(CONFIG, 128) == 6 * n + 12 * 2 * 64 * 128
    assert flops_per_token(CONFIG, 128) == 3 * flops_per_token(CONFIG, 128, training=False)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(CONFIG, 0)


def test_gqa_does_not_change_attention_flops() -> None:
    mha = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=100, multiple_of=16)
    delta = flops_per_token(mha, 256) - flops_per_token(CONFIG, 256)
    assert delta == 6 * 2 * (2 * 64 * 32)  # only the smaller wk, wv differ


def test_ppo_flops_parts_add_up() -> None:
    parts = ppo_flops_per_token(CONFIG, 128, ppo_epochs=2)
    fwd, fwd_scalar = (
        flops_per_token(CONFIG, 128, False),
        flops_per_token(CONFIG, 128, False, "scalar"),
    )
    assert parts["generate"] == parts["policy_rollout"] == parts["reference"] == fwd
    assert parts["reward"] == 2 * fwd_scalar  # helpful + safety, frozen: forward only
    assert parts["policy_train"] == 2 * flops_per_token(CONFIG, 128)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_mfu_arithmetic() -> None:
    # 1000 tok/s * 3e9 FLOP/tok = 3e12 FLOP/s on a 12 TFLOP/s part = 25%
    assert mfu(1000.0, 3e9, 12e12) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0.0)


def test_datasheet_table() -> None:
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert datasheet_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756e12)
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == pytest.approx(312e12)
    assert datasheet_peak_flops("NVIDIA H200", torch.float16) == pytest.approx(989.4e12)
    assert datasheet_peak_flops("Some Other GPU", torch.bfloat16) is None


def test_measured_peak_is_positive_and_finite() -> None:
    peak = measure_peak_flops(torch.float32, "cpu", size=128, repeats=2)
    assert math.isfinite(peak) and peak > 0


def test_throughput_window() -> None:
    meter = Throughput(window=2, flops_per_token=10.0, peak_flops=1000.0)
    assert meter.step(100, now=0.0) is None  # the first step only starts the clock
    first = meter.step(100, now=1.0)
    assert first is not None and first.tokens_per_s == pytest.approx(100.0)
    assert first.mfu == pytest.approx(1.0)  # 100 tok/s * 10 FLOP/tok / 1000 FLOP/s
    meter.step(300, now=2.0)
    report = meter.step(300, now=3.0)  # window of 2 steps: (300 + 300) tokens in 2 s
    assert report is not None and report.tokens_per_s == pytest.approx(300.0)
    assert Throughput().step(5, now=0.0) is None
    assert Throughput(window=1).report() is None
    with pytest.raises(ValueError):
        Throughput(window=0)


def test_compile_model_keeps_state_dict_names() -> None:
    model = Llama.from_config(CONFIG)
    names = list(model.state_dict())
    assert compile_blocks(model) is model  # lazy: nothing is compiled until the first call
    assert list(model.state_dict()) == names
    with pytest.raises(TypeError):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_blocks_share_one_graph_and_match_eager() -> None:
    """All blocks reuse one graph, with no graph break, through sequence lengths that change
    (one static graph, then one with a symbolic length: never one per layer or per length,
    which past Dynamo's recompile limit of 8 would leave blocks eager); the compiled model's
    loss and gradients equal the eager model's."""
    import copy

    import torch._dynamo

    config = LlamaConfig(dim=64, n_layers=10, n_heads=4, n_kv_heads=2, vocab_size=128)
    eager = Llama.from_config(config)
    compiled = compile_blocks(copy.deepcopy(eager))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    for length in (16, 24, 40):
        ids = torch.randint(0, 128, (2, length), generator=generator)
        losses = [m(ids).logsumexp(-1).mean() for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
            p.grad = q.grad = None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]
