"""Warm job start (engine.warm): a sweep's jobs fork from a server that has imported torch and
Lightning, each still a process of its own. Real sweeps, real processes, real signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import WarmProcess, child_env, run_cli, start_cli, stderr_of

FAST = ("debug=limit", "logger=csv", "test=false")


def sweep_record(cwd: Path) -> dict:
    (path,) = cwd.glob("logs/train/sweeps/*/sweep.json")
    return json.loads(path.read_text())


def metrics(cwd: Path, job: dict) -> dict:
    return json.loads((cwd / job["dir"] / "metrics.json").read_text())


# A sweep started from a terminal (cold) starts its server as `python -m trainlab.engine.warm`; one
# that a warm server forked, as the other tests' sweeps are, forks its server from itself. The
# cold one pays two fresh interpreters' imports (about 20 s): in test-all (and a cold sweep's
# start is in test_sweep_signals' Ctrl-C while its server imports).
@pytest.mark.parametrize("cold", [pytest.param(True, marks=pytest.mark.slow), False])
def test_warm_jobs_are_processes_of_their_own(tmp_path, cold):
    # three jobs of one setting, without a seed: each must draw its own initial weights
    args = ("-m", "seed=null", "optimizer.lr=1e-3,0.001,1e-3", *FAST)
    result = run_cli("trainlab.train", *args, cwd=tmp_path, cold=cold)
    assert result.returncode == 0, result.stderr[-3000:]
    record = sweep_record(tmp_path)
    jobs = list(record["jobs"].values())
    assert [job["start"] for job in jobs] == ["warm"] * 3
    pids = {job["pid"] for job in jobs}
    assert len(pids) == 3 and record["launcher"]["pid"] not in pids
    for job in jobs:
        assert job["status"] == "finished" and job["exit_code"] == 0
        run = metrics(tmp_path, job)
        assert run["status"] == "finished" and run["epochs"] == 2
        # its own output, in its own console.log, the run's config first
        console = (tmp_path / job["dir"] / "console.log").read_text()
        assert console.startswith("config") and "Trainer.fit` stopped" in console
    # not the server's random state in each (forked processes share it unless reseeded)
    assert len({metrics(tmp_path, job)["train/loss"] for job in jobs}) == 3
    # one at a time: each job began its run (the logger's hparams.yaml) only once the one before
    # it had ended, and composed its config meanwhile (ahead of its turn: on a loaded machine a
    # short job can end before the next has composed, so at least once in the sweep)
    composed_ahead = []
    for before, job in zip(jobs, jobs[1:], strict=False):
        ended = (tmp_path / before["dir"] / "metrics.json").stat().st_mtime
        run_dir = tmp_path / job["dir"]
        composed_ahead.append((run_dir / ".hydra" / "config.yaml").stat().st_mtime < ended)
        assert (run_dir / "hparams.yaml").stat().st_mtime > ended
    assert any(composed_ahead)


@pytest.mark.slow
def test_warm_false_starts_each_job_cold(tmp_path):
    args = ("-m", "optimizer.lr=1e-3", *FAST, "hydra.launcher.warm=false")
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = sweep_record(tmp_path)["jobs"].values()
    assert job["start"] == "cold" and job["status"] == "finished"


@pytest.mark.slow
def test_a_job_that_crashes_leaves_the_others_finished(tmp_path):
    """#1 dies of a segmentation fault mid-run; #0 finished before it, #2 starts after it from
    the same server."""
    proc = start_cli("trainlab.train", "-m", "trainer.max_epochs=2,60,2", *FAST, cwd=tmp_path)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("logs/train/sweeps/*/1/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, stderr_of(proc)
        time.sleep(0.05)
    job = sweep_record(tmp_path)["jobs"]["1"]
    assert job["status"] == "running" and job["start"] == "warm"
    os.kill(job["pid"], signal.SIGSEGV)
    _, stderr = proc.communicate(timeout=180)

    assert proc.returncode == 1
    assert "1 job(s) of the sweep failed: #1 (trainer.max_epochs=60" in stderr
    record = sweep_record(tmp_path)
    statuses = {num: job["status"] for num, job in record["jobs"].items()}
    assert statuses == {"0": "finished", "1": "failed", "2": "finished"}
    crashed = record["jobs"]["1"]
    assert crashed["exit_code"] == -signal.SIGSEGV
    assert crashed["error"].startswith(f"exit code {-signal.SIGSEGV}")
    assert not (tmp_path / crashed["dir"] / "metrics.json").exists()  # it really died mid-run
    assert record["jobs"]["2"]["start"] == "warm"  # the server outlived the crash


@pytest.mark.slow
def test_a_ddp_job_in_a_warm_sweep_finishes(tmp_path):
    """Lightning's DDP launcher starts rank 1 as `python -m trainlab.train <the job's args>`."""
    args = ("-m", "trainer=ddp_cpu", "trainer.devices=2", "optimizer.lr=1e-3,2e-3", *FAST)
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in sweep_record(tmp_path)["jobs"].values():
        assert job["start"] == "warm" and job["status"] == "finished"
        run = metrics(tmp_path, job)
        assert run["status"] == "finished" and run["world_size"] == 2 and run["ranks_agree"]


@pytest.mark.slow  # test_sweep_signals kills a (warm) sweep too; this looks at the server
def test_the_server_goes_with_its_sweep(tmp_path):
    """SIGKILL to the sweep: the server exits, and its jobs stop as a signalled run does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainlab.train", "-m", "trainer.max_epochs=60", *FAST],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("logs/train/sweeps/*/0/checkpoints/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    job = sweep_record(tmp_path)["jobs"]["0"]
    server = psutil.Process(job["pid"]).parent()
    assert server.pid != proc.pid and "trainlab.engine.warm" in server.cmdline()
    proc.kill()
    proc.wait()
    psutil.wait_procs([server, psutil.Process(job["pid"])], timeout=60)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    assert metrics(tmp_path, job)["status"] == "interrupted"
    assert "stopped by SIGTERM" in (tmp_path / job["dir"] / "console.log").read_text()


# The suite's own runs (conftest.start_cli) fork from a warm server too: a run must look the
# same to a test as a fresh interpreter's, but for the seconds it saves.
PROBE = """
import os, signal, sys, time
print(sys.path[0] == os.getcwd(), sys.argv[1:], flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["wait"]:
    time.sleep(60)
sys.exit(3)
"""


def test_a_warm_run_looks_like_a_cold_one(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)  # found because `python -m` looks in its cwd
    runs = {cold: run_cli("probe", "a b", cwd=tmp_path, cold=cold) for cold in (False, True)}
    warm, cold = runs[False], runs[True]
    assert (warm.returncode, warm.stdout, warm.stderr) == (3, "True ['a b']\n", "to stderr\n")
    assert (cold.returncode, cold.stdout, cold.stderr) == (3, "True ['a b']\n", "to stderr\n")

    proc = start_cli("probe", "wait", cwd=tmp_path)
    assert isinstance(proc, WarmProcess) and proc.pid != os.getpid()
    assert psutil.Process(proc.pid).parent().cmdline()[1:3] == ["-m", "trainlab.engine.warm"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
