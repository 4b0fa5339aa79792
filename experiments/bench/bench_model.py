"""Training-step speed: ours vs ``transformers.LlamaForCausalLM`` (same config, same weights).

One step = forward, next-token cross-entropy, backward, AdamW step, zero_grad. Reports tokens/s
(median of ``--repeats`` interleaved runs), peak step memory, and MFU against a measured (CPU) or
datasheet (GPU) peak. ``--compile`` adds our model with per-block ``torch.compile``; ``--aten``
adds our model with its CPU float32 products on ``F.linear``'s BLAS (what Hugging Face's model
uses) instead of oneDNN (``llamalab.model.linear``), which separates the library's share of
the difference from the rest of the implementation.

    python experiments/bench/bench_model.py --quick          # about 1 minute on 2 CPU cores
    python experiments/bench/bench_model.py                  # tiny,small,base x 256,1024
    python experiments/bench/bench_model.py --compile --sizes tiny,small --seq 256
    python experiments/bench/bench_model.py --aten --sizes tiny --seq 256
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import (
    DTYPES,
    alternate,
    machine_line,
    peak_memory_mib,
    setup,
    twin_models,
    with_cpu_matmul,
)

from llamalab.model import LlamaConfig
from llamalab.perf import flops_per_token, measure_peak_flops, mfu
from llamalab.scale.wrap import compile_blocks


def train_step(model: torch.nn.Module, batch: torch.Tensor, hf: bool) -> Callable[[], None]:
    """A closure doing one full optimisation step of ``model`` on ``batch (B, T)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-5)

    def step() -> None:
        out = model(batch)
        logits = out.logits if hf else out
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_one(args: argparse.Namespace, size: str, seq: int, peak: float) -> dict[str, object]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = LlamaConfig.from_name(size, max_seq_len=max(seq, 256))
    ours, theirs = twin_models(config, device, dtype)
    ours.train(), theirs.train()
    batch = torch.randint(0, config.vocab_size, (args.batch, seq), device=device)
    steps = {"ours": train_step(ours, batch, False), "hf": train_step(theirs, batch, True)}
    if args.compile:
        compiled = compile_blocks(copy.deepcopy(ours), dynamic=None)
        steps["ours_compiled"] = train_step(compiled, batch, False)
    if args.aten:  # our model with the same GEMM library as Hugging Face's (MKL on x86)
        steps["ours_aten"] = with_cpu_matmul(train_step(copy.deepcopy(ours), batch, False), "aten")
    seconds = alternate(steps, device, args.warmup, args.repeats)
    memory = {name: peak_memory_mib(fn, device) for name, fn in steps.items()}
    tokens = args.batch * seq
    fpt = flops_per_token(config, seq, training=True)
    row: dict[str, object] = {"size": size, "seq": seq, "batch": args.batch}
    for name, s in seconds.items():
        row[f"{name}_tok_s"] = tokens / s
        row[f"{name}_mib"] = memory[name]
        row[f"{name}_mfu"] = mfu(tokens / s, fpt, peak)
    row["ratio"] = seconds["hf"] / seconds["ours"]
    for name in seconds:
        if name not in ("ours", "hf"):
            row[f"ratio_{name}"] = seconds["hf"] / seconds[name]
    return row


def contenders(args: argparse.Namespace) -> list[str]:
    return ["ours", "hf"] + ["ours_compiled"] * args.compile + ["ours_aten"] * args.aten


def print_header(names: list[str]) -> None:
    head = ["size", "seq", "batch"]
    for n in names:
        head += [f"{n} tok/s", f"{n} MiB", f"{n} MFU"]
    head += ["ours/hf"] + [f"{n}/hf" for n in names[2:]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)


def print_row(r: dict[str, object], names: list[str]) -> None:
    cells = [str(r["size"]), str(r["seq"]), str(r["batch"])]
    for n in names:
        cells += [f"{r[f'{n}_tok_s']:.0f}", f"{r[f'{n}_mib']:.0f}", f"{r[f'{n}_mfu']:.1%}"]
    cells.append(f"{r['ratio']:.2f}x")
    cells += [f"{r[f'ratio_{n}']:.2f}x" for n in names[2:]]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small,base")
    parser.add_argument("--seq", default="256,1024", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time ours, torch.compile'd")
    parser.add_argument(
        "--aten", action="store_true", help="also time ours with F.linear's GEMMs (no oneDNN)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny,small at seq 256 only")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.seq = "tiny,small", "256"
    setup(args.threads)
    device = torch.device(args.device)
    peak = measure_peak_flops(DTYPES[args.dtype], device)
    print(machine_line(device))
    print(f"dtype {args.dtype}, peak {peak / 1e9:.0f} GFLOP/s, median of {args.repeats}")
    print_header(contenders(args))
    for size in args.sizes.split(","):
        for seq in (int(s) for s in args.seq.split(",")):
            print_row(bench_one(args, size, seq, peak), contenders(args))


if __name__ == "__main__":
    main()
