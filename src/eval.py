"""The evaluation entry point: `python src/eval.py [ckpt=PATH] [eval=SUITE] [eval.key=value ...]`.

Composes configs/eval.yaml with a suite from configs/eval/ (default `builtin`: offline lm-eval tasks
from the built-in data) and hands it to `llamalab.evaluation.runner.evaluate`, which writes
results.json, PNG plots and a W&B run to `outputs/eval/<timestamp>/` (or `paths.output_dir`).
Bad input (an unknown task or suite, a ckpt that is not a model, a judge that is not a reward
model) stops with one message before any model runs (HYDRA_FULL_ERROR=1 for the traceback).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llamalab.evaluation.runner import evaluate
from llamalab.runner.cli import run_cli
from llamalab.runner.paths import register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
