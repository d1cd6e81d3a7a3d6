"""metrics.json, the stable record of a run that later tools read (see README, "Run
directories"): what goes into it, how it is written, and finding the run that resume=auto
continues by it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"


def final_metrics(trainer: Any) -> dict[str, float]:
    """Lightning's last logged values, with epoch means under their plain names."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        if key.endswith("_step"):
            continue
        metrics[key.removesuffix("_epoch")] = float(value)
    return metrics


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


# The parts of a config that say what a run computes (with what the command line set).
CHOSEN = ("model", "data", "optimizer", "scheduler", "trainer")


def chosen_hparams(flat: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Of flat_hparams, the keys a user chose: what the command line set (`experiment`,
    `optimizer.lr`, ...) and the model, data, optimizer, scheduler and trainer values, with
    bookkeeping (paths, loggers, how often to log or save) left out: TensorBoard's HParams."""
    from trainlab.engine.config import is_bookkeeping

    given = {o.partition("=")[0].lstrip("+~").partition("@")[0] for o in overrides}
    return {
        key: value
        for key, value in flat.items()
        if (key.split(".")[0] in CHOSEN or any(key == g or key.startswith(f"{g}.") for g in given))
        and not is_bookkeeping(key)
    }


def ranked_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What runs are ranked by: the monitored metric's best (as <metric>_best), and the final
    validation and test values of a run's record (metrics.json)."""
    metrics = {
        key: float(value)
        for key, value in record.items()
        if key.startswith(("val/", "test/")) and isinstance(value, int | float)
    }
    monitor = record.get("monitor") or {}
    if monitor.get("best") is not None:
        metrics[f"{monitor['metric']}_best"] = float(monitor["best"])
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

    from trainlab.engine.run_dirs import newest_first

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
