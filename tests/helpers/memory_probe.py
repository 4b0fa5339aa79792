"""Run in a fresh process by ``tests/test_stream_io.py``: load or export a model and print, as
one JSON line, how much host memory each phase added over its baseline.

``python memory_probe.py import META_DIR`` (architecture, streamed load, in-place fill) or
``python memory_probe.py export OUT_DIR MAX_SHARD_SIZE`` (FSDP2 in one process, streamed export).

Two measures per phase, both as the increase over the phase's starting RSS:

- ``hwm``: the peak resident set (``VmHWM``), exact. It is reset at the start of each phase by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so it is that phase's peak. It
  counts the pages of memory-mapped checkpoint files that were read (``RssFile``): clean page
  cache the kernel may drop at any time, not a copy of the weights.
- ``anon``: the peak of anonymous memory (``RssAnon``), sampled every 0.5 ms by a thread: the
  copies the code makes. A sampled peak can miss a short spike, so tests bound ``hwm`` too.

The parent sets ``MALLOC_MMAP_THRESHOLD_`` so that glibc returns freed tensors to the system
(its adaptive threshold otherwise keeps freed blocks of up to 32 MB in the heap, which would
count memory the code no longer holds), and each phase starts after a warm-up that imports and
initialises what it uses (torch's meta-device kernels alone take about 60 MB the first time).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from llamalab.checkpoint import load_meta, load_model, save_hf
from llamalab.checkpoint.loader import checkpoint_config
from llamalab.model import Llama, LlamaConfig
from llamalab.scale.build import LazyState, build, load_weights
from llamalab.scale.zero_gen import host_tensors

# About 97M parameters: a 12-layer, 768-wide LLaMA with an 8000-piece vocabulary.
PROBE_CONFIG = LlamaConfig(
    dim=768, n_layers=12, n_heads=12, vocab_size=8000, multiple_of=256, max_seq_len=512
)
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    """Bytes of the fields of ``/proc/self/status`` this probe reads."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def phase(results: dict, name: str) -> Iterator[None]:
    """Measure the block: ``results[name] = {"anon": ..., "hwm": ..., "seconds": ...}``."""
    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], status()["RssAnon"])
            time.sleep(0.0005)

    exact = reset_peak()
    before = status()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    after = status()
    results[name] = {
        "anon": max(peak["anon"], after["RssAnon"]) - before["RssAnon"],
        "hwm": after["VmHWM"] - before["VmRSS"] if exact else None,
        "seconds": round(seconds, 2),
    }


def warm_up() -> None:
    """What the phases use, once on a tiny model: meta-device kernels, the loaders."""
    tiny = LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16)
    with torch.device("meta"):
        Llama(tiny)
    torch.cat([torch.zeros(4, 4), torch.zeros(4, 4)]).to(torch.bfloat16, copy=True)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def probe_import(meta_dir: Path) -> dict:
    """Architecture only; streamed ``load_meta``; then a fill in place of the model just loaded
    (what each parameter load does under ZeRO-3, rank 0 inside ``GatheredParameters``)."""
    results: dict = {}
    warm_up()
    with phase(results, "config"):
        config = checkpoint_config(meta_dir)
    with phase(results, "load"):
        model = load_meta(meta_dir)
    assert model.config == config
    with phase(results, "fill"):
        load_weights(model, LazyState(meta_dir), "none", str(meta_dir))
    results["model_bytes"] = weight_bytes(model)
    results["largest_tensor_bytes"] = max(p.numel() * p.element_size() for p in model.parameters())
    return results


def probe_export(out: Path, max_shard_size: str) -> dict:
    """An FSDP2 model (one process, gloo) exported the way the runner does it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29531"))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = build("lm", PROBE_CONFIG, "fsdp", init_device_mesh("cpu", (1,)))
    warm_up()
    results: dict = {}
    with phase(results, "export"):
        save_hf(
            model, None, out, max_shard_size=max_shard_size, tensors=host_tensors(model, "fsdp")
        )
    with torch.no_grad():
        whole = {n: p.full_tensor() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    back = load_model(out).state_dict()
    results["equal"] = back.keys() == whole.keys() and all(
        torch.equal(back[n], whole[n]) for n in whole
    )
    results["model_bytes"] = sum(t.numel() * t.element_size() for t in whole.values())
    results["largest_block_bytes"] = max(
        weight_bytes(block)  # fp32 blocks, whole (DTensor sizes are the global ones)
        for block in model.layers  # type: ignore[union-attr]
    )
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, path = sys.argv[1], Path(sys.argv[2])
    result = probe_import(path) if what == "import" else probe_export(path, sys.argv[3])
    print(json.dumps(result))
