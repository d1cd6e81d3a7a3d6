"""What a job knows of how it was launched: the environment that tells a sweep's job it is one,
the request that it stop when its sweep dies, and the run name a distributed launcher gives all
its processes. (Here, below the launcher, the configs and the run directories, so that each of
them uses it without importing another.)"""

from __future__ import annotations

import os
import signal
import sys
import time

from trainlab.engine import stopping

SWEEP_ENV = "TRAINLAB_SWEEP"  # tells a job the name of its sweep (its W&B group)
PARENT_ENV = "TRAINLAB_SWEEP_PARENT"  # the launcher's pid: its jobs stop when it dies


def stop_with_parent() -> None:
    """In a job of a sweep: SIGTERM when the sweep's process dies (killed outright, say), so
    that the job saves its checkpoint and stops rather than training on as an orphan.

    The kernel sends it when the *thread* that started the job ends: here a worker thread of
    the launcher, which waits for its job and so outlives it unless the whole process dies.
    Linux only; elsewhere the jobs of a killed sweep run to their end.
    """
    parent = os.environ.pop(PARENT_ENV, None)  # not inherited by processes the job starts
    if parent is not None and SWEEP_ENV in os.environ:
        stopping.count_every_signal()  # the launcher signals a job twice only when asked twice
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def run_name() -> str:
    """The name of a run's directory (`${run_name:}` in conf/hydra/default.yaml): the job's
    name under a distributed launcher (see shared_run_name), else its start time. The entry
    points make a time-named directory unique (see claim)."""
    return shared_run_name() or time.strftime("%Y-%m-%d_%H-%M-%S")


def shared_run_name() -> str | None:
    """The job's id where a distributed launcher started one process per node: these must all
    agree on one directory, and a requeued SLURM job must find its own again."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = env.get("SLURM_ARRAY_JOB_ID", env["SLURM_JOB_ID"])
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}" + (f"_{task}" if task else "")
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("TORCHELASTIC_RUN_ID"):
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id == "none":  # static rendezvous: the master's address is what all share
            run_id = f"{env.get('MASTER_ADDR', 'localhost')}-{env.get('MASTER_PORT', '')}"
        return f"torchrun-{run_id}"
    return None
