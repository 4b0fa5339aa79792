"""Speed accounting: FLOPs per token, peak FLOP/s, model FLOPs utilisation (MFU), throughput.

FLOPs convention (PaLM, appendix B; Chinchilla, appendix F), one multiply-add = 2 FLOPs:

- ``N`` = the weights that take part in a matmul for every token: the seven projections of each
  block (``wq wk wv wo w1 w2 w3``) plus the head (``output``: ``vocab x dim``, or ``score``:
  ``dim``). The embedding is a lookup (no FLOPs) and the norms are element-wise (negligible), so
  neither counts.
- Forward, per token: ``2 N`` for the matmuls plus ``4 * n_layers * dim * seq_len`` for attention
  (``Q K^T`` and ``A V``, each ``2 * dim * seq_len`` per layer: ``n_heads * head_dim = dim``
  whatever the number of KV heads, so GQA/MQA do not change it).
- Training = forward + backward, the backward costing twice the forward:
  ``6 N + 12 * n_layers * dim * seq_len``.

Attention is counted over the full ``seq_len`` (the PaLM convention) even though a causal mask
lets kernels skip about half of it; MFU figures are therefore comparable with published ones.
Recomputation (activation checkpointing) is *not* counted: MFU measures useful work, not
hardware utilisation. PAPER.md (Pretraining) implies 38-43% MFU for LLaMA 2 on A100s.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass

import torch

from llamalab.model.config import LlamaConfig
from llamalab.model.linear import ONEDNN_AVAILABLE, onednn_product


def matmul_params(config: LlamaConfig, head: str = "lm") -> int:
    """``N``: parameters used in a matmul per token (blocks + head; no embedding, no norms)."""
    norms = config.n_layers * 2 * config.dim + config.dim
    return config.num_params(head) - config.vocab_size * config.dim - norms


def flops_per_token(
    config: LlamaConfig, seq_len: int, training: bool = True, head: str = "lm"
) -> float:
    """FLOPs per token of a sequence of ``seq_len`` tokens: ``6N + 12 L d s`` (training) or
    ``2N + 4 L d s`` (forward only). See the module docstring for what ``N`` counts."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = matmul_params(config, head)
    attention = 4 * config.n_layers * config.dim * seq_len
    forward = 2 * n + attention
    return float(3 * forward if training else forward)


def ppo_flops_per_token(
    policy: LlamaConfig,
    seq_len: int,
    value: LlamaConfig | None = None,
    n_reward_models: int = 2,
    reward: LlamaConfig | None = None,
    ppo_epochs: int = 1,
) -> dict[str, float]:
    """FLOPs per token of experience (prompt + response tokens) of one PPO iteration, by part.

    Parts (PAPER.md, RLHF with PPO): ``generate`` (the policy's forward; with the KV cache each
    token goes through the model once), ``policy_rollout`` (the policy's log-probs of the
    finished rollout, recomputed in one forward: PPO's "old" log-probs, exact where the
    sampler's per-step ones may differ by kernel rounding), ``reference`` (frozen SFT policy,
    forward),
    ``reward`` (``n_reward_models`` frozen scalar models, helpful + safety: forward),
    ``value_rollout`` (the critic's values for GAE, forward), then ``ppo_epochs`` passes of
    training for the policy (``policy_train``) and the critic (``value_train``). The critic is
    initialised from a reward model, so ``value`` and ``reward`` default to the policy's shape.
    ``total`` is the sum. The frozen models are forward only: ``2N + 4 L d s`` each.
    """
    value = value or policy
    reward = reward or value
    parts = {
        "generate": flops_per_token(policy, seq_len, training=False),
        "policy_rollout": flops_per_token(policy, seq_len, training=False),
        "reference": flops_per_token(policy, seq_len, training=False),
        "reward": n_reward_models * flops_per_token(reward, seq_len, training=False, head="scalar"),
        "value_rollout": flops_per_token(value, seq_len, training=False, head="scalar"),
        "policy_train": ppo_epochs * flops_per_token(policy, seq_len, training=True),
        "value_train": ppo_epochs * flops_per_token(value, seq_len, training=True, head="scalar"),
    }
    parts["total"] = sum(parts.values())
    return parts


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the hardware's peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops}")
    return tokens_per_s * flops_per_token / peak_flops


# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets, by device-name fragment and dtype.
# "float32" is the plain FP32 rate; "tf32" applies when float32 matmuls may use TF32.
# Order matters: the first fragment found in the device name wins.
_DATASHEET: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("H100 PCIe", {"bfloat16": 756.0e12, "float16": 756.0e12, "tf32": 378.0e12, "float32": 51.2e12}),
    ("H100 NVL", {"bfloat16": 835.0e12, "float16": 835.0e12, "tf32": 417.5e12, "float32": 60.0e12}),
    ("H100", {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312.0e12, "float16": 312.0e12, "tf32": 156.0e12, "float32": 19.5e12}),
)  # fmt: skip


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of a known GPU (H200, H100 SXM/PCIe/NVL, A100) for ``dtype``, else None."""
    key = str(dtype).removeprefix("torch.")
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    for fragment, table in _DATASHEET:
        if fragment.lower() in device_name.lower():
            return table.get(key)
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    size: int = 2048,
    repeats: int = 5,
    use_datasheet: bool = True,
) -> float:
    """Peak matmul FLOP/s: the datasheet figure for a known GPU, else a timed GEMM.

    The measurement multiplies two ``size x size`` matrices (``2 size^3`` FLOPs) ``repeats``
    times after one warm-up and keeps the median, so one slow run (another process, a frequency
    change) does not move it. On CPU every GEMM library this torch build offers is timed (the
    BLAS behind ``torch.mm`` and, for float32, oneDNN, which :mod:`llamalab.model.linear` uses)
    and the fastest counts: the peak is what the cores can deliver, not what one library gets.
    On an AMD Zen 5 core, MKL's AVX2 kernels reach well under half of oneDNN's AVX-512 ones.
    """
    device = torch.device(device)
    if use_datasheet and device.type == "cuda":
        peak = datasheet_peak_flops(torch.cuda.get_device_name(device), dtype)
        if peak is not None:
            return peak
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    kernels = [lambda: torch.mm(a, b)]
    if device.type == "cpu" and dtype == torch.float32 and ONEDNN_AVAILABLE:
        kernels.append(lambda: onednn_product(a, b))
    best = 0.0
    for kernel in kernels:
        kernel()
        times = []
        for _ in range(max(1, repeats)):
            _sync(device)
            start = time.perf_counter()
            kernel()
            _sync(device)
            times.append(time.perf_counter() - start)
        best = max(best, 2 * size**3 / max(statistics.median(times), 1e-9))
    return best


@dataclass
class ThroughputReport:
    tokens_per_s: float
    mfu: float | None  # None when no FLOPs per token or peak was given


class Throughput:
    """Tokens/s (and MFU) over a sliding window of the last ``window`` steps.

    Call ``step(n_tokens)`` once per training step, after the step's work has finished (on a GPU
    the caller's logging already synchronises; the time is read with ``time.perf_counter``). The
    first call only starts the clock. ``report()`` returns ``None`` until two steps are known.
    """

    def __init__(
        self,
        window: int = 20,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._times: deque[float] = deque(maxlen=window + 1)
        self._tokens: deque[int] = deque(maxlen=window + 1)  # tokens done *at* each time
        self._total = 0

    def step(self, n_tokens: int, now: float | None = None) -> ThroughputReport | None:
        """Record a finished step of ``n_tokens``; return the window's figures."""
        self._total += n_tokens
        self._times.append(time.perf_counter() if now is None else now)
        self._tokens.append(self._total)
        return self.report()

    def report(self) -> ThroughputReport | None:
        if len(self._times) < 2:
            return None
        elapsed = self._times[-1] - self._times[0]
        tokens = self._tokens[-1] - self._tokens[0]
        rate = tokens / elapsed if elapsed > 0 else 0.0
        util = None
        if self.flops_per_token is not None and self.peak_flops:
            util = mfu(rate, self.flops_per_token, self.peak_flops)
        return ThroughputReport(rate, util)
