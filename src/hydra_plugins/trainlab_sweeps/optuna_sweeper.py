"""Bayesian search with Optuna (TPE by default), on current Optuna releases.

The search space is written in Hydra's sweep syntax, e.g.
    optimizer.lr: tag(log, interval(1e-4, 1e-1))
    data.batch_size: choice(32, 64, 128)
Trials run through the sweep's launcher, one process each. With n_jobs > 1, n_jobs workers
each ask the sampler for a trial as soon as their previous one ends (TPE's constant liar keeps
them from asking for the trials that are still running), so a slow trial holds only its own slot.

The objective is the config's `monitor`: each trial's best value of monitor.metric (metrics.json's
monitor.best), maximised or minimised as monitor.mode says unless `direction` is set.

Pruning: with `pruner=median` (or hyperband, successive_halving, threshold) every trial reports
its best value so far to the study after each epoch and stops early when the pruner says so (see
trainlab.engine.callbacks.pruning); it is recorded as "pruned", not failed.

Storage: by default the study lives in <sweep dir>/optuna.db, so the same command run again
continues it. `storage=` takes any Optuna database URL (sqlite:///..., postgresql://...,
mysql+pymysql://...) or the path of a journal file (any value without "://"; Optuna's
JournalStorage, which needs only a shared file system). Several sweep commands, on several
machines, can work on one such study: together they run n_trials. Finished, pruned, running and
self-failed trials are counted.

A trial cut off (the sweep stopped by a signal, or killed) stays RUNNING in the study, marked
`interrupted`; the same sweep command run again (with resume=auto, or not) first continues each
such trial of this host as the same trial, in its own directory and from its checkpoint, with
the same parameters, and tells the study its value. Only a trial whose parameters no longer fit
the search space is marked failed instead (and a new trial replaces it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from trainlab.engine import stopping
from trainlab.engine.commands import override
from trainlab.engine.errors import UserError, exit_on_user_error

log = logging.getLogger(__name__)

STORAGE_FILE = "optuna.db"
# A trial process finds its study (as JSON) here, and its number in the launcher's JOB_ENV: a
# trial runs as the job of the same number (see trainlab.engine.callbacks.pruning).
STUDY_ENV = "TRAINLAB_OPTUNA_STUDY"
PRUNERS = {
    "none": "NopPruner",
    "median": "MedianPruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",
}
ORPHAN_AFTER_S = 60  # a running trial with no owner recorded this long is left from a crash
DIRECTIONS = {"max": "maximize", "min": "minimize"}  # monitor.mode in Optuna's (and W&B's) words


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        params: dict[str, str],
        n_trials: int,
        direction: str | None = None,
        study_name: str = "study",
        seed: int | None = None,
        storage: str | None = None,
        pruner: str = "none",
        pruner_args: dict[str, Any] | None = None,
        metric: str | None = None,  # no longer read: refused in _sweep, saying what replaced it
    ) -> None:
        self.old_metric = metric
        self.params = _flat(params or {})
        self._names: dict[str, str] = {}  # a search-space key as a trial's override names it
        self.n_trials = n_trials
        self.metric: str | None = None  # monitor.metric, known in setup()
        self.direction = direction
        self.study_name = study_name
        self.seed = seed
        self.storage = storage
        self.pruner = pruner
        self.pruner_args = _plain(pruner_args)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self._asking = threading.Lock()  # one worker at a time asks and checks the budget
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._cut_off: list[Any] = []  # trials an earlier sweep left running: continued first

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.metric = config.monitor.metric
        with exit_on_user_error():  # here, as Hydra would print it as a crash
            self.direction = direction(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        with exit_on_user_error():  # here, as Hydra would print it as a crash
            self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> None:
        import optuna

        assert self.config is not None
        if self.old_metric is not None:
            raise UserError(
                f"hydra.sweeper.metric={self.old_metric}: the sweeper optimises the config's "
                "monitor instead; set monitor.metric (and monitor.mode, min or max) there, e.g. "
                "'monitor.metric=val/loss monitor.mode=min'."
            )
        if not self.metric:
            raise UserError(
                "monitor.metric is null, so a trial has no value for Optuna to optimise: set "
                "the metric whose best value should rank trials, e.g. 'monitor.metric=val/loss "
                "monitor.mode=min'."
            )
        searched, fixed = _split_arguments(arguments)
        space = search_space({**self.params, **searched}, self.config)
        # A key that no config file writes (a constructor's parameter) is added, as `++` does.
        self._names = {k: k if _in_config(self.config, k) else f"++{k}" for k in space}
        make_pruner(self.pruner, self.pruner_args)  # a typo fails here, not in every trial
        sweep_dir = Path(self.config.hydra.sweep.dir)
        storage = storage_url(self.storage, sweep_dir)
        n_jobs = getattr(self.launcher, "n_jobs", 1)
        if self.config.hydra.launcher.get("dry_run"):
            goal = "maximising" if self.direction == "maximize" else "minimising"
            print(
                f"Optuna study '{self.study_name}': {self.n_trials} trials {goal} the best "
                f"{self.metric} of each"
            )
            print(f"  stored in {storage}, pruner {self.pruner}, {n_jobs} trial(s) at a time")
            for key, dist in space.items():
                print(f"  {key}: {dist}")
            print(f"Each trial also gets: {' '.join(fixed) or '(no other overrides)'}")
            return

        sweep_dir.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self._open_study(storage)
        self._cut_off = self._orphans(study, space)
        done = self._counted(study)
        if done:
            log.info(f"Continuing study '{self.study_name}': {done} of {self.n_trials} counted")
        os.environ[STUDY_ENV] = json.dumps(
            {
                "storage": storage,
                "study": self.study_name,
                "pruner": self.pruner,
                "pruner_args": self.pruner_args,
                # what continues a trial: this sweep (see trainlab.callbacks.pruning)
                "resume": getattr(self.launcher, "continue_command", lambda: None)(),
            }
        )
        if n_jobs == 1:  # in this thread, where the launcher handles signals itself
            self._work(study, space, fixed)
        else:
            self._work_in_threads(n_jobs, study, space, fixed)
        if self._errors:
            raise self._errors[0]

        completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if completed:
            best = study.best_trial
            params = " ".join(f"{k}={v}" for k, v in best.params.items())
            log.info(f"Best {self.metric} {best.value:.4f} (trial {best.number}): {params}")

    def _open_study(self, storage: str) -> Any:
        import optuna
        from sqlalchemy.exc import SQLAlchemyError

        try:
            study = optuna.create_study(
                study_name=self.study_name,
                storage=open_storage(storage),
                direction=self.direction,
                pruner=make_pruner(self.pruner, self.pruner_args),
                load_if_exists=True,
            )
        except (ImportError, OSError, ValueError, SQLAlchemyError) as e:  # driver, URL, server
            raise UserError(
                f"hydra.sweeper.storage={storage} could not be opened ({type(e).__name__}: "
                f"{e}). Give a database URL whose driver is installed (postgresql://user@host/"
                "db needs psycopg2, mysql+pymysql://... needs pymysql; sqlite:///path.db needs "
                "nothing) or the path of a journal file on a shared file system "
                "(e.g. /shared/study.log)."
            ) from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            seed = self._sampler_seed(len(study.trials))
            study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        return study

    def _sampler_seed(self, trials: int) -> int | None:
        if self.seed is None:
            return None
        if not self.storage:
            # A continued study draws on from where it stopped, not its first points again.
            return self.seed if not trials else zlib.crc32(f"{self.seed}:{trials}".encode())
        # Other sweeps may share this study: with one seed they would all ask for the same
        # first trials. Each its own; a shared study's order is not repeatable anyway.
        return zlib.crc32(f"{self.seed}:{socket.gethostname()}:{os.getpid()}".encode())

    def _orphans(self, study: Any, space: dict[str, Any]) -> list[Any]:
        """Trials left running by a sweep of this host that is gone (stopped or killed), to be
        continued as they were. Other hosts' running trials are theirs. One whose parameters
        do not fit this search space cannot be: marked failed, and not counted."""
        from optuna.trial import TrialState

        orphans = []
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get("owner")
            if owner is None:
                age = (_now(trial) - trial.datetime_start).total_seconds()
                orphan = age > ORPHAN_AFTER_S
            else:
                host, pid = owner.rsplit(":", 1)
                orphan = host == socket.gethostname() and not _alive(int(pid))
            if not orphan:
                continue
            if trial.distributions == space:
                log.info(f"Trial {trial.number} was cut off: continuing it")
                orphans.append(trial)
            else:
                log.info(f"Trial {trial.number} was cut off, and the search space has changed")
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        return orphans

    def _work_in_threads(self, n_jobs: int, study: Any, space: dict, fixed: list[str]) -> None:
        """n_jobs workers, each running one trial after another. A stop (trainlab.engine.stopping)
        reaches the launcher, which stops the jobs; the workers then ask for no more."""
        workers = [
            threading.Thread(target=self._work, args=(study, space, fixed), name=f"trials-{i}")
            for i in range(n_jobs)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def _work(self, study: Any, space: dict, fixed: list[str]) -> None:
        """Ask for a trial (or take one cut off earlier), run it, tell its result; again until
        the study has its n_trials."""
        import optuna
        from optuna.trial import TrialState

        while not self._stop.is_set() and stopping.requested() is None:
            with self._asking:
                if self._cut_off:
                    frozen = self._cut_off.pop(0)
                    trial = optuna.trial.Trial(study, frozen._trial_id)
                else:
                    if self._counted(study) >= self.n_trials:
                        return
                    trial = study.ask(space)
                    if not self._within_budget(study, trial.number):
                        # Another sweep on this study asked at the same moment and came first.
                        trial.set_user_attr("skipped", "the study already had its n_trials")
                        study.tell(trial, state=TrialState.FAIL)
                        return
                trial.set_user_attr("owner", f"{socket.gethostname()}:{os.getpid()}")
            overrides = [
                *fixed,
                *(_param(self._names[key], trial.params[key]) for key in space),
            ]
            try:
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            except BaseException as e:  # stopped by a signal, or a bug: stop every worker
                if type(e).__name__ == "SweepStopped":  # (the launcher's module is reloaded)
                    trial.set_user_attr("interrupted", True)  # left running: to continue
                else:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                self._stop.set()
                self._errors.append(e)
                return
            self._tell(study, trial, ret.return_value or {})

    def _tell(self, study: Any, trial: Any, record: dict[str, Any]) -> None:
        from optuna.trial import TrialState

        status = record.get("status")
        value = (record.get("monitor") or {}).get("best")  # the trial's best epoch's
        if status == "finished" and value is not None and math.isfinite(value):
            study.tell(trial, value)
        elif status == "pruned":
            study.tell(trial, state=TrialState.PRUNED)  # its last reported value is kept
        elif status in ("interrupted", "pending"):  # stopped by a signal: continued later
            trial.set_user_attr("interrupted", True)
            self._stop.set()
        else:
            trial.set_user_attr("error", record.get("error") or f"no value of {self.metric}")
            study.tell(trial, state=TrialState.FAIL)

    def _counted(self, study: Any) -> int:
        return sum(map(_counts, study.get_trials(deepcopy=False)))

    def _within_budget(self, study: Any, number: int) -> bool:
        """Whether trial `number` is one of the study's n_trials: trial numbers are handed out
        by the storage in order, so of several sweeps asking at once the earlier numbers win."""
        before = [t for t in study.get_trials(deepcopy=False) if t.number < number]
        return sum(map(_counts, before)) < self.n_trials


def direction(config: DictConfig) -> str:
    """hydra.sweeper.direction where it is set, else monitor.mode's: maximize or minimize."""
    chosen = config.hydra.sweeper.get("direction") or DIRECTIONS[config.monitor.mode]
    if chosen not in ("maximize", "minimize"):
        raise UserError(
            f"hydra.sweeper.direction={chosen} is neither maximize nor minimize (Optuna's "
            "words); or leave it out, and the study follows monitor.mode."
        )
    return chosen


def _counts(trial: Any) -> bool:
    """Finished, pruned, running, or failed on its own (not cut off, not skipped)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage as every process can open it: a URL, or a journal file's absolute
    path (the sweep's trials run in the same working directory, but other machines may not)."""
    if not storage:
        return f"sqlite:///{sweep_dir.resolve() / STORAGE_FILE}"
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def open_storage(storage: str) -> Any:
    """An Optuna storage from storage_url's answer: a database URL as it is (Optuna opens it),
    anything else a journal file (created with its directory)."""
    if "://" in storage:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_pruner(name: str, args: dict[str, Any] | None = None) -> Any:
    """One of Optuna's pruners by its short name, with `args` for its constructor."""
    import optuna

    if name not in PRUNERS:
        raise UserError(
            f"hydra.sweeper.pruner={name} is not a pruner: choose one of {', '.join(PRUNERS)} "
            "(the pruner's own arguments go in hydra.sweeper.pruner_args, e.g. "
            "'+hydra.sweeper.pruner_args.n_warmup_steps=2')."
        )
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**(args or {}))
    except (TypeError, ValueError) as e:
        raise UserError(
            f"hydra.sweeper.pruner_args={args} do not fit optuna.pruners.{PRUNERS[name]}: {e}."
        ) from None


def search_space(params: dict[str, str], config: Any = None) -> dict[str, Any]:
    """Optuna distributions from Hydra sweep expressions, checked (against the declarations of
    the `_target_`s in `config`, the sweep's config, where given)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from trainlab.engine.config import check_sweep_params, glob_options

    check_sweep_params(params, "the Optuna search space (hydra.sweeper.params)", config)
    parser = OverridesParser.create()
    space = {}
    for key, expression in params.items():
        parsed = parser.parse_override(f"{key}={expression}")
        value = parsed.value()
        log_scale = "log" in getattr(value, "tags", set())
        if isinstance(value, ChoiceSweep):
            space[key] = CategoricalDistribution(list(value.list))
        elif isinstance(value, IntervalSweep):
            ints = isinstance(value.start, int) and isinstance(value.end, int)
            dist = IntDistribution if ints else FloatDistribution
            space[key] = dist(value.start, value.end, log=log_scale)
        elif isinstance(value, RangeSweep):
            space[key] = CategoricalDistribution(list(range(value.start, value.stop, value.step)))
        elif isinstance(value, Glob):  # a group's options that match
            space[key] = CategoricalDistribution(glob_options(parsed))
        else:
            raise ValueError(
                f"hydra.sweeper.params.{key}={expression!r} is not a search space: use "
                "choice(a, b, ...), interval(lo, hi), tag(log, interval(lo, hi)), range(...) "
                "or, for a config group, glob(pattern)"
            )
    return space


def _split_arguments(arguments: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the command line's sweeps, which join the search space as Hydra's own Optuna sweeper
    takes them, e.g. 'optimizer.lr=tag(log, interval(1e-4, 1e-1))' or 'model=mlp,cnn'; the
    overrides every trial gets)."""
    searched, fixed = {}, []
    for override_ in OverridesParser.create().parse_overrides(arguments):
        if override_.is_sweep_override():
            searched[override_.key_or_group] = override_.input_line.partition("=")[2]
        else:
            fixed.append(override_.input_line)
    return searched, fixed


def _in_config(config: DictConfig, key: str) -> bool:
    return OmegaConf.select(config, key, default=_ABSENT) is not _ABSENT


_ABSENT = object()


def _param(key: str, value: Any) -> str:
    # Numbers bare (quoted, Hydra would read them as strings), strings quoted.
    return override(key, value) if isinstance(value, str) else f"{key}={value}"


def _flat(params: Any, prefix: str = "") -> dict[str, str]:
    """Search-space keys as dotted paths: `hydra.sweeper.params.trainer.max_epochs=...` on a
    command line nests trainer: {max_epochs: ...} under params."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(args: Any) -> dict[str, Any]:
    if args is None:
        return {}
    return OmegaConf.to_container(args) if OmegaConf.is_config(args) else dict(args)


def _now(trial: Any) -> Any:
    import datetime

    return datetime.datetime.now(tz=trial.datetime_start.tzinfo)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
