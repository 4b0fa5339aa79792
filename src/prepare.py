"""Prepare a pretraining corpus once: `python src/prepare.py data.path=SRC data.name=NAME
[data.workers=N]`.

Reads SRC streaming, optionally cleans and deduplicates it (datatrove), tokenizes it with N
processes into litdata shards under `outputs/data/NAME` (or `paths.output_dir`), and writes a
manifest there. Rerun the same command to resume an interrupted preparation. Training mixes
prepared directories with `python src/train.py data.sources='[{path: DIR, weight: W}, ...]'`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from llamalab.data.prepare_cli import prepare_from_config
from llamalab.runner.cli import run_cli


@hydra.main(version_base="1.3", config_path="../configs", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_cli(prepare_from_config, cfg)


if __name__ == "__main__":
    main()
