"""The experiments/ convention: collection maths, the attention-ablation configs, every experiment
config and the Optuna search run end to end (tiny sizes)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import CONFIGS, compose_config, run_train
from omegaconf import OmegaConf

from llamalab.experiments import (
    RunLog,
    aggregate,
    final,
    find_runs,
    markdown_table,
    mean_curve,
    mean_spread,
    median,
    plot_curves,
    read_csv_metrics,
    series,
    wandb_runs,
    write_json,
    write_records,
)
from llamalab.runner.run import architecture

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
# Shrinks any experiment to seconds: one layer, 2 steps of 2 x 256 tokens, one validation batch.
TINY = [
    "model.n_layers=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=2",
    "stage.batch_tokens=512",
]


def write_run(run_dir: Path, rows: list[dict[str, object]], config: dict[str, object]) -> Path:
    """A run directory as src/train.py writes it (config + CSV log), with hand-made values."""
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


ROWS = [
    {"step": 0, "train/loss": 8.0, "train/tokens_seen": 100, "train/tokens_per_s": 10},
    {"step": 1, "train/loss": 7.0, "train/tokens_seen": 200, "train/tokens_per_s": 30},
    {"step": 1, "val/loss": 7.5},  # an old-style validation row: no tokens seen
    {"step": 2, "train/loss": 6.0, "train/tokens_seen": 300, "train/tokens_per_s": 50},
    {"step": 2, "val/loss": 6.5, "train/tokens_seen": 300},
]


# ---------------------------------------------------------------------------- collection maths
def test_csv_rows_series_final_and_median(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "0", ROWS, {"seed": 1, "model": {"attention": "gqa"}})
    rows = read_csv_metrics(run_dir / "csv" / "metrics.csv")
    assert rows[2] == {"step": 1.0, "val/loss": 7.5}  # empty cells dropped, values are floats
    (run,) = find_runs(tmp_path)
    assert run.get("model.attention") == "gqa" and run.get("model.missing", "x") == "x"
    # The validation row without tokens seen takes the latest value logged before it (200).
    assert series(run, "val/loss") == ([200.0, 300.0], [7.5, 6.5])
    assert final(run, "val/loss") == 6.5 and math.isnan(final(run, "val/ppl"))
    assert median(run, "train/tokens_per_s") == 40.0  # first (warm-up) step skipped
    assert median(run, "train/tokens_per_s", skip=0) == 30.0


def test_find_runs_in_job_order_and_clear_error(tmp_path: Path) -> None:
    for job in (10, 2, 0):
        write_run(tmp_path / "sweep" / str(job), ROWS, {"seed": job})
    assert [r.name for r in find_runs(tmp_path / "sweep")] == ["0", "2", "10"]
    with pytest.raises(FileNotFoundError, match="no runs"):
        find_runs(tmp_path / "empty")


def test_mean_spread_and_aggregate_by_hand() -> None:
    mean, std = mean_spread([1.0, 2.0, 3.0, math.nan])
    assert mean == 2.0 and std == pytest.approx(1.0)  # sample std of 1,2,3
    assert mean_spread([4.0]) == (4.0, 0.0)
    records = [
        {"attention": "mha", "loss": 2.0},
        {"attention": "mqa", "loss": 3.0},
        {"attention": "mha", "loss": 4.0},
    ]
    rows = aggregate(records, "attention", ["loss"])
    assert rows[0] == {
        "attention": "mha",
        "n": 2,
        "loss_mean": 3.0,
        "loss_std": pytest.approx(2**0.5),
    }
    assert rows[1]["attention"] == "mqa" and rows[1]["loss_std"] == 0.0


def test_markdown_table_and_result_files(tmp_path: Path) -> None:
    rows = [{"attention": "mha", "loss_mean": 2.0, "loss_std": 0.25}]
    text = markdown_table(
        rows, [("attention", "attention", str), ("loss", "loss±", "{:.2f}".format)]
    )
    assert text.splitlines() == ["| attention | loss |", "|---|---|", "| mha | 2.00 ± 0.25 |"]
    write_records([{"a": 1}, {"a": 2, "b": 3}], tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]
    write_json({"x": math.nan, "y": [1.0, math.nan]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None, "y": [1.0, None]}


def test_mean_curve_band_and_plot(tmp_path: Path) -> None:
    xs, mean, low, high = mean_curve([([1, 2, 3], [4.0, 2.0, 1.0]), ([1, 2], [6.0, 4.0])])
    assert (xs, mean, low, high) == ([1, 2], [5.0, 3.0], [4.0, 2.0], [6.0, 4.0])
    runs = [
        RunLog(str(i), OmegaConf.create({"model": {"attention": kind}}), ROWS)
        for i, kind in enumerate(["mha", "mha", "mqa"])
    ]
    path = plot_curves(runs, "model.attention", "val/loss", tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_runs_reads_history_like_csv_rows() -> None:
    """The online path, against a stand-in for ``wandb.Api`` (no network in tests)."""
    history = [{"trainer/global_step": 3, "val/loss": 5.0, "val/samples": {"_type": "table"}}]
    run = SimpleNamespace(name="r1", config={"seed": 2}, scan_history=lambda: history)
    calls = []

    def runs(path: str, filters: dict | None = None) -> list:
        calls.append((path, filters))
        return [run]

    (log,) = wandb_runs("proj", group="g", entity="me", api=SimpleNamespace(runs=runs))
    assert calls == [("me/proj", {"group": "g"})]
    assert log.rows == [{"trainer/global_step": 3.0, "val/loss": 5.0, "step": 3.0}]
    assert log.get("seed") == 2


# ---------------------------------------------------------------------------- the study's configs
def test_attention_ablation_has_equal_parameters_and_kv_ratios(tmp_path: Path) -> None:
    """FFN widened per attention kind so the totals match MHA's (within 0.05%)."""
    archs = {}
    for kind in ("mha", "gqa", "mqa"):
        cfg = compose_config(
            ["experiment=attention_ablation", f"attention={kind}"], output_dir=tmp_path
        )
        archs[kind] = architecture(cfg)
        assert archs[kind].attention_kind == kind
    mha = archs["mha"].num_params()
    assert mha == 5_310_720 and archs["gqa"].num_params() == mha  # 832 = exact
    assert abs(archs["mqa"].num_params() - mha) / mha < 5e-4  # 853: -1,024 parameters
    assert [archs[k].hidden_dim for k in ("mha", "gqa", "mqa")] == [704, 832, 853]
    # K and V, 4 layers, 32-dim heads, bf16: 8, 2 and 1 KV heads.
    assert [archs[k].kv_cache_bytes_per_token() for k in ("mha", "gqa", "mqa")] == [4096, 1024, 512]


def test_attention_ablation_sweeps_attention_by_seed(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=attention_ablation"], output_dir=tmp_path)
    params = cfg.hydra.sweeper.params
    assert params.attention == "mha,gqa,mqa" and params.seed == "1,2,3"
    assert cfg.stage.run_name == "attention_ablation" and "attention_ablation" in cfg.tags


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs_a_couple_of_steps(
    experiment: str, tmp_path: Path, cache_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_train(
        [f"experiment={experiment}", *TINY, "logger=none", f"paths.output_dir={run_dir}"], cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = find_runs(run_dir)
    assert final(run, "train/tokens_seen") == 2 * 512 and math.isfinite(final(run, "val/loss"))
    assert (run_dir / "export" / "config.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_optuna_search_two_trials_in_memory(tmp_path: Path, cache_dir: Path) -> None:
    outputs = tmp_path / "outputs"
    result = run_train(
        [
            "-m",
            "hparams_search=pretrain_optuna",
            "hydra.sweeper.n_trials=2",
            *TINY,
            "logger=none",
            f"paths.outputs_root={outputs}",
        ],
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (outputs / "pretrain_optuna").glob("20*")
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"stage.optim.lr", "stage.optim.warmup_steps"}
    assert 1e-4 <= best["best_params"]["stage.optim.lr"] <= 3e-3
    trial_losses = [final(r, "val/loss") for r in find_runs(sweep)]
    assert len(trial_losses) == 2 and best["best_value"] == pytest.approx(
        min(trial_losses), rel=1e-5
    )
