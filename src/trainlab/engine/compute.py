"""How a run uses the machine: the accelerator and devices it asks for, checked before it
starts; torch's CPU threads; and torch's CUDA check on CPU runs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from trainlab.engine.errors import UserError

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


# Lightning's accelerators by the names its Trainer takes.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def check_hardware(cfg: Any) -> None:
    """The Trainer's accelerator and devices exist on this machine, asked before Hydra runs the
    job: Lightning would find out only once it builds the Trainer, inside the run. (torch is
    imported only to count GPUs where a GPU is asked for.)"""
    from omegaconf import OmegaConf

    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    devices = OmegaConf.select(cfg, "trainer.devices", default="auto")
    if not isinstance(accelerator, str) or accelerator == "auto":
        return
    if accelerator not in ACCELERATORS:
        raise UserError(
            f"'trainer.accelerator' is {accelerator!r}, which Lightning does not know: it takes "
            f"{', '.join(ACCELERATORS)} (auto: a GPU where there is one)."
        )
    other = "choose trainer=cpu, or trainer.accelerator=auto to use one where there is one"
    if accelerator == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise UserError(
                "trainer.accelerator=tpu needs a TPU and torch_xla, which this Python does "
                f"not have: {other}."
            )
        return
    if accelerator == "cpu":
        return
    import torch

    found = (
        int(torch.backends.mps.is_available())
        if accelerator == "mps"
        else torch.cuda.device_count()
    )
    kind = "an Apple GPU (mps)" if accelerator == "mps" else "a GPU (CUDA)"
    if found == 0:
        raise UserError(
            f"trainer.accelerator={accelerator} (e.g. trainer=gpu or trainer=ddp) needs {kind}, "
            f"and torch finds none on this machine: {other}."
        )
    wanted = _device_indices(devices)
    if wanted and max(wanted) >= found:
        raise UserError(
            f"trainer.devices={OmegaConf.to_container(cfg.trainer)['devices']!r} asks for "
            f"device{'s' if len(wanted) > 1 else ''} {', '.join(map(str, wanted))}, but this "
            f"machine has {found} ({', '.join(map(str, range(found)))}): ask for at most "
            f"{found}, or trainer.devices=-1 for all of them."
        )


def _device_indices(devices: Any) -> list[int]:
    """The device indices that trainer.devices names: a count n is 0..n-1; -1 and auto, none."""
    from omegaconf import ListConfig

    if isinstance(devices, str) and devices != "auto":
        return [int(p) for p in devices.split(",") if p.strip().isdigit()]
    if isinstance(devices, (list, ListConfig)):
        return [d for d in devices if _is_int(d)]
    return list(range(devices)) if _is_int(devices) and devices > 0 else []


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
