"""Talking to a trained model: find and load it with its tokenizer, keep a dialog in Meta's chat
format, stream each answer token by token with the KV cache, and answer prompt files in batches.

Used by `src/chat.py` (interactive or piped chat) and `src/generate.py` (prompts file -> JSONL).
Sampling defaults are Meta's chat defaults (PAPER.md "Chat format": temperature 0.6, top-p 0.9).
The context is the model's `max_seq_len`: older turns are dropped from the prompt when a dialog
outgrows it, as a chat front-end must (Meta's `chat_completion` caps the total length the same way).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from llamalab import generation, pipeline
from llamalab.checkpoint import load_model
from llamalab.data.errors import DataError
from llamalab.data.formats import load_prompt_records
from llamalab.data.sources import FILE_SUFFIXES
from llamalab.model import Llama
from llamalab.model.kv_cache import KVCache
from llamalab.tokenizer import DialogError, Message, Tokenizer

DEFAULT_RUNS = pipeline.CHAT_DEFAULT_RUNS  # what `chat.py` loads without --model, in this order


class ChatError(ValueError):
    """A model or tokenizer the chat cannot use (the message says what to pass instead)."""


@dataclass
class Sampling:
    """How answers are sampled; `temperature == 0` is greedy."""

    temperature: float = 0.6
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None


# ------------------------------------------------------------------------------ loading
def default_model_path(outputs_root: str | Path | None = None) -> Path:
    """`outputs/sft/latest`, else `outputs/pretrain/latest` (`$LLAMALAB_OUTPUTS` replaces
    `outputs`, like `paths.outputs_root`)."""
    tried = [Path(pipeline.latest(run, outputs_root)) for run in DEFAULT_RUNS]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"no model found ({' and '.join(map(str, tried))} do not exist): train one with "
        "`python src/train.py stage=sft`, or pass --model PATH"
    )


def find_tokenizer(model_path: str | Path) -> Path:
    """The `tokenizer.model` that belongs to a checkpoint: in an export / HF / Meta directory,
    a run's `export/`, Meta's parent directory, or the run of a Lightning `.ckpt`."""
    path = Path(model_path)
    folder = path if path.is_dir() else path.parent
    candidates = [
        folder / "tokenizer.model",
        folder / "export" / "tokenizer.model",
        folder.parent / "tokenizer.model",  # Meta: llama-2-7b/../tokenizer.model
        folder.parent / "export" / "tokenizer.model",  # <run>/checkpoints/last.ckpt
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ChatError(f"no tokenizer.model found with {path}: pass --tokenizer PATH")


def load_chat_model(
    model_path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Llama, Tokenizer]:
    """Any checkpoint `llamalab.checkpoint.load_model` reads (None = `default_model_path()`),
    in eval mode, with its tokenizer (found next to it unless given)."""
    path = Path(model_path) if model_path is not None else default_model_path()
    model = load_model(path, device=device)
    if not isinstance(model, Llama):
        raise ChatError(
            f"{path} holds a {type(model).__name__} (a reward model?), not a language model"
        )
    tokenizer = Tokenizer(tokenizer_path or find_tokenizer(path))
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ChatError(
            f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but the model "
            f"has {model.config.vocab_size}: pass the model's own tokenizer with --tokenizer"
        )
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------ streaming
@torch.no_grad()
def stream_tokens(
    model: Llama,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.6,
    top_p: float | None = 0.9,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt, stopping after EOS.

    Prefill the KV cache with the prompt, then feed back one token per step: the same tokens as
    `llamalab.generation.generate` for a batch of one (greedy parity is tested).
    """
    if not prompt_ids or max_new_tokens < 1:
        raise ValueError("stream_tokens needs a non-empty prompt and max_new_tokens >= 1")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(model.config, 1, len(prompt_ids) + max_new_tokens, device, dtype)
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, P)
    for step in range(max_new_tokens):
        logits = model(tokens, kv_cache=cache)[:, -1]  # (1, vocab)
        tokens = generation.sample_next(logits, temperature, top_p, None, generator)[
            :, None
        ]  # (1, 1)
        token = int(tokens.item())
        yield token
        if token == eos_id or step == max_new_tokens - 1:
            return


class IncrementalDecoder:
    """Token ids in, new text out: decodes the whole answer so far and returns what was not
    shown yet (SentencePiece joins pieces with spaces and bytes into characters, so a piece
    alone does not decode right). An incomplete UTF-8 byte sequence and trailing whitespace
    (the chat format ends every answer with a space before EOS) are held back until more text
    follows. `text` is everything decoded so far."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self.shown = ""

    def push(self, token: int) -> str:
        if token == self.tokenizer.eos_id:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        visible = text.rstrip()
        if not visible.startswith(self.shown):
            return ""
        new, self.shown = visible[len(self.shown) :], visible
        return new


# ------------------------------------------------------------------------------ dialogs
def fit_dialog(tokenizer: Tokenizer, messages: list[Message], budget: int) -> list[int]:
    """`encode_dialog(messages)` within `budget` tokens: drop the oldest (user, answer) pairs
    (a system message stays), then, if one turn alone is too long, keep its last tokens."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    ids = tokenizer.encode_dialog(system + turns)
    while len(ids) > budget and len(turns) > 2:
        turns = turns[2:]
        ids = tokenizer.encode_dialog(system + turns)
    return ids[-budget:]


class ChatSession:
    """One conversation with a model: history in Meta's format, answers streamed.

    Args:
        model, tokenizer: from `load_chat_model`.
        system: optional system prompt (Meta merges it into the first user turn).
        sampling: temperature / top-p / answer length / seed.
    """

    def __init__(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        system: str | None = None,
        sampling: Sampling | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system, self.sampling = system, sampling or Sampling()
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        if self.sampling.seed is not None:
            self.generator.manual_seed(self.sampling.seed)
        self.messages: list[Message] = []
        self.reset()

    def reset(self) -> None:
        """Forget the dialog (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self, user_text: str) -> tuple[list[int], int]:
        """Token ids of the dialog plus `user_text`, and how many new tokens fit after them."""
        context = self.model.config.max_seq_len
        new = min(self.sampling.max_new_tokens, max(1, context // 2))
        messages = [*self.messages, {"role": "user", "content": user_text}]
        ids = fit_dialog(self.tokenizer, messages, context - new)
        return ids, min(self.sampling.max_new_tokens, context - len(ids))

    def reply(self, user_text: str, on_text: Callable[[str], Any] | None = None) -> str:
        """Answer `user_text`, calling `on_text` with each new piece of text; the turn joins
        the history only once the answer is complete. `DialogError` for a message Meta's
        format refuses (e.g. one containing `[INST]`)."""
        ids, max_new = self.prompt_ids(user_text)
        decoder = IncrementalDecoder(self.tokenizer)
        s = self.sampling
        for token in stream_tokens(
            self.model, ids, max_new, s.temperature, s.top_p, self.tokenizer.eos_id, self.generator
        ):
            piece = decoder.push(token)
            if piece and on_text is not None:
                on_text(piece)
        answer = decoder.text.strip() or "…"  # an empty answer would break the dialog format
        self.messages += [
            {"role": "user", "content": user_text},
            {"role": "assistant", "content": answer},
        ]
        return answer


def run_chat(session: ChatSession, lines: Iterable[str], out: TextIO, interactive: bool) -> int:
    """The chat loop: each line is a user turn of one dialog; answers stream to `out`.

    Interactive: `/reset` starts over, `/exit` (or end of input) quits, Ctrl-C stops the answer
    being written. Piped: every non-empty line is a turn, each answer ends with a newline.
    Returns the exit code: 1 if a turn was refused (the reason goes to stderr), else 0.
    """
    status = 0

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if interactive and line in ("/exit", "/quit"):
            break
        if interactive and line == "/reset":
            session.reset()
            write("(dialog cleared)\n")
            continue
        try:
            session.reply(line, on_text=write)
        except DialogError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
        except KeyboardInterrupt:
            if not interactive:
                raise
            write(" [stopped]")
        write("\n")
    return status


def tty_lines(prompt: str = "> ") -> Iterator[str]:
    """Lines typed at a terminal (with `input`'s line editing) until end of input."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


# ------------------------------------------------------------------------------ prompt files
def read_prompts(path: str | Path, system: str | None = None) -> list[tuple[Any, list[Message]]]:
    """Prompts of a file as `(prompt as given, messages ending with user)`.

    `.jsonl` / `.json` / `.parquet`: records with `prompt` (text or messages), `messages` or
    Alpaca `instruction` (`llamalab.data.formats`; a bad line stops with its file and line).
    Any other file: one prompt per non-empty line. `system` is added where none is given.
    """
    source = Path(path)
    if source.suffix in FILE_SUFFIXES or source.is_dir():
        messages_list = [record["prompt"] for record in load_prompt_records(source)]
    else:
        if not source.is_file():
            raise DataError("no such file", path=str(source))
        text = source.read_text(encoding="utf-8")
        messages_list = [
            [{"role": "user", "content": ln}] for ln in text.splitlines() if ln.strip()
        ]
    prompts = []
    for messages in messages_list:
        shown: Any = messages[0]["content"] if len(messages) == 1 else messages
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        prompts.append((shown, messages))
    return prompts


def answer_prompts(
    model: Llama,
    tokenizer: Tokenizer,
    prompts: Sequence[list[Message]],
    sampling: Sampling,
    batch_size: int = 8,
    raw: bool = False,
    compile: bool = False,
) -> Iterator[dict[str, Any]]:
    """Generate an answer per prompt in batches (:func:`llamalab.generation.answer_prompts`);
    yields `{"response", "tokens" (new ids, EOS included), "finished" (ended with EOS)}` in
    order. The batch starting at prompt `i` samples with seed `sampling.seed + i`.
    `raw`: the prompt text is encoded as plain text with BOS (a pretrained, not chat, model).
    `compile`: decode with the compiled static-shape step (`llamalab.generation.compiled`)."""
    context = model.config.max_seq_len
    budget = max(1, context - min(sampling.max_new_tokens, context // 2))
    answers = generation.answer_prompts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        batch_size=batch_size,
        seed_stride=batch_size,
        encode=lambda messages: encode_prompt(tokenizer, messages, budget, raw),
        compile=compile,
    )
    for answer in answers:
        yield {"response": answer.response, "tokens": answer.tokens, "finished": answer.finished}


def encode_prompt(
    tokenizer: Tokenizer, messages: list[Message], budget: int, raw: bool
) -> list[int]:
    """Chat prompt ids (Meta's format, oldest turns dropped to fit `budget`), or with `raw` the
    single user text as plain text with BOS."""
    if not raw:
        return fit_dialog(tokenizer, messages, budget)
    if len(messages) != 1:
        raise ChatError("--raw takes plain-text prompts only (no system or earlier turns)")
    return tokenizer.encode(messages[0]["content"], bos=True)[-budget:]
