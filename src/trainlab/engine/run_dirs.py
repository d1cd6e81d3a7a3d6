"""Run directories that no two runs share by accident, and log and data dirs checked up front.

Hydra names a run's directory by the second it started (`${run_name:}`) and creates it with
exist_ok, so two runs started in the same second would write into one. The entry points
therefore choose the directory before Hydra starts: they create it with os.mkdir, which fails
when the name is taken, try <name>_2, <name>_3, ... until one is new, and hand it to Hydra as
hydra.run.dir (hydra.sweep.dir for `-m`). Lightning's DDP child processes re-run that command
line, so they find the same directory.

Directories named otherwise are shared on purpose and only created if missing: one given on the
command line (resume=auto), one named by a distributed job's id (every node of the job writes
there), Optuna's study directory (the same command continues the study).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainlab.engine import config
from trainlab.engine.commands import override
from trainlab.engine.errors import UserError
from trainlab.engine.jobs import shared_run_name

NEW_NAME = "${run_name:}"  # a directory whose name ends so is new for each run


@dataclass
class Chosen:
    """The run directory an entry point's command will use."""

    arguments: list[str]  # to append to the command line: the override naming a new directory
    sweep_dir: Path | None = None  # a sweep's directory (where it writes sweep.json)
    created: list[Path] = field(default_factory=list)  # the dirs this command made, deepest first


def claim_run_dir(entry: str, argv: list[str]) -> Chosen:
    """Create the directory this command will run in (a new one, unless the command names it or
    it is shared on purpose), and say how to hand it to Hydra; nothing where the command runs
    nothing (--help, --cfg, --info)."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_known_args(argv)[0]
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return Chosen([])
    cfg = compose(entry, args.overrides, args.config_name)
    multirun = args.multirun or str(cfg.hydra.mode).endswith("MULTIRUN")  # -m or hydra.mode
    parsed = OverridesParser.create().parse_overrides(args.overrides)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise UserError(
            f"'{sweeps[0].input_line}' gives several values, which makes a sweep: add -m to run "
            "one job for each, or give one value."
        )
    key = f"hydra.{'sweep' if multirun else 'run'}.dir"
    _check_required(cfg, {o.key_or_group for o in sweeps})
    if "data" in cfg:  # train and eval read data sets; export and predict do not
        check_data_dir(cfg)
    path = Path(str(OmegaConf.select(cfg, key)))
    # (absolute: a run with hydra.job.chdir=true is elsewhere when they are removed)
    missing = [p for p in (path.absolute(), *path.absolute().parents) if not os.path.exists(p)]
    _check_free_space(path.absolute(), "paths.log_dir")
    arguments = []
    if any(a.lstrip("+").startswith(f"{key}=") for a in args.overrides):
        make_dir(path, key)
    elif not _unresolved(cfg, key).endswith(NEW_NAME) or shared_run_name():
        make_dir(path, "paths.log_dir")
    else:
        path = claim(path)
        arguments = [override(key, path)]
        missing = [path.absolute(), *missing[1:]]
    return Chosen(arguments, path if multirun else None, missing)


def claim(path: Path) -> Path:
    """Create `path`, or `path_2`, `path_3`, ... where it is taken, atomically; return it."""
    make_dir(path.parent, "paths.log_dir")
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.mkdir()  # fails if another run got there first, however close in time
            return candidate
        except FileExistsError:
            n += 1
        except OSError as e:
            error = _cannot("create the run directory", candidate, e, "paths.log_dir")
            raise UserError(error) from None


def make_dir(path: Path, key: str) -> None:
    """Create `path` if missing; one line, not a traceback, where it cannot be a writable one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(_cannot("create the run directory", path, e, key)) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(_cannot("write to the run directory", path, _denied(), key))


# Less free space than this where a run would write: Hydra's first files (the run's config,
# about 20 KB) would fail there with a traceback. A disk that fills later, while a checkpoint is
# saved, keeps the checkpoints saved before (checkpoint.AtomicCheckpointIO).
MIN_FREE_BYTES = 256 * 1024


def _check_free_space(path: Path, key: str) -> None:
    existing = next((p for p in (path, *path.parents) if os.path.exists(p)), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else MIN_FREE_BYTES
    except OSError:
        return  # cannot tell: creating the directory reports what is wrong
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"the disk that holds {existing} has {free} bytes free, too few for a run's config, "
            f"logs and checkpoints: free some space, or choose another disk with {key}=<dir>."
        )


def remove_unless_kept(created: list[Path], trained_counts: bool = True) -> None:
    """After a command that a UserError stopped: remove the directories it created (`created`,
    deepest first, the run's or sweep's own first) where they hold no work: no checkpoint,
    and no record of a trained step (unless `trained_counts` is False: steps that trained as
    the command did not mean). Parents go only where empty: others may share them."""
    import json

    if not created or not created[0].is_dir():
        return
    run = created[0]
    if any(run.rglob("*.ckpt")):
        return
    for record in run.rglob("metrics.json") if trained_counts else ():
        try:
            if json.loads(record.read_text()).get("steps"):
                return
        except (OSError, ValueError, AttributeError):
            return  # unreadable: better kept
    shutil.rmtree(run, ignore_errors=True)
    for parent in created[1:]:
        try:
            parent.rmdir()
        except OSError:
            break


def _check_required(cfg: Any, swept: set[str]) -> None:
    """Values the command must give (`???` in its entry config, e.g. eval's ckpt_path): asked
    for here, before a run directory exists for a command that cannot run. A key the command
    sweeps over (`swept`) is given: each job gets one of its values (`cfg` leaves sweeps out)."""
    missing = [
        key for key in cfg if key != "hydra" and key not in swept and OmegaConf.is_missing(cfg, key)
    ]
    if missing:
        needed = " ".join(f"{key}=<value>" for key in missing)
        raise UserError(f"{', '.join(missing)} must be given: add {needed} to the command.")


def check_data_dir(cfg: Any) -> None:
    """The data dir must be a directory, or one that can be created (data sets download into
    it); it need not be writable when it exists (data sets already there are only read)."""
    path = Path(str(OmegaConf.select(cfg, "data.data_dir") or cfg.paths.data_dir)).absolute()
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
    except OSError as e:  # e.g. a name too long
        raise UserError(_cannot("use the data directory", path, e, "paths.data_dir")) from None
    if not existing.is_dir():
        error = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        raise UserError(_cannot("use the data directory", path, error, "paths.data_dir"))
    if existing != path and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(_cannot("create the data directory", path, _denied(), "paths.data_dir"))


def _denied() -> OSError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def _cannot(what: str, path: Path, error: OSError, key: str) -> str:
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        reason = "a file stands where a folder should be"
    else:
        reason = (error.strerror or str(error)).lower()
    return f"cannot {what} {path}: {reason}. Choose another with {key}=<dir>."


def compose(entry: str, overrides: list[str], config_name: str | None = None) -> Any:
    """The entry's config with Hydra's own part, as `python -m trainlab.<entry>` would see it
    (sweeps left out, as Hydra leaves them out of a sweep's own config: a sweep's directory is
    the same for all its jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    single = [o.input_line for o in parsed if not o.is_sweep_override()]
    return config.compose(config_name or entry, single, hydra=True)


def _unresolved(cfg: Any, key: str) -> str:
    """The value at `key` as written in the config files, interpolations and all."""
    parent, _, name = key.rpartition(".")
    return str(OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False)[name])


def newest_first(run_dirs: list[Path]) -> list[Path]:
    """Run directories newest first: by their time names, `_10` after `_9`."""

    def key(path: Path) -> list:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]

    return sorted(run_dirs, key=key, reverse=True)
