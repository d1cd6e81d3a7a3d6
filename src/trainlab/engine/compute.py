"""How a run uses the machine: torch's CPU threads, and torch's CUDA check on CPU runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def set_threads(threads: int | str) -> int:
    """Set torch's intra-op threads; `auto` is half the usable cores, at least 1 and at most 8.

    On a small shared machine extra threads fight other processes for cores (2 threads on 2
    cores ran 2 to 16 times slower under load than 1); on a big one a few help a CPU run.
    """
    import torch

    if threads == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, min(8, (cores or 2) // 2))
    torch.set_num_threads(int(threads))
    return int(threads)


@contextlib.contextmanager
def torch_cuda_check(trainer: Any = None) -> Iterator[None]:
    """Torch's own test for CUDA inside the block, Lightning's again afterwards; with `trainer`,
    only where it trains on the CPU and without a fork-based launcher.

    Importing Lightning sets NVML_CHECK, so that a fork-based launcher can fork before CUDA is
    initialised, and torch's optimizers then ask NVML whether CUDA is there on every step of a
    CPU run: 0.03 to 0.43 ms a step on 2-core machines (bench/RESULTS.md), up to a tenth of a
    small MLP's step. Only fork-based launchers (those that also work in notebooks) need it.
    Processes that a spawn launcher starts (`start_method=spawn`) import Lightning afresh and
    keep its check: slower there, not wrong. DDP's default launcher runs this in every process.
    """
    saved = None
    if trainer is None or _trains_on_cpu_without_fork(trainer):
        saved = os.environ.pop(NVML_CHECK, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[NVML_CHECK] = saved


def _trains_on_cpu_without_fork(trainer: Any) -> bool:
    from lightning.pytorch.accelerators import CPUAccelerator

    launcher = trainer.strategy.launcher
    forks = launcher is not None and launcher.is_interactive_compatible
    return isinstance(trainer.accelerator, CPUAccelerator) and not forks
