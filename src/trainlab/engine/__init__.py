"""The engine: everything that runs an experiment, which a forker never needs to open.

Command line and checks (cli, config, parameters, commands, jobs), run directories and records
(run_dirs, run_record, compare), the sweep's fork server (warm), checkpoints and resume
(checkpoint, callbacks), loggers, the fast training path (module, blocks, memory) and the
data-module base (datamodule). A forker's code imports the names in __all__, and only these:

    from trainlab.engine import TrainlabModule, InMemoryDataModule, UserError

Each is imported when first asked for, so that the command line starts without torch.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for readers of the source (editors, type checkers, engine.parameters)
    from trainlab.engine.datamodule import SPLIT_SEED, InMemoryDataModule, per_device_batch_size
    from trainlab.engine.errors import UserError
    from trainlab.engine.loggers import log_image
    from trainlab.engine.memory import Augment
    from trainlab.engine.module import TrainlabModule
    from trainlab.engine.resumable import ResumableDataLoader, run_seed

__all__ = [
    # the bases of LightningModules and in-memory data modules (docs/making-it-yours.md)
    "TrainlabModule",
    "InMemoryDataModule",
    "SPLIT_SEED",
    "per_device_batch_size",
    "Augment",
    "ResumableDataLoader",
    "run_seed",
    # a bad value: one paragraph, exit 2, no traceback
    "UserError",
    # an image in every logger that takes one
    "log_image",
]
_HOME = {
    "TrainlabModule": "module",
    "InMemoryDataModule": "datamodule",
    "SPLIT_SEED": "datamodule",
    "per_device_batch_size": "datamodule",
    "Augment": "memory",
    "ResumableDataLoader": "resumable",
    "run_seed": "resumable",
    "UserError": "errors",
    "log_image": "loggers",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f"trainlab.engine.{_HOME[name]}"), name)
    raise AttributeError(f"module 'trainlab.engine' has no attribute {name!r}")
