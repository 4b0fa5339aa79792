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
    from llamalab.reliability import MissingCheckpointError
    from llamalab.run import MissingInputError
    from llamalab.scale.plan import PlanError
    from llamalab.stages.base import NonFiniteError
    from llamalab.tokenizer import DialogError

    return (
        CheckpointError,
        ConfigError,
        DataError,
        DialogError,
        MissingCheckpointError,
        MissingInputError,
        NonFiniteError,
        PlanError,
    )


def rejected_setting(err: BaseException) -> BaseException | None:
    """The user error behind a failed ``hydra.utils.instantiate``, or None for a bug.

    Hydra wraps whatever a ``_target_``'s constructor raised in ``InstantiationException``. A
    user error type, or a ``ValueError`` / ``TypeError`` (a value the class refuses, a key it
    does not take: ``stage.nonfinite=bogus``, a typo in a key) or Lightning's
    ``MisconfigurationException`` (``trainer.*``), is an impossible config: the message is
    Hydra's, which names the class, the exception and the config key.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if not isinstance(err, InstantiationException):
        return None
    cause = err.__cause__
    if isinstance(cause, user_error_types()):
        return cause
    if isinstance(cause, (ValueError, TypeError, MisconfigurationException)):
        return err
    return None


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn``; a user error prints ``error: <message>`` and exits 1 (no traceback unless
    ``HYDRA_FULL_ERROR=1``). A preempted run's ``SystemExit`` (checkpoint saved) passes through
    with its own code (:class:`llamalab.reliability.Preempted`)."""
    try:
        return fn(*args)
    except Exception as err:
        user_error = err if isinstance(err, user_error_types()) else rejected_setting(err)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(1)
