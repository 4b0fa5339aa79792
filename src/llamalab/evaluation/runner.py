"""The run ``src/eval.py`` drives: resolve the model, run one suite, write results.json, the W&B run
and the plots.

A suite is a module ``llamalab.evaluation.<suite>`` (one of :data:`SUITES`) with
``run(cfg, out_dir) -> dict``: ``cfg`` is the whole composed config (``cfg.ckpt`` the resolved
model path, ``cfg.eval`` the suite's group); it writes its plots and files into ``out_dir`` and
returns its part of results.json. ``benchmarks`` returns lm-eval's layout (``results``,
``n-shot``, ``versions``...), which goes to the top level of results.json so that tools reading
lm-eval's output read ours; every other suite's dict goes under its name (``safety``,
``redteam``, ``winrate``). A returned ``_tables`` entry (name -> rows, the first row the column
names) is logged as W&B tables and not written to results.json. results.json in an existing
``paths.output_dir`` is updated, so several suites can share one folder.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict

from llamalab.evaluation.common import EvalError, device_of, resolve_ckpt
from llamalab.runner.paths import output_dir
from llamalab.runner.tracking import wandb_offline

SUITES = ("benchmarks", "safety", "redteam", "winrate")
TOP_LEVEL_SUITE = "benchmarks"
RESULTS = "results.json"


def suite_module(name: str) -> Any:
    """``llamalab.evaluation.<name>``; an unknown suite stops with the closest names."""
    if name not in SUITES:
        close = difflib.get_close_matches(str(name), SUITES, n=2, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise EvalError(f"eval.suite={name!r} is not a suite{hint}; suites: {', '.join(SUITES)}")
    return importlib.import_module(f"llamalab.evaluation.{name}")


def init_distributed(device: str | None) -> int:
    """Join the process group of a ``torchrun`` launch (data-parallel lm-eval); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.get_rank() if dist.is_initialized() else 0
    cuda = device_of(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank()


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), recursively; other values unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def scalars(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a nested dict as ``a/b/c -> value`` (for the W&B summary)."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(scalars(value, f"{prefix}{key}/"))
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        out[prefix.rstrip("/")] = float(tree)
    return out


def log_wandb(cfg: DictConfig, out_dir: Path, results: dict, tables: dict[str, list]) -> str:
    """One W&B run in ``out_dir/wandb``: config, summary numbers, tables and the PNG plots."""
    import wandb  # lazy: heavy, only to log the finished results

    mode = cfg.wandb.get("mode") or (
        "offline" if wandb_offline(OmegaConf.create({"offline": None})) else "online"
    )
    name = cfg.wandb.get("name") or f"eval-{cfg.eval.suite}-{Path(str(cfg.ckpt)).name}"
    run = wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.get("entity"),
        name=name,
        job_type="eval",
        dir=str(out_dir),
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
    )
    logged: dict[str, Any] = {}
    for key, rows in tables.items():
        logged[f"table/{key}"] = wandb.Table(columns=[str(c) for c in rows[0]], data=rows[1:])
    for png in sorted(out_dir.glob("*.png")):
        logged[f"plot/{png.stem}"] = wandb.Image(str(png))
    if logged:
        run.log(logged)
    run.summary.update(scalars({k: v for k, v in results.items() if k != "config"}))
    run.finish()
    return mode


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.eval.suite`` on ``cfg.ckpt`` (module docstring); returns results.json's dict."""
    module = suite_module(cfg.eval.suite)  # a bad suite stops before anything loads
    if int(cfg.eval.get("tp_size", 1)) != 1 and cfg.eval.suite != "benchmarks":
        raise EvalError(
            f"eval.tp_size={cfg.eval.tp_size}: tensor-parallel copies serve the lm-eval suites "
            f"(builtin, harness, llama2_benchmarks); eval={cfg.eval.suite} holds whole models "
            "(set eval.tp_size=1)"
        )
    rank = init_distributed(cfg.get("device"))
    out_dir = output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.eval.get("policies"):  # the safety suite may compare several policies instead
        ckpt = resolve_ckpt(cfg.ckpt, cfg.paths.outputs_root) if cfg.ckpt else None
    else:
        ckpt = resolve_ckpt(cfg.ckpt, cfg.paths.outputs_root)
    with open_dict(cfg):
        cfg.ckpt = None if ckpt is None else str(ckpt)
    fragment = module.run(cfg, out_dir)
    if rank != 0:
        return {}
    tables = fragment.pop("_tables", {})
    path = out_dir / RESULTS
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if cfg.eval.suite == TOP_LEVEL_SUITE:
        results.update(fragment)
    else:
        results[cfg.eval.suite] = fragment
    results.update(ckpt=cfg.ckpt, suite=cfg.eval.suite)
    results.setdefault("config", {})[cfg.eval.suite] = OmegaConf.to_container(cfg.eval)
    results = _json_safe(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    mode = log_wandb(cfg, out_dir, results, tables)
    print(f"results: {path} (W&B {mode} run in {out_dir / 'wandb'})")
    return results
