"""What a run prints: one copy of each Lightning message, without the noise, and the config."""

from __future__ import annotations

import logging
import warnings
from typing import Any


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
    # A resumed run's directory already holds its checkpoints.
    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
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
