"""PPO on-policy at any temperature (issue #18): the old and new log-probs and the KL to the
reference are read under logits / temperature, the distribution the rollout was sampled from;
top-p (which no ratio can follow) is refused with a message naming ``stage.top_p``."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from helpers import compose_config, run_train
from helpers.rlhf import checkpoint_paths, make_ppo_stage
from torch import nn

from llamalab.generation import GenerationOutput, generate
from llamalab.model import ConfigError, Llama, LlamaConfig
from llamalab.rlhf import logprobs_from_logits
from llamalab.rlhf.experience import ppo_objective
from llamalab.rlhf.rollout import Rollout, build_rollout, response_logits, response_logprobs
from llamalab.stages.ppo import PPOConfig

PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 3, 4], [1, 11, 12, 13]]


@pytest.fixture(scope="module")
def world(tiny_checkpoints: dict) -> dict[str, Path]:
    return checkpoint_paths(tiny_checkpoints)


def peaked_model(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(
        LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    )
    model.init_weights(std=0.2)  # peaked: temperature 0.6 changes log-probs visibly
    return model.eval()


def sampling_logprobs(model: nn.Module, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token], written out independently of the library."""
    with torch.no_grad():
        logits = model(rollout.input_ids, attention_mask=rollout.attention_mask)
    logits = logits[:, rollout.prompt_width - 1 : -1].float() / temperature
    picked = torch.log_softmax(logits, -1).gather(-1, rollout.response[..., None])[..., 0]
    return picked * rollout.response_mask


# ---------------------------------------------------------------------------- the first PPO step
def test_first_ppo_step_is_on_policy_at_temperature_0_6(world: dict[str, Path]) -> None:
    """At temperature 0.6 the old log-probs are those of the distribution the tokens were drawn
    from (before issue #18 they were the raw distribution's: this failed by up to 1.7 nats), and the
    first step's ratio is exactly 1 on every token, the KL to the reference at the same
    temperature."""
    stage = make_ppo_stage(
        world, temperature=0.6, mini_batch=16, rollout_batch=16, max_new_tokens=8
    )
    assert stage.actor is not None and stage.reference is not None
    with torch.no_grad():  # a peaked actor, so the temperature matters
        stage.actor.output.weight.mul_(20.0)
    tok = stage.tokenizer
    prompts = [tok.encode(t, bos=True) for t in ("a question", "hello there", "why", "no")] * 2
    is_safety = torch.tensor([False, True] * 4)
    rollout = stage.generate_rollout(prompts, stage.cfg.temperature, stage.cfg.top_p)
    scores = stage.score(rollout, is_safety)
    experience, stats = stage.experience(rollout, scores, is_safety)
    mask = rollout.response_mask
    expected = sampling_logprobs(stage.actor, rollout, 0.6)
    torch.testing.assert_close(experience.old_logprobs, expected, atol=1e-5, rtol=0)
    raw = sampling_logprobs(stage.actor, rollout, 1.0)
    assert float(((raw - expected).abs() * mask).max()) > 1e-2  # the check above has teeth
    assert rollout.temperature == 0.6
    # The sampler recorded the same distribution's log-probs (KV cache vs full forward).
    assert stats["train/logprob_gap"] < 1e-4
    # KL to the reference: both read at temperature 0.6.
    ref = sampling_logprobs(stage.reference, rollout, 0.6)
    expected_kl = float(((expected - ref) * mask).sum(dim=1).mean())
    assert stats["train/kl"] == pytest.approx(expected_kl, abs=1e-4)
    # The first update's new log-probs (the ppo_update path) equal the old ones bit for bit.
    logits = response_logits(stage.actor, rollout)
    new = logprobs_from_logits(logits, rollout.response) * mask
    assert torch.equal(new, experience.old_logprobs)
    _, step = ppo_objective(
        logits, experience.old_values, rollout, experience, **stage.cfg.loss_settings()
    )
    ratio = torch.exp(new - experience.old_logprobs)
    assert bool((ratio[mask.bool()] == 1.0).all())
    assert float(step["train/ratio"]) == 1.0 and float(step["train/clipfrac"]) == 0.0
    assert float(step["train/approx_kl"]) == 0.0


# ---------------------------------------------------------------------------- the readings
@pytest.mark.parametrize("temperature", [0.6, 1.3])
def test_rollout_logprobs_are_those_of_the_sampling_distribution(temperature: float) -> None:
    model = peaked_model()
    out = generate(model, PROMPTS, max_new_tokens=6, temperature=temperature, top_p=None, seed=1)
    rollout = build_rollout(PROMPTS, out, pad_id=0, temperature=temperature)
    expected = sampling_logprobs(model, rollout, temperature)
    with torch.no_grad():
        ours = response_logprobs(model, rollout)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.gen_logprobs, expected, atol=1e-4, rtol=0)
    assert rollout.select(torch.tensor([1, 0])).temperature == temperature


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_temperature_0_and_1_read_the_raw_logits_bit_for_bit(temperature: float) -> None:
    """The default (1.0) and greedy (0) keep the raw logits: nothing is divided."""
    model = peaked_model()
    generated = GenerationOutput([[7, 2], [8, 9, 10]], [[0.0] * 2, [0.0] * 3], [True, False])
    rollout = build_rollout([[1, 5, 6], [1, 4]], generated, pad_id=0, temperature=temperature)
    with torch.no_grad():
        raw = model(rollout.input_ids, attention_mask=rollout.attention_mask)[:, 2:-1]
        assert torch.equal(response_logits(model, rollout), raw)


# ---------------------------------------------------------------------------- settings
def test_top_p_and_non_positive_temperatures_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"stage\.top_p=0\.9: PPO supports top_p=1\.0 only"):
        PPOConfig(top_p=0.9)
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match=r"stage\.temperature="):
            PPOConfig(temperature=bad)
    assert PPOConfig(temperature=0.6).temperature == 0.6
    with pytest.raises(ConfigError, match=r"stage\.top_p"):
        PPOConfig.check_sampling(1.0, 0.5)  # what generate_rollout checks


MODELS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_default_ppo_configs_pass_the_check(model: str) -> None:
    """configs/stage/ppo.yaml with each model (and its stage_size/ppo_<model>.yaml) keeps
    temperature 1 and top-p 1, which the check accepts."""
    cfg = compose_config(["stage=ppo", f"model={model}"])
    names = {f.name for f in fields(PPOConfig)}
    settings = {k: v for k, v in cfg.stage.items() if k in names}
    config = PPOConfig(**settings)
    assert config.temperature == 1.0 and config.top_p == 1.0


@pytest.mark.integration
def test_top_p_is_refused_from_the_command_line(
    world: dict[str, Path], tmp_path: Path, cache_dir: Path
) -> None:
    result = run_train(
        [
            "stage=ppo",
            "logger=none",
            "callbacks=none",
            "plan.check=false",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.outputs_root={tmp_path / 'outs'}",
            f"stage.init={world['sft']}",
            f"stage.reference={world['sft']}",
            f"stage.critic_init={world['rm']}",
            f"stage.reward_helpful={world['rm']}",
            f"stage.reward_safety={world['rm']}",
            "stage.top_p=0.9",
        ],
        cache_dir,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "stage.top_p=0.9" in result.stderr and "Traceback" not in result.stderr
