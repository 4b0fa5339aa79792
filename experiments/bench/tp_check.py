"""The tensor-parallel rollout engine on one device: its TP-1 path equals plain generation.

On a single GPU the engine's whole path still runs: the copy built unit by unit
(:func:`llamalab.scale.tensor_parallel.build_tp_copy`, here from a plain model), the local
config the KV cache is allocated from, the wrapped row-parallel layers and head, the prompt
exchange and the seeds. Greedy tokens and log-probs must equal ``generate`` on the model itself
(the same weights and the same kernels: bit-identical), and temperature sampling with one seed
must draw the same tokens. Prints the copy's bytes against the plan's formula and tokens/s.

    python experiments/bench/tp_check.py                       # model=small, bf16, on CUDA
    python experiments/bench/tp_check.py --device cpu --dtype float32 --size tiny
"""

from __future__ import annotations

import argparse
import time

import torch

from llamalab.generation import generate
from llamalab.model import Llama, LlamaConfig
from llamalab.scale.plan_gen import tp_copy_bytes
from llamalab.scale.rollout_engine import RolloutEngine
from llamalab.scale.tensor_parallel import resident_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="small")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = Llama.from_config(LlamaConfig.from_name(args.size)).to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
        for n in torch.randint(4, 32, (args.batch,), generator=g).tolist()
    ]  # ragged: left-padded
    common = dict(max_new_tokens=args.new_tokens, top_p=None, eos_id=2, pad_id=0, chunk_size=64)
    ok = True
    for temperature in (0.0, 1.0):
        ref = generate(model, prompts, args.new_tokens, temperature=temperature, top_p=None,
                       eos_id=2, seed=7)  # fmt: skip
        engine = RolloutEngine("tensor_parallel", tp_size=1)
        t0 = time.perf_counter()
        out = engine.sample(model, None, prompts, seed_of=lambda r: 7, version=0, keep=True,
                            temperature=temperature, **common)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        same = out.tokens == ref.tokens
        diff = max(
            (abs(a - b) for x, y in zip(out.logprobs, ref.logprobs) for a, b in zip(x, y)),
            default=0.0,
        )
        assert engine.copy is not None
        copy = resident_bytes(engine.copy)
        plan = tp_copy_bytes(model.config, 1, torch.finfo(dtype).bits // 8)
        ok &= same and copy == plan
        new = sum(len(t) for t in out.tokens)
        print(f"TP-1 engine, temperature {temperature}: tokens equal {same}, max log-prob diff "
              f"{diff:.2e}, copy {copy:,} bytes (plan {plan:,}), {new / seconds:.1f} new tokens/s "
              f"(copy built inside the timing)")  # fmt: skip
    print("TP CHECK", "PASSED" if ok else "FAILED")


if __name__ == "__main__":
    main()
