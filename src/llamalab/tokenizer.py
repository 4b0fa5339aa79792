"""SentencePiece tokenizer: train one the way LLaMA's was trained, load one, and speak Meta's chat format.

The training settings are LLaMA 2's own (PAPER.md, "Architecture": read back from a model built the
same way): BPE, digits split, byte fallback, whitespace-only pieces, identity normalisation with a
dummy prefix and without collapsing whitespace. ``encode`` calls ``SentencePieceProcessor.encode``
exactly like Meta's ``llama/tokenizer.py``, so ``encode_dialog`` reproduces Meta's
``chat_completion`` token for token (PAPER.md, "Chat format").

This module imports only sentencepiece (no torch): DESIGN.md keeps the tokenizer a lower layer.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

# Meta's chat markers (llama/generation.py). B_SYS/E_SYS carry their newlines.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
# The four strings a message may not contain (Meta answers UNSAFE_ERROR, we raise DialogError).
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
ROLES = ("system", "user", "assistant")
# One chat message, {"role": one of ROLES, "content": text}; a dialog is a list of them.
Message = dict[str, str]

# LLaMA 2's trainer settings (PAPER.md "Architecture"). unk/bos/eos = 0/1/2 and no pad piece.
LLAMA_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "split_digits": True,
    "byte_fallback": True,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.99995,
    "max_sentencepiece_length": 16,
    "unk_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "pad_id": -1,
    "normalization_rule_name": "identity",
    "add_dummy_prefix": True,
    "remove_extra_whitespaces": False,
}


class DialogError(ValueError):
    """A dialog that Meta's chat format cannot encode (bad roles, order, keys or special tags)."""


def training_sentences(texts: Iterable[str], max_sentence_bytes: int) -> Iterator[str]:
    """Split documents into the "sentences" SentencePiece trains on: non-empty lines.

    SentencePiece's own file reader is line based, so LLaMA's tokenizer never saw a newline
    inside a sentence (it encodes "\\n" with the byte piece <0x0A>). Lines longer than
    ``max_sentence_bytes`` (SentencePiece would silently drop them) are cut into chunks of at
    most ``max_sentence_bytes // 4`` characters, which is at most that many UTF-8 bytes.
    """
    chunk_chars = max(1, max_sentence_bytes // 4)
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) <= max_sentence_bytes:
                yield line
            else:
                for i in range(0, len(line), chunk_chars):
                    yield line[i : i + chunk_chars]


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` then rename it into place (no torn file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Tokenizer:
    """A SentencePiece model plus Meta's chat format.

    ``pad_id`` is an explicit choice: LLaMA's model has no pad piece (``pad_id = -1``), so padding
    uses the unk id 0. With byte fallback, unk never comes out of ``encode``, and 0 differs from
    EOS (2), so a pad can never be mistaken for the end of an answer. ``decode`` skips it.
    """

    def __init__(self, model_path: str | os.PathLike[str]) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {self.model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.unk_id: int = self._sp.unk_id()
        self.pad_id: int = self.unk_id  # see the class docstring
        if self.pad_id == self.eos_id or min(self.bos_id, self.eos_id) < 0:
            raise ValueError(
                f"{self.model_path}: a LLaMA-style model needs BOS, EOS and unk != EOS"
            )

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        model_path: str | os.PathLike[str],
        vocab_size: int,
        *,
        input_sentence_size: int = 2_000_000,
        max_sentence_length: int = 4192,
        seed: int = 0,
    ) -> Tokenizer:
        """Train a LLaMA-style BPE model on ``texts`` and write it atomically to ``model_path``.

        Args:
            texts: documents (any length; split into lines by :func:`training_sentences`).
            model_path: where the ``.model`` file goes (written to a temp name, then renamed).
            vocab_size: pieces, including the 3 specials and 256 byte pieces. A small corpus caps
                it (the built-in one accepts at most about 31,000).
            input_sentence_size: at most this many lines are sampled (with ``seed``) for training.
            max_sentence_length: longest line in bytes; longer lines are chunked, not dropped.
            seed: seeds SentencePiece's sampler. Training uses one thread: the BPE result depends
                on the thread count, and one thread makes it identical everywhere.
        """
        buffer = io.BytesIO()
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_sentences(texts, max_sentence_length),
                model_writer=buffer,
                vocab_size=vocab_size,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=max_sentence_length,
                num_threads=1,
                minloglevel=2,
                **LLAMA_TRAINER_SETTINGS,
            )
        except RuntimeError as err:  # e.g. "Vocabulary size too high (...). Please set it to <= N"
            raise ValueError(f"SentencePiece refused vocab_size={vocab_size}: {err}") from err
        _write_atomically(Path(model_path), buffer.getvalue())
        return cls(model_path)

    # ------------------------------------------------------------------ plain text
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text`` (``SentencePieceProcessor.encode``, as Meta's tokenizer calls it)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False
    ) -> list[list[int]]:
        """``encode`` over a list in one SentencePiece call (its C++ side batches the work)."""
        batch: list[list[int]] = self._sp.encode(list(texts))
        head = [self.bos_id] if bos else []
        tail = [self.eos_id] if eos else []
        return [head + ids + tail for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping pad (= unk, 0) and negative ids (-100 label padding)."""
        kept = [int(i) for i in ids if int(i) >= 0 and int(i) != self.pad_id]
        bad = [i for i in kept if i >= self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})"
            )
        return self._sp.decode(kept)

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id (``▁`` marks a space, ``<0x0A>`` a byte)."""
        return self._sp.id_to_piece(token_id)

    # ------------------------------------------------------------------ chat format
    def encode_dialog(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Meta's ``chat_completion`` encoding of a dialog (PAPER.md "Chat format").

        A dialog ending with a user turn is a generation prompt (Meta's only case): the last
        turn is ``f"{B_INST} {user.strip()} {E_INST}"`` with BOS only. A dialog ending with an
        assistant turn (a training example) closes its last pair with EOS like the others.
        """
        return self.encode_dialog_with_mask(messages)[0]

    def encode_dialog_with_mask(
        self, messages: Sequence[Mapping[str, str]]
    ) -> tuple[list[int], list[bool]]:
        """``encode_dialog`` ids and a mask that is True on each answer's tokens and its EOS.

        The answer of a pair is what the full pair encoding adds after the encoding of its
        prompt part ``f"{B_INST} {user} {E_INST}"``: the answer's pieces, the trailing space
        piece and EOS. SentencePiece splits on whitespace before merging, so no piece crosses
        the space after ``[/INST]`` and the prompt part is a prefix of the pair; were that ever
        not so, the longest common prefix is used, giving the boundary piece to the answer.
        SFT puts labels only where the mask is True (PAPER.md §3.1).
        """
        ids: list[int] = []
        mask: list[bool] = []
        for user, answer in dialog_pairs(messages):
            prompt = self.encode(f"{B_INST} {user.strip()} {E_INST}", bos=True)
            if answer is None:  # the final user turn: a generation prompt
                ids += prompt
                mask += [False] * len(prompt)
                continue
            pair = self.encode(
                f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True
            )
            n_prompt = _common_prefix_length(prompt, pair)
            ids += pair
            mask += [False] * n_prompt + [True] * (len(pair) - n_prompt)
        return ids, mask


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_message(index: int, message: object) -> tuple[str, str]:
    """Role and content of one message, or a DialogError naming what is wrong with it."""
    if not isinstance(message, Mapping):
        raise DialogError(f"message {index} is a {type(message).__name__}, not a mapping")
    for key in ("role", "content"):
        if key not in message:
            raise DialogError(f"message {index} has no {key!r} key (keys: {sorted(message)})")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise DialogError(f"message {index} has unknown role {role!r} (expected one of {ROLES})")
    if not isinstance(content, str):
        raise DialogError(f"message {index} content is a {type(content).__name__}, not a str")
    for tag in SPECIAL_TAGS:
        if tag in content:
            raise DialogError(f"message {index} ({role}) contains the special tag {tag!r}")
    return role, content


def dialog_pairs(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str | None]]:
    """Validate a dialog and group it into (user, answer) pairs, the last answer maybe None.

    A leading system message is merged into the first user content as
    ``B_SYS + system + E_SYS + user`` (Meta's order). After it, roles must alternate user,
    assistant, user, ... starting with user.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise DialogError(f"a dialog is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise DialogError("empty dialog: at least one user message is needed")
    checked = [_check_message(i, m) for i, m in enumerate(messages)]
    offset = 0
    if checked[0][0] == "system":
        if len(checked) == 1:
            raise DialogError("dialog has a system message but no user message")
        offset = 1
        if checked[1][0] == "user":
            checked[1] = ("user", B_SYS + checked[0][1] + E_SYS + checked[1][1])
    turns = checked[offset:]
    for j, (role, _) in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if role != expected:
            raise DialogError(
                f"message {j + offset} has role {role!r}, expected {expected!r}: roles must "
                "alternate user/assistant starting with user (after an optional system message)"
            )
    users = [content for _, content in turns[0::2]]
    answers: list[str | None] = [content for _, content in turns[1::2]]
    answers += [None] * (len(users) - len(answers))
    return list(zip(users, answers))
