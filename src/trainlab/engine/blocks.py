"""steps_per_call: how many optimizer steps one trip through Lightning's training loop takes.

Lightning's loop costs 0.2 to 1.3 ms a call whatever the step (hook dispatch over every
callback, progress bookkeeping, logging checks): more than a small net's whole step on a GPU.
With steps_per_call=N the in-memory loader yields Blocks of N batches and the module
(trainlab.engine.module) takes one plain optimizer step per batch inside one training_step, so that
cost is paid once per N.

What a user sees stays exact because N divides every interval counted in steps
(log_every_n_steps, checkpoint_every_n_steps, an integer val_check_interval, max_steps, a
ModelCheckpoint's every_n_train_steps): those steps always end a block. Whatever counts
Lightning's batches in a way N cannot fit keeps N = 1, and choose() says why.
"""

from __future__ import annotations

import copy
import math
import time

import torch

KEY = "steps_per_call"  # in checkpoints: a resumed run keeps the blocks it was written with
CALL_S = 0.05  # auto: a call of at least 50 ms, so that Lightning's ~1 ms is 2% of it or less
MOST = 64


def choose(module, requested: int | str) -> tuple[int, str]:
    """(N, why) for this fit of `module` (a TrainlabModule), the same on every rank."""
    trainer = module.trainer
    reason = _needs_one(module, trainer)
    if reason:
        return 1, reason
    intervals = _intervals(trainer)
    fits = [n for n in range(1, MOST + 1) if all(v % n == 0 for v in intervals.values())]
    if requested == "auto":
        step_s = trainer.strategy.broadcast(_time_step(module))  # rank 0's, for every rank
        wanted = math.ceil(CALL_S / step_s)
        n = next((n for n in fits if n >= wanted), fits[-1])
        why = f"auto: a step takes {step_s * 1e3:.2f} ms, {wanted} steps make {CALL_S * 1e3:g} ms"
    else:
        wanted = int(requested)
        n = max(f for f in fits if f <= wanted)
        why = "as set"
    named = ", ".join(f"{k}={v}" for k, v in intervals.items())
    if n < wanted:
        why += f"; {n} is the largest count up to that which divides {named}"
    elif n > wanted:  # auto rounds up to a count that ends on every logged or saved step
        why += f"; {n} is the first count from there that divides {named}"
    return n, why


def apply(trainer, n: int, before: int = 1) -> None:
    """Make the training loader yield blocks of n (in place of `before`), and count an integer
    val_check_interval in the blocks that Lightning sees as its batches."""
    if trainer.datamodule is not None:  # None: fit given loaders, which take no blocks
        trainer.datamodule.steps_per_call = n
    if isinstance(trainer.val_check_interval, int):
        trainer.val_check_interval = trainer.val_check_interval * before // n


def resumed(choice: dict, stored: int | None) -> dict | None:
    """The choice for a run resumed from a checkpoint written with `stored` steps a call (None:
    written before blocks, so 1): that one, as Lightning's restored counters count its calls;
    None to keep `choice`."""
    stored = stored or 1
    if stored == choice["steps_per_call"] or choice["why"].endswith(": 1"):
        return None  # the same, or this run cannot take blocks at all
    return {"steps_per_call": stored, "why": "as in the checkpoint resumed from"}


def direct(module, trainer) -> bool:
    """Whether a block's steps may skip Lightning's per-step wrappers (manual_backward and its
    LightningOptimizer: hook dispatch over every callback for on_before/after_backward and
    on_before_optimizer_step, profiler contexts), about 0.4 ms a step on 2 CPU cores. They do
    nothing for this run when no callback or module overrides those hooks, one device trains
    (DDP's backward preparation stays Lightning's) and the precision needs no gradient
    scaler: the same arithmetic, so the same weights to the bit."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import SingleDeviceStrategy

    hooks = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
    for base, objects in ((pl.Callback, trainer.callbacks), (pl.LightningModule, [module])):
        for obj in objects:
            if any(getattr(type(obj), h) is not getattr(base, h) for h in hooks):
                return False
    precision = trainer.precision_plugin
    plain = type(precision) is Precision or (
        type(precision) is MixedPrecision and precision.scaler is None
    )
    return plain and type(trainer.strategy) is SingleDeviceStrategy


def _needs_one(module, trainer) -> str | None:
    """Why this fit must take one step per call, if it must."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if module.automatic_optimization:
        return "gradient accumulation and clipping need Lightning's loop: 1"
    if not module.plain_steps:
        return "the module steps its optimizers itself: 1"
    if getattr(trainer.datamodule, "loader", None) != "memory":
        return "the DataLoader path yields one batch at a time: 1"
    if trainer.fast_dev_run or trainer.overfit_batches:
        return "fast_dev_run and overfit_batches count Lightning's batches: 1"
    if trainer.limit_train_batches != 1.0:
        return "limit_train_batches counts Lightning's batches: 1"
    interval = trainer.val_check_interval
    if not isinstance(interval, int) and interval != 1.0:
        return "a fractional or timed val_check_interval counts Lightning's batches: 1"
    for callback in trainer.callbacks:
        if isinstance(callback, LearningRateMonitor) and callback.logging_interval != "epoch":
            return "lr_monitor logs the rate before every step: 1"
    return None


def _intervals(trainer) -> dict[str, int]:
    """Every interval counted in optimizer steps, by the name a user sets it with."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from trainlab.engine.callbacks.checkpoints import LastCheckpoint

    found = {"trainer.log_every_n_steps": trainer.log_every_n_steps}
    if isinstance(trainer.val_check_interval, int):
        found["trainer.val_check_interval"] = trainer.val_check_interval
        # and the epoch's length: a shorter last block would end on a check of its own
        found["the epoch's batches"] = trainer.datamodule.train_dataloader().num_batches
    if trainer.max_steps > 0:
        found["trainer.max_steps"] = trainer.max_steps
    for callback in trainer.callbacks:
        if isinstance(callback, LastCheckpoint) and callback.every_n_steps:
            found["checkpoint_every_n_steps"] = callback.every_n_steps
        elif isinstance(callback, ModelCheckpoint) and callback._every_n_train_steps:
            found["callbacks.checkpoint.every_n_train_steps"] = callback._every_n_train_steps
    return found


def _time_step(module) -> float:
    """Seconds of one plain step of a copy of the net on a real training batch (the fastest of
    a few), leaving the model, the optimizer and every random generator as they were."""
    datamodule = module.trainer.datamodule
    first = next(iter(datamodule.train_dataloader()))  # its own seeded order: no global draw
    x, y = first[0] if isinstance(first, list) else first  # a Block, from an earlier fit
    x, y = datamodule.on_after_batch_transfer((x, y), 0)
    net = copy.deepcopy(module.net).to(x.device)
    optimizer = module.make_optimizer(params=net.parameters())
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    times = []
    with torch.random.fork_rng(devices=cuda):
        for _ in range(5):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            module.loss(net(x), y).backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    return max(min(times[2:]), 1e-6)  # the first steps warm up
