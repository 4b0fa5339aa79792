"""Collect the attention ablation (MHA vs GQA vs MQA) into results.csv, summary.json, a table and
a plot. See README.md in this folder for the question and the command that produced the runs.

    python experiments/attention_ablation/collect.py                       # the latest sweep
    python experiments/attention_ablation/collect.py --runs outputs/attention_ablation/<ts>
    python experiments/attention_ablation/collect.py --wandb-project llamalab --wandb-group G

Per run (from its CSV log, or its W&B history when online): final validation loss, median
training tokens/s, parameters and KV-cache bytes per token (from the architecture). Per attention
kind: the same over seeds (mean ± sample std) plus generation tokens/s at batch 1 and a large
batch, timed here on the first seed's export (speed depends on the architecture, not the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from llamalab.experiments import (
    RunLog,
    aggregate,
    final,
    find_runs,
    markdown_table,
    mean_spread,
    median,
    plot_curves,
    wandb_runs,
    write_json,
    write_records,
)
from llamalab.model import LlamaConfig

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ORDER = {"mha": 0, "gqa": 1, "mqa": 2}
ARCH_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
ARCH_KEYS += ("ffn_dim_multiplier", "ffn_hidden_dim", "norm_eps", "rope_theta", "max_seq_len")


def architecture(run: RunLog) -> LlamaConfig:
    """The run's exact architecture: its export's config.json, else the model config."""
    if run.path is not None and (run.path / "export" / "config.json").exists():
        return LlamaConfig.from_hf_config(
            json.loads((run.path / "export" / "config.json").read_text())
        )
    return LlamaConfig.from_dict({k: run.get(f"model.{k}") for k in ARCH_KEYS})


def run_record(run: RunLog) -> dict[str, Any]:
    """One row of results.csv."""
    arch = architecture(run)
    return {
        "attention": arch.attention_kind,
        "seed": int(run.get("seed", -1)),
        "params": arch.num_params(),
        "kv_heads": arch.kv_heads,
        "ffn_hidden_dim": arch.hidden_dim,
        "kv_bytes_per_token": arch.kv_cache_bytes_per_token(dtype_bytes=2),  # bf16 cache
        "tokens_seen": final(run, "train/tokens_seen"),
        "final_val_loss": final(run, "val/loss"),
        "final_train_loss": final(run, "train/loss"),
        "train_tokens_per_s": median(run, "train/tokens_per_s"),
        "run": display_path(run.path) if run.path is not None else run.name,
    }


def display_path(path: Path) -> str:
    """Relative to the repository when inside it (the committed results name no home folders)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def paired_deltas(
    records: list[dict[str, Any]], key: str, baseline: str = "mha"
) -> dict[str, list[float]]:
    """attention -> ``key`` minus the baseline's ``key`` at the same seed (same data order), so
    the seed-to-seed variation of the data cancels; seeds without a baseline run are skipped."""
    base = {r["seed"]: r[key] for r in records if r["attention"] == baseline}
    deltas: dict[str, list[float]] = {}
    for r in records:
        if r["seed"] in base:
            deltas.setdefault(r["attention"], []).append(r[key] - base[r["seed"]])
    return deltas


def generation_speed(
    exports: dict[str, Path], batches: list[int], prompt_len: int, new_tokens: int, repeats: int
) -> dict[str, dict[int, float]]:
    """attention -> batch -> new tokens/s of greedy KV-cache generation (median of ``repeats``).

    The models are timed in turn inside each repeat, so a slow patch of a shared machine hits all
    of them alike. EOS is disabled (every row generates ``new_tokens``); the time includes prefill.
    """
    from llamalab.checkpoint import load_model
    from llamalab.generation import generate

    models = {k: load_model(p).eval() for k, p in exports.items()}
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in models}
    rng = torch.Generator().manual_seed(0)
    for batch in batches:
        for _ in range(repeats):
            prompts = torch.randint(3, 4000, (batch, prompt_len), generator=rng).tolist()
            for kind, model in models.items():
                start = time.perf_counter()
                generate(model, prompts, new_tokens, temperature=0.0, top_p=None, eos_id=None)
                times[kind][batch].append(time.perf_counter() - start)
    return {
        k: {b: b * new_tokens / statistics.median(ts) for b, ts in per.items()}
        for k, per in times.items()
    }


def first_exports(runs: list[RunLog], records: list[dict[str, Any]]) -> dict[str, Path]:
    """attention -> the export of its lowest seed (when the runs are local)."""
    chosen: dict[str, tuple[int, Path]] = {}
    for run, rec in zip(runs, records):
        export = (run.path / "export") if run.path is not None else None
        if export is None or not (export / "config.json").exists():
            continue
        if rec["attention"] not in chosen or rec["seed"] < chosen[rec["attention"]][0]:
            chosen[rec["attention"]] = (rec["seed"], export)
    return {k: v[1] for k, v in sorted(chosen.items(), key=lambda kv: ORDER.get(kv[0], 9))}


def table(summary: list[dict[str, Any]], large: int) -> str:
    def f3(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.3f}"

    def f0(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:,.0f}"

    columns = [
        ("attention", "attention", str),
        ("seeds", "n", str),
        ("parameters", "params", lambda v: f"{int(v):,}"),
        ("FFN hidden", "ffn_hidden_dim", str),
        ("KV bytes/token (bf16)", "kv_bytes_per_token", lambda v: f"{int(v):,}"),
        ("final val loss", "final_val_loss±", f3),
        (
            "Δ val loss vs MHA, same seed",
            "val_loss_vs_mha±",
            lambda v: "n/a" if math.isnan(v) else f"{v:+.3f}",
        ),
        ("train tokens/s", "train_tokens_per_s±", f0),
        ("gen tokens/s, batch 1", "gen_tps_1", f0),
        (f"gen tokens/s, batch {large}", f"gen_tps_{large}", f0),
    ]
    return markdown_table(summary, columns)


def plot(runs: list[RunLog], summary: list[dict[str, Any]], large: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=90)
    plot_curves(
        runs,
        "model.attention",
        "val/loss",
        path,
        ax=axes[0],
        title="validation loss (mean, min-max over seeds)",
    )
    plot_curves(
        runs,
        "model.attention",
        "train/loss",
        path,
        ax=axes[1],
        title="training loss (mean, min-max over seeds)",
    )
    kinds = [row["attention"] for row in summary]
    for i, (batch, label) in enumerate(((1, "batch 1"), (large, f"batch {large}"))):
        values = [row.get(f"gen_tps_{batch}", math.nan) for row in summary]
        bars = axes[2].bar([k + i * 0.4 for k in range(len(kinds))], values, width=0.4, label=label)
        axes[2].bar_label(bars, fmt="%.0f", fontsize=8)
    axes[2].set_xticks([k + 0.2 for k in range(len(kinds))], kinds)
    axes[2].set_ylabel("generated tokens/s")
    axes[2].set_title("greedy generation speed (KV cache)")
    axes[2].legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def load(args: argparse.Namespace) -> list[RunLog]:
    if args.wandb_project:
        return wandb_runs(args.wandb_project, args.wandb_group, args.wandb_entity)
    root = Path(args.runs) if args.runs else REPO / "outputs" / "attention_ablation" / "latest"
    root = root.resolve()
    if (root / "csv" / "metrics.csv").exists() and root.parent.name != "attention_ablation":
        root = root.parent  # `latest` is one job of the sweep: collect the whole sweep
    return find_runs(root)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--runs", help="sweep directory (default: outputs/attention_ablation/latest's sweep)"
    )
    ap.add_argument("--wandb-project", help="read the runs from the W&B API instead (online)")
    ap.add_argument("--wandb-group")
    ap.add_argument("--wandb-entity")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--large-batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads stall on a busy 2-core box
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    runs = load(args)
    records = [run_record(r) for r in runs]
    order = sorted(
        range(len(runs)), key=lambda i: (ORDER.get(records[i]["attention"], 9), records[i]["seed"])
    )
    runs, records = [runs[i] for i in order], [records[i] for i in order]
    metrics = ["final_val_loss", "final_train_loss", "train_tokens_per_s"]
    summary = aggregate(records, "attention", metrics)
    exports = first_exports(runs, records)
    batches = [1, args.large_batch]
    speed = (
        generation_speed(exports, batches, args.prompt_len, args.new_tokens, args.repeats)
        if exports
        else {}
    )
    deltas = paired_deltas(records, "final_val_loss")
    for row in summary:
        row["val_loss_vs_mha_mean"], row["val_loss_vs_mha_std"] = mean_spread(
            deltas.get(row["attention"], [])
        )
        first = next(r for r in records if r["attention"] == row["attention"])
        row.update(
            {k: first[k] for k in ("params", "kv_heads", "ffn_hidden_dim", "kv_bytes_per_token")}
        )
        for b in batches:
            row[f"gen_tps_{b}"] = speed.get(row["attention"], {}).get(b, math.nan)

    args.out.mkdir(parents=True, exist_ok=True)
    write_records(records, args.out / "results.csv")
    write_json({"runs": records, "summary": summary, "generation": vars(args) | {"out": str(args.out)}},
               args.out / "summary.json")  # fmt: skip
    plot(runs, summary, args.large_batch, args.out / "attention_ablation.png")
    print(table(summary, args.large_batch))


if __name__ == "__main__":
    main()
