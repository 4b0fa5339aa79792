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

``--compile`` adds our compiled static-shape decode step (``llamalab.compiled_decode``) as a
third contender; its one-off compilation happens in the warm-up and is printed separately.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import DTYPES, alternate, machine_line, setup, twin_models

from llamalab.generation import generate
from llamalab.model import LlamaConfig


def runners(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    prompts: torch.Tensor,
    new: int,
    compiled: bool = False,
) -> dict[str, Callable[[], list[list[int]]]]:
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

    fns = {"ours": run_ours, "hf": run_hf}
    if compiled:
        fns["compiled"] = run_compiled
    return fns


def bench_one(args: argparse.Namespace, size: str, batch: int) -> dict[str, object]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = LlamaConfig.from_name(size)
    ours, theirs = twin_models(config, device, dtype)
    ours.eval(), theirs.eval()
    theirs.generation_config.eos_token_id = None
    prompts = torch.randint(3, config.vocab_size, (batch, args.prompt_len), device=device)
    fns = runners(ours, theirs, prompts, args.new, args.compile)
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
    return row


def print_header(compiled: bool) -> None:
    head = ["size", "batch", "ours tok/s", "hf tok/s", "ours/hf", "match"]
    if compiled:
        head += ["compiled tok/s", "compiled/hf", "compiled match", "compile s"]
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
    print_header(args.compile)
    for size in args.sizes.split(","):
        for batch in args.batches.split(","):
            print_row(bench_one(args, size, int(batch)))


if __name__ == "__main__":
    main()
