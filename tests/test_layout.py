"""The package layout (issue 14): no import cycle in src/llamalab (counting the imports inside
functions), imports at the top of every file, every module importable, no long modules."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llamalab"
MAX_LINES = 400
# The only imports allowed inside functions, each with a `# lazy: <reason>` comment: optional
# heavy dependencies, and two torch submodules that `import torch` does not load and that cost
# about a second each (Inductor's config: only a compiled decode; distributed checkpoints: only
# loading one, which chat / generate / score should not pay for).
LAZY = (
    "deepspeed",
    "wandb",
    "transformers",
    "matplotlib",
    "optuna",
    "datasets",
    "pyarrow",
    "torch._inductor",
    "torch.distributed.checkpoint",
)
REASON = "# lazy:"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(path: Path, name: str) -> list[tuple[str, ast.stmt, bool]]:
    """(absolute module name, node, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, ast.stmt, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((alias.name, child, inside) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                out.append((base, child, inside))
                out.extend((f"{base}.{alias.name}", child, inside) for alias in child.names)
            visit(child, inside)

    visit(tree, False)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the llamalab modules it imports, at the top or inside functions. Importing
    ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__`` (edges to one's own packages are
    left out: they are always imported first)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for target, _, _ in imported_names(path, name):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if not target.startswith("llamalab") or target == name:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in mods and step != name and not name.startswith(step + "."):
                    graph[name].add(step)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(import_graph()) == []


def is_lazy_allowed(target: str) -> bool:
    return any(target == name or target.startswith(name + ".") for name in LAZY)


def has_reason(lines: list[str], node: ast.stmt) -> bool:
    """A ``# lazy:`` comment on the import's own lines or in the comment just above it (above a
    group of consecutive imports: the one comment covers the group)."""
    end = node.end_lineno or node.lineno
    if any(REASON in line for line in lines[node.lineno - 1 : end]):
        return True
    above = ("import ", "from ", "#")  # the group's other imports, a comment's other lines
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith(above) and REASON not in lines[i]:
        i -= 1
    return i >= 0 and REASON in lines[i]


def function_level_imports(path: Path, name: str) -> list[str]:
    """The imports inside functions of one file that break the rule."""
    lines = path.read_text().splitlines()
    bad = []
    for target, node, inside in imported_names(path, name):
        if not inside:
            continue
        if not is_lazy_allowed(target):
            bad.append(f"{name}:{node.lineno} imports {target} inside a function")
        elif not has_reason(lines, node):
            bad.append(f"{name}:{node.lineno} imports {target} lazily without a '{REASON}' reason")
    return list(dict.fromkeys(bad))  # in line order, without repeats


def test_the_import_rule_finds_a_function_level_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    import wandb\n"
        "    # lazy: heavy\n"
        "    import deepspeed\n"
        "    import deepspeed.zero\n"
        "    import pyarrow  # lazy: heavy\n"
        "    import torch.distributed.checkpoint  # lazy: heavy\n"
        "    import torch.distributed.tensor  # lazy: not allowed\n"
    )
    assert function_level_imports(source, "m") == [
        "m:3 imports json inside a function",
        "m:4 imports wandb lazily without a '# lazy:' reason",
        "m:10 imports torch.distributed.tensor inside a function",
    ]


def test_imports_sit_at_the_top() -> None:
    """Imports inside functions only for the heavy dependencies in LAZY, each with its reason."""
    bad = [line for name, path in modules().items() for line in function_level_imports(path, name)]
    assert bad == []


def test_pipeline_imports_no_other_llamalab_module() -> None:
    assert import_graph()["llamalab.pipeline"] == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_user_error_table_names_real_exceptions() -> None:
    from llamalab.runner import cli

    for module, name in (*cli.USER_ERRORS, *cli.REJECTED_SETTINGS):
        importlib.import_module(module)
        assert issubclass(getattr(sys.modules[module], name), Exception), (module, name)
    assert len(cli.user_error_types()) == len(cli.USER_ERRORS)


def test_no_module_is_over_400_lines() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
