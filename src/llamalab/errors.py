"""One clear message for the errors a user can fix, instead of a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (config, data, checkpoints, plans, missing stages)."""
    from llamalab.checkpoint import CheckpointError
    from llamalab.data.errors import DataError
    from llamalab.model.config import ConfigError
    from llamalab.run import MissingInputError
    from llamalab.scale.plan import PlanError
    from llamalab.stages.base import NonFiniteError
    from llamalab.tokenizer import DialogError

    return (
        CheckpointError,
        ConfigError,
        DataError,
        DialogError,
        MissingInputError,
        NonFiniteError,
        PlanError,
    )


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn``; a user error prints ``error: <message>`` and exits 1 (no traceback unless
    ``HYDRA_FULL_ERROR=1``)."""
    try:
        return fn(*args)
    except user_error_types() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
