"""Sweeps stopped by a signal, or by the death of their own process, then picked up again.

Real processes and real signals throughout, on 4-job grids over trainer.max_epochs run two
jobs at a time, so that the moment of the signal is certain whatever the machine's load:
with `2,3,16,17`, #0 and #1 have finished once #2 and #3 have saved a checkpoint; with
`40,41,42,43`, #2 and #3 have not started when #0 and #1 have.
"""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import run_cli, start_cli, stderr_of

from hydra_plugins.trainlab_sweeps.process_launcher import PARENT_ENV, launcher_alive, sweep_status
from trainlab.engine.commands import override
from trainlab.engine.compare import compare

TWO_DONE = "trainer.max_epochs=2,3,16,17"
NONE_DONE = "trainer.max_epochs=40,41,42,43"
SWEEP = (
    "-m",
    "debug=limit",
    "logger=csv",
    "test=false",
    "hydra.launcher.n_jobs=2",
)


def start(cwd: Path, *args: str):
    """The sweep as a terminal starts it: a process group of its own (a warm run's session)."""
    return start_cli("trainlab.train", *args, cwd=cwd, new_session=True)


def sweep_of(cwd: Path) -> Path:
    (sweep,) = (cwd / "logs" / "train" / "sweeps").iterdir()
    return sweep


def wait_for_checkpoints(
    cwd: Path, proc: subprocess.Popen, *nums: int, sweeps: str = "logs/train/sweeps/*"
) -> Path:
    """Wait until jobs `nums` of the sweep have each saved a checkpoint; the sweep's dir."""
    deadline = time.monotonic() + 180
    while True:
        found = [p for n in nums for p in cwd.glob(f"{sweeps}/{n}/checkpoints/last.ckpt")]
        if len(found) == len(nums):
            return found[0].parents[2]
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the sweep did not get that far: {stderr_of(proc)}")
        time.sleep(0.05)


def processes_in(cwd: Path) -> list[psutil.Process]:
    """Live processes working in `cwd` (the sweep and its jobs, whatever their group)."""
    alive = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and Path(proc.cwd()) == cwd:
                alive.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return alive


def none_left_in(cwd: Path, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while processes_in(cwd):
        if time.monotonic() > deadline:
            left = [" ".join(p.cmdline()[-3:]) for p in processes_in(cwd)]
            for proc in processes_in(cwd):
                proc.kill()
            pytest.fail(f"processes still running {within} s later: {left}")
        time.sleep(0.2)


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def jobs(sweep: Path) -> dict[str, dict]:
    return json.loads((sweep / "sweep.json").read_text())["jobs"]


def resume(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The same command again, with resume=auto."""
    return run_cli("trainlab.train", *args, "resume=auto", cwd=cwd)


def assert_all_finished(sweep: Path, resumed: set[str]) -> None:
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["status"] == "finished"
    assert {job["status"] for job in record["jobs"].values()} == {"finished"}
    for num, job in record["jobs"].items():
        metrics = json.loads((sweep / num / "metrics.json").read_text())
        epochs = next(int(o.split("=")[1]) for o in job["overrides"] if "max_epochs" in o)
        assert metrics["status"] == "finished" and metrics["epochs"] == epochs
        # an interrupted job continued from its checkpoint, in its own directory
        assert bool(metrics["resumed_from"]) == (num in resumed), num
        # and sweep.json holds the values its record holds
        values = {key: value for key, value in metrics.items() if "/" in key}
        assert "val/acc_best" in values and "train/loss" in values, num
        assert {key: job.get(key) for key in values} == values, num


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [
        pytest.param(signal.SIGINT, True, id="timeout-s-INT"),
        pytest.param(signal.SIGTERM, False, id="sigterm-to-parent", marks=pytest.mark.slow),
    ],
)
def test_stopped_sweep_records_every_job_and_resume_finishes_it(tmp_path, signum, to_group):
    command = (*SWEEP, TWO_DONE)
    proc = start(tmp_path, *command)
    sweep = wait_for_checkpoints(tmp_path, proc, 2, 3)
    done = {n: sweep / n / "metrics.json" for n in ("0", "1")}
    before = {n: (path.read_text(), path.stat().st_mtime_ns) for n, path in done.items()}
    if to_group:  # what `timeout -s INT` does: the sweep, then its whole group, at once
        proc.send_signal(signum)
        os.killpg(proc.pid, signum)  # (a terminal's Ctrl-C sends only this): one stop all the same
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    none_left_in(tmp_path)

    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    name = signal.Signals(signum).name
    assert (
        f"stopped by {name}: of its 4 jobs, 2 finished, 2 were interrupted (each saved a "
        "checkpoint) and 0 had not started" in stderr
    )
    again = stderr.split("Continue the sweep with: ")[1].split(" (finished jobs")[0]
    assert shlex.split(again)[:3] == ["python", "-m", "trainlab.train"]
    assert shlex.split(again)[-1] == "resume=auto"

    record = json.loads((sweep / "sweep.json").read_text())
    assert record["status"] == "interrupted" and sweep_status(record) == "interrupted"
    statuses = {num: job["status"] for num, job in record["jobs"].items()}
    assert statuses == {"0": "finished", "1": "finished", "2": "interrupted", "3": "interrupted"}
    for num in ("2", "3"):
        job = record["jobs"][num]
        assert _status(sweep / num) == "interrupted"
        assert (sweep / num / "checkpoints" / "last.ckpt").is_file()
        # the job's own output reached its console.log, to its last line
        assert f"stopped by {name}" in (sweep / num / "console.log").read_text()
        run_dir = override("hydra.run.dir", job["dir"])
        assert shlex.split(job["resume"])[-2:] == ["resume=auto", run_dir]

    # The same command with resume=auto continues that sweep, in its directory.
    result = resume(tmp_path, *command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"continuing the sweep in {sweep.relative_to(tmp_path)}" in result.stdout
    assert sweep_of(tmp_path) == sweep  # no new sweep dir
    assert_all_finished(sweep, resumed={"2", "3"})
    # the finished jobs were not run again
    assert {n: (p.read_text(), p.stat().st_mtime_ns) for n, p in done.items()} == before


@pytest.mark.parametrize("then_resume", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_killed_sweep_takes_its_jobs_with_it(tmp_path, then_resume):
    command = (*SWEEP, NONE_DONE)
    proc = start(tmp_path, *command)
    sweep = wait_for_checkpoints(tmp_path, proc, 0, 1)
    proc.kill()  # SIGKILL to the sweep's process alone: nothing runs there any more
    proc.communicate(timeout=30)
    none_left_in(tmp_path)

    # Its jobs were told (SIGTERM from the kernel) and stopped as a signalled run does.
    for num in ("0", "1"):
        assert _status(sweep / num) == "interrupted"
        assert "stopped by SIGTERM" in (sweep / num / "console.log").read_text()
    # sweep.json was left saying "running"; a reader can tell that the sweep died.
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["status"] == "running" and sweep_status(record) == "died"
    assert [job["status"] for job in record["jobs"].values()] == ["running"] * 2 + ["pending"] * 2
    result = compare([tmp_path / "logs"], "val/acc_best", tmp_path / "compare")
    assert [p.kind for p in result["problems"]] == ["died"]
    waiting = {r.dir.name: r for r in result["not_finished"]}
    assert {n: r.status for n, r in waiting.items()} == {
        "0": "interrupted",
        "1": "interrupted",
        "2": "pending",
        "3": "pending",
    }
    assert all(shlex.split(r.resume)[-1] == "resume=auto" for r in waiting.values())

    if then_resume:
        result = resume(tmp_path, *command)
        assert result.returncode == 0, result.stderr[-3000:]
        assert sweep_of(tmp_path) == sweep
        assert_all_finished(sweep, resumed={"0", "1"})


def test_ctrl_c_while_the_server_imports_starts_no_job(tmp_path):
    """Ctrl-C in a sweep's first seconds, while its fork server still imports torch (held
    there by SIGSTOP, so that the moment is certain): the sweep ends at once, starting nothing,
    every job pending, and the server goes with it. Started cold, as from a terminal (a sweep
    the test's own warm server forked would fork its server ready-made)."""
    proc = start_cli("trainlab.train", *SWEEP, NONE_DONE, cwd=tmp_path, cold=True, new_session=True)
    deadline = time.monotonic() + 60
    while True:
        # the server once it has exec'd (before, the child is the sweep's own copy, which a
        # SIGSTOP would freeze together with the sweep, halfway through starting it)
        servers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if p.environ().get(PARENT_ENV) == str(proc.pid)
        ]
        if servers:
            break
        assert proc.poll() is None and time.monotonic() < deadline, stderr_of(proc)
        time.sleep(0.01)
    (server,) = servers
    server.suspend()  # SIGSTOP: it never becomes ready
    try:
        while not list(tmp_path.glob("logs/train/sweeps/*/sweep.json")):  # jobs wait for it
            assert proc.poll() is None and time.monotonic() < deadline, stderr_of(proc)
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=15)  # at once, though its server still holds the sweep's stderr open
    finally:
        server.resume()  # the SIGTERM its launcher's death sent it takes effect
    _, stderr = proc.communicate(timeout=30)
    none_left_in(tmp_path)

    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "0 finished, 0 were interrupted and 4 had not started" in stderr
    record = jobs(sweep_of(tmp_path))
    assert {job["status"] for job in record.values()} == {"pending"}
    assert not any("pid" in job for job in record.values())


@pytest.mark.slow
def test_second_stop_stops_the_jobs_at_once(tmp_path):
    """A second stop, a while after the first, stops the jobs at once; each still records
    itself as interrupted. The jobs are held (SIGSTOP) until both have been passed on, so that
    neither has ended after the first: the second is a SIGTERM, which the kernel does not
    merge with the SIGINT still waiting."""
    proc = start(tmp_path, *SWEEP, NONE_DONE)
    sweep = wait_for_checkpoints(tmp_path, proc, 0, 1)
    held = [psutil.Process(jobs(sweep)[num]["pid"]) for num in ("0", "1")]
    for job in held:
        job.suspend()
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.5)  # (within a second of the first, it would be the same stop)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
    finally:
        for job in held:
            job.resume()
    _, stderr = proc.communicate(timeout=60)
    none_left_in(tmp_path, within=15)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "SIGTERM again: stopping every job at once" in stderr
    statuses = [job["status"] for job in jobs(sweep).values()]
    assert statuses == ["interrupted"] * 2 + ["pending"] * 2
    for num in ("0", "1"):
        metrics = json.loads((sweep / num / "metrics.json").read_text())
        assert metrics["status"] == "interrupted" and "at once" in metrics["error"]


@pytest.mark.slow
def test_stopped_optuna_trial_continues_inside_its_study(tmp_path):
    """An Optuna trial cut off by a stop stays running in its study; the sweep's command again
    continues it as the same trial, from its checkpoint, and tells the study its value."""
    import optuna
    from optuna.trial import TrialState

    command = (
        "-m",
        "hparams_search=optuna_lr_batch",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=stopped",
        "debug=limit",
        "logger=csv",
        "test=false",
        "trainer.max_epochs=30",
    )
    proc = start(tmp_path, *command)
    study_dir = wait_for_checkpoints(tmp_path, proc, 1, sweeps="logs/train/optuna/stopped")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    none_left_in(tmp_path)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "interrupted ones continue as the same trials" in stderr
    again = stderr.split("Continue the sweep with: ")[1].split(" (finished trials")[0]
    # what sweep.json, compare and the trial's own message offer: the sweep, not the trial alone
    assert jobs(study_dir)["1"]["resume"] == again
    assert f"Resume with: {again}" in (study_dir / "1" / "console.log").read_text()
    first = (study_dir / "0" / "metrics.json").read_text()
    storage = f"sqlite:///{study_dir / 'optuna.db'}"
    cut_off = optuna.load_study(study_name="stopped", storage=storage).trials[1]
    assert cut_off.state == TrialState.RUNNING and cut_off.user_attrs["interrupted"]

    result = run_cli("trainlab.train", *shlex.split(again)[3:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {num: job["status"] for num, job in jobs(study_dir).items()}
    assert statuses == {"0": "finished", "1": "finished", "2": "finished"}
    assert (study_dir / "0" / "metrics.json").read_text() == first
    study = optuna.load_study(study_name="stopped", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    continued = json.loads((study_dir / "1" / "metrics.json").read_text())
    assert continued["status"] == "finished" and continued["resumed_from"]
    assert study.trials[1].params == cut_off.params
    assert study.trials[1].value == continued["monitor"]["best"]
    assert jobs(study_dir)["1"]["val/acc_best"] == continued["val/acc_best"]


def test_a_dead_sweep_is_told_from_a_running_one(tmp_path):
    """sweep.json says "running" until its launcher says otherwise; a reader checks the
    launcher's process on its own host and its heartbeat from any other."""
    here = socket.gethostname()
    sweep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # trainlab"])
    record = {"status": "running", "launcher": {"pid": sweep.pid, "host": here}}
    assert launcher_alive(record) and sweep_status(record) == "running"
    sweep.kill()
    time.sleep(0.5)  # killed, not yet reaped: a zombie, dead all the same
    assert not launcher_alive(record)
    sweep.wait()
    assert sweep_status(record) == "died"
    # a process that got the sweep's pid since is not the sweep
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record["launcher"]["pid"] = other.pid
    assert sweep_status(record) == "died"
    other.kill()
    other.wait()
    elsewhere = {"status": "running", "launcher": {"pid": 1, "host": f"not-{here}"}}
    elsewhere["launcher"]["heartbeat"] = time.time() - 5
    assert sweep_status(elsewhere) == "running"
    elsewhere["launcher"]["heartbeat"] = time.time() - 120
    assert sweep_status(elsewhere) == "died"
    assert sweep_status({**elsewhere, "status": "interrupted"}) == "interrupted"
