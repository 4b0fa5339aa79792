"""The one training entry point: `python src/train.py [group=option ...] [key=value ...]`.

Composes the Hydra config (configs/train.yaml) and hands it to `llamalab.runner.run.train`. Errors in
the config, the data, the inputs or the memory plan stop the run with one clear message (set
HYDRA_FULL_ERROR=1 for the traceback).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llamalab.runner.cli import run_cli
from llamalab.runner.paths import check_launch, register_resolvers
from llamalab.runner.run import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    # Returned for hparams_search: the Optuna sweeper minimises this value.
    value = metrics.get("val/loss") if isinstance(metrics, dict) else None
    return float(value) if value is not None else None


if __name__ == "__main__":
    run_cli(check_launch, sys.argv[1:])  # every rank of a launch must share one run directory
    main()
