"""The split of the suite stays honest (README, "Tests"): entry points run only through
``helpers.run_train`` / ``launch_train``, which fail a test not marked ``integration`` (or
``distributed`` for several processes); a file that spawns processes itself is ``distributed``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import check_markers

TESTS = Path(__file__).resolve().parent
SUBPROCESS = re.compile(r"subprocess\.(run|Popen|call|check_call|check_output)\(")
SPAWN = re.compile(
    r"\bmp\.spawn\(|multiprocessing\.(Process|Pool)\(|torch\.multiprocessing\.spawn\("
)


def _call(text: str, start: int) -> str:
    """The source of the call whose opening parenthesis ends text[:start]."""
    depth, i = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start:i]


def test_entry_points_run_only_through_the_helpers() -> None:
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        text = path.read_text()
        for match in SUBPROCESS.finditer(text):
            if re.search(r"REPO|TRAIN|src|\.py\b", _call(text, match.end())):
                offenders.append(f"{path.name}:{text.count(chr(10), 0, match.start()) + 1}")
    assert not offenders, f"run entry points with helpers.run_train / launch_train: {offenders}"


def test_files_that_spawn_processes_are_marked_distributed() -> None:
    for path in sorted(TESTS.glob("test_*.py")):
        text = path.read_text()
        if SPAWN.search(text):
            assert "pytestmark = [pytest.mark.distributed" in text, path.name


def test_run_train_refuses_a_test_without_the_markers(request: pytest.FixtureRequest) -> None:
    import helpers

    assert helpers.current_item is request.node  # set by conftest.py for the running test
    with pytest.raises(AssertionError, match="not marked integration"):
        check_markers(["stage=sft"])
    with pytest.raises(AssertionError, match="not marked integration, distributed"):
        check_markers(["trainer.devices=2"])


@pytest.mark.integration
def test_run_train_accepts_an_integration_test_on_one_process() -> None:
    check_markers(["stage=sft", "trainer.devices=1"])
    with pytest.raises(AssertionError, match="not marked distributed"):
        check_markers(["strategy=ddp", "trainer.devices=2"])
