"""Collect a study's runs into a table and a plot (the ``experiments/`` convention).

Every study's ``collect.py`` does the same three things: load its runs (from the CSV logs each
run writes, so it works offline, or from the W&B API when online), reduce each run to numbers
(final values, medians), aggregate over seeds (mean and spread), then write a Markdown table,
a CSV/JSON of results and a matplotlib PNG. This module is those steps; a study only says which
metrics it wants and how its runs are grouped.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

TOKENS = "train/tokens_seen"


@dataclass
class RunLog:
    """One run: its config and its logged metric rows (each row a ``{name: value}`` dict).

    Rows are in logging order and carry ``step`` (the optimizer step). Values are floats; a row
    holds only the metrics logged in it (CSV cells left empty are dropped).
    """

    name: str
    config: DictConfig
    rows: list[dict[str, float]]
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A config value by dotted key (``model.attention``); ``default`` when it is missing or
        cannot be resolved outside Hydra (``${hydra:...}``)."""
        value = OmegaConf.select(
            self.config, key, default=default, throw_on_resolution_failure=False
        )
        return default if value is None else value


# ---------------------------------------------------------------------------- loading
def read_csv_metrics(path: str | Path) -> list[dict[str, float]]:
    """Lightning's ``metrics.csv`` as rows of floats (empty cells dropped)."""
    with open(path, newline="") as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def load_run(run_dir: str | Path) -> RunLog:
    """A run directory written by ``src/train.py``: ``.hydra/config.yaml`` + ``csv/metrics.csv``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.exists():
        raise FileNotFoundError(
            f"{run_dir} has no csv/metrics.csv: is it a src/train.py run directory?"
        )
    config_file = run_dir / ".hydra" / "config.yaml"
    config = OmegaConf.load(config_file) if config_file.exists() else OmegaConf.create({})
    assert isinstance(config, DictConfig)
    return RunLog(name=run_dir.name, config=config, rows=read_csv_metrics(metrics), path=run_dir)


def find_runs(root: str | Path) -> list[RunLog]:
    """Every run under ``root`` (a multirun's sweep directory, or one run), in job order."""
    root = Path(root)
    dirs = sorted({p.parent.parent for p in root.rglob("csv/metrics.csv")}, key=_job_order)
    if not dirs:
        raise FileNotFoundError(f"no runs (csv/metrics.csv) under {root}")
    return [load_run(d) for d in dirs]


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, str(path))


def wandb_runs(
    project: str, group: str | None = None, entity: str | None = None, api: Any = None
) -> list[RunLog]:
    """The runs of a W&B project (one sweep's ``group``) through the public API (online only).

    ``api`` defaults to ``wandb.Api()``; the history rows get ``step`` from ``trainer/global_step``
    so they read like the CSV rows.
    """
    if api is None:
        import wandb  # lazy: heavy (~1 s), only the online W&B API needs it

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    runs = api.runs(path, filters={"group": group} if group else None)
    out = []
    for run in runs:
        rows = []
        for row in run.scan_history():
            values = {k: float(v) for k, v in row.items() if _is_number(v)}
            if "trainer/global_step" in values:
                values["step"] = values["trainer/global_step"]
            rows.append(values)
        out.append(RunLog(name=run.name, config=OmegaConf.create(dict(run.config)), rows=rows))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------- per-run numbers
def series(run: RunLog, y: str, x: str = TOKENS) -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of metric ``y`` against ``x``; rows without ``x`` take the latest ``x`` logged
    at the same or an earlier step (older logs wrote validation rows without tokens seen)."""
    xs: list[float] = []
    ys: list[float] = []
    last_x: float | None = None
    for row in run.rows:
        if x in row:
            last_x = row[x]
        if y in row and last_x is not None:
            xs.append(row.get(x, last_x))
            ys.append(row[y])
    return xs, ys


def final(run: RunLog, key: str) -> float:
    """The last logged value of ``key`` (NaN when never logged)."""
    values = [row[key] for row in run.rows if key in row]
    return values[-1] if values else math.nan


def median(run: RunLog, key: str, skip: int = 1) -> float:
    """Median of ``key`` over the run, skipping its first ``skip`` values (warm-up steps)."""
    values = [row[key] for row in run.rows if key in row][skip:]
    return statistics.median(values) if values else math.nan


# ---------------------------------------------------------------------------- aggregation
def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs are ignored."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def aggregate(
    records: Iterable[dict[str, Any]], by: str, metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Group per-run records by ``by`` (in first-seen order); each metric becomes ``<m>_mean``
    and ``<m>_std`` over the group, plus ``n`` (runs in the group)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record[by], []).append(record)
    out = []
    for key, members in groups.items():
        row: dict[str, Any] = {by: key, "n": len(members)}
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_spread([float(r[m]) for r in members])
        out.append(row)
    return out


# ---------------------------------------------------------------------------- outputs
Formatter = Callable[[Any], str]


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Formatter]]
) -> str:
    """A Markdown table; ``columns`` are ``(header, key, format)`` and a key ending in ``±``
    shows ``<key>_mean ± <key>_std``."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, fmt in columns:
            if key.endswith("±"):
                base = key[:-1]
                spread = fmt(row[base + "_std"]).lstrip("+")  # a spread has no sign
                cells.append(f"{fmt(row[base + '_mean'])} ± {spread}")
            else:
                cells.append(fmt(row[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_records(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Per-run records as CSV (columns = the union of keys, in first-seen order)."""
    path = Path(path)
    columns = list(dict.fromkeys(k for r in records for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    return path


def write_json(data: Any, path: str | Path) -> Path:
    """JSON with NaN written as null (valid JSON for any reader)."""
    path = Path(path)
    path.write_text(json.dumps(_nan_to_none(data), indent=2) + "\n")
    return path


def _nan_to_none(data: Any) -> Any:
    if isinstance(data, float) and math.isnan(data):
        return None
    if isinstance(data, dict):
        return {k: _nan_to_none(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_nan_to_none(v) for v in data]
    return data


def mean_curve(
    curves: Sequence[tuple[list[float], list[float]]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``(xs, mean, low, high)`` over curves sampled at the same x values (runs of one token
    budget); only the x values every curve has are kept."""
    common = sorted(set.intersection(*(set(xs) for xs, _ in curves))) if curves else []
    lookups = [dict(zip(xs, ys)) for xs, ys in curves]
    mean, low, high = [], [], []
    for x in common:
        values = [lk[x] for lk in lookups]
        mean.append(statistics.fmean(values))
        low.append(min(values))
        high.append(max(values))
    return common, mean, low, high


def plot_curves(
    runs: Sequence[RunLog],
    by: str,
    y: str,
    path: str | Path,
    x: str = TOKENS,
    title: str | None = None,
    ax: Any = None,
) -> Path:
    """Mean curve of ``y`` against ``x`` per group (config key ``by``), with the min-max band over
    the group's runs (its seeds); writes a PNG unless drawing into a given ``ax``."""
    import matplotlib  # lazy: optional (dev extra) and heavy, only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above, after the Agg backend is chosen

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    groups: dict[Any, list[RunLog]] = {}
    for run in runs:
        groups.setdefault(run.get(by), []).append(run)
    for key, members in groups.items():
        xs, mean, low, high = mean_curve([series(r, y, x) for r in members])
        line = ax.plot(xs, mean, marker="o", markersize=3, label=f"{key} (n={len(members)})")[0]
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} by {by}")
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return path
