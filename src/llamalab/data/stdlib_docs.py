"""The standard library's own documentation: the raw material of every built-in data set.

No data can be downloaded on the machines this project targets, yet a new user should see the
whole pipeline run. Every Python install carries about 1.2 MB of English prose: the help topics in
``pydoc_data.topics`` and the docstrings of the standard library. This module collects both.

Docstrings differ between Python versions, so anything cached from them is keyed by
:func:`python_key`. Modules that act on import (``antigravity`` opens a browser, ``this`` prints
the Zen of Python, ``idlelib``/``tkinter`` want a display) are never imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import io
import json
import subprocess
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pydoc_data.topics import topics

# Modules never imported: they act on import, need a display, or are slow/noisy to import.
_SKIP_PREFIXES = (
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "venv",
    "__main__",
    "__phello__",
    "typing.io",
    "typing.re",
    "_",
    "pydoc_data",
    "distutils",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "nturl2path",
    "encodings",
    "xxsubtype",
    "xxlimited",
    "crypt",
    "nis",
    "spwd",
    "ossaudiodev",
    "sre_",
    "sndhdr",
    "imghdr",
    "cgi",
    "telnetlib",
    "asynchat",
    "asyncore",
    "smtpd",
    "pipes",
    "uu",
    "xdrlib",
    "chunk",
    "mailcap",
    "audioop",
    "aifc",
    "sunau",
    "nntplib",
)


@dataclass(frozen=True)
class DocEntry:
    """One documented object: ``name`` is its dotted path (``json.dumps``), ``doc`` the text."""

    name: str
    kind: str  # "module", "function", "class", "method" or "topic"
    doc: str

    @property
    def summary(self) -> str:
        """The first paragraph of the doc, on one line (what an answer about the object says)."""
        para = self.doc.strip().split("\n\n", 1)[0]
        return " ".join(para.split())


def python_key() -> str:
    """Cache key for anything derived from these docs (they change between Python versions)."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"


def _module_names() -> list[str]:
    names = sorted(getattr(sys, "stdlib_module_names", ()))
    return [n for n in names if not n.startswith(_SKIP_PREFIXES)]


def _clean(doc: str | None) -> str | None:
    if not doc:
        return None
    doc = inspect.cleandoc(doc)
    if len(doc) < 40 or "Copyright" in doc[:200]:
        return None
    return doc


@functools.lru_cache(maxsize=1)
def stdlib_entries() -> tuple[DocEntry, ...]:
    """All documented modules, functions, classes and methods of the standard library.

    Deterministic for a given Python version (sorted by name). Collected in a fresh, isolated
    interpreter (``-I -S``: no site-packages), because third-party packages imported in this
    process patch stdlib objects (``logging.Logger.warning_once``...) and would change the set.
    Takes about a second.
    """
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-W", "ignore", __file__],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    return tuple(DocEntry(**e) for e in json.loads(out))


def _collect_entries() -> tuple[DocEntry, ...]:
    """The collection itself (run by ``stdlib_entries`` in a clean interpreter)."""
    entries: dict[str, DocEntry] = {}
    sink = io.StringIO()
    for mod_name in _module_names():
        try:
            with warnings.catch_warnings(), redirect_stdout(sink), redirect_stderr(sink):
                warnings.simplefilter("ignore")
                module = importlib.import_module(mod_name)
        except BaseException:
            continue
        doc = _clean(getattr(module, "__doc__", None))
        if doc:
            entries[mod_name] = DocEntry(mod_name, "module", doc)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue
            if inspect.isclass(obj):
                kind = "class"
            elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                kind = "function"
            else:
                continue
            qual = f"{mod_name}.{attr}"
            doc = _clean(getattr(obj, "__doc__", None))
            if doc:
                entries[qual] = DocEntry(qual, kind, doc)
            if kind == "class":
                for meth_name, meth in sorted(vars(obj).items()):
                    if meth_name.startswith("_") or not callable(meth):
                        continue
                    if getattr(meth, "__module__", mod_name) not in (mod_name, None):
                        continue
                    mdoc = _clean(getattr(meth, "__doc__", None))
                    if mdoc:
                        entries[f"{qual}.{meth_name}"] = DocEntry(
                            f"{qual}.{meth_name}", "method", mdoc
                        )
    return tuple(entries[k] for k in sorted(entries))


@functools.lru_cache(maxsize=1)
def pydoc_topics() -> tuple[DocEntry, ...]:
    """The help topics of ``pydoc_data.topics`` (the language reference's prose)."""
    return tuple(DocEntry(name, "topic", text.strip()) for name, text in sorted(topics.items()))


def all_documents() -> list[str]:
    """Every document (topic texts first, then docstrings), for the pretraining corpus."""
    return [e.doc for e in pydoc_topics()] + [e.doc for e in stdlib_entries()]


if __name__ == "__main__":
    json.dump([e.__dict__ for e in _collect_entries()], sys.stdout)
