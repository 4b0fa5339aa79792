"""`python src/eval.py`: the default suite end to end, and bad input stopping with one message."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_train
from helpers.rlhf import tiny_config

from llamalab.checkpoint import save_hf
from llamalab.evaluation.builtin_tasks import ANSWER_TASK, MC_TASK
from llamalab.model import Llama
from llamalab.runner.tracking import read_offline_run

pytestmark = pytest.mark.integration
EVAL = REPO / "src" / "eval.py"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, small_tok) -> Path:
    torch.manual_seed(0)
    model = Llama(tiny_config(small_tok.vocab_size))
    model.init_weights()
    return save_hf(model, small_tok, tmp_path_factory.mktemp("eval") / "sft", chat=True)


def test_default_suite_writes_results_plots_and_wandb(chat_model, tmp_path, cache_dir):
    out = tmp_path / "eval"
    args = [f"ckpt={chat_model}", "eval.limit=6", f"paths.output_dir={out}"]
    result = run_train(args, cache_dir, script=EVAL, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "benchmarks" and results["chat_format"] is True
    mc, answer = results["results"][MC_TASK], results["results"][ANSWER_TASK]
    assert 0.0 <= mc["acc,none"] <= 1.0 and mc["sample_len"] == 6
    assert {"helpful,none", "f1,none", "exact_match,none"} <= set(answer)
    assert (out / "benchmarks.png").stat().st_size > 1000
    run = read_offline_run(out)
    assert run.summary[f"results/{MC_TASK}/acc,none"] == mc["acc,none"]
    assert run.summary["table/benchmarks/nrows"] == 7  # 2 tasks: acc, acc_norm; 3 judge metrics
    assert any(key.startswith("plot/benchmarks") for key in run.summary)


def test_hub_benchmarks_offline_stop_at_once(chat_model, tmp_path, cache_dir):
    started = time.monotonic()
    env = {"HF_ENDPOINT": "https://127.0.0.1:9", "HF_DATASETS_OFFLINE": "0"}  # no hub here
    args = [f"ckpt={chat_model}", "eval=llama2_benchmarks", f"paths.output_dir={tmp_path / 'x'}"]
    result = run_train(args, cache_dir, script=EVAL, timeout=120, env=env)
    assert result.returncode == 1
    assert "error: tasks humaneval, piqa, social_iqa" in result.stderr
    assert "cannot be reached" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "x" / "results.json").exists()


def test_ckpt_that_is_not_a_model_stops(tmp_path, cache_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"hello": 1}')
    args = [f"ckpt={tmp_path / 'notes'}", f"paths.output_dir={tmp_path / 'x'}"]
    result = run_train(args, cache_dir, script=EVAL, timeout=300)
    assert result.returncode == 1
    assert f"ckpt={tmp_path / 'notes'} is not a model" in result.stderr
    assert "Traceback" not in result.stderr
