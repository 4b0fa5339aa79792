"""Record schemas: check every record of users' SFT, preference and prompt data, normalise it.

Rows come from :mod:`llamalab.data.sources` (files, Parquet, `datasets`, `hf:`); this module
checks their fields and turns every supported format into one normalised record. Every problem is
a `DataError` naming the file, the 1-based line (row for Parquet / `datasets`) and the field,
raised before any model is built.

Normalised records (what every later stage sees, whatever the user's format):
- SFT: `{"messages": [{"role", "content"}, ...]}`: optional system first, then user/assistant
  alternating, ending with assistant. A `messages` record that also has `instruction` is a GAtt
  dialog (PAPER.md §3.3) and keeps `instruction`. Accepted: `messages`, `prompt` + `response`
  (or `completion`), Alpaca `instruction` (+ `input`) + `output`.
- preference: `{"prompt": [messages ending with user], "chosen": str, "rejected": str,
  "rating": one of RATINGS | None, "is_safety": bool}`; accepted with an explicit prompt, as
  message lists, or as Anthropic HH transcripts.
- prompt (PPO, rejection sampling): `{"prompt": [messages ending with user], "is_safety": bool}`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from llamalab.data.errors import DataError, type_name
from llamalab.data.labels import RATINGS, parse_rating
from llamalab.data.sources import Row, iter_rows
from llamalab.tokenizer import ROLES, SPECIAL_TAGS, Message

log = logging.getLogger(__name__)

Record = dict[str, Any]

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ------------------------------------------------------------------------------ field checks


def _text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    """A non-empty string without Meta's chat tags."""
    if value is None:
        raise DataError("missing", field=field)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", field=field)
    if not allow_empty and not value.strip():
        raise DataError("empty", field=field)
    for tag in SPECIAL_TAGS:
        if tag in value:
            raise DataError(f"contains the reserved chat tag {tag!r}", field=field)
    return value


def _messages(value: Any, field: str, *, last: str) -> list[Message]:
    """A role/content list in chat order whose last message has role `last`."""
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of {{role, content}} messages, got {type_name(value)}", field=field
        )
    if not value:
        raise DataError("empty message list", field=field)
    messages = [_message(item, f"{field}[{i}]") for i, item in enumerate(value)]
    check_order(messages, field, last=last)
    return messages


def _message(item: Any, field: str) -> Message:
    if not isinstance(item, dict):
        raise DataError(f"expected a {{role, content}} object, got {type_name(item)}", field=field)
    role = item.get("role")
    if role is None:
        raise DataError("missing", field=f"{field}.role")
    if role not in ROLES:
        raise DataError(f"expected one of {ROLES}, got {role!r}", field=f"{field}.role")
    return {"role": role, "content": _text(item.get("content"), f"{field}.content")}


def check_order(messages: list[Message], field: str, *, last: str) -> None:
    """Optional system message first, then user/assistant alternating from user, ending with
    `last` ("assistant" for training dialogs, "user" for prompts). Raises `DataError`."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise DataError("no user message after the system message", field=field)
    for i in range(start, len(messages)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if messages[i]["role"] != expected:
            raise DataError(
                f"expected role '{expected}' (after an optional system message, turns alternate "
                f"user/assistant), got '{messages[i]['role']}'",
                field=f"{field}[{i}].role",
            )
    if messages[-1]["role"] != last:
        raise DataError(f"must end with a '{last}' message", field=field)


def _flag(row: Row) -> bool:
    """`is_safety` (or `safety`): a boolean, 0/1 accepted; absent means False."""
    for key in ("is_safety", "safety"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise DataError(f"expected true/false, got {value!r}", field=key)
    return False


def _rating(value: Any) -> str | None:
    """A RATINGS name, or None when absent (PAPER.md §3.2.2; "unsure" = negligibly better)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"expected a rating such as 'better', got {type_name(value)}", field="rating"
        )
    try:
        index = parse_rating(value)
    except ValueError as err:
        raise DataError(str(err), field="rating") from None
    return None if index < 0 else RATINGS[index]


# ------------------------------------------------------------------ Anthropic HH transcripts


def _is_hh_prompt(text: str) -> bool:
    return text.lstrip().startswith("Human:") and text.rstrip().endswith("Assistant:")


def _hh_turns(text: str, field: str) -> list[Message]:
    """Messages of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns, in chat order, ending with user."""
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        raise DataError("text before the first 'Human:' turn", field=field)
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        turn = f"{field} turn {len(messages) + 1}"
        messages.append({"role": _HH_ROLES[speaker], "content": _text(content.strip(), turn)})
    if not messages:
        raise DataError("no 'Human:' turn", field=field)
    check_order(messages, field, last="user")
    return messages


def _split_hh(text: Any, field: str) -> tuple[list[Message], str]:
    """Split a full HH transcript at its last "\\n\\nAssistant:": (prompt messages, answer)."""
    text = _text(text, field)
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        raise DataError("no '\\n\\nAssistant:' turn in the transcript", field=field)
    answer = _text(text[cut + len("\n\nAssistant:") :].strip(), field)
    return _hh_turns(text[:cut], field), answer


# ---------------------------------------------------------------------------- record kinds


def _prompt(value: Any, field: str, system: Any = None) -> list[Message]:
    """A prompt given as text, an HH transcript ending with "Assistant:", or messages ending
    with user; `system` (optional text) goes first when the prompt is text."""
    if isinstance(value, list):
        if system is not None:
            raise DataError("give the system message inside the message list", field="system")
        return _messages(value, field, last="user")
    text = _text(value, field)
    if _is_hh_prompt(text):
        messages = _hh_turns(text[: text.rstrip().rfind("\n\nAssistant:")], field)
    else:
        messages = [{"role": "user", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": _text(system, "system")})
    return messages


def normalize_sft(row: Row) -> Record:
    """One SFT record in any supported format -> `{"messages": [...]}` (see module docstring)."""
    if row.get("messages") is not None:
        record: Record = {"messages": _messages(row["messages"], "messages", last="assistant")}
        if row.get("instruction") is not None:  # GAtt dialog (PAPER.md §3.3)
            record["instruction"] = _text(row["instruction"], "instruction")
        return record
    if row.get("instruction") is not None:  # Alpaca: instruction, optional input, output
        user = _text(row["instruction"], "instruction")
        extra = row.get("input")
        if extra is not None and _text(extra, "input", allow_empty=True).strip():
            user = f"{user}\n\n{extra}"
        prompt = _prompt(user, "instruction", row.get("system"))
        return {"messages": [*prompt, _answer(row.get("output"), "output")]}
    if row.get("prompt") is not None:
        key = "response" if row.get("response") is not None else "completion"
        if row.get(key) is None:
            raise DataError(
                "missing: a 'prompt' record needs 'response' or 'completion'", field="response"
            )
        prompt = _prompt(row["prompt"], "prompt", row.get("system"))
        return {"messages": [*prompt, _answer(row[key], key)]}
    raise DataError(
        f"unrecognised SFT record with fields {sorted(row)}: expected 'messages', "
        "'prompt' + 'response' (or 'completion'), or Alpaca 'instruction' + 'output'"
    )


def _answer(value: Any, field: str) -> Message:
    return {"role": "assistant", "content": _text(value, field)}


def normalize_preference(row: Row) -> Record:
    """One preference pair (explicit prompt, message lists, or HH transcripts) -> the
    normalised preference record (module docstring)."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise DataError("missing", field=key)
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt", row.get("system"))
        chosen = _response(row["chosen"], prompt, "chosen")
        rejected = _response(row["rejected"], prompt, "rejected")
    elif isinstance(row["chosen"], list):
        full = _messages(row["chosen"], "chosen", last="assistant")
        prompt, chosen = full[:-1], full[-1]["content"]
        rejected = _response(row["rejected"], prompt, "rejected")
    else:
        prompt, chosen = _split_hh(row["chosen"], "chosen")
        rejected_prompt, rejected = _split_hh(row["rejected"], "rejected")
        if rejected_prompt != prompt:
            raise DataError(
                "conversation before the last answer differs from 'chosen'", field="rejected"
            )
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError("no user turn before the answer", field="prompt")
    if chosen.strip() == rejected.strip():
        raise DataError("identical to 'chosen': the pair carries no preference", field="rejected")
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "rating": _rating(row.get("rating")),
        "is_safety": _flag(row),
    }


def _response(value: Any, prompt: list[Message], field: str) -> str:
    """An answer as text, as one assistant message, or as the whole conversation (prompt +
    answer), whose part before the answer must equal `prompt`."""
    if not isinstance(value, list):
        return _text(value, field)
    if len(value) == 1 and isinstance(value[0], dict) and value[0].get("role") == "assistant":
        return _message(value[0], f"{field}[0]")["content"]
    full = _messages(value, field, last="assistant")
    if full[:-1] != prompt:
        raise DataError("conversation before the last answer differs from 'prompt'", field=field)
    return full[-1]["content"]


def normalize_prompt(row: Row) -> Record:
    """One PPO / rejection-sampling prompt -> `{"prompt": [... user], "is_safety": bool}`.

    Accepts `prompt` (text or messages), `messages` (a trailing assistant answer is dropped, so
    SFT files double as prompt sets) or Alpaca `instruction` (+ `input`)."""
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"], "prompt", row.get("system"))
    elif row.get("messages") is not None:
        value = row["messages"]
        last = value[-1] if isinstance(value, list) and value else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            value = value[:-1]
        prompt = _messages(value, "messages", last="user")
    elif row.get("instruction") is not None:
        prompt = normalize_sft({**row, "output": "-"})["messages"][:-1]
    else:
        raise DataError(f"unrecognised prompt record with fields {sorted(row)}: expected 'prompt'")
    return {"prompt": prompt, "is_safety": _flag(row)}


# --------------------------------------------------------------------------------- loaders


def read_records(
    source: str | Path,
    normalize: Callable[[Row], Record],
    errors: Literal["raise", "skip"] = "raise",
) -> Iterator[Record]:
    """Normalised records of a source. `errors="skip"` drops invalid records (not unreadable
    files or malformed JSON) with one warning naming the first problem and the count."""
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    skipped: list[DataError] = []
    for path, line, row in iter_rows(source):
        try:
            yield normalize(row)
        except DataError as err:
            located = err.located(path, line)
            if errors == "raise":
                raise located from None
            skipped.append(located)
    if skipped:
        log.warning("skipped %d invalid records of %s; first: %s", len(skipped), source, skipped[0])


def _load(source: str | Path, normalize: Callable[[Row], Record], errors: Any) -> list[Record]:
    records = list(read_records(source, normalize, errors))
    if not records:
        raise DataError("no records", path=str(source))
    return records


def load_sft_records(
    source: str | Path, errors: Literal["raise", "skip"] = "raise"
) -> list[Record]:
    """All SFT records of a source, normalised; `DataError` on the first invalid one."""
    return _load(source, normalize_sft, errors)


def load_preference_records(
    source: str | Path, errors: Literal["raise", "skip"] = "raise"
) -> list[Record]:
    """All preference records of a source, normalised; `DataError` on the first invalid one."""
    return _load(source, normalize_preference, errors)


def load_prompt_records(
    source: str | Path, errors: Literal["raise", "skip"] = "raise"
) -> list[Record]:
    """All prompt records of a source, normalised; `DataError` on the first invalid one."""
    return _load(source, normalize_prompt, errors)
