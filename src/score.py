"""Score (prompt, response) records with a reward model.

    python src/score.py --model PATH --data FILE.jsonl [--out FILE] [--batch-size N] [--device D]

`--model` is a reward model export (`outputs/reward_helpful/latest`, its `export/`, or any
checkpoint `llamalab.checkpoint.load_model` reads with a scalar head) and the `tokenizer.model`
next to it (or `--tokenizer`). Each record of `--data` (JSONL, JSON, Parquet, a directory or
`hf:NAME`) has a `prompt` (text, an HH transcript or messages ending with user; optional `system`)
and either a `response` (scored) or a `chosen`/`rejected` pair (both scored; accuracy is printed).
The text is encoded in Meta's chat format exactly as the reward stage trains on it
(`prompt + [assistant response]`, closed by EOS; see `llamalab.data.preference`).

Output: the input rows with `score` (raw reward) and `probability` (sigmoid of it), or
`score_chosen`/`score_rejected`/`probability_chosen`/`probability_rejected` for pairs, as JSONL to
`--out` (to stdout without it, the summary then going to stderr). Records longer than the
model's context get `score: null` and are counted. Bad records stop with `file:line: field`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from llamalab.runner.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward model export or run directory")
    parser.add_argument("--data", required=True, help="JSONL (or Parquet, dir, hf:NAME) records")
    parser.add_argument("--out", help="output JSONL (default: stdout)")
    parser.add_argument("--tokenizer", help="SentencePiece model (default: next to --model)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return parser.parse_args(argv)


def find_tokenizer(model_path: Path, explicit: str | None) -> Path:
    from llamalab.checkpoint import CheckpointError

    candidates = (
        [Path(explicit)]
        if explicit
        else [
            model_path / "tokenizer.model",
            model_path / "export" / "tokenizer.model",
            model_path.parent / "tokenizer.model",
        ]
    )
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"no tokenizer.model for {model_path}; pass --tokenizer")


def encode_rows(
    source: str, tokenizer: Any, max_len: int
) -> tuple[list[dict[str, Any]], list[list[int] | None]]:
    """Every raw row and the token lists to score: one per response row, two (chosen then
    rejected) per pair row; None where the sequence exceeds ``max_len``."""
    from llamalab.data.errors import DataError
    from llamalab.data.formats import normalize_preference, normalize_sft
    from llamalab.data.sources import iter_rows
    from llamalab.tokenizer import DialogError

    rows: list[dict[str, Any]] = []
    sequences: list[list[int] | None] = []
    for path, line, row in iter_rows(source):
        try:
            if row.get("chosen") is not None or row.get("rejected") is not None:
                record = normalize_preference(row)
                dialogs = [
                    [*record["prompt"], {"role": "assistant", "content": record[k]}]
                    for k in ("chosen", "rejected")
                ]
            else:
                dialogs = [normalize_sft(row)["messages"]]
            encoded = [tokenizer.encode_dialog(d) for d in dialogs]
        except DataError as err:
            raise err.located(path, line) from None
        except DialogError as err:  # e.g. a reserved chat tag in the text
            raise DataError(str(err), path, line) from None
        rows.append(row)
        sequences.extend(ids if len(ids) <= max_len else None for ids in encoded)
    if not rows:
        raise DataError("no records", path=source)
    return rows, sequences


def attach_scores(rows: list[dict[str, Any]], scores: list[float | None]) -> dict[str, Any]:
    """Write the scores into the rows (in place); summary {mean_score, pairs, accuracy, skipped}."""
    it = iter(scores)
    valid: list[float] = []
    correct, pairs = 0, 0
    for row in rows:
        is_pair = row.get("chosen") is not None or row.get("rejected") is not None
        keys = ("chosen", "rejected") if is_pair else ("",)
        values = [next(it) for _ in keys]
        for key, value in zip(keys, values):
            suffix = f"_{key}" if key else ""
            row[f"score{suffix}"] = value
            row[f"probability{suffix}"] = None if value is None else 1 / (1 + math.exp(-value))
            if value is not None:
                valid.append(value)
        if is_pair and None not in values:
            pairs += 1
            correct += int(values[0] > values[1])  # type: ignore[operator]
    return {
        "records": len(rows),
        "mean_score": sum(valid) / len(valid) if valid else float("nan"),
        "skipped_sequences": sum(s is None for s in scores),
        "pairs": pairs,
        "accuracy": correct / pairs if pairs else None,
    }


def score_file(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from llamalab.checkpoint import CheckpointError, load_model
    from llamalab.model import LlamaScalar
    from llamalab.stages.reward import score_token_rows
    from llamalab.tokenizer import Tokenizer

    model_path = Path(args.model)
    if not model_path.exists():
        raise CheckpointError(f"--model {model_path} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(model_path, device=device)
    if not isinstance(model, LlamaScalar):
        raise CheckpointError(f"{model_path} is a language model, not a reward model (scalar head)")
    tokenizer = Tokenizer(find_tokenizer(model_path, args.tokenizer))
    rows, sequences = encode_rows(args.data, tokenizer, model.config.max_seq_len)
    kept = [s for s in sequences if s is not None]
    values = (
        score_token_rows(model, kept, tokenizer.pad_id, args.batch_size).tolist() if kept else []
    )
    it = iter(values)
    summary = attach_scores(rows, [None if s is None else next(it) for s in sequences])
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out:
        Path(args.out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    report = sys.stdout if args.out else sys.stderr
    print(
        f"scored {summary['records']} records: mean score {summary['mean_score']:.4f}", file=report
    )
    if summary["pairs"]:
        print(
            f"pairwise accuracy {summary['accuracy']:.4f} over {summary['pairs']} pairs",
            file=report,
        )
    if summary["skipped_sequences"]:
        print(
            f"{summary['skipped_sequences']} sequences longer than {model.config.max_seq_len} "
            "tokens were not scored (score null)",
            file=report,
        )
    return summary


def main(argv: list[str] | None = None) -> None:
    run_cli(score_file, parse_args(argv))


if __name__ == "__main__":
    main()
