"""The command line of every entry point before Hydra reads it: checked, and completed with
what Hydra must know before it starts. An entry point's main() is `cli.run(<entry>, _hydra_main)`.

In order: `--dry-run` is taken out; the command line is checked (config.check_command_line);
`resume=auto` finds the run, or the sweep, it continues; the run directory is chosen
(run_dirs.claim_run_dir). A dry run instead becomes a sweep whose launcher only lists its jobs,
in a scratch directory removed afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainlab.engine import errors, jobs, run_dirs, stopping, warm
from trainlab.engine.commands import override
from trainlab.engine.config import check_command_line
from trainlab.engine.errors import exit_on_user_error

MULTIRUN = {"-m", "--multirun", "hydra.mode=MULTIRUN"}


@dataclass
class Prepared:
    """A command line as Hydra must read it."""

    argv: list[str]
    sweep_dir: Path | None = None  # where a sweep writes sweep.json (none for a single run)
    scratch: Path | None = None  # a dry run's, removed once Hydra returns
    created: list[Path] = field(default_factory=list)  # dirs this command made (see run)


def run(entry: str, hydra_main: Callable[[], Any], sweeps: bool = True) -> None:
    """Prepare sys.argv for Hydra, run the entry point's Hydra main, and, where it can sweep,
    report a sweep that was stopped or whose jobs did not all finish (one paragraph, non-zero
    exit). A job of a sweep also stops when its sweep dies."""
    stopping.install()  # (the entry point's first line did already; see trainlab.engine.stopping)
    prepared = Prepared([])
    try:
        _run(entry, hydra_main, sweeps, prepared)
    except BaseException as error:
        stop = error if isinstance(error, stopping.Stopped) else stopping.unreported()
        if stop is None:
            if isinstance(error, SystemExit) and error.code == 2:  # refused inside Hydra
                discard = errors.printed is not None and errors.printed.discard
                run_dirs.remove_unless_kept(prepared.created, trained_counts=not discard)
            raise
        stopping.exit_with(stop, _stopped(entry, stop, prepared))
    finally:
        if prepared.scratch:
            shutil.rmtree(prepared.scratch, ignore_errors=True)
        # A command refused once Hydra ran (a sweeper setting, say) leaves no empty directory
        # behind; rmdir leaves any that holds something.
        for path in prepared.created:
            with contextlib.suppress(OSError):
                path.rmdir()


def _run(entry: str, hydra_main: Callable[[], Any], sweeps: bool, prepared: Prepared) -> None:
    """run()'s work; `prepared` is filled in as soon as the command line is (see run)."""
    from hydra_plugins.trainlab_sweeps import process_launcher

    if sweeps:
        jobs.stop_with_parent()
        if _warm_sweep(sys.argv[1:]):
            warm.start_early()  # its imports run while the sweep is checked and composed
    with exit_on_user_error():
        if warm.sweep_job():  # from the fork server: the launcher built and checked it
            ready = Prepared(sys.argv[1:])
        else:
            ready = prepare(entry, sys.argv[1:], sweeps, made=prepared.created)
    vars(prepared).update(vars(ready))
    sys.argv[1:] = prepared.argv
    started = time.time()
    if sweeps:
        process_launcher.run_and_report(hydra_main, prepared.sweep_dir, since=started)
    else:
        hydra_main()


def _stopped(entry: str, stop: stopping.Stopped, prepared: Prepared) -> str:
    """What to say of a stop that reached the entry point: one that came before the run had
    saved anything it could continue from. The run (or sweep) directory this command made is
    removed, unless it holds such a thing: a checkpoint, or jobs of the sweep."""
    made = prepared.created[0] if prepared.created else None
    if made is not None and made.is_dir():
        if prepared.sweep_dir is None:
            keep = any(made.glob("checkpoints/*.ckpt"))
        else:
            keep = any(p.name not in (".hydra", "multirun.yaml") for p in made.iterdir())
        if keep:
            return (
                f"stopped by {stop.name}; {made} is kept: run the same command with "
                "resume=auto to continue it."
            )
        shutil.rmtree(made, ignore_errors=True)  # (its parents made for it go in run's finally)
    return f"stopped by {stop.name} before {entry} had saved anything; nothing is left behind."


def prepare(
    entry: str, argv: list[str], sweeps: bool = True, made: list[Path] | None = None
) -> Prepared:
    """The command line `python -m trainlab.<entry> <argv>` as Hydra must read it (see the
    module's docstring); a UserError where it is wrong. The directories it makes are added to
    `made` at once (a stop meanwhile removes them; see run)."""
    made = [] if made is None else made
    dry_run = sweeps and "--dry-run" in argv
    # -m first: Hydra's parser takes no flag after an override (`a=1 -m b=2,3` fails there)
    argv = [a for a in argv if a in MULTIRUN] + [a for a in argv if a not in MULTIRUN]
    argv = check_command_line(entry, [a for a in argv if a != "--dry-run" or not sweeps])
    if dry_run:
        return _dry_run(argv)
    argv = [*argv, *_resume_run(entry, argv), *_resume_sweep(entry, argv)]
    with stopping.held():  # a stop waits until the directories made are known to `made`
        chosen = run_dirs.claim_run_dir(entry, argv)
        made.extend(chosen.created)
    return Prepared([*argv, *chosen.arguments], chosen.sweep_dir, created=chosen.created)


def _warm_sweep(argv: list[str]) -> bool:
    """Whether this command looks like a sweep whose jobs the fork server will start: the
    process launcher (the default), warm start on, more than a dry run."""
    if not MULTIRUN & set(argv) or {"--dry-run", "--help", "-h", "--cfg", "-c"} & set(argv):
        return False
    other_launcher = any(
        a.startswith("hydra/launcher=") and a != "hydra/launcher=process" for a in argv
    )
    return not other_launcher and "hydra.launcher.warm=false" not in argv


def _resume_run(entry: str, args: list[str]) -> list[str]:
    """`resume=auto` (single runs): the directory of the newest unfinished run of the same
    command, which Hydra must know before it creates a new one."""
    from trainlab.engine.run_record import unfinished_run

    if "resume=auto" not in args or MULTIRUN & set(args):
        return []
    if any(a.startswith("hydra.run.dir=") for a in args):
        return []  # the run to continue is named
    if jobs.shared_run_name():
        return []  # every process of a distributed job (and its requeued self) has one directory
    overrides = [a for a in args if not a.startswith("-")]
    runs_dir = Path(str(run_dirs.compose(entry, overrides).hydra.run.dir)).parent
    found = unfinished_run(runs_dir, overrides)
    if found is None:
        print(f"resume=auto: no unfinished run of this command in {runs_dir}; starting a new run.")
        return []
    print(f"resume=auto: continuing {found}")
    return [override("hydra.run.dir", found)]


def _resume_sweep(entry: str, args: list[str]) -> list[str]:
    """`-m ... resume=auto`: the directory of the newest unfinished sweep of the same command,
    which Hydra must know before it creates a new one. (A sweep whose directory is not new for
    each run, such as an Optuna study's, continues there anyway.)"""
    from hydra_plugins.trainlab_sweeps.process_launcher import unfinished_sweep

    if "resume=auto" not in args or not MULTIRUN & set(args):
        return []
    if any(a.lstrip("+").startswith("hydra.sweep.dir=") for a in args):
        return []  # the sweep to continue is named
    cfg = run_dirs.compose(entry, [a for a in args if not a.startswith("-")])
    if not OmegaConf.to_container(cfg.hydra.sweep)["dir"].endswith(run_dirs.NEW_NAME):
        return []
    sweeps_dir = Path(str(cfg.hydra.sweep.dir)).parent
    found = unfinished_sweep(sweeps_dir, args)
    if found is None:
        print(f"resume=auto: no unfinished sweep of this command in {sweeps_dir}; a new sweep.")
        return []
    print(f"resume=auto: continuing the sweep in {found}")
    return [override("hydra.sweep.dir", found)]


def _dry_run(argv: list[str]) -> Prepared:
    """`--dry-run`: a multirun whose launcher only prints its jobs (their overrides and their
    number), in a scratch dir (Hydra writes multirun.yaml there)."""
    if not {"-m", "--multirun"} & set(argv):
        argv = ["-m", *argv]
    scratch = Path(tempfile.mkdtemp(prefix="trainlab-dry-run-"))
    argv = [*argv, "hydra.launcher.dry_run=true", override("hydra.sweep.dir", scratch)]
    return Prepared(argv, scratch=scratch)
