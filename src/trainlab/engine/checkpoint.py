"""What a trainlab checkpoint holds beyond Lightning's own, and how to read one back safely.

Every checkpoint carries the run's resolved config, so `eval` rebuilds the model from the file
alone, and what a resumed run needs to continue exactly (written by the callbacks in
trainlab.engine.callbacks.checkpoints). Nothing is pickled: files load with
`torch.load(weights_only=True)`, and are written whole or not at all.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from trainlab.engine.commands import override, shell
from trainlab.engine.config import (
    check_targets,
    is_bookkeeping,
    parameter_default,
    rename_moved_targets,
)
from trainlab.engine.errors import UserError

KEY = "trainlab"  # the checkpoint's entry for what trainlab adds


def best_path(trainer) -> str | None:
    """The best checkpoint the run's ModelCheckpoint kept, if it has one."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.best_model_path:
            return callback.best_model_path
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it and renames it into place, so a
    checkpoint on disk is always whole: a kill or a full disk mid-write leaves the old one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        buffer = io.BytesIO()  # serialise first: write errors then surface as OSError
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise UserError(
                    f"no space left to write {path} ({e.strerror}). The previous checkpoints "
                    f"in {path.parent} are intact; free some space (or move paths.log_dir) and "
                    "resume with resume=auto."
                ) from None
            raise


def read(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file, or raise a UserError that names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist. Pass ckpt_path=<file>; each run keeps "
            "last.ckpt and best.ckpt in <run dir>/checkpoints/."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, or pickled objects we refuse to run
        raise UnreadableCheckpoint(path, why_unreadable(e)) from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(
            f"{path} holds no trainlab config: it was not written by trainlab.train, so the "
            "model cannot be rebuilt from it."
        )
    rename_moved_targets(ckpt[KEY].get("config"))  # a run trained before a net or module moved
    check_targets(ckpt[KEY].get("config") or {}, f"checkpoint {path}")  # whatever reads it
    return ckpt


class UnreadableCheckpoint(UserError):
    """A checkpoint file that torch cannot load: damaged, or holding objects it refuses."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"checkpoint {path} cannot be read: {reason}. Try the run's other checkpoint "
            "(last.ckpt or best.ckpt in the same folder)."
        )


def why_unreadable(error: Exception) -> str:
    """What torch.load's error means for a checkpoint, in words, without torch's advice to
    load it with weights_only=False (which would run whatever code the file holds)."""
    text = str(error)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return (
            f"it holds a pickled Python object ({refused.group(1)}), which could run code when "
            "loaded and is refused (trainlab's checkpoints hold only tensors and plain values)"
        )
    if "Weights only load failed" in text or isinstance(error, pickle.UnpicklingError):
        return "it is damaged, or not a checkpoint (its bytes are not a torch file)"
    if isinstance(error, EOFError) or not text.strip():
        return "it is damaged: empty or cut short"
    return "it is damaged: cut short (killed while saving?), or not a checkpoint"


def stored_config(ckpt: dict[str, Any]) -> Any:
    return OmegaConf.create(ckpt[KEY]["config"])


def build_model(ckpt: dict[str, Any]) -> pl.LightningModule:
    """Rebuild the LightningModule from the checkpoint's own config and load its weights."""
    cfg = stored_config(ckpt)
    check_targets(cfg.model, "the checkpoint's model config")
    check_targets(cfg.optimizer, "the checkpoint's optimizer config")
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not fit its model config: {e}") from None
    return model


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [stored value, current value]} for every setting that differs, bookkeeping aside.

    A key that only one of the configs has is compared with the default of the `_target_`
    parameter it sets (data.per_device=true given to one run only); otherwise it comes from
    another version of trainlab (an option added since) and is not compared. A section
    replaced by a value (scheduler=none) is compared.
    """
    changes: dict[str, list[Any]] = {}

    def walk(theirs: Any, ours: Any, prefix: str) -> None:
        if is_bookkeeping(prefix):
            return
        if isinstance(theirs, dict) and isinstance(ours, dict):
            for key in sorted(theirs.keys() | ours.keys(), key=str):
                here = f"{prefix}.{key}" if prefix else str(key)
                if key in theirs and key in ours:
                    walk(theirs[key], ours[key], here)
                    continue
                known, default = parameter_default(ours.get("_target_"), key)
                if known:
                    walk(theirs.get(key, default), ours.get(key, default), here)
        elif theirs != ours:
            changes[prefix] = [theirs, ours]

    walk(stored, current, "")
    return changes


def check_config(ckpt: dict[str, Any], path: str | Path, cfg: Any) -> dict[str, list[Any]]:
    """The run's config against the one stored in the checkpoint it resumes from: refuse any
    difference unless cfg.resume_allow_changes, and return the differences allowed."""
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(ckpt[KEY]["config"], current)
    if not changes:
        return changes
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if not cfg.get("resume_allow_changes"):
        what = "model" if any(key.startswith("model.") for key in changes) else "config"
        raise UserError(
            f"checkpoint {path} was written by a different {what} ({listed}; stored -> now). "
            "Resume with the settings of the run that wrote it (see .hydra/overrides.yaml in "
            "its run directory), add resume_allow_changes=true to continue with the new values "
            "(recorded in metrics.json as resume_changes), or start a new run without "
            "resume/ckpt_path."
        )
    if any(key.startswith("model.") for key in changes):
        _check_weights_fit(ckpt, path, cfg)
    print(f"Resuming with a changed config (resume_allow_changes=true): {listed}.")
    return changes


def _check_weights_fit(ckpt: dict[str, Any], path: str | Path, cfg: Any) -> None:
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        reason = lines[1] if len(lines) > 1 else lines[0]  # the first says only "Error(s) in"
        raise UserError(
            f"the weights in {path} do not fit the changed model ({reason}): a change of model "
            "that changes its parameters cannot resume; start a new run without resume/ckpt_path."
        ) from None


def latest_good(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run (last.ckpt first), or None if it has none yet.

    A damaged file is reported and skipped, so resumption falls back to the one before it; if
    every checkpoint is damaged, a UserError names them and changes nothing.
    """
    folder = run_dir / "checkpoints"
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    damaged = []
    for path in files:
        try:
            return path, read(path)
        except UserError as e:
            print(f"resume: skipping {path}: {e}")
            damaged.append(f"{path}: {e.reason}" if isinstance(e, UnreadableCheckpoint) else str(e))
    if not damaged:
        return None
    here = shell([override("hydra.run.dir", run_dir)])
    raise UserError(
        f"resume=auto: no checkpoint of {run_dir} can be read ({'; '.join(damaged)}). Nothing "
        f"in {run_dir} was changed. To start this run over in it, run the same command with "
        f"resume=restart in place of resume=auto, and {here} (the run's earlier files are moved "
        f"to {run_dir}/previous-<n>/); to continue from a checkpoint kept elsewhere, pass "
        "ckpt_path=<file> instead."
    )


def set_aside(run_dir: Path) -> Path | None:
    """resume=restart: move what an earlier run left in run_dir (checkpoints, metrics, logger
    files) into run_dir/previous-<n>/, so a new run starts there without losing any of it.

    Hydra's .hydra/ and the *.log files that this process already writes to stay in place.
    """
    keep = {".hydra"}
    earlier = [
        p
        for p in run_dir.iterdir()
        if p.name not in keep and p.suffix != ".log" and not p.name.startswith("previous-")
    ]
    if not earlier:
        return None
    n = 1
    while (run_dir / f"previous-{n}").exists():
        n += 1
    target = run_dir / f"previous-{n}"
    target.mkdir()
    for path in earlier:
        shutil.move(path, target / path.name)
    return target
