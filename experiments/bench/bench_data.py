"""Data pipeline vs training step: tokens/s the real DataLoaders deliver, next to the step's.

The data must never be the bottleneck: for each size (``tiny``, ``small``) and each data path,
batches are drawn from the same DataLoader a training run uses, built the way
``llamalab.runner.run.train`` builds it: the real config composed by Hydra (``train.yaml`` with
``stage=pretrain|sft model=<size>``, so ``configs/data/<stage>.yaml`` and
``stage_size/<stage>_<size>.yaml`` give the batch size, sequence length and ``num_workers``),
``hydra.utils.instantiate(cfg.data, tokenizer_path=...)``, then ``prepare_data`` / ``setup`` /
``train_dataloader``. Paths:

- ``pretrain``: ``PretrainDataModule``: the built-in corpus prepared into litdata shards (reused
  from ``$LLAMALAB_CACHE`` / ``paths.cache_dir``; prepared there if missing), ``seq_len`` windows
  read through ``litdata.StreamingDataset``, the resumable mixture sampler, default collate;
- ``pretrain mix``: the same shards named twice in ``data.sources`` with weights 3 and 1 (the
  weighted mixture's path);
- ``sft``: ``SFTDataModule`` with the built-in dialogs and the built-in tokenizer (what the SFT
  stage gets from the pretraining export): chat-format encoding with the prompt masked out of the
  labels, packing (``setup``, once per run), then the loader stacking packed rows;
- ``sft padded``: the same with ``data.packing=false``: the collate right-pads each batch.

``data tok/s`` = ``input_ids`` positions delivered per second while iterating ``--batches``
batches (median of 3 passes, each starting a fresh iterator as an epoch does). ``step tok/s`` =
one optimisation step of our ``Llama`` on a batch of that loader (forward through the stage's own
``forward_batch``, so packed rows get their segment/position ids, ``lm_loss``, backward, AdamW
with the stage's parameter groups), median of ``--repeats`` after one warm-up, in the same process.
``data/step`` must be >> 1. The one-off costs (corpus collection, tokenizer, ``src/prepare.py``'s
tokenization of a ``--corpus-mb`` corpus into fresh shards at 1 and 2 workers, SFT encoding) are
printed separately: they are paid once per run (or once ever,
for the cached ones), not per step.

    python experiments/bench/bench_data.py --quick          # tiny, 10 batches, 1 step repeat
    python experiments/bench/bench_data.py                  # tiny,small, 50 batches
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from common import DTYPES, alternate, machine_line, setup

from llamalab.data.corpus import builtin_corpus, builtin_tokenizer_path
from llamalab.data.prepare import PrepareSettings, prepare_corpus
from llamalab.data.tokens import file_sha256
from llamalab.model import Llama
from llamalab.optim import build_adamw, param_groups
from llamalab.rlhf.losses import lm_loss

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose(overrides: list[str]) -> Any:
    """The composed ``train`` config, as ``src/train.py`` sees it (without the hydra node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llamalab.runner.paths import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def build(cfg: Any, tokenizer_path: str | None) -> tuple[Any, Any]:
    """(datamodule, stage module) as ``llamalab.runner.run.train`` instantiates them; the stage's model
    is our ``Llama`` of the composed architecture, random init (no ``init`` checkpoint)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from llamalab.runner.run import architecture

    datamodule = instantiate(cfg.data, tokenizer_path=tokenizer_path, _convert_="all")
    values = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(values, dict)
    values = {str(k): v for k, v in values.items() if k not in ("_target_", "init")}
    arch = architecture(cfg)
    stage = instantiate(
        {"_target_": cfg.stage._target_},
        arch=arch.to_dict(),
        tokenizer_path=tokenizer_path,
        compile=False,
        **values,
        _convert_="all",
    )
    stage.model = Llama.from_config(arch)
    return datamodule, stage


def batches(loader: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, epoch after epoch (a fresh iterator per epoch, as Lightning does)."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_speed(loader: Any, n: int, passes: int = 3) -> tuple[float, float]:
    """(batches/s, input_ids positions/s) over ``n`` batches, median of ``passes`` passes."""
    rates = []
    for _ in range(passes):
        stream, tokens = batches(loader), 0
        start = time.perf_counter()
        for _, batch in zip(range(n), stream):
            tokens += batch["input_ids"].numel()
        elapsed = time.perf_counter() - start
        rates.append((n / elapsed, tokens / elapsed))
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def train_step(stage: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One optimisation step as the LM stages take it (``training_step`` minus logging; the
    stage's AdamW groups; the LR schedule does not change the cost)."""
    model, o = stage.model, stage.optim_cfg
    model.train()
    optimizer = build_adamw(
        param_groups(model.named_parameters(), o["weight_decay"]),
        lr=o["lr"],
        betas=tuple(o.get("betas", (0.9, 0.95))),
        eps=o.get("eps", 1e-5),
        fused=o.get("fused"),
    )

    def step() -> None:
        loss = lm_loss(stage.forward_batch(batch), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_path(
    args: argparse.Namespace, size: str, path: str, cfg: Any, tokenizer_path: str | None
) -> dict[str, Any]:
    device = torch.device(args.device)
    datamodule, stage = build(cfg, tokenizer_path)
    start = time.perf_counter()
    if hasattr(datamodule, "prepare_data"):
        datamodule.prepare_data()
    datamodule.setup("fit")
    setup_s = time.perf_counter() - start
    loader = datamodule.train_dataloader()
    per_s, tok_s = loader_speed(loader, args.batches)
    batch = {k: v.to(device) for k, v in next(iter(loader)).items()}
    stage.model.to(device=device, dtype=DTYPES[args.dtype])
    seconds = alternate({"step": train_step(stage, batch)}, device, 1, args.repeats)["step"]
    step_tok_s = batch["input_ids"].numel() / seconds
    row = {
        "size": size,
        "path": path,
        "shape": "x".join(str(d) for d in batch["input_ids"].shape),
        "workers": datamodule.num_workers,
        "setup_s": setup_s,
        "batches_s": per_s,
        "data_tok_s": tok_s,
        "step_tok_s": step_tok_s,
        "ratio": tok_s / step_tok_s,
    }
    stats = getattr(datamodule, "stats", {})
    if stats:  # SFT: tokens encoded during setup
        row["encoded_tokens"] = sum(s.tokens for s in stats.values())
    return row


def write_corpus(root: Path, documents: list[str], megabytes: int) -> None:
    """About ``megabytes`` of JSON lines in 4 files (so 2 workers share them): the built-in
    documents again and again, each copy numbered (no two documents are equal)."""
    import json

    root.mkdir(parents=True)
    target, written, copy = megabytes * 2**20, 0, 0
    handles = [(root / f"part{i}.jsonl").open("w") for i in range(4)]
    while written < target:
        for i, doc in enumerate(documents):
            line = json.dumps({"text": f"copy {copy}: {doc}"}) + "\n"
            handles[i % 4].write(line)
            written += len(line)
        copy += 1
    for handle in handles:
        handle.close()


def one_offs(
    cache_dir: str, vocab_size: int, corpus_mb: int
) -> tuple[list[tuple[str, float, int]], str]:
    """(what, seconds, tokens) of the one-off costs, and the built-in tokenizer's path."""
    from llamalab.data.corpus import load_builtin_tokenizer

    rows = []
    start = time.perf_counter()
    documents = builtin_corpus()  # collected in a clean subprocess, then cached in-process
    seconds = time.perf_counter() - start
    rows.append((f"collect the built-in corpus ({len(documents)} documents)", seconds, 0))
    tok_file = builtin_tokenizer_path(vocab_size, cache_dir)
    cached = tok_file.is_file()
    start = time.perf_counter()
    tokenizer = load_builtin_tokenizer(vocab_size, cache_dir)
    what = "load the cached" if cached else "train the"
    rows.append(
        (f"{what} built-in tokenizer ({vocab_size} pieces)", time.perf_counter() - start, 0)
    )
    with tempfile.TemporaryDirectory() as tmp:  # fresh output directories: really tokenises
        source = Path(tmp) / "corpus"
        write_corpus(source, documents, corpus_mb)
        settings = PrepareSettings(str(source), file_sha256(tokenizer.model_path), 0.01)
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = prepare_corpus(
                settings, Path(tmp) / f"out{workers}", tokenizer, workers, verbose=False
            )
            seconds = time.perf_counter() - start
            assert manifest is not None
            tokens = manifest["totals"]["train"]["tokens"] + manifest["totals"]["val"]["tokens"]
            rows.append(
                (f"prepare.py: {corpus_mb} MB into shards, {workers} worker(s)", seconds, tokens)
            )
    return rows, str(tok_file)


def print_row(r: dict[str, Any]) -> None:
    cells = [r["size"], r["path"], r["shape"], str(r["workers"]), f"{r['setup_s']:.2f}"]
    cells += [f"{r['batches_s']:.0f}", f"{r['data_tok_s']:.0f}", f"{r['step_tok_s']:.0f}"]
    cells.append(f"{r['ratio']:.0f}x")
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument("--batches", type=int, default=50, help="batches drawn per pass")
    parser.add_argument("--repeats", type=int, default=3, help="training steps timed")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("LLAMALAB_CACHE"),
        help="tokenizer and token caches (default: $LLAMALAB_CACHE, else the config's "
        "paths.cache_dir)",
    )
    parser.add_argument("--corpus-mb", type=int, default=32, help="corpus prepare.py tokenizes")
    parser.add_argument("--quick", action="store_true", help="tiny, 10 batches, 1 step repeat")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batches, args.repeats, args.corpus_mb = "tiny", 10, 1, 4
    setup(args.threads)
    device = torch.device(args.device)
    print(machine_line(device))
    common = [f"paths.cache_dir={args.cache_dir}"] if args.cache_dir else []
    sizes = args.sizes.split(",")
    base = compose(["stage=pretrain", f"model={sizes[0]}", *common])
    cache_dir = str(base.paths.cache_dir)
    offs, tokenizer_path = one_offs(cache_dir, int(base.data.vocab_size), args.corpus_mb)
    print(f"cache {cache_dir}; dtype {args.dtype}; {args.batches} batches per pass\n")
    print("| one-off cost | s | tokens | tok/s |")
    print("|---|---|---|---|")
    for what, seconds, tokens in offs:
        rate = f"{tokens / seconds:.0f}" if tokens else ""
        print(f"| {what} | {seconds:.2f} | {tokens or ''} | {rate} |", flush=True)
    print()
    head = ["size", "path", "batch", "workers", "setup s", "batches/s", "data tok/s"]
    head += ["step tok/s", "data/step"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head), flush=True)
    paths = {
        "pretrain": ["stage=pretrain"],
        "sft": ["stage=sft", f"data.tokenizer_path={tokenizer_path}"],
        "sft padded": ["stage=sft", f"data.tokenizer_path={tokenizer_path}", "data.packing=false"],
    }
    rows = []
    for size in sizes:
        for path, overrides in paths.items():
            if path == "sft":  # the built-in shards exist now: mix them with themselves
                prepared = max(Path(cache_dir, "data").glob("builtin-*"), key=os.path.getmtime)
                mix = f"[{{path: {prepared}, weight: 3}}, {{path: {prepared}, weight: 1}}]"
                cfg = compose(["stage=pretrain", f"model={size}", f"data.sources={mix}", *common])
                r = measure_path(args, size, "pretrain mix", cfg, None)
                rows.append(r)
                print_row(r)
            cfg = compose([*overrides, f"model={size}", *common])
            tok = None if path == "pretrain" else tokenizer_path  # pretrain: the built-in one
            r = measure_path(args, size, path, cfg, tok)
            rows.append(r)
            print_row(r)
    print(
        "\nsetup s = prepare_data + setup, once per run (pretrain: the corpus collection above "
        "is cached in-process, so not counted again); batch = rows x positions of the first batch"
    )
    sft = [r for r in rows if "encoded_tokens" in r]
    if sft:
        r = sft[0]
        print(
            f"SFT setup ({r['size']}, {r['path']}): {r['encoded_tokens']} dialog tokens encoded "
            f"(chat format + prompt mask) and packed/split in {r['setup_s']:.2f} s "
            f"= {r['encoded_tokens'] / r['setup_s']:.0f} tok/s, once per run"
        )
    worst = min(rows, key=lambda r: r["ratio"])
    print(
        f"slowest margin: {worst['size']} {worst['path']}, data {worst['ratio']:.0f}x faster "
        "than the training step",
        flush=True,
    )


if __name__ == "__main__":
    main()
