"""Scale: memory planning (``plan``), applied from outside the model. Plain Python: importing
this package pulls in no torch, Lightning or DeepSpeed."""

from llamalab.scale.plan import (
    STAGES,
    STRATEGIES,
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
