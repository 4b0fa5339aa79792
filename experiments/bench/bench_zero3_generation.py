"""Generation under ZeRO-3: the actor gathered once per rollout vs gathered per layer per token.

Two processes (gloo on CPU, NCCL on GPUs) hold a ZeRO-3-partitioned ``Llama`` (built inside
``deepspeed.zero.Init`` and wrapped by ``deepspeed.initialize``, which installs the per-module
gather hooks, as Lightning's DeepSpeedStrategy does). Each rank samples the same number of new
tokens (EOS disabled) for its prompts, both ways:

- ``per-layer``: the partitioned model itself (:class:`llamalab.scale.zero_gen.LockstepModel`):
  every module's forward all-gathers its weights and frees them, for every generated token;
- ``gathered``: :func:`llamalab.scale.zero_gen.consolidated` gathers a plain copy once (timed
  with the generation), generation then runs without communication.

Prints tokens/s of new tokens (all ranks together) and the speed-up; the outputs are checked
identical (same weights, same seed, greedy).

    python experiments/bench/bench_zero3_generation.py                  # dim 512, 8 layers
    python experiments/bench/bench_zero3_generation.py --dim 256 --layers 4 --new-tokens 16
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.multiprocessing as mp

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_allow_untested_optimizer": True,
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="prompts per rank")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--port", type=int, default=29517)
    return p.parse_args()


def build_engine(args: argparse.Namespace) -> torch.nn.Module:
    """A partitioned, initialised Llama with DeepSpeed's ZeRO-3 hooks installed."""
    import deepspeed

    from llamalab.model import Llama, LlamaConfig
    from llamalab.scale.build import init_weights

    config = LlamaConfig(
        dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, vocab_size=args.vocab,
        multiple_of=64, max_seq_len=args.prompt_len + args.new_tokens,
    )  # fmt: skip
    with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
        model = Llama(config)
    torch.manual_seed(0)
    init_weights(model, "zero3")
    engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, model_parameters=[])
    return engine.module


def timed(fn):  # type: ignore[no-untyped-def]
    torch.distributed.barrier()
    t0 = time.perf_counter()
    out = fn()
    torch.distributed.barrier()
    return out, time.perf_counter() - t0


def worker(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world),
                      LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(args.port))  # fmt: skip
    torch.set_num_threads(args.threads)
    import deepspeed

    from llamalab.generation import generate
    from llamalab.scale.zero_gen import LockstepModel, consolidated

    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    model = build_engine(args).eval()
    g = torch.Generator().manual_seed(rank)
    prompts = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()

    def sample(m: torch.nn.Module) -> list[list[int]]:
        with torch.no_grad():
            return generate(m, prompts, args.new_tokens, temperature=0.0, eos_id=None).tokens

    def per_layer() -> list[list[int]]:
        lockstep = LockstepModel(model)
        try:
            return sample(lockstep)
        finally:
            lockstep.finish()

    def gathered() -> list[list[int]]:
        with consolidated(model, "zero3") as copy:
            return sample(copy)  # type: ignore[arg-type]

    gathered()  # warm-up (allocator, first gathers)
    slow, t_slow = timed(per_layer)
    fast, t_fast = timed(gathered)
    assert slow == fast, "the two ways must sample the same tokens"
    if rank == 0:
        tokens = args.world * args.batch * args.new_tokens
        n = sum(p.ds_numel for p in model.parameters())
        print(f"model {n / 1e6:.1f}M params, {args.world} ranks, {args.batch} prompts/rank, "
              f"{args.new_tokens} new tokens, device {'cuda' if torch.cuda.is_available() else 'cpu'}")  # fmt: skip
        print(f"per-layer gathering : {tokens / t_slow:9.1f} tokens/s ({t_slow:.2f} s)")
        print(f"gathered once       : {tokens / t_fast:9.1f} tokens/s ({t_fast:.2f} s)")
        print(f"speed-up            : {t_slow / t_fast:.1f}x")
    torch.distributed.destroy_process_group()


def main() -> None:
    args = parse()
    mp.spawn(worker, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
