"""What a trainlab checkpoint holds beyond Lightning's own, and how to read one back safely.

Every checkpoint carries the run's resolved config, so `eval` rebuilds the model from the file
alone. Nothing is pickled: files load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainlab import __version__
from trainlab.config import check_targets
from trainlab.errors import UserError

KEY = "trainlab"


class StoreConfig(pl.Callback):
    """Writes the resolved run config (plain dicts and lists) into every checkpoint."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = {"config": self.config, "version": __version__}


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
