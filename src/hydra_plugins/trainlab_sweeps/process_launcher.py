"""Runs every job of a Hydra sweep as its own `python -m trainlab.train ...` process.

Why not in-process, as Hydra's basic launcher does: a job that crashes, leaks a W&B run or GPU
memory, or changes global state would take the others with it; and a job that itself uses
several devices needs its own process tree, since Lightning's DDP launcher re-runs the
command line in each child (in-process, that would re-run the whole sweep).

Each job runs as a plain single run whose run directory is the job's sweep directory. The
sweep's record is <sweep dir>/sweep.json: one entry per job with its overrides, status, error
and final metrics, rewritten as jobs finish, so a running or broken sweep can be inspected.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from trainlab.commands import override

log = logging.getLogger(__name__)

SUMMARY_FILE = "sweep.json"
SWEEP_ENV = "TRAINLAB_SWEEP"  # tells a job the name of its sweep (its W&B group)

# Jobs that failed in this process's sweeps; the entry point's exit code depends on it.
FAILED_JOBS: list[dict[str, Any]] = []


class ProcessLauncher(Launcher):
    def __init__(
        self,
        module: str,
        n_jobs: int = 1,
        gpus_per_job: int | None = None,
        dry_run: bool = False,
    ) -> None:
        self.module = module
        self.n_jobs = max(1, n_jobs)
        self.gpus_per_job = gpus_per_job
        self.dry_run = dry_run
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self._lock = threading.Lock()

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        assert self.config is not None
        jobs = [
            self._prepare(initial_job_idx + i, list(overrides))
            for i, overrides in enumerate(job_overrides)
        ]
        if self.dry_run:
            for job in jobs:
                print(f"#{job['num']}: {' '.join(job['overrides']) or '(no overrides)'}")
            print(f"{len(jobs)} job(s); nothing was run (--dry-run).")
            return [self._job_return(job, None) for job in jobs]

        slots: queue.Queue = queue.Queue()
        for slot in gpu_slots(self.n_jobs, self.gpus_per_job):
            slots.put(slot)
        workers = slots.qsize()
        log.info(f"Launching {len(jobs)} jobs, {workers} at a time, each in its own process")

        def run(job: dict[str, Any]) -> JobReturn:
            slot = slots.get()
            try:
                return self._run(job, slot, echo=workers == 1)
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(run, jobs))

    def _prepare(self, num: int, overrides: list[str]) -> dict[str, Any]:
        """The job's config as Hydra composes it (the sweep dir and subdir resolve here)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.num = num
            cfg.hydra.job.id = str(num)
        job_dir = Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
        return {"num": num, "overrides": overrides, "dir": job_dir, "cfg": cfg}

    def _run(self, job: dict[str, Any], gpus: str | None, echo: bool) -> JobReturn:
        job_dir: Path = job["dir"]
        job_dir.mkdir(parents=True, exist_ok=True)
        sweep_dir = job_dir.parent
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # W&B: own service
        env[SWEEP_ENV] = sweep_dir.name
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        # A list, so no shell reads it; the directory quoted for Hydra's override grammar.
        run_dir = override("hydra.run.dir", job_dir)
        cmd = [sys.executable, "-m", self.module, *job["overrides"], run_dir]
        entry = {
            "num": job["num"],
            "overrides": job["overrides"],
            "dir": str(job_dir),
            "status": "running",
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self._record(sweep_dir, entry)
        log.info(f"#{job['num']} started: {' '.join(job['overrides'])}")

        started = time.perf_counter()
        last_lines: list[str] = []
        with open(job_dir / "console.log", "w") as console:
            proc = subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for line in proc.stdout:
                console.write(line)
                if echo:
                    sys.stdout.write(line)
                last_lines = [*last_lines[-19:], line.rstrip()]
            exit_code = proc.wait()

        metrics = _read_json(job_dir / "metrics.json")
        entry.update({k: v for k, v in metrics.items() if "/" in k})
        entry["exit_code"] = exit_code
        entry["duration_s"] = round(time.perf_counter() - started, 2)
        if exit_code == 0 and metrics.get("status") == "finished":
            entry["status"] = "finished"
        else:
            entry["status"] = "failed"
            entry["error"] = metrics.get("error") or _error_line(last_lines, exit_code)
            with self._lock:
                FAILED_JOBS.append(entry)
        self._record(sweep_dir, entry)
        shown = f"val/acc_best {entry['val/acc_best']:.4f}" if "val/acc_best" in entry else ""
        log.info(
            f"#{job['num']} {entry['status']} in {entry['duration_s']:.0f}s: "
            f"{' '.join(job['overrides'])} {shown or entry.get('error', '')}"
        )
        return self._job_return(job, {**metrics, **entry})

    def _record(self, sweep_dir: Path, entry: dict[str, Any]) -> None:
        """Merge one job's entry into sweep.json (written whole, then renamed)."""
        from trainlab.run import write_json

        with self._lock:
            summary = _read_json(sweep_dir / SUMMARY_FILE) or {"jobs": {}}
            summary["jobs"][str(entry["num"])] = entry
            summary["failed"] = sum(j["status"] == "failed" for j in summary["jobs"].values())
            write_json(sweep_dir / SUMMARY_FILE, summary)

    def _job_return(self, job: dict[str, Any], value: Any) -> JobReturn:
        # Always COMPLETED: Hydra's sweepers stop the whole sweep at a FAILED job, while a
        # failure here is recorded in sweep.json and FAILED_JOBS, and the other jobs go on.
        ret = JobReturn(
            overrides=job["overrides"],
            cfg=job["cfg"],
            working_dir=str(job["dir"]),
            task_name=job["cfg"].hydra.job.name,
            status=JobStatus.COMPLETED,
        )
        ret.return_value = value
        return ret


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
