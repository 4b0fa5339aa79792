"""The PPO stage: rollout layout and alignment, the trainer settings, the checkpoint state, clear
errors for missing or mismatched inputs, and whole runs through ``src/train.py``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import run_train
from helpers.rlhf import (
    checkpoint_paths,
    make_policy,
    make_ppo_stage,
    read_metrics,
    series,
    tiny_config,
)

from llamalab.checkpoint import CheckpointError, save_hf
from llamalab.generation import GenerationOutput, sample_responses
from llamalab.model import Llama, LlamaConfig, LlamaScalar
from llamalab.rlhf.rollout import (
    build_rollout,
    response_logprobs,
    response_values,
    sequence_scores,
)
from llamalab.stages.ppo import PPOConfig, PPOStage, derive_seed
from llamalab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def world(tiny_checkpoints: dict) -> dict[str, Path]:
    """A 512-piece tokenizer, a random tiny policy and a good-token reward model (conftest)."""
    return checkpoint_paths(tiny_checkpoints)


def ppo_overrides(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "stage=ppo",
        "logger=none",
        "callbacks=none",
        "plan.check=false",
        f"paths.output_dir={out}",
        f"paths.outputs_root={out.parent / 'outs'}",
        f"stage.init={world['sft']}",
        f"stage.reference={world['sft']}",
        f"stage.critic_init={world['rm']}",
        f"stage.reward_helpful={world['rm']}",
        f"stage.reward_safety={world['rm']}",
        "stage.rollout_batch=16",
        "stage.mini_batch=8",
        "stage.max_new_tokens=8",
        "stage.generation_batch=16",
        "stage.eval_max_new_tokens=8",
        "stage.ppo_epochs=1",
        *extra,
    ]


# ---------------------------------------------------------------------------- rollout layout
def test_build_rollout_left_pads_prompts_and_right_pads_responses() -> None:
    generated = GenerationOutput(
        [[7, 2], [8, 9, 10]], [[-1.0, -2.0], [-3.0, -4.0, -5.0]], [True, False]
    )
    r = build_rollout([[1, 5, 6], [1, 4]], generated, pad_id=0)
    assert r.prompt_width == 3
    assert r.input_ids.tolist() == [[1, 5, 6, 7, 2, 0], [0, 1, 4, 8, 9, 10]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert r.response.tolist() == [[7, 2, 0], [8, 9, 10]]
    assert r.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.gen_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert r.finished.tolist() == [True, False]
    assert r.lengths.tolist() == [2, 3]
    assert r.select(torch.tensor([1])).input_ids.tolist() == [[0, 1, 4, 8, 9, 10]]


def test_recomputed_logprobs_match_the_sampler() -> None:
    """The batched forward over the padded rollout scores each token exactly as the KV-cache
    sampler did: the columns line up and padding does not leak."""
    torch.manual_seed(0)
    model = Llama(
        LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    )
    model.init_weights()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4]]
    out = sample_responses(
        model,
        prompts,
        max_new_tokens=6,
        temperature=1.0,
        top_p=None,
        eos_id=2,
        pad_id=0,
        seed=3,
        chunk_size=2,
    )
    rollout = build_rollout(prompts, out, pad_id=0)
    recomputed = response_logprobs(model, rollout)
    assert torch.allclose(recomputed, rollout.gen_logprobs, atol=1e-4)
    # Row by row without any padding gives the same values too.
    for row, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]
        alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        assert torch.allclose(recomputed[row, : len(tokens)], alone, atol=1e-4)


def test_values_and_scores_read_the_right_positions() -> None:
    torch.manual_seed(0)
    critic = LlamaScalar(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    critic.init_weights()
    generated = GenerationOutput([[7, 2], [8, 9, 10]], [[0.0] * 2, [0.0] * 3], [True, False])
    rollout = build_rollout([[1, 5, 6], [1, 4]], generated, pad_id=0)
    values = response_values(critic, rollout)
    with torch.no_grad():
        alone = critic(torch.tensor([[1, 4, 8, 9, 10]]))[0]
        first = critic(torch.tensor([[1, 5, 6, 7, 2]]))[0]
    # V(state before token t) sits at the prompt's last position + t.
    assert torch.allclose(values[1], alone[1:4], atol=1e-5)
    assert torch.allclose(values[0, :2], first[2:4], atol=1e-5) and values[0, 2] == 0
    scores = sequence_scores(critic, rollout)
    assert torch.allclose(scores, torch.stack([first[-1], alone[-1]]), atol=1e-5)


# ---------------------------------------------------------------------------- settings
def test_trainer_overrides_count_optimizer_steps() -> None:
    stage = PPOStage(
        arch=tiny_config(64).to_dict(),
        optim={"lr": 1e-3, "weight_decay": 0.1},
        iterations=5,
        rollout_batch=20,
        mini_batch=8,
        ppo_epochs=2,
        eval_every=2,
        eval_prompts=30,
    )
    assert stage.cfg.steps_per_iteration == 2 * 3  # ceil(20 / 8) mini-batches, twice
    out = stage.trainer_overrides({"max_steps": -1})
    assert out["max_steps"] == 30 and out["max_epochs"] == -1
    assert out["val_check_interval"] == 2 and out["check_val_every_n_epoch"] is None
    assert out["limit_val_batches"] == 2  # ceil(30 prompts / 20 per batch)
    assert "max_steps" not in stage.trainer_overrides({"max_steps": 7})  # the user's choice wins
    assert stage.automatic_optimization is False


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="reward_whitening"):
        PPOConfig(reward_whitening="sometimes")
    with pytest.raises(ValueError, match="mini_batch"):
        PPOConfig(mini_batch=0)


def test_seeds_differ_by_iteration_and_rank() -> None:
    seeds = {derive_seed(1, i, r) for i in range(50) for r in range(4)}
    assert len(seeds) == 200 and derive_seed(1, 3, 0) == derive_seed(1, 3, 0)


# ---------------------------------------------------------------------------- models
def test_configure_model_builds_five_models(world: dict[str, Path]) -> None:
    stage = make_ppo_stage(world)
    assert isinstance(stage.actor, Llama) and isinstance(stage.reference, Llama)
    assert all(
        isinstance(m, LlamaScalar) for m in (stage.critic, stage.rm_helpful, stage.rm_safety)
    )
    assert all(p.requires_grad for p in stage.actor.parameters())
    assert all(p.requires_grad for p in stage.critic.parameters())
    for frozen in (stage.reference, stage.rm_helpful, stage.rm_safety):
        assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert torch.equal(stage.actor.output.weight, stage.reference.output.weight)
    optimizer = stage.configure_optimizers()
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    assert lrs == [1e-3]  # critic_lr defaults to the actor's
    n_trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_trainable == sum(
        p.numel() for p in [*stage.actor.parameters(), *stage.critic.parameters()]
    )


def test_reference_is_its_own_input(world: dict[str, Path], tmp_path: Path) -> None:
    """``stage.reference`` sets the frozen KL anchor apart from the actor's start (the paper's
    chain: actor from rejection sampling, KL to SFT); without it the reference is ``init``."""
    from llamalab.checkpoint import load_model

    other = make_policy(tmp_path / "other", Tokenizer(world["tokenizer"]), seed=1)
    stage = make_ppo_stage(world, reference=str(other))
    assert torch.equal(stage.reference.output.weight, load_model(other).output.weight)
    assert torch.equal(stage.actor.output.weight, load_model(world["sft"]).output.weight)
    assert not torch.equal(stage.actor.output.weight, stage.reference.output.weight)
    assert not any(p.requires_grad for p in stage.reference.parameters())


def test_two_learning_rates_in_one_optimizer(world: dict[str, Path]) -> None:
    stage = make_ppo_stage(world)
    stage.optim_cfg["critic_lr"] = 5e-3
    optimizer = stage.configure_optimizers()
    actor_ids = {id(p) for p in stage.actor.parameters()}
    for group in optimizer.param_groups:
        in_actor = {id(p) in actor_ids for p in group["params"]}
        assert len(in_actor) == 1
        assert group["lr"] == (1e-3 if in_actor.pop() else 5e-3)


def test_vocabulary_mismatch_is_a_clear_error(world: dict[str, Path], tmp_path: Path) -> None:
    other = LlamaScalar(tiny_config(Tokenizer(world["tokenizer"]).vocab_size + 8))
    other.init_weights()
    save_hf(other, None, tmp_path / "rm_other")
    config = tiny_config(Tokenizer(world["tokenizer"]).vocab_size)
    stage = PPOStage(
        arch=config.to_dict(),
        optim={"lr": 1e-3, "weight_decay": 0.1},
        init=str(world["sft"]),
        critic_init=str(world["rm"]),
        reward_helpful=str(world["rm"]),
        reward_safety=str(tmp_path / "rm_other"),
    )
    with pytest.raises(CheckpointError, match=r"vocabulary.*reward_safety: 520"):
        stage.configure_model()


def test_a_language_model_as_reward_model_is_refused(world: dict[str, Path]) -> None:
    config = tiny_config(Tokenizer(world["tokenizer"]).vocab_size)
    stage = PPOStage(
        arch=config.to_dict(),
        optim={"lr": 1e-3, "weight_decay": 0.1},
        init=str(world["sft"]),
        critic_init=str(world["sft"]),
        reward_helpful=str(world["sft"]),
        reward_safety=str(world["rm"]),
    )
    with pytest.raises(CheckpointError, match=r"stage.reward_helpful=.*not a reward model"):
        stage.configure_model()


def test_critic_from_a_language_model_keeps_its_backbone(world: dict[str, Path]) -> None:
    from llamalab.checkpoint import load_model
    from llamalab.scale.build import build_pretrained

    critic = build_pretrained(world["sft"], "scalar", "none", trainable=True, role="critic_init")
    policy = load_model(world["sft"])
    assert torch.equal(critic.layers[0].attention.wq.weight, policy.layers[0].attention.wq.weight)
    assert critic.training and all(p.requires_grad for p in critic.parameters())


def test_checkpoint_keeps_ppo_state_and_drops_frozen_models(world: dict[str, Path]) -> None:
    stage = make_ppo_stage(world, adaptive_kl=True, kl_coef=0.05)
    stage.iteration = 7
    stage.kl_ctl.update(current_kl=100.0, n_steps=1000)
    stage.reward_moments["combined"].update(torch.tensor([1.0, 2.0, 4.0]))
    stage.eval_state = {"best": 0.5, "bad_evals": 1}
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    prefixes = {k.split(".", 1)[0] for k in checkpoint["state_dict"]}
    assert prefixes == {"actor", "critic"}
    assert checkpoint["llamalab"]["prefix"] == "actor." and checkpoint["llamalab"]["head"] == "lm"

    fresh = make_ppo_stage(world, adaptive_kl=True, kl_coef=0.05)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)  # frozen weights put back
    assert fresh.iteration == 7 and fresh.kl_ctl.value == pytest.approx(stage.kl_ctl.value)
    assert fresh.kl_ctl.value != 0.05
    assert (
        fresh.reward_moments["combined"].state_dict()
        == stage.reward_moments["combined"].state_dict()
    )
    assert fresh.eval_state == {"best": 0.5, "bad_evals": 1}


def test_ppo_checkpoint_loads_as_the_actor(world: dict[str, Path], tmp_path: Path) -> None:
    from llamalab.checkpoint import load_model

    stage = make_ppo_stage(world)
    with torch.no_grad():
        stage.actor.output.weight.add_(1.0)
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ppo.ckpt")
    loaded = load_model(tmp_path / "ppo.ckpt")
    assert isinstance(loaded, Llama)
    assert torch.equal(loaded.output.weight, stage.actor.output.weight)
    assert stage.export_model() is stage.actor


# ---------------------------------------------------------------------------- through train.py
def test_missing_inputs_are_found_before_anything_is_built(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    """The composed stage=ppo config, checked as run.train checks it: each missing input is
    named with the command that produces it; present ones pass."""
    from hydra import compose, initialize_config_dir

    from llamalab.pipeline import MissingInputError
    from llamalab.runner.paths import register_resolvers
    from llamalab.runner.run import check_inputs

    register_resolvers()
    with initialize_config_dir(
        config_dir=str(Path(__file__).parents[1] / "configs"), version_base="1.3"
    ):
        cfg = compose(
            "train",
            overrides=[
                "stage=ppo",
                f"paths.outputs_root={tmp_path}",
                f"stage.reward_safety={world['rm']}",
            ],
        )
    with pytest.raises(MissingInputError) as err:
        check_inputs(cfg)
    message = str(err.value)
    assert f"stage.init={tmp_path}/sft/latest does not exist" in message
    assert "python src/train.py stage=sft" in message
    assert message.count("python src/train.py stage=reward rm=helpful") == 2  # critic and RM
    assert "reward_safety" not in message  # that one exists


@pytest.mark.integration
@pytest.mark.slow
def test_missing_inputs_stop_at_once_naming_the_command(tmp_path: Path, cache_dir: Path) -> None:
    result = run_train(
        [
            "stage=ppo",
            "logger=none",
            f"paths.outputs_root={tmp_path / 'empty'}",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
        cache_dir,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    message = result.stderr
    assert "stage=ppo cannot start" in message
    assert "stage.init=" in message and "python src/train.py stage=sft" in message
    assert "python src/train.py stage=reward rm=helpful" in message
    assert "python src/train.py stage=reward rm=safety" in message
    assert "Traceback" not in message


@pytest.mark.integration
@pytest.mark.slow
def test_a_few_iterations_log_everything_and_export_the_actor(
    world: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    out = tmp_path / "run"
    result = run_train(
        ppo_overrides(
            world,
            out,
            "stage.iterations=3",
            "stage.eval_every=3",
            "stage.eval_prompts=16",
            "callbacks=default",
            "callbacks.model_checkpoint.every_n_train_steps=6",
            "~callbacks.progress_bar",
        ),
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    for key in (
        "train/reward_raw_helpful",
        "train/reward_whitened_helpful",
        "train/reward_raw_safety",
        "train/kl",
        "train/entropy",
        "train/clipfrac",
        "train/approx_kl",
        "train/value_loss",
        "train/explained_variance",
        "train/response_length",
        "train/eos_rate",
        "time/generate_s",
        "time/train_s",
        "eval/reward",
        "eval/ground_truth",
        "eval/kl_to_ref",
        "eval/refusal_rate_harmful",
    ):
        assert series(rows, key), f"{key} was not logged"
    assert len(series(rows, "train/kl")) == 3  # one row per iteration
    assert max(r["step"] for r in rows) <= 6  # 3 iterations x 2 mini-batches = 6 optimizer steps
    assert all(0.0 <= v <= 1.0 for v in series(rows, "eval/ground_truth"))
    assert (out / "export" / "config.json").is_file()
    from llamalab.checkpoint import load_model

    exported = load_model(out / "export")
    assert isinstance(exported, Llama)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["ppo"]["iteration"] == 3 and ckpt["global_step"] == 6
    assert not any(k.startswith(("reference.", "rm_")) for k in ckpt["state_dict"])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.experiment  # make test-experiments (2 min): a learning-quality check, as the RLHF demo
def test_reward_rises_while_kl_stays_bounded(
    world: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    """20 iterations against the good-token reward model (see helpers.rlhf): its raw score
    (the sigmoid saturates near 1 for this model) must rise clearly, the KL stay bounded."""
    out = tmp_path / "run"
    result = run_train(
        ppo_overrides(
            world,
            out,
            "stage.iterations=20",
            "stage.eval_every=null",
            "stage.rollout_batch=32",
            "stage.mini_batch=16",
            "stage.optim.lr=3e-3",
            "stage.optim.critic_lr=3e-3",
            "stage.kl_coef=0.02",
            "stage.ppo_epochs=2",
            "stage.max_new_tokens=12",
        ),
        cache_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    reward = series(rows, "train/reward_raw_helpful")
    kl = series(rows, "train/kl")
    assert len(reward) == 20
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.3, reward
    assert all(math.isfinite(k) for k in kl) and max(kl) < 10.0, kl


@pytest.mark.integration
@pytest.mark.slow
def test_ppo_from_a_rejection_sampling_run_keeps_the_kl_to_sft(
    world: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    """The paper's chain, SFT -> rejection sampling -> PPO, as a user types it: both stages on
    their default inputs under one ``paths.outputs_root``, PPO with only
    ``stage.init=<root>/rejection_sampling/latest``. The actor starts from the rejection-sampling
    export and the reference stays SFT: the first rollout's KL (before any update) is
    KL(rejection sampling || SFT) > 0, where an actor equal to its reference reads exactly 0."""
    root = tmp_path / "outs"
    for run, source in (("sft", "sft"), ("reward_helpful", "rm"), ("reward_safety", "rm")):
        (root / run).mkdir(parents=True)
        (root / run / "latest").symlink_to(world[source])
    quiet = ["logger=none", "callbacks=none", "plan.check=false", f"paths.outputs_root={root}"]
    rs = run_train(
        [
            "stage=rejection_sampling", *quiet, "stage.num_samples=2", "stage.max_prompts=8",
            "stage.max_new_tokens=8", "stage.batch_size=4", "data.batch_size=4",
            "stage.epochs=1", "stage.optim.lr=1e-2", "trainer.limit_val_batches=0",
        ],
        cache_dir,
    )  # fmt: skip
    assert rs.returncode == 0, rs.stderr[-3000:]
    out = tmp_path / "ppo"
    ppo = run_train(
        [
            "stage=ppo", *quiet, f"paths.output_dir={out}",
            f"stage.init={root}/rejection_sampling/latest", "stage.iterations=1",
            "stage.rollout_batch=8", "stage.mini_batch=8", "stage.ppo_epochs=1",
            "stage.max_new_tokens=8", "stage.generation_batch=8", "stage.eval_every=null",
        ],
        cache_dir,
    )  # fmt: skip
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    kl = series(read_metrics(out), "train/kl")
    assert len(kl) == 1 and kl[0] > 1e-3, kl
    from llamalab.checkpoint import load_model

    assert isinstance(load_model(out / "export"), Llama)
