"""The project's own callbacks, one module for each kind:

- progress: the progress display (a live bar, or one line per epoch in a log file);
- guards: stop a run safely (a signal, a loss that is no longer a number, ranks out of step);
- checkpoints: what every checkpoint holds, last.ckpt, optimizer changes on resume;
- pruning: a trial of an Optuna sweep reports to its study.

Lightning's standard callbacks and these are all composed from conf/callbacks/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainlab.engine.commands import train_command


@dataclass
class RunInfo:
    """What only train() knows when a run starts. It sets `callback.run_info` to one, before
    fitting, on every composed callback that has a `run_info` attribute; each callback that
    needs it starts with `RunInfo()`, so that it also works outside train(). (The run
    directory is the trainer's: `trainer.default_root_dir`, read in setup().)"""

    config: dict[str, Any] = field(default_factory=dict)  # resolved, as checkpoints store it
    resume_command: str = train_command("resume=auto")  # the shell line that continues the run
    # the config changes a resume was allowed (resume_allow_changes): {key: [stored, now]}
    changes: dict[str, list[Any]] = field(default_factory=dict)
