"""What `src/prepare.py` does with its composed config (configs/prepare.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llamalab.data.corpus import load_builtin_tokenizer
from llamalab.data.errors import DataError
from llamalab.data.prepare import PrepareSettings, prepare_corpus
from llamalab.data.tokens import file_sha256
from llamalab.tokenizer import Tokenizer

log = logging.getLogger("llamalab")


def output_path(cfg: DictConfig) -> Path:
    """``paths.output_dir`` if set, else ``<paths.outputs_root>/data/<data.name>``."""
    if cfg.paths.get("output_dir"):
        return Path(str(cfg.paths.output_dir))
    return Path(str(cfg.paths.outputs_root)) / "data" / str(cfg.data.name)


def clean_settings(clean: Any) -> dict[str, Any] | None:
    """The enabled cleaning steps (None when every one is off)."""
    values = OmegaConf.to_container(clean, resolve=True) if clean is not None else {}
    assert isinstance(values, dict)
    enabled = any(
        values.get(k) for k in ("exact_dedup", "minhash", "min_words", "max_words", "repetition")
    ) or bool(values.get("language"))
    return {str(k): v for k, v in values.items()} if enabled else None


def prepare_from_config(cfg: DictConfig) -> dict[str, Any] | None:
    data = cfg.data
    if data.workers < 1:
        raise DataError(f"must be at least 1, got {data.workers}", field="data.workers")
    if data.node_rank is not None and not 0 <= data.node_rank < data.num_nodes:
        raise DataError(
            f"must be in [0, data.num_nodes={data.num_nodes}), got {data.node_rank}",
            field="data.node_rank",
        )
    if data.tokenizer_path:
        if not Path(data.tokenizer_path).is_file():
            raise DataError(
                "no such file", path=str(data.tokenizer_path), field="data.tokenizer_path"
            )
        tokenizer = Tokenizer(data.tokenizer_path)
    else:
        tokenizer = load_builtin_tokenizer(int(data.vocab_size), cfg.paths.cache_dir)
    clean = clean_settings(data.get("clean"))
    if clean and data.num_nodes > 1:
        raise DataError(
            "cleaning runs on one machine: prepare with data.clean on one node (or clean with "
            "datatrove's SlurmPipelineExecutor first), then split the tokenization over nodes",
            field="data.num_nodes",
        )
    settings = PrepareSettings(
        source=str(data.path),
        tokenizer_sha256=file_sha256(tokenizer.model_path),
        val_fraction=float(data.val_fraction),
        chunk_tokens=int(data.chunk_tokens),
        part_bytes=int(data.part_bytes),
        clean=clean,
    )
    out = output_path(cfg)
    manifest = prepare_corpus(
        settings,
        out,
        tokenizer,
        workers=int(data.workers),
        num_nodes=int(data.num_nodes),
        node_rank=None if data.node_rank is None else int(data.node_rank),
        check=bool(data.check),
    )
    if manifest is not None:
        totals = manifest["totals"]
        print(
            f"prepared {out}: {totals['train']['tokens']} training tokens "
            f"({totals['train']['documents']} documents), {totals['val']['tokens']} validation "
            f"tokens; removed by cleaning: {manifest['filters'] or 'nothing'}"
        )
    return manifest
