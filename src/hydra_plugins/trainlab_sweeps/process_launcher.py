"""Runs every job of a Hydra sweep as its own `python -m trainlab.train ...` process.

Why not in-process, as Hydra's basic launcher does: a job that crashes, leaks a W&B run or GPU
memory, or changes global state would take the others with it; and a job that itself uses
several devices needs its own process tree, since Lightning's DDP launcher re-runs the
command line in each child (in-process, that would re-run the whole sweep).

Each job runs as a plain single run whose run directory is the job's sweep directory, and
writes its own output to <job dir>/console.log. Jobs fork from a warm server (trainlab.engine.warm);
run one at a time, the next job is forked while the current one trains and waits, its config
composed, for its turn. The sweep's record is <sweep dir>/sweep.json
(see SweepRecord): every job with its overrides, status (pending, running, finished, failed,
interrupted), error, final metrics and, when interrupted, the command that continues it.

Stopping: SIGINT or SIGTERM to this process (or its process group) is passed on to every
running job, which finishes its step, saves last.ckpt and exits; jobs not started stay
pending, and the entry point says how to continue. A second signal (a second or more after the
first: one sent to this process and its group at once, as `timeout -s INT` does, is one stop;
see trainlab.engine.stopping) stops the jobs at once: each still records itself as
interrupted, and is killed if it has not ended KILL_AFTER_S later. Jobs run in sessions of
their own, so a Ctrl-C in the terminal reaches each job once, through here; and each job asks
the kernel for SIGTERM when this process dies (stop_with_parent).
Run again in the same sweep dir (`resume=auto`), finished jobs are kept and the others
continue from their checkpoints.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from trainlab.engine import stopping
from trainlab.engine.commands import override, shell
from trainlab.engine.jobs import PARENT_ENV, SWEEP_ENV

log = logging.getLogger(__name__)

SUMMARY_FILE = "sweep.json"
JOB_ENV = "TRAINLAB_SWEEP_JOB"  # and its number (for Optuna's sweeper, the trial's number)
DONE = ("finished", "pruned")  # a job's ends that need nothing more
HEARTBEAT_S = 10  # how often a running sweep touches sweep.json; silent 6 times this: dead
KILL_AFTER_S = 10  # a job told twice to stop is killed if it still runs this much later


class SweepStopped(BaseException):
    """A signal stopped the sweep after every job was recorded. Not an Exception, so that
    Hydra lets it through to the entry point instead of printing it as a crash."""

    def __init__(self, signum: int, record: Path):
        super().__init__(f"sweep stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.record = record


class ProcessLauncher(Launcher):
    def __init__(
        self,
        module: str,
        n_jobs: int = 1,
        gpus_per_job: int | None = None,
        dry_run: bool = False,
        warm: bool = True,
    ) -> None:
        self.module = module
        self.n_jobs = max(1, n_jobs)
        self.gpus_per_job = gpus_per_job
        self.dry_run = dry_run
        self.warm = warm
        self._server: Any = None  # trainlab.engine.warm.Server: forks the jobs (see _start)
        self._server_lock = threading.Lock()
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.record: SweepRecord | None = None
        self._lock = threading.Lock()
        self._slots: queue.Queue = queue.Queue()  # GPUs for each job running at once
        self._workers = 1
        self._launches = 0  # launch() calls under way
        self._running: dict[int, subprocess.Popen] = {}
        self._held: dict[int, tuple[Any, int]] = {}  # the next job, started ahead: (proc, offset)
        self._stopping: int | None = None  # the signal that stops the sweep
        self._starting = threading.Lock()  # Hydra's config loader, one job at a time

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        if not self.dry_run:  # from here to the sweep's end, a stop stops its jobs
            stopping.take_over(self._on_signal)
        if self.warm and not self.dry_run and self._server is None:
            from trainlab.engine import warm

            if warm.available():  # it imports while Hydra and the sweeper get ready
                self._server = warm.server()

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None
        with self._starting:  # Optuna's sweeper launches from several threads at once
            jobs = [
                self._prepare(initial_job_idx + i, list(overrides))
                for i, overrides in enumerate(job_overrides)
            ]
        if self.dry_run:
            for job in jobs:
                print(f"#{job['num']}: {' '.join(job['overrides']) or '(no overrides)'}")
            print(f"{len(jobs)} job(s); nothing was run (--dry-run).")
            return [self._job_return(job, None) for job in jobs]

        with self._lock:  # Optuna's sweeper launches trial after trial, from several threads
            if self.record is None:
                sweep_dir = Path(self.config.hydra.sweep.dir)
                shared = bool(OmegaConf.select(self.config, "hydra.sweeper.storage"))
                self.record = SweepRecord(sweep_dir, self.continue_command(), shared)
                self.record.data["sweeper"] = OmegaConf.select(
                    self.config, "hydra.sweeper._target_", default=None
                )
                self._slots = queue.Queue()
                for slot in gpu_slots(self.n_jobs, self.gpus_per_job):
                    self._slots.put(slot)
                self._workers = self._slots.qsize()
            self._launches += 1
        record, slots, workers = self.record, self._slots, self._workers
        record.add(jobs)
        log.info(f"Launching {len(jobs)} jobs, {workers} at a time, each in its own process")

        def run(i: int) -> JobReturn:
            job = jobs[i]
            kept = self._finished_earlier(job)
            if kept is not None:
                return kept
            slot = slots.get()
            try:
                # One job at a time: the next one composes its config while this one trains.
                later = jobs[i + 1 :] if workers == 1 else []
                next_job = next((j for j in later if not self._was_finished(j, _metrics(j))), None)
                return self._run(job, slot, echo=workers == 1, next_job=next_job)
            finally:
                slots.put(slot)

        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                returns = list(pool.map(run, range(len(jobs))))
        finally:
            self._drop_held()
            with self._lock:
                self._launches -= 1
                if self._launches == 0 or self._stopping is not None:
                    record.close("interrupted" if self._stopping is not None else None)
        if self._stopping is not None:
            raise SweepStopped(self._stopping, record.path)
        return returns

    def _prepare(self, num: int, overrides: list[str]) -> dict[str, Any]:
        """The job's config as Hydra composes it (the sweep dir and subdir resolve here)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = str(num)
        job_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
        return {"num": num, "overrides": overrides, "dir": job_dir, "cfg": cfg}

    def continue_command(self) -> str:
        """This command with resume=auto: it finds this sweep again and continues it."""
        args = [a for a in sys.argv[1:] if a != "resume=auto"]
        return shell(["python", "-m", self.module, *args, "resume=auto"])

    def _was_finished(self, job: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Whether an earlier run of this sweep finished `job` (`metrics`: its metrics.json)."""
        assert self.record is not None
        done = metrics.get("status") == "finished" and same_job(
            metrics.get("overrides") or [], job["overrides"]
        )
        return done or self.record.earlier.get(job["num"], {}).get("status") == "finished"

    def _finished_earlier(self, job: dict[str, Any]) -> JobReturn | None:
        """A job that an earlier run of this sweep finished: kept as it is, not run again."""
        assert self.record is not None
        metrics = _metrics(job)
        if not self._was_finished(job, metrics):
            return None
        earlier = self.record.earlier.get(job["num"], {})
        entry = {**earlier, **{k: v for k, v in metrics.items() if "/" in k}}
        entry.update(num=job["num"], overrides=job["overrides"], dir=str(job["dir"]))
        entry["status"] = "finished"
        for stale in ("error", "resume", "exit_code"):
            entry.pop(stale, None)
        self.record.update(entry)
        log.info(f"#{job['num']} finished in an earlier run of this sweep: kept")
        return self._job_return(job, {**metrics, **entry})

    def _run(
        self, job: dict[str, Any], gpus: str | None, echo: bool, next_job: dict[str, Any] | None
    ) -> JobReturn:
        assert self.record is not None and self.config is not None
        self._warm_server()  # the first job waits here for the server's imports
        if self._stopping is not None:  # (a stop meanwhile starts nothing)
            return self._job_return(job, {"status": "pending"})  # so sweep.json says
        job_dir: Path = job["dir"]
        entry = {
            "num": job["num"],
            "overrides": job["overrides"],
            "dir": str(job_dir),
            "status": "running",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.record.update(entry)
        log.info(f"#{job['num']} started: {' '.join(job['overrides'])}")

        started = time.perf_counter()
        held = self._held.pop(job["num"], None)
        if held is not None:
            (proc, offset), entry["start"] = held, "warm"
            proc.release()
        else:
            proc, entry["start"], offset = self._start(job, gpus)
        entry["pid"] = proc.pid
        self.record.update(entry)
        self._running[job["num"]] = proc
        if self._stopping is not None:  # the signal came while it started
            _send(proc, self._stopping)
        if next_job is not None and self._stopping is None:
            self._start_held(next_job, gpus)
        console_path = job_dir / "console.log"
        try:
            exit_code = _wait(proc, console_path, offset, echo)
        finally:
            self._running.pop(job["num"], None)

        stopped = self._stopping is not None
        metrics = _metrics(job)
        entry.update({k: v for k, v in metrics.items() if "/" in k})
        entry["exit_code"] = exit_code
        entry["duration_s"] = round(time.perf_counter() - started, 2)
        if metrics.get("status") in ("finished", "pruned") and (exit_code == 0 or stopped):
            # pruned: stopped early by Optuna's pruner; a signal after its end loses nothing
            entry["status"] = metrics["status"]
        elif stopped or metrics.get("status") == "interrupted":
            entry["status"] = "interrupted"
            entry["resume"] = self._job_command(job)
        else:
            entry["status"] = "failed"
            entry["error"] = metrics.get("error") or _error_line(_tail(console_path), exit_code)
        self.record.update(entry)
        best = (metrics.get("monitor") or {}).get("best")
        shown = f"best {metrics['monitor']['metric']} {best:.4f}" if best is not None else ""
        log.info(
            f"#{job['num']} {entry['status']} in {entry['duration_s']:.0f}s: "
            f"{' '.join(job['overrides'])} {shown or entry.get('error', '')}"
        )
        return self._job_return(job, {**metrics, **entry})

    def _start(self, job: dict[str, Any], gpus: str | None, held: bool = False) -> tuple:
        """(process, how it started, where its output starts in console.log). Forked by the
        warm server ("warm": it has imported torch and Lightning already; `held`: it waits for
        its turn: warm.wait_for_turn), or a fresh `python -m ...` ("cold"). Either
        way a session of its own: a Ctrl-C in the terminal reaches it once, from _on_signal."""
        assert self.config is not None
        job_dir: Path = job["dir"]
        job_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # W&B: own service
        env[SWEEP_ENV] = Path(self.config.hydra.sweep.dir).name
        env[JOB_ENV] = str(job["num"])
        env[PARENT_ENV] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"  # console.log up to date, whatever happens to the job
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        # A list, so no shell reads it; the directory quoted for Hydra's override grammar.
        args = [*job["overrides"], override("hydra.run.dir", job_dir)]
        if (job_dir / "checkpoints").is_dir() and "resume=auto" not in args:
            args.append("resume=auto")  # an earlier try of this job: continue it, never over it
        with open(job_dir / "console.log", "ab") as console:  # appended to when continued
            offset = console.tell()
            server = self._warm_server()
            if server is not None:
                proc = server.start(
                    self.module, args, env, os.getcwd(), console.name, sweep=True, held=held
                )
                if proc is not None:
                    return proc, "warm", offset
            if held:
                return None, "cold", offset
            proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, "cold", offset

    def _start_held(self, job: dict[str, Any], gpus: str | None) -> None:
        """Start `job` warm, to wait for its turn; nothing if jobs start cold."""
        proc, _, offset = self._start(job, gpus, held=True)
        if proc is not None:
            self._held[job["num"]] = (proc, offset)

    def _drop_held(self) -> None:
        """Stop jobs started ahead whose turn will not come (the sweep stops): they have only
        composed their configs."""
        while self._held:
            _, (proc, _) = self._held.popitem()
            _send(proc, signal.SIGKILL)

    def _warm_server(self) -> Any:
        """The fork server once it serves (or still importing, when the sweep stops meanwhile);
        None (jobs start cold) if it is off or failed."""
        with self._server_lock:
            server = self._server
            state = None
            while server is not None and state is None and self._stopping is None:
                state = server.ready(timeout=0.2)  # a stop ends the wait for its imports
            if server is not None and state is False:
                error = server.info.get("error") or "its process ended"
                log.warning(f"Warm start unavailable ({error}): each job starts a fresh process")
                self._server = server = None
            return server

    def _job_command(self, job: dict[str, Any]) -> str:
        """The command that continues this one job from its checkpoint: the sweep's own for a
        trial of an Optuna study (its value must reach the study), else the job's alone."""
        assert self.record is not None
        if _study_sweep(self.record.data):
            return self.record.data["resume"]
        args = [o for o in job["overrides"] if o != "resume=auto"]
        run_dir = override("hydra.run.dir", job["dir"])
        return shell(["python", "-m", self.module, *args, "resume=auto", run_dir])

    def _on_signal(self, signum: int, again: bool) -> bool:
        """SIGINT or SIGTERM (trainlab.engine.stopping takes one that reaches this process and
        its group at once for one stop): every running job finishes its step, saves and stops,
        and no new job starts. Asked again: every job stops at once, and is killed
        KILL_AFTER_S later if it has not ended by then."""
        running = list(self._running.values())
        name = signal.Signals(signum).name
        if not again:
            self._stopping = signum
            print(
                f"\n{name}: stopping the sweep; {len(running)} running job(s) finish their step "
                "and save a checkpoint (Ctrl-C again stops them at once)",
                file=sys.stderr,
                flush=True,
            )
            for proc in running:
                _send(proc, signum)
            self._drop_held()
            return False
        print(f"\n{name} again: stopping every job at once", file=sys.stderr, flush=True)
        for proc in running:
            _send(proc, signum)  # each records itself as interrupted (metrics.json)
        killer = threading.Timer(KILL_AFTER_S, _kill_left, args=(running,))
        killer.daemon = True  # the sweep waits for its jobs anyway
        killer.start()
        return False

    def _job_return(self, job: dict[str, Any], value: Any) -> JobReturn:
        # Always COMPLETED: Hydra's sweepers stop the whole sweep at a FAILED job, while a
        # failure here is recorded in sweep.json, and the other jobs go on.
        ret = JobReturn(
            overrides=job["overrides"],
            cfg=job["cfg"],
            working_dir=str(job["dir"]),
            task_name=job["cfg"].hydra.job.name,
            status=JobStatus.COMPLETED,
        )
        ret.return_value = value
        return ret


class SweepRecord:
    """<sweep dir>/sweep.json, rewritten whole (then renamed) at every change and every
    HEARTBEAT_S seconds while the sweep runs. It holds the command that continues the sweep
    (`resume`), its status (running, finished, failed, interrupted), the launcher's pid, host
    and last heartbeat (see launcher_alive), and one entry per job."""

    def __init__(self, sweep_dir: Path, resume: str, shared: bool = False):
        """`shared`: other sweeps may write here at the same time (an Optuna study in a shared
        storage); their jobs are kept when this one saves. Otherwise a running sweep is
        refused."""
        self.path = sweep_dir / SUMMARY_FILE
        self._lock = threading.Lock()
        self._shared = shared
        self._ours: set[str] = set()
        self.data = _read_json(self.path)
        if launcher_alive(self.data) and not shared:
            launcher = self.data["launcher"]
            _refuse(
                f"{sweep_dir} belongs to a sweep that is still running (pid {launcher['pid']} "
                f"on {launcher['host']}). Wait for it or stop it (Ctrl-C there, or kill "
                f"{launcher['pid']}), then run this again."
            )
        # What an earlier run of this sweep left: finished jobs are kept, the others run again.
        self.earlier = {int(n): job for n, job in self.data.get("jobs", {}).items()}
        self.data["jobs"] = dict(self.data.get("jobs", {}))
        self.data["command"] = sys.argv[1:]  # what resume=auto looks for (unfinished_sweep)
        self.data["resume"] = resume
        self.data["launcher"] = {"pid": os.getpid(), "host": socket.gethostname()}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._beat, daemon=True, name="sweep-heartbeat").start()

    def add(self, jobs: list[dict[str, Any]]) -> None:
        """Every job about to be launched, as pending (finished ones stay as they are)."""
        for job in jobs:
            earlier = self.earlier.get(job["num"])
            if earlier and not same_job(earlier.get("overrides", []), job["overrides"]):
                _refuse(
                    f"{self.path.parent} holds another sweep: its job #{job['num']} ran "
                    f"'{' '.join(earlier['overrides'])}', this command's is "
                    f"'{' '.join(job['overrides'])}'. Continue that sweep with its own command "
                    f"({self.data.get('resume', '?')}), or leave hydra.sweep.dir to its default."
                )
        with self._lock:
            self._ours |= {str(job["num"]) for job in jobs}
            for job in jobs:
                if self.data["jobs"].get(str(job["num"]), {}).get("status") != "finished":
                    self.data["jobs"][str(job["num"])] = {
                        "num": job["num"],
                        "overrides": job["overrides"],
                        "dir": str(job["dir"]),
                        "status": "pending",
                    }
            self.data["status"] = "running"
            self._save()

    def update(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.data["jobs"][str(entry["num"])] = entry
            self._save()

    def close(self, status: str | None) -> None:
        """The sweep's status once its jobs have returned: `status`, or what the jobs say."""
        with self._lock:
            for num, job in self.data["jobs"].items():
                if status is None and num not in self._ours and job["status"] not in DONE:
                    # Left by an earlier run and not asked for again: an Optuna study tries
                    # a new trial instead of one that was cut off.
                    job["status"] = "dropped"
                    job["error"] = "the sweeper did not run it again"
            states = {job["status"] for job in self.data["jobs"].values()}
            done = states <= {*DONE, "dropped"}
            self.data["status"] = status or ("finished" if done else "failed")
            self._save()

    def _save(self) -> None:  # with self._lock held
        from trainlab.engine.run_record import write_json

        self.data["launcher"]["heartbeat"] = round(time.time(), 1)
        if self._shared:  # the other sweeps' jobs as they wrote them
            theirs = _read_json(self.path).get("jobs", {})
            self.data["jobs"].update({n: j for n, j in theirs.items() if n not in self._ours})
        self.data["failed"] = sum(j["status"] == "failed" for j in self.data["jobs"].values())
        write_json(self.path, self.data)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                self._save()


def same_job(recorded: list[str], overrides: list[str]) -> bool:
    """Whether two jobs' overrides are the same setting (resume=auto aside)."""

    def key(items: list[str]) -> list[str]:
        return sorted(o for o in items if not o.startswith("resume="))

    return key(recorded) == key(overrides)


def launcher_alive(record: dict[str, Any]) -> bool:
    """Whether the sweep that wrote this sweep.json record still runs. A launcher killed
    outright leaves "running" behind: on its own host its process is gone (checked in /proc),
    and seen from any other host its heartbeat stops."""
    launcher = record.get("launcher") or {}
    if record.get("status") != "running" or "pid" not in launcher:
        return False
    if launcher.get("host") == socket.gethostname() and Path("/proc").is_dir():
        return _is_sweep_process(int(launcher["pid"]))
    return time.time() - launcher.get("heartbeat", 0) < 6 * HEARTBEAT_S


def _is_sweep_process(pid: int) -> bool:
    """Whether `pid` runs, is no zombie (killed, not yet reaped), and is a trainlab command,
    not another process that got its number since."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state != "Z" and b"trainlab" in command


def unfinished_sweep(sweeps_dir: Path, args: list[str]) -> Path | None:
    """The newest sweep under sweeps_dir run by the command `args` (resume=, the sweep's dir
    and the launcher's settings aside), if it did not finish: what `-m ... resume=auto`
    continues. One that is still running is refused."""

    def key(items: list[str]) -> list[str]:
        ignored = ("-", "resume=", "hydra.sweep.dir=", "hydra.launcher.", "hydra.mode=")
        return sorted(a for a in items if not a.lstrip("+").startswith(ignored))

    wanted = key(args)
    sweeps = {
        p.parent for name in (SUMMARY_FILE, "multirun.yaml") for p in sweeps_dir.glob(f"*/{name}")
    }
    for sweep in sorted(sweeps, reverse=True):  # named by their start: newest first
        record = _read_json(sweep / SUMMARY_FILE) or _record_from_hydra(sweep)
        if key(record.get("command") or []) != wanted:
            continue
        if launcher_alive(record):
            _refuse(f"the sweep in {sweep} is still running; wait for it or stop it.")
        return None if sweep_status(record) == "finished" else sweep
    return None


def _record_from_hydra(sweep: Path) -> dict[str, Any]:
    """The part of a sweep.json that unfinished_sweep reads, for a sweep whose launcher writes
    none (SLURM's, through submitit): its command from Hydra's multirun.yaml; finished when
    every job that started has finished."""
    import yaml

    try:
        overrides = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["overrides"]
        command = [*overrides.get("hydra", []), *overrides.get("task", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}
    jobs = [p for p in sweep.iterdir() if p.name.isdigit()]
    done = jobs and all(_read_json(p / "metrics.json").get("status") in DONE for p in jobs)
    return {"command": command, "status": "finished" if done else "stopped"}


def sweep_status(record: dict[str, Any]) -> str:
    """The sweep's status as recorded, or "died" where the record says running but its
    launcher is gone."""
    status = record.get("status") or "unknown"
    return "died" if status == "running" and not launcher_alive(record) else status


def run_and_report(hydra_main: Any, sweep_dir: Path | None, since: float) -> None:
    """For an entry point: run its Hydra main, then report the sweep it ran in sweep_dir (see
    report): its sweep.json, where written since `since` (time.time()); an older one is an
    earlier run's, and a dry run writes none.

    SweepStopped is looked up here, in this module, at the moment it is needed: Hydra's plugin
    scan re-executes the module, so names imported before it are stale.
    """
    try:
        hydra_main()
    except SweepStopped as stopped:
        report(stopped.record, stopped.signum)
    record = sweep_dir / SUMMARY_FILE if sweep_dir else None
    if record and record.is_file() and record.stat().st_mtime >= since:
        report(record, stopping.requested())  # a stop between two launches, say


def report(record: Path, signum: int | None = None) -> None:
    """One paragraph, and exit 128 + signum (stopped by a signal) or 1 (jobs failed or were
    interrupted), naming the command that continues the sweep; nothing if every job finished."""
    summary = json.loads(record.read_text())
    jobs = list(summary["jobs"].values())
    count = {s: sum(j["status"] == s for j in jobs) for s in ("interrupted", "pending")}
    count["finished"] = sum(j["status"] in ("finished", "pruned") for j in jobs)
    failed = [j for j in jobs if j["status"] == "failed"]
    # dropped: left by an earlier run, and not asked for again (see SweepRecord.close)
    if signum is None and all(j["status"] in ("finished", "pruned", "dropped") for j in jobs):
        return
    words = []
    if signum is not None:
        # a job stopped before its first step has no checkpoint: it starts again from scratch
        saved = sum(
            (Path(j["dir"]) / "checkpoints" / "last.ckpt").is_file()
            for j in jobs
            if j["status"] == "interrupted"
        )
        interrupted = f"{count['interrupted']} were interrupted"
        if count["interrupted"]:
            each = "each" if saved == count["interrupted"] else f"{saved} of them"
            interrupted += f" ({each} saved a checkpoint)"
        words.append(
            f"the sweep was stopped by {signal.Signals(signum).name}: of its {len(jobs)} jobs, "
            f"{count['finished']} finished, {interrupted} and {count['pending']} had not started."
        )
    elif count["interrupted"]:
        words.append(f"{count['interrupted']} job(s) of the sweep were interrupted.")
    if failed:
        detail = "; ".join(
            f"#{j['num']} ({' '.join(j['overrides'])}): {str(j.get('error')).rstrip('.')}"
            for j in failed
        )
        words.append(f"{len(failed)} job(s) of the sweep failed: {detail}.")
    if _study_sweep(summary):
        how = "finished trials are kept, interrupted ones continue as the same trials"
    else:
        how = "finished jobs are kept, interrupted ones continue from their checkpoints"
    words.append(f"Details in {record}. Continue the sweep with: {summary['resume']} ({how}).")
    print("error: " + " ".join(words), file=sys.stderr)
    raise SystemExit(1 if signum is None else 128 + signum)


def _study_sweep(record: dict[str, Any]) -> bool:
    """Whether a sweep's jobs are trials of an Optuna study (sweep.json's sweeper)."""
    return "Optuna" in str(record.get("sweeper"))


def _kill_left(procs: list[Any]) -> None:
    """Jobs told twice to stop that still run: killed, with what they started."""
    for proc in procs:
        if proc.poll() is None:
            _send(proc, signal.SIGKILL, group=True)


def _send(proc: subprocess.Popen, signum: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(proc.pid, signum)  # the job and any processes it started
        else:
            proc.send_signal(signum)
    except (ProcessLookupError, PermissionError):
        pass  # it has just ended


def _wait(proc: subprocess.Popen, console: Path, offset: int, echo: bool) -> int:
    """The job's exit code; with echo, its console.log copied to this terminal as it grows."""
    if not echo:
        return proc.wait()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(console, "rb") as f:
        f.seek(offset)
        while True:
            try:
                exit_code = proc.wait(timeout=0.2)  # returns as soon as the job ends
            except subprocess.TimeoutExpired:
                exit_code = None
            text = decoder.decode(f.read())
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
            if exit_code is not None:
                return exit_code


def _tail(path: Path, size: int = 8192) -> list[str]:
    """The last lines of a file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - size))
            return f.read().decode(errors="replace").splitlines()[-20:]
    except OSError:
        return []


def _refuse(message: str) -> None:
    from trainlab.engine.errors import UserError, exit_with

    exit_with(UserError(message))


def gpu_slots(n_jobs: int, gpus_per_job: int | None) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES for each parallel worker: the machine's GPUs split evenly among
    n_jobs (or gpus_per_job each); [None] * n_jobs when there is no GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        ids = [str(i) for i in range(_gpu_count())]
    if not ids:
        return [None] * n_jobs
    per_job = gpus_per_job or max(1, len(ids) // n_jobs)
    slots = [",".join(ids[i : i + per_job]) for i in range(0, len(ids) - per_job + 1, per_job)]
    if len(slots) < n_jobs:
        log.warning(f"{len(ids)} GPUs fit {len(slots)} jobs of {per_job} at a time, not {n_jobs}")
    return slots[:n_jobs]


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


def _metrics(job: dict[str, Any]) -> dict[str, Any]:
    """The job's metrics.json ({} where it has none, or an unreadable one)."""
    return _read_json(job["dir"] / "metrics.json")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _error_line(lines: list[str], exit_code: int) -> str:
    """The job's own error message if it printed one, else its last line of output."""
    for line in reversed(lines):
        if line.startswith("error: ") or "Error" in line.split(":", 1)[0]:
            return line.removeprefix("error: ")
    tail = next((line for line in reversed(lines) if line.strip()), "")
    return f"exit code {exit_code}" + (f": {tail}" if tail else "")
