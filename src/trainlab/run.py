"""The pieces of a run around training: threads, the CUDA check, the printed config, metrics.json.

metrics.json is the stable record of a run that later tools read (see README, "Run directories").
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
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


def quiet_lightning() -> None:
    """One copy of each Lightning message, without its advertising tips or known-harmless warnings.

    Under Hydra the root logger prints to the console and to <run dir>/train.log, so Lightning's
    own console handlers would print every line twice.
    """
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: "Tip:" not in record.getMessage())
    # The run directory already holds .hydra/ when the CSV logger starts writing into it, and
    # its checkpoints when a run resumes.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings(
        "ignore", message="Experiment logs directory .* exists and is not empty"
    )
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # Steps are counted across epochs: an epoch shorter than log_every_n_steps still gets the
    # step loss logged every log_every_n_steps steps, and its epoch means every epoch.
    warnings.filterwarnings("ignore", message="The number of training batches .* is smaller than")
    # A GAN has no validation step: the data modules' validation split simply goes unused.
    warnings.filterwarnings("ignore", message="You passed in a `val_dataloader` but have no")


def print_config(cfg: Any) -> None:
    """The composed config as a tree, one branch per top-level key."""
    import rich
    import rich.syntax
    import rich.tree
    from omegaconf import OmegaConf

    tree = rich.tree.Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else str(value)
        tree.add(key).add(rich.syntax.Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rich.print(tree)


def flat_hparams(config: dict[str, Any], choices: dict[str, str] | None = None) -> dict[str, Any]:
    """{"optimizer.lr": 0.001, "optimizer": "adam", ...}: readable columns for W&B's tables.

    `_target_` and `_partial_` entries are dropped: the group choice names them better.
    """
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if str(key).startswith("_"):
                continue
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(config, "")
    for group, option in (choices or {}).items():
        if option is not None and not group.startswith("hydra"):
            flat[group] = option
    return flat


def final_metrics(trainer: Any) -> dict[str, float]:
    """Lightning's last logged values, with epoch means under their plain names."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if key.endswith("_step"):
            continue
        metrics[key.removesuffix("_epoch")] = float(value)
    return metrics


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so that a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unfinished_run(runs_dir: Path, overrides: list[str]) -> Path | None:
    """The newest run under runs_dir made with these overrides, if it did not finish and has a
    checkpoint: what `resume=auto` continues. (`resume=` and `hydra.` overrides are ignored.)"""
    import yaml

    from trainlab.run_dirs import newest_first

    def key(items: list[str]) -> list[str]:
        return sorted(o for o in items if not o.startswith(("resume=", "hydra.")))

    wanted = key(overrides)
    for run_dir in newest_first(list(runs_dir.glob("*"))):
        recorded = run_dir / ".hydra" / "overrides.yaml"
        if not recorded.is_file() or key(yaml.safe_load(recorded.read_text()) or []) != wanted:
            continue
        try:
            status = json.loads((run_dir / METRICS_FILE).read_text()).get("status")
        except (OSError, ValueError):
            status = None  # killed before it could write metrics.json
        if status == "finished":
            return None
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            return run_dir.resolve()
    return None
