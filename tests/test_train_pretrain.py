"""`python src/train.py` as a user runs it: the pretraining stage end to end, outputs, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_train

QUICK = ["logger=none", "callbacks=none", "trainer.max_steps=2", "trainer.limit_val_batches=1"]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.integration
def test_short_pretraining_run_writes_export_latest_and_logs(
    tmp_path: Path, cache_dir: Path
) -> None:
    outputs = tmp_path / "outputs"
    result = run_train([*QUICK, f"paths.outputs_root={outputs}"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    latest = outputs / "pretrain" / "latest"
    assert latest.is_symlink() and not Path(latest.readlink()).is_absolute()
    run_dir = latest.resolve()
    assert run_dir.parent == (outputs / "pretrain").resolve()
    export = run_dir / "export"
    assert (export / "config.json").exists() and (export / "tokenizer.model").exists()
    assert "chat_template" not in json.loads((export / "tokenizer_config.json").read_text())
    assert (run_dir / ".hydra" / "config.yaml").exists()
    rows = read_metrics(run_dir)
    logged = {k for row in rows for k, v in row.items() if v}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "val/loss"} <= logged

    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(export)
    out = hf.generate(torch.tensor([[1, 50, 60]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


@pytest.mark.integration
def test_resolved_output_dir_override(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "my_run"
    result = run_train([*QUICK, f"paths.output_dir={run_dir}", "debug=fast_dev_run"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "export" / "model.safetensors").exists()


@pytest.mark.integration
def test_dry_run_prints_plan_and_writes_json_without_allocating(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = run_train(
        ["model=70b", "stage=ppo", "dry_run=true", f"paths.output_dir={tmp_path}"], cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "68,976,648,192" in result.stdout and "68,714,512,384" in result.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["total_params"] == 2 * 68_976_648_192 + 3 * 68_714_512_384


@pytest.mark.integration
def test_missing_data_path_is_one_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = run_train(
        [*QUICK, f"data.path={missing}", f"paths.output_dir={tmp_path / 'r'}"], cache_dir
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_empty_data_path_is_one_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_train(
        [*QUICK, f"data.path={empty}", f"paths.output_dir={tmp_path / 'r'}"], cache_dir
    )
    assert result.returncode == 1
    assert "empty.jsonl" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_tokenizer_vocabulary_mismatch_stops_before_training(
    tmp_path: Path, cache_dir: Path
) -> None:
    from llamalab.data.stdlib_docs import pydoc_topics
    from llamalab.tokenizer import Tokenizer

    texts = [e.doc for e in pydoc_topics()]
    tok = Tokenizer.train(texts, tmp_path / "small.model", vocab_size=400)
    result = run_train(
        [*QUICK, f"data.tokenizer_path={tok.model_path}", f"paths.output_dir={tmp_path / 'r'}"],
        cache_dir,
    )
    assert result.returncode == 1
    assert "400 pieces" in result.stderr and "4096" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.integration
def test_unknown_config_value_fails_with_hydra_message(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(["model=tinyy", f"paths.output_dir={tmp_path}"], cache_dir)
    assert result.returncode == 1
    assert "tinyy" in result.stderr and "Available options" in result.stderr


@pytest.mark.integration
def test_impossible_architecture_stops_before_any_compute(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(["model.n_kv_heads=3", f"paths.output_dir={tmp_path}"], cache_dir)
    assert result.returncode == 1
    assert "n_heads (8) must be divisible by n_kv_heads (3)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.experiment  # a learning-quality run: make test-experiments (make test's budget)
def test_pretraining_lowers_validation_perplexity(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(
        [
            "logger=none",
            "callbacks=none",
            "trainer.max_steps=40",
            "trainer.val_check_interval=20",
            f"paths.output_dir={tmp_path}",
        ],
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = [float(r["val/ppl"]) for r in read_metrics(tmp_path) if r.get("val/ppl")]
    # A randomly initialised model predicts nearly uniformly: perplexity ~ the vocabulary (4096).
    assert ppl[-1] < 4096 / 5 and ppl[-1] <= ppl[0], ppl
    assert all(math.isfinite(p) for p in ppl)


@pytest.mark.integration
@pytest.mark.slow
def test_attention_sweep_launches_three_runs(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(
        ["-m", "attention=mha,gqa,mqa", *QUICK, f"paths.outputs_root={tmp_path}"], cache_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    exports = sorted(tmp_path.glob("pretrain/*/*/export/config.json"))
    assert len(exports) == 3
    kv = sorted(json.loads(p.read_text())["num_key_value_heads"] for p in exports)
    assert kv == [1, 2, 8]
