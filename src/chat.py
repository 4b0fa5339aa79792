"""Chat with a trained model: `python src/chat.py [--model PATH] [--system TEXT] ...`.

On a terminal: an interactive chat in Meta's format, answers streamed token by token
(`/reset` starts a new dialog, `/exit` or Ctrl-D quits). With input piped in
(`echo "What does json.dumps do?" | python src/chat.py`): each line is a user turn of one
dialog, each answer is printed on its own line, and the exit code is 0.

`--model` takes any checkpoint `llamalab.checkpoint.load_model` reads (an export, a run
directory, a Lightning `.ckpt`, a Meta or Hugging Face directory); the default is
outputs/sft/latest, else outputs/pretrain/latest.
"""

from __future__ import annotations

import argparse
import sys

from llamalab.chat import ChatError, ChatSession, Sampling, load_chat_model, run_chat, tty_lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint, export or run directory (default: latest SFT run)")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one next to the model)")
    p.add_argument("--system", help="system prompt for the whole dialog")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default: 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    from llamalab.checkpoint import CheckpointError
    from llamalab.tokenizer import DialogError

    args = parse_args(argv)
    try:
        model, tokenizer = load_chat_model(args.model, args.tokenizer, args.device)
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
        session = ChatSession(model, tokenizer, args.system, sampling)
        interactive = sys.stdin.isatty()
        if interactive:
            print("Chat started: /reset for a new dialog, /exit or Ctrl-D to quit.")
        lines = tty_lines() if interactive else sys.stdin
        return run_chat(session, lines, sys.stdout, interactive)
    except (ChatError, CheckpointError, DialogError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
