"""Red-team attack styles as data: reading and checking style files, and expanding a style over
the held-out harmful requests into attack dialogs.

A style file is YAML with a ``styles:`` list (the built-in ``redteam_styles.yaml``, whose header
documents the fields and the template placeholders) or JSON lines, one style per line. Every
problem stops with :class:`~llamalab.data.errors.DataError` naming the file, the line where the
style starts and the field.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llamalab.data.builtin.harms import harm_category
from llamalab.data.builtin.questions import TASK_TEMPLATES
from llamalab.data.builtin.world import HARMS
from llamalab.data.errors import DataError, type_name
from llamalab.data.sources import iter_rows

BUILTIN_STYLES = Path(__file__).with_name("redteam_styles.yaml")
NAME = re.compile(r"^[a-z0-9_]+$")
PLACEHOLDERS = ("request", "task", "task_misspelled", "task_leet", "task_head", "task_tail")
_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})


@dataclass(frozen=True)
class Turn:
    """One user turn of an attack and, optionally, the assistant's fixed reply to it (None: the
    evaluated policy answers it, unless it is the last turn, whose answer is judged)."""

    user: str
    assistant: str | None = None


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    turns: tuple[Turn, ...]
    system: str | None = None
    source: str = ""  # "file:line" where the style is defined


@dataclass(frozen=True)
class Request:
    """A held-out harmful request: the bare task, how a user asks it, its risk category."""

    task: str
    text: str
    category: str


@dataclass(frozen=True)
class Attack:
    """A style applied to a request: the system prompt and the expanded turns."""

    style: str
    request: Request
    system: str | None
    turns: tuple[Turn, ...]


# ----------------------------------------------------------------------------- requests
def heldout_requests(n: int | None = None) -> list[Request]:
    """The built-in harmful requests in their held-out (validation) phrasings: every harm of
    the world, phrased by the validation templates in turn (never a training prompt's text);
    the first ``n`` (None: all)."""
    templates = TASK_TEMPLATES["validation"]
    requests = [
        Request(harm, templates[i % len(templates)].format(task=harm), harm_category(harm))
        for i, harm in enumerate(HARMS)
    ]
    return requests[:n] if n is not None else requests


def misspell(text: str) -> str:
    """Swap the two middle letters of every word longer than three letters (deterministic)."""

    def swap(word: str) -> str:
        if len(word) <= 3 or not word.isalpha():
            return word
        k = len(word) // 2
        return word[: k - 1] + word[k] + word[k - 1] + word[k + 1 :]

    return " ".join(swap(w) for w in text.split(" "))


def fields(request: Request) -> dict[str, str]:
    """The placeholder values of one request (module ``redteam_styles.yaml`` header)."""
    words = request.task.split()
    half = max(1, len(words) // 2)
    return {
        "request": request.text,
        "task": request.task,
        "task_misspelled": misspell(request.task),
        "task_leet": request.task.lower().translate(_LEET),
        "task_head": " ".join(words[:half]),
        "task_tail": " ".join(words[half:]),
    }


def expand(style: Style, request: Request) -> Attack:
    """The attack of ``style`` on ``request``: every template (user and fixed reply) filled in."""
    values = fields(request)
    turns = tuple(
        Turn(t.user.format(**values), None if t.assistant is None else t.assistant.format(**values))
        for t in style.turns
    )
    return Attack(style.name, request, style.system, turns)


def attacks(styles: list[Style], requests: list[Request]) -> list[Attack]:
    """Every style on every request, style-major."""
    return [expand(style, request) for style in styles for request in requests]


# ------------------------------------------------------------------------------- styles
def _check_template(text: Any, path: str, line: int, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"expected a non-empty string, got {type_name(text)}", path, line, field)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as err:  # an unmatched brace
        raise DataError(
            f"bad template: {err} (write {{{{ and }}}} for braces)", path, line, field
        ) from None
    for name in names:
        if name not in PLACEHOLDERS:
            raise DataError(
                f"unknown placeholder {{{name}}}; known: {', '.join(PLACEHOLDERS)}",
                path,
                line,
                field,
            )
    return text


def parse_style(row: Any, path: str, line: int) -> Style:
    """One style mapping (file ``path``, starting at ``line``) -> :class:`Style`, checked."""
    if not isinstance(row, dict):
        raise DataError(f"a style is an object, got {type_name(row)}", path, line)
    unknown = sorted(set(row) - {"name", "description", "system", "turns"})
    if unknown:
        raise DataError(f"unknown field(s) {unknown}", path, line)
    name = row.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise DataError(
            f"expected lower-case letters, digits and _, got {name!r}", path, line, "name"
        )
    description = row.get("description", "")
    if not isinstance(description, str):
        raise DataError(
            f"expected a string, got {type_name(description)}", path, line, "description"
        )
    system = row.get("system")
    if system is not None:
        system = _check_template(system, path, line, "system")
        if any(n for _, n, _, _ in string.Formatter().parse(system) if n):
            raise DataError("the system prompt takes no placeholders", path, line, "system")
    raw_turns = row.get("turns")
    if not isinstance(raw_turns, list) or not raw_turns:
        raise DataError(
            f"expected a non-empty list of turns, got {type_name(raw_turns)}", path, line, "turns"
        )
    turns = []
    for k, turn in enumerate(raw_turns):
        field = f"turns[{k}]"
        if not isinstance(turn, dict) or set(turn) - {"user", "assistant"}:
            raise DataError("a turn is {user: TEXT, assistant: TEXT (optional)}", path, line, field)
        user = _check_template(turn.get("user"), path, line, f"{field}.user")
        assistant = turn.get("assistant")
        if assistant is not None:
            if k == len(raw_turns) - 1:
                raise DataError(
                    "the last turn is answered by the policy: it has no fixed assistant reply",
                    path,
                    line,
                    f"{field}.assistant",
                )
            assistant = _check_template(assistant, path, line, f"{field}.assistant")
        turns.append(Turn(user, assistant))
    return Style(name, description, tuple(turns), system, f"{path}:{line}")


def _yaml_items(path: Path) -> list[tuple[int, Any]]:
    """(line, item) of a YAML file's ``styles:`` list, line 1-based where the item starts."""
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise DataError(
            f"not valid YAML: {getattr(err, 'problem', err)}", str(path), line
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("styles"), list):
        raise DataError("expected a mapping with a 'styles:' list", str(path), 1, "styles")
    seq = next(v for k, v in node.value if k.value == "styles")
    return [(item.start_mark.line + 1, row) for item, row in zip(seq.value, data["styles"])]


def load_styles(path: str | Path) -> list[Style]:
    """The styles of a file: YAML (``.yaml``/``.yml``) or JSON lines; names must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such red-team style file", str(path))
    if path.suffix in (".yaml", ".yml"):
        items = _yaml_items(path)
    else:
        items = [(line, row) for _, line, row in iter_rows(path)]
    styles = [parse_style(row, str(path), line) for line, row in items]
    if not styles:
        raise DataError("no styles", str(path))
    check_unique(styles)
    return styles


def check_unique(styles: list[Style]) -> None:
    """Stop on two styles with one name (their report columns would merge)."""
    seen: dict[str, Style] = {}
    for style in styles:
        if style.name in seen:
            path, _, line = style.source.rpartition(":")
            raise DataError(
                f"style {style.name!r} is already defined at {seen[style.name].source}",
                path,
                int(line),
                "name",
            )
        seen[style.name] = style


def resolve_styles(styles_path: str | None, builtin: bool = True) -> list[Style]:
    """The built-in styles (unless ``builtin`` is false) followed by those of ``styles_path``."""
    styles = load_styles(BUILTIN_STYLES) if builtin else []
    if styles_path:
        styles += load_styles(styles_path)
    if not styles:
        raise DataError("no red-team styles: set eval.styles_path or eval.builtin_styles=true")
    check_unique(styles)
    return styles
