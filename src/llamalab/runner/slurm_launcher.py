"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, requeued jobs resuming.

submitit runs each sweep point as one SLURM job and asks SLURM for SIGUSR2 ``signal_delay_s``
before the time limit (``--signal=USR2@...``). In the job, :class:`~llamalab.runner.callbacks.
PreemptionCheckpoint` takes the signal, saves ``checkpoints/last.ckpt`` at the next step boundary
on every rank, then calls submitit's own handler (rank 0 acts): submitit asks the launcher for
the submission to requeue (:meth:`ResumingSlurmLauncher.checkpoint`) and runs ``scontrol requeue``.
The requeued job runs the same sweep point, in the same directory (the sweep directory's
timestamp is resolved once, in the process that submitted the sweep), with ``ckpt_path=auto``
added: it continues from the checkpoint (or starts fresh if there is none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

_CKPT_KEYS = ("ckpt_path=", "+ckpt_path=", "++ckpt_path=")


def resume_overrides(overrides: Sequence[str]) -> list[str]:
    """A sweep point's overrides with ``ckpt_path=auto`` in place of any ``ckpt_path``."""
    return [o for o in overrides if not o.startswith(_CKPT_KEYS)] + ["ckpt_path=auto"]


class ResumingSlurmLauncher(SlurmLauncher):
    """submitit's SLURM launcher whose requeued jobs carry ``ckpt_path=auto``."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The submission submitit requeues: the same call (sweep overrides, job directory key,
        job number, job id, Hydra's singletons) with ``ckpt_path=auto`` among the overrides."""
        overrides, *rest = args
        return super().checkpoint(resume_overrides(overrides), *rest, **kwargs)
