"""``trainer.val_check_interval`` counts optimizer steps across epochs, so the default jobs'
intervals fit any world size (issue 20: 50 steps against 41 batches per rank crashed a 2-GPU
launch), and a value that can never work stops before anything is built."""

from __future__ import annotations

import pytest
from helpers import compose_config
from omegaconf import OmegaConf

from llamalab.model.config import ConfigError
from llamalab.runner.run import validation_schedule


def trainer_cfg(**values):
    return OmegaConf.create({"val_check_interval": None, "check_val_every_n_epoch": 1, **values})


def test_steps_become_batches_across_epochs() -> None:
    assert validation_schedule(trainer_cfg(val_check_interval=50), accumulate=1) == {
        "val_check_interval": 50,
        "check_val_every_n_epoch": None,
    }
    # 2 micro-batches per optimizer step: Lightning counts batches, the config counts steps.
    assert validation_schedule(trainer_cfg(val_check_interval=50), 2)["val_check_interval"] == 100
    assert validation_schedule(trainer_cfg(val_check_interval=50.0), 1)["val_check_interval"] == 50


def test_per_epoch_and_fractions_are_left_to_lightning() -> None:
    assert validation_schedule(trainer_cfg(), 4) == {}
    assert validation_schedule(trainer_cfg(val_check_interval=0.25), 4) == {
        "val_check_interval": 0.25
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be >= 1"),
        (-5, "must be >= 1"),
        (1.5, r"a fraction of an epoch must be in \(0, 1\]"),
        ("often", "use null"),
        (True, "use null"),
    ],
)
def test_impossible_intervals_are_refused_naming_the_key(value, message) -> None:
    with pytest.raises(ConfigError, match=rf"trainer\.val_check_interval=.*{message}"):
        validation_schedule(trainer_cfg(val_check_interval=value), 1)


def test_default_pretraining_validates_every_50_steps_on_any_world_size(tmp_path) -> None:
    for devices in (1, 2, 8):
        cfg = compose_config([f"trainer.devices={devices}"], tmp_path)
        schedule = validation_schedule(cfg.trainer, 1)
        assert schedule == {"val_check_interval": 50, "check_val_every_n_epoch": None}
