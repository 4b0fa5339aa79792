"""Greedy KV-cache generation speed: ``llamalab.generation.generate`` vs ``transformers``'
``generate`` (``do_sample=False``, ``use_cache=True``), same weights, EOS disabled.

Every row generates exactly ``--new`` tokens per prompt (64 by default) after equal-length random
prompts (no padding), so both sides do identical work; tokens/s counts new tokens only. The
``match`` column is the share of sequences whose greedy tokens are identical on both sides (a
tie between two logits can flip one token in float32; anything far below 100% is a bug).

    python experiments/bench/bench_generate.py --quick     # tiny, batch 1 and 16
    python experiments/bench/bench_generate.py             # tiny,small x batch 1,16
    python experiments/bench/bench_generate.py --large     # also batch 64
    python experiments/bench/bench_generate.py --compile   # also generate(compile=True)
    python experiments/bench/bench_generate.py --aten      # also ours on F.linear's GEMMs

``--compile`` adds our compiled static-shape decode step (``llamalab.generation.compiled``) as a
third contender; its one-off compilation happens in the warm-up and is printed separately.
``--aten`` adds our eager sampler with the model's CPU products on ``F.linear``'s BLAS instead
of oneDNN (``llamalab.model.linear``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import DTYPES, alternate, machine_line, setup, twin_models, with_cpu_matmul

from llamalab.generation import generate
from llamalab.model import LlamaConfig


def runners(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    prompts: torch.Tensor,
    new: int,
    compiled: bool = False,
    aten: bool = False,
) -> dict[str, Callable[[], object]]:
    """Closures returning the new tokens per prompt for each contender."""
    prompt_lists = prompts.tolist()
    mask = torch.ones_like(prompts)

    def run_ours() -> list[list[int]]:
        return generate(ours, prompt_lists, new, temperature=0.0, eos_id=None).tokens

    def run_hf() -> list[list[int]]:
        out = theirs.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        return out[:, prompts.shape[1] :].tolist()

    def run_compiled() -> list[list[int]]:
        return generate(ours, prompt_lists, new, temperature=0.0, eos_id=None, compile=True).tokens

    fns: dict[str, Callable[[], object]] = {"ours": run_ours, "hf": run_hf}
    if compiled:
        fns["compiled"] = run_compiled
    if aten:  # ours, eager, with F.linear's GEMMs (the library Hugging Face's model uses)
        fns["ours_aten"] = with_cpu_matmul(run_ours, "aten")
    return fns


def bench_one(args: argparse.Namespace, size: str, batch: int) -> dict[str, object]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = LlamaConfig.from_name(size)
    ours, theirs = twin_models(config, device, dtype)
    ours.eval(), theirs.eval()
    theirs.generation_config.eos_token_id = None
    prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), device=device)
    fns = runners(ours, theirs, prompts, args.new, args.compile, args.aten)
    row: dict[str, object] = {"size": size, "batch": batch}
    with torch.no_grad():
        if args.compile:
            start = time.perf_counter()
            fns["compiled"]()
            row["compile_s"] = time.perf_counter() - start
        seconds = alternate(fns, device, args.warmup, args.repeats)
        reference = fns["hf"]()
        row["match"] = sum(a == b for a, b in zip(fns["ours"](), reference)) / batch
        if args.compile:
            row["match_compiled"] = (
                sum(a == b for a, b in zip(fns["compiled"](), reference)) / batch
            )
    for name, s in seconds.items():
        row[f"{name}_tok_s"] = batch * args.new / s
    row["ratio"] = seconds["hf"] / seconds["ours"]
    if "compiled" in seconds:
        row["compiled_ratio"] = seconds["hf"] / seconds["compiled"]
    if "ours_aten" in seconds:
        row["aten_ratio"] = seconds["hf"] / seconds["ours_aten"]
    return row


def print_header(compiled: bool, aten: bool) -> None:
    head = ["size", "batch", "ours tok/s", "hf tok/s", "ours/hf", "match"]
    if compiled:
        head += ["compiled tok/s", "compiled/hf", "compiled match", "compile s"]
    if aten:
        head += ["ours_aten tok/s", "ours_aten/hf"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)


def print_row(r: dict[str, object]) -> None:
    cells = [str(r["size"]), str(r["batch"])] + [f"{r[f'{n}_tok_s']:.0f}" for n in ("ours", "hf")]
    cells.append(f"{r['ratio']:.2f}x")
    cells.append(f"{r['match']:.0%}")
    if "compiled_ratio" in r:
        cells += [
            f"{r['compiled_tok_s']:.0f}",
            f"{r['compiled_ratio']:.2f}x",
            f"{r['match_compiled']:.0%}",
            f"{r['compile_s']:.0f}",
        ]
    if "aten_ratio" in r:
        cells += [f"{r['ours_aten_tok_s']:.0f}", f"{r['aten_ratio']:.2f}x"]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--large", action="store_true", help="also batch 64")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny only, 3 repeats")
    parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
    parser.add_argument(
        "--aten", action="store_true", help="also time ours with F.linear's GEMMs (no oneDNN)"
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = "tiny", 3
    if args.large:
        args.batches += ",64"
    setup(args.threads)
    device = torch.device(args.device)
    print(machine_line(device))
    print(
        f"dtype {args.dtype}, greedy, {args.new} new tokens, prompt {args.prompt_len}, median of {args.repeats}"
    )
    print_header(args.compile, args.aten)
    for size in args.sizes.split(","):
        for batch in args.batches.split(","):
            print_row(bench_one(args, size, int(batch)))


if __name__ == "__main__":
    main()
