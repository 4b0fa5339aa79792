"""Done-when of the data pipeline: `src/prepare.py` twice, then `src/train.py data.sources=...`
pretrains on the weighted mixture of both, logs the drawn shares, and resumes bit-identically
after SIGTERM; bad sources stop with one message before any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, run_train
from test_resume import PRETRAIN, assert_identical, straight_and_resumed

from llamalab.tokenizer import Tokenizer

PREPARE = REPO / "src" / "prepare.py"
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _corpus(root: Path, prefix: str, n: int) -> Path:
    root.mkdir(parents=True)
    rows = [
        json.dumps({"text": f"{prefix} {i}: " + " ".join(f"w{(i * j) % 89}" for j in range(60))})
        for i in range(n)
    ]
    (root / "docs.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_prepare_two_sources_and_pretrain_on_their_mixture_with_exact_resume(
    tmp_path: Path, cache_dir: Path, small_tok: Tokenizer
) -> None:
    outs = tmp_path / "outputs"
    for name, n in (("web", 160), ("code", 60)):
        result = run_train(
            [
                f"data.path={_corpus(tmp_path / f'{name}_src', name, n)}",
                f"data.name={name}",
                "data.workers=2",
                f"data.tokenizer_path={small_tok.model_path}",
                f"paths.outputs_root={outs}",
            ],
            cache_dir,
            script=PREPARE,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert (outs / "data" / name / "manifest.json").is_file()
    mixture = f"data.sources=[{{path: {outs}/data/web, weight: 3}}, {{path: {outs}/data/code, weight: 1}}]"  # fmt: skip
    overrides = [*PRETRAIN, mixture, "model.vocab_size=512"]
    straight, resumed = straight_and_resumed(tmp_path, cache_dir, overrides, stop_at=2)
    assert_identical(straight, resumed)
    header = (tmp_path / "straight" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "data/share/web" in header and "data/share/code" in header  # the drawn shares, logged

    bad = [*overrides, "data.sources=[{path: nowhere, weight: -1}]", f"paths.output_dir={tmp_path / 'bad'}"]  # fmt: skip
    result = run_train(bad, cache_dir)
    assert result.returncode == 1
    assert "data.sources[0].weight': must be positive" in result.stderr
