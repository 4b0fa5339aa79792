"""The command-line wrapper of the entry points: one clear message for the errors a user can fix,
instead of a traceback (``HYDRA_FULL_ERROR=1`` shows it)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from hydra.errors import InstantiationException

T = TypeVar("T")

# Errors that describe bad input (config, data, checkpoints, plans, missing stages), by module
# and name. They are looked up among the modules already imported, not imported here: an error
# whose module was never imported cannot have been raised, and `src/score.py` or
# `src/prepare.py` need not pay for importing Lightning (tests/test_layout.py checks that every
# entry names a real exception class).
USER_ERRORS = (
    ("llamalab.checkpoint.io", "CheckpointError"),
    ("llamalab.model.config", "ConfigError"),
    ("llamalab.data.errors", "DataError"),
    ("llamalab.evaluation.common", "EvalError"),
    ("llamalab.tokenizer", "DialogError"),
    ("llamalab.runner.checkpoints", "MissingCheckpointError"),
    ("llamalab.pipeline", "MissingInputError"),
    ("llamalab.stages.base", "NonFiniteError"),
    ("llamalab.scale.plan", "PlanError"),
    ("llamalab.scale.tensor_parallel", "TPError"),
)
# A value a class refuses, a key it does not take, Lightning's rejection of a `trainer.*` value.
REJECTED_SETTINGS = (
    ("builtins", "ValueError"),
    ("builtins", "TypeError"),
    ("lightning.fabric.utilities.exceptions", "MisconfigurationException"),
)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    found = (getattr(sys.modules.get(module), name, None) for module, name in names)
    return tuple(t for t in found if isinstance(t, type) and issubclass(t, BaseException))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input (config, data, checkpoints, plans, missing stages)."""
    return _loaded(USER_ERRORS)


def rejected_setting(err: BaseException) -> BaseException | None:
    """The user error behind a failed ``hydra.utils.instantiate``, or None for a bug.

    Hydra wraps whatever a ``_target_``'s constructor raised in ``InstantiationException``. A
    user error type, or a ``ValueError`` / ``TypeError`` (a value the class refuses, a key it
    does not take: ``stage.nonfinite=bogus``, a typo in a key) or Lightning's
    ``MisconfigurationException`` (``trainer.*``), is an impossible config: the message is
    Hydra's, which names the class, the exception and the config key.
    """
    if not isinstance(err, InstantiationException):
        return None
    cause = err.__cause__
    if isinstance(cause, user_error_types()):
        return cause
    if isinstance(cause, _loaded(REJECTED_SETTINGS)):
        return err
    return None


def run_cli(fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn``; a user error prints ``error: <message>`` and exits 1 (no traceback unless
    ``HYDRA_FULL_ERROR=1``). A preempted run's ``SystemExit`` (checkpoint saved) passes through
    with its own code (:class:`llamalab.runner.callbacks.Preempted`)."""
    try:
        return fn(*args)
    except Exception as err:
        user_error = err if isinstance(err, user_error_types()) else rejected_setting(err)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(1)
