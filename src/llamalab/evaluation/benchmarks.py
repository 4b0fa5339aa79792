"""The ``benchmarks`` suite: lm-eval tasks on our model (``eval=builtin``, ``eval=llama2_benchmarks``,
or any ``eval.tasks=[...]``).

Returns lm-eval's own ``results`` (task -> ``"metric,filter"`` -> value) plus, when the config has
``groups`` (the paper's Table 3), each group's average beside the paper's numbers. Tasks are run
once per shot count (``eval.num_fewshot``, or each group's own). Task names are checked against
lm-eval's registry before the model loads (an unknown name stops with the closest matches); tasks
that read the Hugging Face hub stop at once, with a message, when the hub cannot be reached.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from omegaconf import DictConfig, OmegaConf

from llamalab.evaluation.builtin_tasks import write_builtin_tasks
from llamalab.evaluation.common import EvalError, device_of
from llamalab.evaluation.harness import LlamalabLM
from llamalab.evaluation.plots import grouped_bars

HUB_TIMEOUT_S = 3.0


def check_tasks(names: Iterable[str], available: Sequence[str]) -> None:
    """EvalError for the first name lm-eval does not know, with its closest registered names."""
    known = set(available)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(available), n=3, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise EvalError(
                f"unknown lm-eval task {name!r}{hint} (`lm_eval ls tasks` lists them; task YAMLs "
                "of your own go in eval.include_path=DIR)"
            )


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) accepts a connection within ``timeout``."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_hub(names: Sequence[str]) -> None:
    """Stop before any download is tried when hub tasks are asked for and the hub is out of
    reach (``HF_DATASETS_OFFLINE=1`` says the datasets are in the local cache: no check)."""
    if not names or os.environ.get("HF_DATASETS_OFFLINE") == "1" or hub_reachable():
        return
    raise EvalError(
        f"tasks {', '.join(names)} read their datasets from the Hugging Face hub, which cannot be "
        "reached from here: run them on a machine with network access (or with the datasets in "
        "the HF cache and HF_DATASETS_OFFLINE=1). Offline, `eval=builtin` runs the built-in tasks."
    )


def task_plan(ev: DictConfig) -> dict[int | None, list[str]]:
    """Shot count -> task names: each group's ``num_fewshot`` with ``groups``, else
    ``eval.tasks`` at ``eval.num_fewshot`` (None: each task's default)."""
    plan: dict[int | None, list[str]] = defaultdict(list)
    if ev.get("groups"):
        for group in ev.groups.values():
            for task in group.tasks:
                plan[task.get("num_fewshot")].append(task.name)
    else:
        if not ev.get("tasks"):
            raise EvalError("eval.tasks is empty: name at least one lm-eval task")
        plan[ev.get("num_fewshot")] = list(ev.tasks)
    return dict(plan)


def chat_format(setting: Any, ckpt: Path) -> bool:
    """``eval.apply_chat_template``: true / false, or ``auto``: true for a chat model (its
    export's tokenizer_config.json carries a ``chat_template``)."""
    if setting != "auto":
        return bool(setting)
    for folder in (ckpt, ckpt / "export", ckpt.parent):
        config = folder / "tokenizer_config.json"
        if config.is_file():
            return "chat_template" in json.loads(config.read_text())
    return False


def metric_value(task_results: dict[str, Any], metric: str) -> float | None:
    """``metric`` (``name`` or ``name,filter``) of one task's results, or None."""
    if metric in task_results:
        return float(task_results[metric])
    for key, value in task_results.items():
        if key.split(",")[0] == metric and isinstance(value, int | float):
            return float(value)
    return None


def group_scores(ev: DictConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each group's average (percent) of its tasks' metrics, beside the paper's numbers."""
    out: dict[str, Any] = {}
    for name, group in ev.groups.items():
        values = {t.name: metric_value(results.get(t.name, {}), t.metric) for t in group.tasks}
        scored = [v for v in values.values() if v is not None]
        out[name] = {
            "score": 100 * sum(scored) / len(scored) if scored else None,
            "tasks": values,
            "paper": dict(group.get("paper", {})),
        }
    return out


def print_groups(groups: dict[str, Any], label: str) -> list[list[Any]]:
    """Print the groups table (ours beside the paper's sizes); returns its rows."""
    sizes = sorted({size for g in groups.values() for size in g["paper"]})
    header = ["group", label, *[f"Llama 2 {s}" for s in sizes]]
    rows = [[name, g["score"], *[g["paper"].get(s) for s in sizes]] for name, g in groups.items()]
    cell = lambda v: "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))  # noqa: E731
    widths = [max(len(cell(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    return [header, *rows]


def include_paths(value: Any) -> list[str]:
    """``eval.include_path``: a folder, a list of folders or null -> absolute paths that exist."""
    if value is None:
        return []
    folders = [value] if isinstance(value, str) else list(OmegaConf.to_container(value))
    for folder in folders:
        if not Path(folder).is_dir():
            raise EvalError(f"eval.include_path={folder}: no such directory of task YAMLs")
    return [str(Path(f).resolve()) for f in folders]


def build_task_manager(names: Sequence[str], include: list[str]) -> tuple[TaskManager, list[str]]:
    """A TaskManager that knows every name; also returns the names that need the hub. The full
    lm-eval index (15-30 s) is built only when a name is not among the local tasks."""
    local = TaskManager(include_path=include or None, include_defaults=False)
    remote = [n for n in names if n not in local.all_tasks]
    if not remote:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON only: no telemetry call
        return local, []
    check_hub(remote)  # before the slow index: offline stops at once
    full = TaskManager(include_path=include or None, include_defaults=True)
    check_tasks(remote, full.all_tasks)
    return full, remote


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run the configured lm-eval tasks on ``cfg.ckpt``; see the module docstring."""
    ev = cfg.eval
    plan = task_plan(ev)
    names = [n for tasks in plan.values() for n in tasks]
    include = include_paths(ev.get("include_path"))
    # The built-in tasks are always known (and a typo of their names finds them).
    include.insert(0, str(write_builtin_tasks(out_dir / "tasks", ev.get("max_gen_toks", 48))))
    manager, remote = build_task_manager(names, include)
    ckpt = Path(cfg.ckpt)
    apply_chat = chat_format(ev.get("apply_chat_template", "auto"), ckpt)
    lm = LlamalabLM(
        pretrained=str(ckpt),
        batch_size=ev.get("batch_size", 8),
        device=str(device_of(cfg.get("device"))),
        max_gen_toks=ev.get("max_gen_toks", 256),
        tp_size=ev.get("tp_size", 1),
    )
    results: dict[str, Any] = {}
    configs: dict[str, Any] = {"n-shot": {}, "versions": {}, "higher_is_better": {}}
    for shots, tasks in plan.items():
        try:
            out = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=shots,
                limit=ev.get("limit"),
                batch_size=lm.batch_size,
                task_manager=manager,
                apply_chat_template=apply_chat,
                fewshot_as_multiturn=apply_chat and bool(shots),
                log_samples=False,
                confirm_run_unsafe_code=bool(ev.get("confirm_run_unsafe_code", False)),
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
            )
        except ConnectionError as err:
            raise EvalError(f"tasks {tasks}: a dataset could not be fetched: {err}") from None
        if out is None or lm.global_rank != 0:  # rank 0 holds the gathered results (the
            continue  # other ranks of its tensor-parallel group hold a copy of them)
        results.update(out["results"])
        for key in configs:
            configs[key].update(out.get(key, {}))
    fragment: dict[str, Any] = {"results": results, **configs, "chat_format": apply_chat}
    fragment["needs_hub"] = remote
    if not results:
        return fragment
    if ev.get("groups"):
        groups = group_scores(ev, results)
        fragment["groups"] = groups
        rows = print_groups(groups, "ours")
        fragment["_tables"] = {"groups": rows}
        sizes = rows[0][2:]
        series = {"ours": [g["score"] for g in groups.values()]}
        for k, size in enumerate(sizes):
            series[size] = [row[2 + k] for row in rows[1:]]
        grouped_bars(out_dir / "groups.png", list(groups), series, "Table 3 groups", "score (%)")
    else:
        rows = [["task", "metric", "value"]]
        rows += [
            [task, key, float(value)]
            for task, metrics in results.items()
            for key, value in metrics.items()
            if isinstance(value, int | float) and "_stderr" not in key
        ]
        fragment["_tables"] = {"benchmarks": rows}
        labels = [f"{r[0]}\n{r[1]}" for r in rows[1:]]
        grouped_bars(
            out_dir / "benchmarks.png",
            labels,
            {"ours": [r[2] for r in rows[1:]]},
            "lm-eval tasks",
            "score",
        )
    return fragment
