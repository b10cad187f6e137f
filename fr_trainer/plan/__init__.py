"""Memory and communication planner of the sharded head (`fr-trainer plan`)."""

from fr_trainer.plan.model import (
    Collective,
    HeadPlan,
    gpus_needed,
    head_collectives,
    parse_bytes,
    parse_count,
    plan_head,
)

__all__ = ["Collective", "HeadPlan", "gpus_needed", "head_collectives", "parse_bytes",
           "parse_count", "plan_head"]
