"""Scale: memory planning (``plan``, its formulas in ``memory``), applied from outside the model.
Plain arithmetic: it builds no model and imports no Lightning, Hydra or DeepSpeed."""

from llamalab.scale.memory import STRATEGIES
from llamalab.scale.plan import (
    STAGES,
    Plan,
    PlanError,
    StageModels,
    check_fits,
    default_cluster,
    make_plan,
)

__all__ = [
    "STAGES",
    "STRATEGIES",
    "Plan",
    "PlanError",
    "StageModels",
    "check_fits",
    "default_cluster",
    "make_plan",
]
