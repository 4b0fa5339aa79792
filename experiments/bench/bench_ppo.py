"""One PPO iteration broken down by phase: generate, score, experience, train (our PPO stage).

The five models of the PPO stage are built from random init at a named size (actor ``Llama``,
frozen reference ``Llama`` = a copy of the actor, critic ``LlamaScalar``, frozen helpfulness and
safety reward models ``LlamaScalar``) and the stage's settings are composed from the real config
(``configs/stage/ppo.yaml`` + ``stage_size/ppo_<size>.yaml``) with the command line's
``--rollout-batch``, ``--mini-batch``, ``--max-new-tokens`` and ``--ppo-epochs`` as overrides.
The phases are the stage's own methods, called in the order ``PPOStage.training_step`` calls
them; only the Lightning plumbing they reach for (``optimizers()``, ``manual_backward``,
``clip_gradients``, ``log``) is supplied by :class:`BenchPPOStage` instead of a ``Trainer``:

1. ``generate``: ``generate_rollout`` = ``sample_responses`` in chunks of ``generation_batch``
   (temperature 1, top-p off, EOS disabled so every response has ``--max-new-tokens`` tokens)
   + ``build_rollout``;
2. ``score``: ``score`` = ``score_rollout`` with the two reward models;
3. ``experience``: ``experience`` = actor (old log-probs), reference and critic forwards
   (``in_chunks`` of ``mini_batch`` rows), the KL-shaped rewards, GAE and whitening;
4. ``train``: ``ppo_update`` = ``ppo_epochs`` passes over shuffled mini-batches, the real
   ``ppo_loss`` (clipped policy + value loss), backward through actor and critic, gradient
   clipping and one step of the stage's AdamW (two parameter groups per model) per mini-batch.

Prompts are random tokens of random lengths (``--prompt-len``, default 16-48; left padded by the
library). Each figure is the median over ``--repeats`` iterations after one warm-up iteration.
FLOPs come from ``llamalab.perf.ppo_flops_per_token`` per token of experience (prompt + response
tokens, attention over the mean sequence length): ``generate``, ``reward``, ``policy_rollout``
(the actor's old log-probs, recomputed by ``experience``) + ``reference`` +
``value_rollout``, and ``policy_train`` +
``value_train`` (``ppo_epochs`` passes). MFU is against a peak measured in the same run
(``measure_peak_flops``: a timed GEMM on CPU, the datasheet on a known GPU).

Same-process reference (what a user would otherwise reach for): Hugging Face
``LlamaForCausalLM`` with the actor's weights (``common.twin_models``) for the two phases with a
direct equivalent: ``generate(do_sample=True, top_k=0, eos_token_id=None)`` on the same prompts
and chunks, and the reference log-probs of the rollout (``response_logprobs`` of the reference
alone vs the HF forward with the same positions, both in ``mini_batch`` chunks; the table's
``ref log-probs`` row, part of ``experience``).

    python experiments/bench/bench_ppo.py --quick                 # tiny, rollout 16, 1 repeat
    python experiments/bench/bench_ppo.py --threads 1             # tiny, rollout 64 (the config's)
    python experiments/bench/bench_ppo.py --sizes tiny,small
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from common import DTYPES, machine_line, setup, timed, twin_models

from llamalab.generation import left_pad
from llamalab.model import LlamaConfig, LlamaScalar
from llamalab.perf import measure_peak_flops, mfu, ppo_flops_per_token
from llamalab.rlhf import logprobs_from_logits
from llamalab.rlhf.rollout import Rollout, in_chunks, response_logprobs
from llamalab.scale.build import freeze
from llamalab.stages.ppo import PPOStage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PHASES = ("generate", "score", "experience", "train")


# ---------------------------------------------------------------------------- the stage
class _HookedOptimizer:
    """The stage's AdamW as Lightning's manual optimisation steps it: the module's
    ``on_before_optimizer_step`` hook (gradient norm, non-finite guard) right before ``step``."""

    def __init__(self, optimizer: torch.optim.Optimizer, module: PPOStage) -> None:
        self.optimizer, self.module = optimizer, module

    def step(self) -> None:
        self.module.on_before_optimizer_step(self.optimizer)
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class BenchPPOStage(PPOStage):
    """``PPOStage`` without a ``Trainer``: the few ``LightningModule`` services its methods call
    are given directly (backward, the optimizer, norm clipping as Lightning's 32-bit precision
    plugin does it); metric logging is dropped. Everything PPO is the stage's own code."""

    bench_optimizer: _HookedOptimizer | None = None

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        return self.bench_optimizer

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward(*args, **kwargs)

    def clip_gradients(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        assert gradient_clip_algorithm in (None, "norm")
        params = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)  # type: ignore[arg-type]

    def log(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs


def stage_settings(size: str, args: argparse.Namespace) -> tuple[LlamaConfig, dict[str, Any]]:
    """(architecture, stage keyword arguments) from the composed real config, as
    ``llamalab.runner.run.train`` builds them (the input checkpoints left out: random init here)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from llamalab.runner.paths import register_resolvers
    from llamalab.runner.run import architecture

    overrides = [
        "stage=ppo",
        f"model={size}",
        f"stage.rollout_batch={args.rollout_batch}",
        f"stage.mini_batch={args.mini_batch}",
        f"stage.max_new_tokens={args.max_new_tokens}",
        f"stage.ppo_epochs={args.ppo_epochs}",
        "stage.temperature=1.0",
        "stage.top_p=1.0",
    ]
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    values = OmegaConf.to_container(cfg.stage, resolve=True)
    assert isinstance(values, dict)
    for key in ("_target_", "init", "critic_init", "reward_helpful", "reward_safety"):
        values.pop(key, None)
    return architecture(cfg), {str(k): v for k, v in values.items()}


def build_stage(
    size: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[BenchPPOStage, torch.nn.Module]:
    """The stage with its five models (random init), its optimizer, and HF's twin of the actor."""
    config, kwargs = stage_settings(size, args)
    stage = BenchPPOStage(arch=config.to_dict(), tokenizer_path=None, compile=False, **kwargs)
    actor, hf_actor = twin_models(config, device, dtype)
    hf_actor.eval()
    hf_actor.generation_config.eos_token_id = None  # EOS disabled on both sides: equal work
    critic = LlamaScalar(config)
    critic.init_weights()
    helpful, safety = LlamaScalar(config), LlamaScalar(config)
    helpful.init_weights(), safety.init_weights()
    stage.actor = actor.train()
    stage.reference = freeze(copy.deepcopy(actor))  # type: ignore[assignment]
    stage.critic = critic.to(device=device, dtype=dtype).train()
    stage.rm_helpful = freeze(helpful.to(device=device, dtype=dtype))  # type: ignore[assignment]
    stage.rm_safety = freeze(safety.to(device=device, dtype=dtype))  # type: ignore[assignment]
    stage.to(device)  # records the device for build_rollout (the models are there already)
    stage.kl_ctl = stage.make_kl_controller(actor)
    # eos_id None: no early stop (the library's generate accepts it; the stage passes an int).
    stage._tokenizer = SimpleNamespace(eos_id=None, pad_id=0)
    stage.bench_optimizer = _HookedOptimizer(stage.configure_optimizers(), stage)
    return stage, hf_actor


# ---------------------------------------------------------------------------- HF reference
def hf_generate(
    model: torch.nn.Module, prompts: list[list[int]], chunk: int, new: int, device: torch.device
) -> None:
    """``LlamaForCausalLM.generate`` over the same prompts in the same chunks: sampling at
    temperature 1 from the full distribution (top-k and top-p off), exactly ``new`` tokens."""
    for start in range(0, len(prompts), chunk):
        ids, mask = left_pad(prompts[start : start + chunk], 0, device)
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )


def hf_response_logprobs(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """``response_logprobs`` through ``LlamaForCausalLM``: same layout, same positions (real
    tokens counted, as our model does by default)."""
    mask = rollout.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(rollout.input_ids, attention_mask=mask, position_ids=positions).logits
    scored = logits[:, rollout.prompt_width - 1 : -1]
    return logprobs_from_logits(scored, rollout.response) * rollout.response_mask


# ---------------------------------------------------------------------------- one iteration
def iteration(
    stage: BenchPPOStage,
    hf_actor: torch.nn.Module,
    prompts: list[list[int]],
    is_safety: torch.Tensor,
    device: torch.device,
) -> tuple[dict[str, float], Rollout, float]:
    """Seconds of each phase of one iteration (plus the two HF contenders, interleaved), the
    rollout, and the largest |ours - HF| reference log-prob."""
    cfg = stage.cfg
    out: dict[str, Any] = {}
    out["generate"] = timed(
        lambda: out.update(
            rollout=stage.generate_rollout(prompts, cfg.temperature, cfg.top_p)  # type: ignore[arg-type]
        ),
        device,
    )
    rollout: Rollout = out.pop("rollout")
    out["hf_generate"] = timed(
        lambda: hf_generate(hf_actor, prompts, cfg.generation_batch, cfg.max_new_tokens, device),
        device,
    )
    out["score"] = timed(lambda: out.update(scores=stage.score(rollout, is_safety)), device)
    scores = out.pop("scores")
    out["experience"] = timed(
        lambda: out.update(made=stage.experience(rollout, scores, is_safety)), device
    )
    experience, stats = out.pop("made")
    reference = stage.reference
    assert reference is not None
    ours_ref = lambda r: response_logprobs(reference, r)  # noqa: E731
    theirs_ref = lambda r: hf_response_logprobs(hf_actor, r)  # noqa: E731
    out["ref_logprobs"] = timed(lambda: in_chunks(ours_ref, rollout, cfg.mini_batch), device)
    out["hf_ref_logprobs"] = timed(lambda: in_chunks(theirs_ref, rollout, cfg.mini_batch), device)
    out["train"] = timed(lambda: stage.ppo_update(rollout, experience), device)
    stage.kl_ctl.update(float(stats["train/kl"]), len(rollout))  # type: ignore[union-attr]
    stage.iteration += 1
    gap = (
        in_chunks(ours_ref, rollout, cfg.mini_batch)
        - in_chunks(theirs_ref, rollout, cfg.mini_batch)
    ).abs()
    return out, rollout, float(gap.max())


def random_prompts(
    n: int, low: int, high: int, vocab: int, generator: torch.Generator
) -> list[list[int]]:
    """``n`` prompts of uniform random length in [low, high], token ids 3.. (0-2: unk/BOS/EOS)."""
    lengths = torch.randint(low, high + 1, (n,), generator=generator).tolist()
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for length in lengths]


def bench_one(args: argparse.Namespace, size: str, peak: float) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    stage, hf_actor = build_stage(size, args, device, dtype)
    config, cfg = stage.arch, stage.cfg
    low, high = (int(x) for x in args.prompt_len.split("-"))
    if high + cfg.max_new_tokens > config.max_seq_len:
        raise SystemExit(
            f"prompt {high} + {cfg.max_new_tokens} new tokens exceed {size}'s max_seq_len "
            f"{config.max_seq_len}"
        )
    generator = torch.Generator().manual_seed(args.seed)
    prompts = random_prompts(cfg.rollout_batch, low, high, config.vocab_size, generator)
    is_safety = torch.rand(cfg.rollout_batch, generator=generator) < 0.5
    runs = [iteration(stage, hf_actor, prompts, is_safety, device) for _ in range(1 + args.repeats)]
    runs = runs[1:]  # the first iteration warms up
    seconds = {k: statistics.median(r[0][k] for r in runs) for k in runs[0][0]}
    total = statistics.median(sum(r[0][p] for p in PHASES) for r in runs)
    rollout = runs[-1][1]
    tokens = int(rollout.attention_mask.sum())  # prompt + response tokens of experience
    seq = round(tokens / len(rollout))  # mean sequence length (attention term)
    parts = ppo_flops_per_token(config, seq, n_reward_models=2, ppo_epochs=cfg.ppo_epochs)
    flops = {  # per token of experience, by phase (see the module docstring)
        "generate": parts["generate"],
        "score": parts["reward"],
        "experience": parts["policy_rollout"] + parts["reference"] + parts["value_rollout"],
        "ref_logprobs": parts["reference"],
        "train": parts["policy_train"] + parts["value_train"],
    }
    passes = {  # model passes over the experience tokens
        "generate": 1,
        "score": 2,
        "experience": 3,
        "ref_logprobs": 1,
        "train": 2 * cfg.ppo_epochs,
    }
    rows = []
    for phase in ("generate", "score", "experience", "ref_logprobs", "train"):
        s = seconds[phase]
        row = {
            "phase": phase,
            "s": s,
            "share": s / total,
            "tokens": passes[phase] * tokens,
            "gflop": flops[phase] * tokens / 1e9,
            "mfu": mfu(tokens / s, flops[phase], peak),
        }
        if f"hf_{phase}" in seconds:
            row["hf_s"] = seconds[f"hf_{phase}"]
        rows.append(row)
    all_flops = sum(flops[p] for p in PHASES) * tokens
    rows.append(
        {
            "phase": "iteration",
            "s": total,
            "share": 1.0,
            "tokens": sum(passes[p] for p in PHASES) * tokens,
            "gflop": all_flops / 1e9,
            "mfu": all_flops / total / peak,
        }
    )
    lengths = rollout.lengths.float()
    return {
        "size": size,
        "rows": rows,
        "total": total,
        "generate_share": seconds["generate"] / total,
        "tokens": tokens,
        "batch": len(rollout),
        "width": rollout.input_ids.shape[1],
        "prompt_width": rollout.prompt_width,
        "response_len": float(lengths.mean()),
        "steps": cfg.steps_per_iteration,
        "gap": max(r[2] for r in runs),
        "cfg": cfg,
    }


def print_result(r: dict[str, Any]) -> None:
    cfg = r["cfg"]
    print(
        f"\n{r['size']}: rollout {r['batch']} prompts (prompt width {r['prompt_width']}, "
        f"{r['response_len']:.0f} new tokens each, padded width {r['width']}), "
        f"{r['tokens']} tokens of experience, generation chunks of {cfg.generation_batch}, "
        f"mini-batch {cfg.mini_batch}, {cfg.ppo_epochs} PPO epochs = {r['steps']} optimizer steps"
    )
    head = ["phase", "s", "share", "tokens", "tok/s", "GFLOP", "MFU", "hf s", "ours/hf"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    names = {
        "generate": "1 generate (sample + build_rollout)",
        "score": "2 score (2 reward models)",
        "experience": "3 experience (actor, ref, critic fwd + GAE)",
        "ref_logprobs": "  3a of which ref log-probs",
        "train": "4 train (PPO epochs x mini-batches)",
        "iteration": "iteration",
    }
    for row in r["rows"]:
        cells = [
            names[row["phase"]],
            f"{row['s']:.2f}",
            f"{row['share']:.0%}",
            str(row["tokens"]),
            f"{row['tokens'] / row['s']:.0f}",
            f"{row['gflop']:.1f}",
            f"{row['mfu']:.1%}",
        ]
        if "hf_s" in row:
            cells += [f"{row['hf_s']:.2f}", f"{row['hf_s'] / row['s']:.2f}x"]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    print(
        f"iteration {r['total']:.2f} s (median), generation {r['generate_share']:.0%} of it; "
        f"ref log-probs ours vs HF max |diff| {r['gap']:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny")
    parser.add_argument("--rollout-batch", type=int, default=64, help="prompts per iteration")
    parser.add_argument("--mini-batch", type=int, default=16, help="rows per optimizer step")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--ppo-epochs", type=int, default=2)
    parser.add_argument("--prompt-len", default="16-48", help="min-max prompt length, tokens")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="iterations timed (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny, rollout 16, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.rollout_batch, args.repeats = "tiny", 16, 1
    setup(args.threads, args.seed)
    device = torch.device(args.device)
    peak = measure_peak_flops(DTYPES[args.dtype], device)
    print(machine_line(device))
    print(
        f"dtype {args.dtype}, peak {peak / 1e9:.0f} GFLOP/s, median of {args.repeats} "
        f"iteration(s) after 1 warm-up; EOS disabled, temperature 1; tokens = prompt + response "
        f"tokens x model passes; hf = transformers LlamaForCausalLM, same weights"
    )
    for size in args.sizes.split(","):
        print_result(bench_one(args, size, peak))


if __name__ == "__main__":
    main()
