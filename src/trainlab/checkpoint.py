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
import random
import subprocess
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from trainlab import __version__
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
    """Load a checkpoint file, or raise a UserError that names the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist. Pass ckpt_path=<file>; each run keeps "
            "last.ckpt and best.ckpt in <run dir>/checkpoints/."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, or pickled objects we refuse to run
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} cannot be read ({reason}). It may be truncated (a run killed "
            "while saving) or not a checkpoint; try the run's other checkpoint (last.ckpt or "
            "best.ckpt)."
        ) from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(
            f"{path} holds no trainlab config: it was not written by trainlab.train, so the "
            "model cannot be rebuilt from it."
        )
    return ckpt


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


def check_same_model(ckpt: dict[str, Any], path: str | Path, model_cfg: Any) -> None:
    """Refuse to resume `model_cfg` from a checkpoint written by a different model."""
    stored = OmegaConf.to_container(stored_config(ckpt).model, resolve=True)
    current = OmegaConf.to_container(model_cfg, resolve=True)
    if stored != current:
        differences = ", ".join(
            f"{key}: {theirs!r} there, {ours!r} here"
            for key, theirs, ours in _differences(stored, current, "model")
        )
        raise UserError(
            f"checkpoint {path} was written by a different model ({differences}). Resume with "
            "the overrides of the run that wrote it, or start a new run without ckpt_path/resume."
        )


def _differences(a: Any, b: Any, prefix: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from _differences(a.get(key), b.get(key), f"{prefix}.{key}")
    elif a != b:
        yield prefix, a, b


def latest_good(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint of a run (last.ckpt first), or None if it has none.

    A damaged file is reported and skipped, so resumption falls back to the one before it.
    """
    folder = run_dir / "checkpoints"
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", -p.stat().st_mtime))
    for path in files:
        try:
            return path, read(path)
        except UserError as e:
            print(f"resume: skipping {path}: {e}")
    return None
