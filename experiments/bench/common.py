"""Shared pieces of the benchmarks: the machine line, twin models, alternating median timing.

"Twin" = our ``Llama`` and ``transformers.LlamaForCausalLM`` with the *same* weights (through
``llamalab.checkpoint.hf.to_hf_state_dict``), so any speed difference is the implementation's.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from llamalab.checkpoint.hf import to_hf_state_dict
from llamalab.model import Llama, LlamaConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup(threads: int, seed: int = 0) -> None:
    """Pin the thread count (2 cores here: more threads only adds contention) and the seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/llamalab_inductor_cache")


def machine_line(device: torch.device) -> str:
    """One line naming the hardware and the software versions the figures came from."""
    import transformers

    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
    return (
        f"machine: {hw}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def twin_models(
    config: LlamaConfig, device: torch.device, dtype: torch.dtype
) -> tuple[Llama, torch.nn.Module]:
    """Our model and Hugging Face's, same weights, same device and dtype."""
    import transformers

    ours = Llama.from_config(config).to(device=device, dtype=dtype)
    skip = {"architectures", "model_type", "torch_dtype"}
    hf_config = transformers.LlamaConfig(
        **{k: v for k, v in config.to_hf_config().items() if k not in skip}
    )
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_config).to(device=device, dtype=dtype)
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    return ours, theirs


def with_cpu_matmul(fn: Callable[[], object], mode: str) -> Callable[[], object]:
    """``fn`` run with ``llamalab.model.linear``'s CPU GEMM library set to ``mode`` (``"aten"``:
    the BLAS ``F.linear`` uses, as Hugging Face's model does; ``"onednn"``: the default)."""
    from llamalab.model.linear import cpu_matmul, set_cpu_matmul

    def run() -> object:
        previous = cpu_matmul()
        set_cpu_matmul(mode)
        try:
            return fn()
        finally:
            set_cpu_matmul(previous)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (device-synchronised)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (a, b, a, b, ...) so that a
    slow patch of the machine (another process, thermal) hits every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---- peak memory of one call ----------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call of ``fn`` adds on top of what was resident before it, in MiB.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: tracemalloc cannot see torch's allocations,
    so we use the kernel's resident-set high-water mark: free what glibc caches
    (``malloc_trim``), reset ``VmHWM`` (write 5 to ``/proc/self/clear_refs``), run, then read
    ``VmHWM - VmRSS(before)``. Page-granular and includes allocator slack, so compare models
    measured the same way, not with GPU figures.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) / 1024
