"""Learning-rate schedules, stepped once per optimizer step.

Each takes the optimizer and the run's total number of steps (which only the Trainer knows,
so the LightningModule passes it in) and starts from the optimizer's own lr: a sweep over
`optimizer.lr` moves the whole schedule.
"""

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field, NonNegativeInt
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from trainlab.engine import UserError


def total_steps(trainer: Any) -> int:
    """The run's number of optimizer steps, which a schedule must know from the start."""
    steps = trainer.estimated_stepping_batches
    loader = trainer.train_dataloader  # Lightning counts its blocks (steps_per_call) as batches
    if getattr(loader, "steps_per_call", 1) > 1 and steps != float("inf"):
        epochs = trainer.max_epochs
        steps = loader.num_batches * epochs if epochs not in (None, -1) else trainer.max_steps
        if trainer.max_steps != -1:
            steps = min(steps, trainer.max_steps)
    if steps == float("inf"):
        raise UserError(
            "a learning-rate schedule needs a run of known length: set trainer.max_epochs "
            "or trainer.max_steps, or choose scheduler=none."
        )
    return int(steps)


def with_schedule(
    optimizer: Optimizer, make_scheduler: Callable[..., LRScheduler] | None, trainer: Any
) -> Any:
    """What a LightningModule's configure_optimizers returns: the optimizer, and its schedule
    (if any) stepped after every optimizer step."""
    if make_scheduler is None:
        return optimizer
    scheduler = make_scheduler(optimizer, total_steps=total_steps(trainer))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: NonNegativeInt = 0) -> LRScheduler:
    """Linear warm-up over `warmup_steps`, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def onecycle(
    optimizer: Optimizer, total_steps: int, pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.25
) -> LRScheduler:
    """Smith's one-cycle policy, peaking at the optimizer's lr."""
    if pct_start * total_steps <= 1:  # torch would divide by zero, or run the warm-up backwards
        raise UserError(
            f"scheduler=onecycle warms up over {pct_start:g} of the run, but this run has only "
            f"{total_steps} optimizer steps: that is not more than one step of warm-up. Train "
            "for more steps, raise scheduler.pct_start, or choose scheduler=cosine."
        )
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)
