"""What a trainlab checkpoint holds beyond Lightning's own, and how to read one back safely.

Every checkpoint carries the run's resolved config, so `eval` rebuilds the model from the file
alone, and what a resumed run needs to continue exactly. Nothing is pickled: files load with
`torch.load(weights_only=True)`, and are written whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from omegaconf import OmegaConf

from trainlab import __version__
from trainlab.commands import override, shell
from trainlab.config import check_targets
from trainlab.errors import UserError

KEY = "trainlab"


class CheckpointRecord(pl.Callback):
    """Makes every checkpoint self-describing and resumable to the bit.

    Beside Lightning's own state it stores the resolved run config (plain dicts and lists), the
    git commit, the versions of the main packages, the W&B run id (a resumed run continues the
    same W&B run), the random number generators' states (a resumed run draws the same
    dropout masks and data order as an uninterrupted one), and the class names where the data
    set has them (an exported model names its predictions with them).
    """

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.commit = _git_commit()
        self._restored = False

    def on_fit_start(self, trainer, pl_module) -> None:
        # Under DDP each rank draws its own dropout masks and augmentations: seed + rank (a
        # resumed run has just had its generators restored instead).
        seed = self.config.get("seed")
        if trainer.world_size > 1 and seed is not None and not self._restored:
            pl.seed_everything(seed + trainer.global_rank, workers=True, verbose=False)

    def on_train_start(self, trainer, pl_module) -> None:
        # The training loader's position in its epoch (data/memory.py, data/resumable.py): a
        # schedule that asks for the run's length (estimated_stepping_batches) makes Lightning
        # set up the training data before it restores the loops, and it then never hands the
        # loader its saved state. Handed here, before the first batch is drawn.
        trainer.fit_loop._load_combined_loader_states()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:  # the metric history up to here is on disk too
            logger.save()
        checkpoint[KEY] = {
            "config": self.config,
            "version": __version__,
            "git_commit": self.commit,
            "packages": _package_versions(),
            "wandb_id": _wandb_id(trainer),
            "rng": _rng_states(),
            "classes": _class_names(trainer),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get(KEY, {}).get("rng")
        if rng:
            _set_rng_states(rng)
            self._restored = True


class LastCheckpoint(Checkpoint):
    """Keeps <run dir>/checkpoints/last.ckpt at the run's latest state, whatever the monitored
    metric did: at the end of every epoch, and every `every_n_steps` optimizer steps if set.

    Lightning's ModelCheckpoint(save_last=True) writes last.ckpt only beside a top-k save, so
    after the metric stops improving its last.ckpt stays at the best epoch. As a Checkpoint,
    Lightning runs this after the LightningModule's own on_train_epoch_end and after the other
    checkpoint callbacks (which come first in the list), so the file holds the epoch's
    validation and the best checkpoint's bookkeeping as they end the epoch; a run resumed from
    it starts the next epoch. (StopOnSignal writes the same file at a signal.)
    """

    def __init__(self, ckpt_dir: str | Path, every_n_steps: int | None = None):
        self.path = Path(ckpt_dir) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n, step = self.every_n_steps, trainer.global_step
        if not n or step == 0 or step % n or step == self._saved_step:
            return  # (with gradient accumulation a step spans several batches)
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the end of the epoch saves, after its validation
        self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the full state, quietly
        self._saved_step = trainer.global_step


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


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("trainlab", "torch", "lightning", "torchmetrics", "hydra-core", "torchvision"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def _wandb_id(trainer) -> str | None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            return logger.version
    return None


def _class_names(trainer) -> list[str] | None:
    # Image folders and lists name their classes (`classes`); tensors only have labels.
    classes = getattr(trainer.datamodule, "classes", None)
    return [str(c) for c in classes] if classes else None


def _rng_states() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            numpy_state[0],
            torch.from_numpy(numpy_state[1].astype(np.int64)),
            *numpy_state[2:],
        ],
        "python": random.getstate(),
    }


def _set_rng_states(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))


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


# Keys that say where a run writes, what it reports or how often it saves, not what it computes:
# changing them on resume is not a change of the run. (Checked as prefixes of dotted keys.)
BOOKKEEPING = (
    "resume",
    "resume_allow_changes",
    "ckpt_path",
    "checkpoint_every_n_steps",
    "steps_per_call",  # the same weights either way; a resumed run keeps the checkpoint's
    "test",
    "tags",
    "threads",
    "paths",
    "logger",
    "data.data_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.profiler",
    "callbacks.lr_monitor",
    "effective_batch_size",  # derived from keys that are compared
    "effective_lr",
)


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{key: [stored value, current value]} for every setting that differs, bookkeeping aside.

    A key that only one of the configs has comes from another version of trainlab (an option
    added since) and is not compared; a section replaced by a value (scheduler=none) is.
    """
    changes: dict[str, list[Any]] = {}

    def walk(theirs: Any, ours: Any, prefix: str) -> None:
        if _is_bookkeeping(prefix):
            return
        if isinstance(theirs, dict) and isinstance(ours, dict):
            for key in sorted(theirs.keys() & ours.keys(), key=str):
                walk(theirs[key], ours[key], f"{prefix}.{key}" if prefix else str(key))
        elif theirs != ours:
            changes[prefix] = [theirs, ours]

    walk(stored, current, "")
    return changes


def _is_bookkeeping(key: str) -> bool:
    return any(key == b or key.startswith(f"{b}.") for b in BOOKKEEPING)


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


class ApplyOptimizerChanges(pl.Callback):
    """On a resume with resume_allow_changes=true, the new optimizer settings take effect.

    Lightning restores the optimizer's parameter groups from the checkpoint, over the values
    the new config built them with: without this, `optimizer.lr=0.01` would be recorded while
    the run went on with the old rate. The new config's values are read from the freshly built
    optimizers (on_fit_start, before the restore) and put back after it (on_train_start): a
    changed learning rate scales the restored rate and its schedule, so the schedule goes on
    from where it was; any other changed setting (weight_decay, betas, ...) is copied.
    """

    def __init__(self, changes: dict[str, list[Any]]):
        self.keys = {k.removeprefix("optimizer.") for k in changes if k.startswith("optimizer.")}
        self._fresh: list[list[dict[str, Any]]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fresh = [[dict(g) for g in opt.param_groups] for opt in trainer.optimizers]

    def on_train_start(self, trainer, pl_module) -> None:
        for opt, fresh_groups in zip(trainer.optimizers, self._fresh, strict=True):
            for group, fresh in zip(opt.param_groups, fresh_groups, strict=True):
                for key in self.keys - {"lr"}:
                    if key in fresh:
                        group[key] = fresh[key]
                self._scale_lr(trainer, opt, group, fresh)  # lr_scaling may change it too

    @staticmethod
    def _scale_lr(trainer, opt, group: dict[str, Any], fresh: dict[str, Any]) -> None:
        # The rate a schedule started from (initial_lr), or the rate itself without one.
        ratio = fresh.get("initial_lr", fresh["lr"]) / group.get("initial_lr", group["lr"])
        if ratio == 1:
            return
        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
            if key in group:
                group[key] *= ratio
        index = opt.param_groups.index(group)
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is opt:
                for name in ("base_lrs", "_last_lr"):
                    values = getattr(config.scheduler, name, None)
                    if values is not None:
                        values[index] *= ratio


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
