"""What the red-team and win-rate suites share: finding and checking models (language model or
reward model, before any compute), answering attack dialogs turn by turn, and scoring answers
with a reward model (the reward stage's own ``score_token_rows``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from llamalab.chat import ChatError, find_tokenizer
from llamalab.checkpoint import CheckpointError, load_model
from llamalab.checkpoint.hf import head_from_config
from llamalab.generation import answer_prompts
from llamalab.model import Llama, LlamaScalar
from llamalab.stages.reward import score_token_rows
from llamalab.tokenizer import Message, Tokenizer

HEADS = {"lm": "a language model (causal LM head)", "scalar": "a reward model (scalar head)"}
TURN_SEED_STRIDE = 1_000_003  # as generation.answer_turns: turn t is seeded seed + t * stride


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_head(path: str | Path, option: str) -> str:
    """``"lm"`` or ``"scalar"``: the head of the checkpoint ``option=path`` names. Read from the
    Hugging Face ``config.json`` when there is one (no weights read), else by loading it; a
    missing path or a non-checkpoint is a :class:`CheckpointError` naming the option."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{option}={root}: no such file or directory")
    for folder in (root, root / "export"):
        config = folder / "config.json"
        if root.is_dir() and config.is_file():
            return head_from_config(json.loads(config.read_text()), folder)
    try:
        model = load_model(root)
    except CheckpointError as err:
        raise CheckpointError(f"{option}={root}: {err}") from None
    return "scalar" if isinstance(model, LlamaScalar) else "lm"


def check_head(path: str | Path, option: str, want: str) -> None:
    """Stop unless ``option=path`` is a checkpoint with the ``want`` head (:data:`HEADS`)."""
    head = model_head(path, option)
    if head != want:
        raise CheckpointError(f"{option}={path} is {HEADS[head]}, not {HEADS[want]}")


def _tokenizer(path: Path, option: str, vocab_size: int) -> Tokenizer:
    try:
        tokenizer = Tokenizer(str(find_tokenizer(path)))
    except ChatError:
        raise CheckpointError(f"{option}={path}: no tokenizer.model next to the model") from None
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(
            f"{option}={path}: tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} "
            f"pieces but the model has {vocab_size}"
        )
    return tokenizer


def load_lm(path: str | Path, option: str) -> tuple[Llama, Tokenizer]:
    """A language model and its tokenizer, in eval mode on :func:`device`."""
    check_head(path, option, "lm")
    model = load_model(path, device=device())
    assert isinstance(model, Llama)
    return model.eval(), _tokenizer(Path(path), option, model.config.vocab_size)


def load_reward_model(path: str | Path, option: str) -> tuple[LlamaScalar, Tokenizer]:
    """A reward model and its tokenizer, in eval mode on :func:`device`."""
    check_head(path, option, "scalar")
    model = load_model(path, device=device())
    assert isinstance(model, LlamaScalar)
    return model.eval(), _tokenizer(Path(path), option, model.config.vocab_size)


@torch.no_grad()
def reward_scores(
    model: LlamaScalar,
    tokenizer: Tokenizer,
    dialogs: Sequence[Sequence[Message]],
    batch_size: int = 16,
) -> torch.Tensor:
    """Raw rewards ``(N,)`` of complete dialogs (ending with the assistant answer to score),
    encoded as the reward stage trains on them (Meta's chat format, closed by EOS). A dialog
    longer than the model's context keeps its last ``max_seq_len`` tokens (the answer and the
    EOS the reward is read at)."""
    limit = model.config.max_seq_len
    rows = [tokenizer.encode_dialog(list(d))[-limit:] for d in dialogs]
    return score_token_rows(model, rows, tokenizer.pad_id, batch_size)


def answer_dialogs(
    model: Llama,
    tokenizer: Tokenizer,
    dialogs: Sequence[tuple[str | None, Sequence[tuple[str, str | None]]]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    seed: int,
    batch_size: int,
) -> list[list[Message]]:
    """Play attack dialogs to the end, turn by turn, batched across dialogs.

    ``dialogs[i]`` is ``(system or None, [(user text, fixed assistant reply or None), ...])``.
    At turn ``t`` every dialog with more than ``t`` turns gets its user message; a fixed reply is
    appended as is, otherwise the policy answers (given the dialog so far, its own earlier
    answers included; turn ``t`` seeded ``seed + t * TURN_SEED_STRIDE``). Returns each dialog's
    messages; the last is the policy's answer to the last turn.
    """
    messages: list[list[Message]] = [
        [{"role": "system", "content": system}] if system else [] for system, _ in dialogs
    ]
    longest = max((len(turns) for _, turns in dialogs), default=0)
    for t in range(longest):
        pending = []
        for i, (_, turns) in enumerate(dialogs):
            if len(turns) <= t:
                continue
            user, fixed = turns[t]
            messages[i].append({"role": "user", "content": user})
            if fixed is not None:
                messages[i].append({"role": "assistant", "content": fixed})
            else:
                pending.append(i)
        answers = answer_prompts(
            model,
            tokenizer,
            [messages[i] for i in pending],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + t * TURN_SEED_STRIDE,
            batch_size=batch_size,
        )
        for i, answer in zip(pending, answers, strict=True):
            messages[i].append({"role": "assistant", "content": answer.response})
    return messages
