"""PPO rollout engines under ZeRO-3: ``gather``, ``layerwise`` and ``tensor_parallel``.

``--world`` processes (gloo on CPU, NCCL on GPUs) hold a ZeRO-3-partitioned ``Llama`` of a named
size (built inside ``deepspeed.zero.Init`` and wrapped by ``deepspeed.initialize``, as Lightning's
DeepSpeedStrategy does). Each rank brings its own prompts and samples greedily (EOS disabled)
through :class:`llamalab.scale.rollout_engine.RolloutEngine`, the object PPO uses, with each
engine in turn; every timed rollout is a fresh one (the weights' version changes), so the
gathered copy and the TP copy are rebuilt inside the timing, as after each PPO optimizer step.

Prints, per size and engine: new tokens/s of all ranks together, seconds per decode step, and
the bytes each GPU receives per decode step (:func:`llamalab.scale.plan_gen.engine_cost`, the
plan's model: ``layerwise`` every other rank's shard of the weights, ``tensor_parallel`` two
all-reduces of the hidden states per block and one all-gather of the logits, ``gather`` none
after the one gather per rollout), and whether the tokens equal ``gather``'s.

    python experiments/bench/bench_rollout.py                          # small,base on 2 ranks
    python experiments/bench/bench_rollout.py --sizes small --new-tokens 8 --repeats 1
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
ENGINES = ("gather", "layerwise", "tensor_parallel")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="small,base")
    p.add_argument("--batch", type=int, default=4, help="prompts per rank")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed rollouts per engine (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rollouts per engine first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--port", type=int, default=29531)
    return p.parse_args()


class DeepSpeedShim:
    """What the engine reads from Lightning's DeepSpeedStrategy: ZeRO stage 3 and its engine."""

    zero_stage_3 = True

    def __init__(self, engine: object) -> None:
        self.deepspeed_engine = engine


def worker(rank: int, args: argparse.Namespace) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world),
                      LOCAL_WORLD_SIZE=str(args.world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(args.port))  # fmt: skip
    torch.set_num_threads(args.threads)
    import deepspeed

    from llamalab.model import Llama, LlamaConfig
    from llamalab.scale.build import init_weights
    from llamalab.scale.plan_gen import engine_cost
    from llamalab.scale.rollout_engine import RolloutEngine

    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    rows = []
    for size in args.sizes.split(","):
        config = LlamaConfig.from_name(size)
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG):
            model = Llama(config)
        torch.manual_seed(0)
        init_weights(model, "zero3")
        ds, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, model_parameters=[])
        strategy, model = DeepSpeedShim(ds), ds.module.eval()
        g = torch.Generator().manual_seed(rank)
        prompts = torch.randint(3, config.vocab_size, (args.batch, args.prompt_len), generator=g)
        version = 0
        outputs = {}
        for name in ENGINES:
            engine = RolloutEngine(name, tp_size=args.world)
            times = []
            for _ in range(args.warmup + args.repeats):
                version += 1
                torch.distributed.barrier()
                t0 = time.perf_counter()
                out = engine.sample(
                    model, strategy, prompts.tolist(), seed_of=lambda r: r, version=version,
                    devices_per_node=args.world, max_new_tokens=args.new_tokens,
                    temperature=0.0, top_p=None, eos_id=-1, pad_id=0, chunk_size=64,
                )  # fmt: skip
                torch.distributed.barrier()
                times.append(time.perf_counter() - t0)
            outputs[name] = out.tokens
            timed = sorted(times[args.warmup :])
            median = timed[len(timed) // 2]
            cost = engine_cost(name, config, 4, args.world, args.world, 1, args.batch,
                               64, args.prompt_len + args.new_tokens)  # fmt: skip
            tokens = args.world * args.batch * args.new_tokens
            rows.append((size, name, tokens / median, median / args.new_tokens,
                         cost.network_bytes_per_token, outputs[name] == outputs["gather"]))  # fmt: skip
        del ds, model
    if rank == 0:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"{args.world} ranks ({dev}), {args.batch} prompts/rank, prompt {args.prompt_len}, "
              f"{args.new_tokens} new tokens, float32, greedy; median of {args.repeats}")  # fmt: skip
        print("| size | engine | tokens/s | s per decode step | bytes received per GPU per "
              "step | ratio to gather | tokens = gather's |")  # fmt: skip
        print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
        base = {r[0]: r[2] for r in rows if r[1] == "gather"}
        for size, name, tps, step, net, same in rows:
            print(f"| {size} | {name} | {tps:.1f} | {step:.3f} | {net:,} | "
                  f"{tps / base[size]:.2f} | {'yes' if same else 'no'} |")  # fmt: skip
    torch.distributed.destroy_process_group()


def main() -> None:
    args = parse()
    mp.spawn(worker, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
