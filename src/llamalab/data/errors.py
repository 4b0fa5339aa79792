"""The one exception a user's data can raise: where the problem is and what is wrong.

Data is checked before any model is built, so a bad line in a 100k-line file stops the run in
seconds with `path:line: field 'x': message` instead of a traceback an hour into training.
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Invalid or unreadable user data.

    Attributes `message`, `path`, `line` (1-based line of a JSON-lines file, or 1-based row of a
    Parquet file / `datasets` split) and `field` (e.g. `messages[2].content`) are kept so callers
    can build their own report; `str()` reads `path:line: field 'x': message`, parts omitted
    when None.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(self._render())

    def _render(self) -> str:
        location = ":".join(str(part) for part in (self.path, self.line) if part is not None)
        if self.path is None and self.line is not None:
            location = f"line {self.line}"
        field = f"field '{self.field}': " if self.field is not None else ""
        return f"{location}: {field}{self.message}" if location else f"{field}{self.message}"

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when pickled (DataLoader workers send exceptions to the main process).
        return (type(self), (self.message, self.path, self.line, self.field))

    def located(self, path: str | None = None, line: int | None = None) -> DataError:
        """A copy with `path`/`line` filled in where this error has none (used by readers that
        validate a record first and learn where it came from afterwards)."""
        return DataError(
            self.message,
            self.path if self.path is not None else path,
            self.line if self.line is not None else line,
            self.field,
        )


def type_name(value: Any) -> str:
    """How error messages name a value's JSON type ("a string", "null" ...)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names |= {int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
