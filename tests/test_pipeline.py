"""The stage graph (llamalab.pipeline) is the one source: the stage configs' defaults, the input
checks, the memory plan, chat's default model and PPO's frozen models all agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, compose_config

from llamalab import pipeline
from llamalab.pipeline import MissingInputError
from llamalab.runner.run import architecture, check_inputs, stage_inputs
from llamalab.scale.plan_cfg import plan_from_config, plan_roles


@pytest.mark.parametrize("name", sorted(pipeline.STAGES))
def test_stage_config_defaults_agree_with_the_pipeline(name: str) -> None:
    """configs/stage/<name>.yaml: its name, run name(s) and every input's default."""
    spec = pipeline.STAGES[name]
    raw = yaml.safe_load((CONFIGS / "stage" / f"{name}.yaml").read_text())
    assert raw["name"] == name
    runs = {raw["run_name"].replace("${rm}", rm) for rm in ("helpful", "safety")}
    assert runs == set(spec.run_names)
    for item in spec.inputs:
        expected = (
            None if item.producer is None else f"${{paths.outputs_root}}/{item.producer}/latest"
        )
        assert raw[item.key] == expected, f"stage={name}: {item.key}"
    # Every model loads a declared input; every input feeds a model.
    keys = {item.key for item in spec.inputs}
    assert {m.input for m in spec.models} - {None} == keys
    # Every producer is a run some stage writes.
    for item in spec.inputs:
        if item.producer is not None:
            assert pipeline.producing_command(item.producer).startswith("python src/train.py")


@pytest.mark.parametrize("name", sorted(pipeline.STAGES))
def test_composed_defaults_follow_outputs_root(name: str, tmp_path: Path) -> None:
    overrides = [f"stage={name}", f"paths.outputs_root={tmp_path}"]
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    expected = {
        item.key: pipeline.default_input(name, item.key, str(tmp_path))
        for item in pipeline.inputs_of(name)
        if item.producer is not None
    }
    assert stage_inputs(cfg) == expected


def test_missing_inputs_name_the_producing_command(tmp_path: Path) -> None:
    cfg = compose_config(["stage=rejection_sampling", f"paths.outputs_root={tmp_path}",
                          "stage.reward_safety=null"], output_dir=tmp_path / "run")  # fmt: skip
    with pytest.raises(MissingInputError) as err:
        check_inputs(cfg)
    message = str(err.value)
    assert f"stage.init={tmp_path}/sft/latest does not exist" in message
    assert "`python src/train.py stage=sft`" in message
    assert "stage.reward_safety is not set: produce it with " in message
    assert "`python src/train.py stage=reward rm=safety`" in message


def test_pretrain_init_is_optional_and_checked_when_given(tmp_path: Path) -> None:
    assert check_inputs(compose_config([], output_dir=tmp_path)) == {}
    cfg = compose_config([f"stage.init={tmp_path}/nope"], output_dir=tmp_path)
    with pytest.raises(MissingInputError, match=r"nope does not exist$"):
        check_inputs(cfg)


def test_plan_defaults_honour_outputs_root(tmp_path: Path) -> None:
    """An input set to null is planned from its default under paths.outputs_root."""
    cfg = compose_config(["model=7b", "stage=ppo", "stage.init=null",
                          f"paths.outputs_root={tmp_path}"], output_dir=tmp_path / "run")  # fmt: skip
    plan = plan_from_config(cfg, architecture(cfg), stage_inputs(cfg))
    loads = {row["role"]: row["input"] for row in plan.to_dict()["models"]}
    assert loads == {
        "actor": f"{tmp_path}/sft/latest",
        "critic": f"{tmp_path}/reward_helpful/latest",
        "reference": f"{tmp_path}/sft/latest",
        "reward_helpful": f"{tmp_path}/reward_helpful/latest",
        "reward_safety": f"{tmp_path}/reward_safety/latest",
    }


def test_plan_roles_map_config_keys_to_models() -> None:
    roles = plan_roles("ppo", {"init": "/a", "critic_init": "/c"}, "/root")
    assert roles == {
        "actor": "/a",
        "critic": "/c",
        "reference": "/root/sft/latest",  # the KL anchor stays SFT whatever init is
        "reward_helpful": "/root/reward_helpful/latest",
        "reward_safety": "/root/reward_safety/latest",
    }
    assert plan_roles("pretrain", {}, "/root") == {}
    assert plan_roles("reward", {"init": "/s"}) == {"reward": "/s"}


def test_ppo_reference_stays_sft_unless_told_to_follow_init(tmp_path: Path) -> None:
    """The paper's chain: PPO from rejection sampling keeps its KL reference at SFT; the
    documented override anchors it at the init instead."""
    rs = f"stage.init={tmp_path}/rejection_sampling/latest"
    chain = compose_config(["stage=ppo", rs, f"paths.outputs_root={tmp_path}"], tmp_path / "a")
    assert stage_inputs(chain)["reference"] == f"{tmp_path}/sft/latest"
    follow = compose_config(["stage=ppo", rs, "stage.reference=${stage.init}"], tmp_path / "b")
    assert stage_inputs(follow)["reference"] == f"{tmp_path}/rejection_sampling/latest"


def test_ppo_frozen_models_and_chat_default_come_from_the_pipeline(tmp_path: Path) -> None:
    from llamalab.chat import default_model_path
    from llamalab.stages.ppo import FROZEN

    assert FROZEN == ("reference", "rm_helpful", "rm_safety")
    (tmp_path / "pretrain" / "latest").mkdir(parents=True)
    assert default_model_path(tmp_path) == tmp_path / "pretrain" / "latest"
    (tmp_path / "sft" / "latest").mkdir(parents=True)
    assert default_model_path(tmp_path) == tmp_path / "sft" / "latest"


def test_pipeline_is_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, llamalab.pipeline; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
