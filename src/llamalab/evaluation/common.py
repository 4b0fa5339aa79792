"""What every evaluation suite needs: the models it judges and the answers it scores.

- :func:`resolve_ckpt`: the model path of ``ckpt=`` (default: the newest chat model's ``latest``).
- :func:`load_policy` / :func:`load_reward_model`: a language model or a reward model with its
  tokenizer, or one :class:`EvalError` saying what the path holds instead.
- :func:`answer_dialogs`: dialogs (message lists ending with a user turn) -> answer texts, in
  batches on the KV-cache ``generate``, with a progress bar.
- :func:`score_answers`: reward-model scores of ``dialog + [answer]``, encoded as the reward
  stage trains on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llamalab import chat, pipeline
from llamalab.checkpoint import CheckpointError, load_model
from llamalab.model import Llama, LlamaScalar
from llamalab.stages.reward import score_token_rows
from llamalab.tokenizer import Message, Tokenizer

# Runs that hold chat models, newest stage of the recipe first: `ckpt=` defaults to the first
# that exists (`<outputs_root>/<run>/latest`, linked when a run finishes).
CHAT_RUNS = ("ppo", "dpo", "rejection_sampling", "sft")


class EvalError(ValueError):
    """An evaluation input that cannot be used (a path, a task name, a judge): the message says
    which and what to pass instead."""


def resolve_ckpt(ckpt: str | Path | None, outputs_root: str | Path | None = None) -> Path:
    """``ckpt`` as a path that exists, or the newest chat model's ``latest`` when None."""
    if ckpt is not None:
        path = Path(ckpt)
        if not path.exists():
            raise EvalError(f"ckpt={ckpt}: no such file or directory")
        return path
    tried = [Path(pipeline.latest(run, outputs_root)) for run in CHAT_RUNS]
    for path in tried:
        if path.exists():
            return path
    raise EvalError(
        f"no chat model found ({', '.join(map(str, tried))} do not exist): pass ckpt=PATH "
        "(a run directory, Hugging Face or Meta directory, or .ckpt)"
    )


def device_of(name: str | None) -> torch.device:
    """``None`` / ``auto``: cuda when available, else cpu."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(path: Path, what: str, device: torch.device) -> Llama | LlamaScalar:
    try:
        return load_model(path, device=device)
    except (CheckpointError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        raise EvalError(f"{what}={path} is not a model: {err}") from None


def _tokenizer(path: Path, model: Llama | LlamaScalar, what: str) -> Tokenizer:
    try:
        tokenizer = Tokenizer(chat.find_tokenizer(path))
    except chat.ChatError as err:
        raise EvalError(f"{what}={path}: {err}") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise EvalError(
            f"{what}={path}: tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces "
            f"but the model has {model.config.vocab_size}"
        )
    return tokenizer


def load_policy(
    path: str | Path, device: torch.device | str = "cpu", what: str = "ckpt"
) -> tuple[Llama, Tokenizer]:
    """A language model (eval mode) and its tokenizer; ``what`` names the option in errors."""
    path = Path(path)
    model = _load(path, what, torch.device(device))
    if not isinstance(model, Llama):
        raise EvalError(
            f"{what}={path} is a reward model (scalar head), not a language model: pass a "
            "policy (pretrain, SFT, rejection sampling, PPO or DPO export)"
        )
    return model.eval(), _tokenizer(path, model, what)


def load_reward_model(
    path: str | Path, device: torch.device | str = "cpu", what: str = "judge"
) -> tuple[LlamaScalar, Tokenizer]:
    """A reward model (scalar head, eval mode) and its tokenizer."""
    path = Path(path)
    model = _load(path, what, torch.device(device))
    if not isinstance(model, LlamaScalar):
        raise EvalError(
            f"{what}={path} is a language model, not a reward model: a judge must have a scalar "
            "head (`python src/train.py stage=reward` exports one)"
        )
    return model.eval(), _tokenizer(path, model, what)


def answer_dialogs(
    model: Llama,
    tokenizer: Tokenizer,
    dialogs: Sequence[list[Message]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "answering",
) -> list[str]:
    """One answer per dialog (Meta's chat format, greedy by default), in order."""
    sampling = chat.Sampling(temperature, 0.9, max_new_tokens, seed)
    answers = chat.answer_prompts(model, tokenizer, list(dialogs), sampling, batch_size)
    return [a["response"] for a in tqdm(answers, total=len(dialogs), desc=desc, leave=False)]


@torch.no_grad()
def score_answers(
    reward_model: LlamaScalar,
    tokenizer: Tokenizer,
    dialogs: Sequence[list[Message]],
    answers: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Raw reward of each ``dialog + [assistant answer]`` (closed by EOS, as in training); a
    sequence longer than the model's context keeps its last ``max_seq_len`` tokens."""
    max_len = reward_model.config.max_seq_len
    rows = [
        tokenizer.encode_dialog([*dialog, {"role": "assistant", "content": answer.strip() or "…"}])[
            -max_len:
        ]
        for dialog, answer in zip(dialogs, answers, strict=True)
    ]
    return score_token_rows(reward_model, rows, tokenizer.pad_id, batch_size).tolist()
