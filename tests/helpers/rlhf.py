"""Shared by the PPO / rejection-sampling tests: tiny checkpoints made in a few milliseconds.

- a policy: a random tiny ``Llama`` saved with ``save_hf`` (actor, reference);
- a reward model whose score is known by construction: it rises with the share of "good" token
  ids in the sequence (attention with zero queries and keys averages the embeddings; the value
  path copies a "good" feature into the dimension the score head reads). PPO must learn to emit
  good tokens, so "reward rises" is a real test of the loop and not of a trained RM's luck.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from llamalab.checkpoint import save_hf
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.stages.ppo import PPOStage
from llamalab.tokenizer import Tokenizer


def tiny_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        dim=32, n_layers=1, n_heads=2, vocab_size=vocab_size, multiple_of=16, max_seq_len=256
    )


def make_policy(path: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Llama(tiny_config(tokenizer.vocab_size))
    model.init_weights()
    save_hf(model, tokenizer, path)
    return path


def good_token_ids(vocab_size: int) -> list[int]:
    """Every 8th id from 3 on (never unk/bos/eos): about 12% of the vocabulary."""
    return list(range(3, vocab_size, 8))


@torch.no_grad()
def make_reward_model(path: Path, tokenizer: Tokenizer, scale: float = 2.0) -> Path:
    """A reward model scoring the share of good tokens (module docstring)."""
    config = tiny_config(tokenizer.vocab_size)
    model = LlamaScalar(config)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.tok_embeddings.weight.mul_(0.01)
    model.tok_embeddings.weight[:, 0] = 0.0
    model.tok_embeddings.weight[good_token_ids(config.vocab_size), 0] = 1.0
    model.tok_embeddings.weight[:, 2] = 1.0  # a constant feature keeps RMSNorm's scale steady
    attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
    attention.wq.weight.zero_()
    attention.wk.weight.zero_()  # uniform attention over the real tokens seen so far
    attention.wv.weight.zero_()
    attention.wv.weight[0, 0] = 1.0  # head 0, channel 0 <- the "good" feature
    attention.wo.weight.zero_()
    attention.wo.weight[1, 0] = 1.0  # -> residual dimension 1 = share of good tokens
    ffn.w2.weight.zero_()
    model.score.weight.zero_()
    model.score.weight[0, 1] = scale
    save_hf(model, tokenizer, path)
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Rows of the run's CSV log (``<run>/csv/metrics.csv``), empty cells dropped."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def series(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def checkpoint_paths(tiny_checkpoints: dict) -> dict[str, Path]:
    """The conftest ``tiny_checkpoints`` as paths: ``tokenizer`` (its .model), ``sft``, ``rm``."""
    return {
        "tokenizer": Path(tiny_checkpoints["tokenizer"].model_path),
        "sft": tiny_checkpoints["sft"],
        "rm": tiny_checkpoints["rm"],
    }


def make_ppo_stage(world: dict[str, Path], **kwargs: object) -> PPOStage:
    """A PPO stage on the tiny checkpoints (actor/reference from ``sft``, critic and both RMs
    from ``rm``), its models built."""
    stage = PPOStage(
        arch=tiny_config(Tokenizer(world["tokenizer"]).vocab_size).to_dict(),
        optim={"lr": 1e-3, "weight_decay": 0.1},
        init=str(world["sft"]),
        critic_init=str(world["rm"]),
        reward_helpful=str(world["rm"]),
        reward_safety=str(world["rm"]),
        tokenizer_path=str(world["tokenizer"]),
        **kwargs,
    )
    stage.configure_model()
    return stage
