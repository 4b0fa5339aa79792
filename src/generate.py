"""Answer a file of prompts in batches: `python src/generate.py --prompts FILE --out OUT.jsonl`.

Prompts: JSONL / JSON / Parquet records with `prompt` (text or a message list), `messages` or
Alpaca `instruction`, or any other file with one prompt per line. Each is formatted in Meta's
chat format (`--raw`: plain text, for a pretrained model) and answered with
`llamalab.generation.generate`. OUT gets one JSON line per prompt, in order:
`{"prompt", "response", "tokens" (new token ids, EOS included), "finished" (ended with EOS)}`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llamalab.chat import ChatError, Sampling, answer_prompts, load_chat_model, read_prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", required=True, help="prompts file (JSONL/JSON/Parquet or text)")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--model", help="checkpoint, export or run directory (default: latest SFT run)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one next to the model)")
    p.add_argument("--system", help="system prompt for prompts that have none")
    p.add_argument("--raw", action="store_true", help="plain-text prompts, no chat format")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (batch i uses seed + i)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compiled static-shape decode step (faster for many batches; compiles first)",
    )
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from llamalab.checkpoint import CheckpointError
    from llamalab.data.errors import DataError
    from llamalab.tokenizer import DialogError

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        prompts = read_prompts(args.prompts, args.system)  # bad data stops before the model loads
        model, tokenizer = load_chat_model(args.model, args.tokenizer, device)
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        answers = answer_prompts(
            model,
            tokenizer,
            [m for _, m in prompts],
            sampling,
            args.batch_size,
            args.raw,
            compile=args.compile,
        )
        with open(out, "w", encoding="utf-8") as f:
            for (shown, _), answer in zip(prompts, answers):
                f.write(json.dumps({"prompt": shown, **answer}, ensure_ascii=False) + "\n")
    except (ChatError, CheckpointError, DataError, DialogError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(prompts)} answers to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
