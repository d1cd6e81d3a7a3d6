"""Paths: run directories that two runs never share, any log dir (spaces, accents) in every
command the project builds or prints, and log or data dirs that cannot work refused in one line."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env, run_cli, start_cli

from trainlab.engine.config import check_command_line
from trainlab.engine.run_dirs import claim, newest_first

QUICK = ("logger=csv", "test=false", "debug=limit")
ODD = "my runs/été 1"  # a log dir with a space and non-ASCII letters


def start(cwd: Path, *args: str):
    return start_cli("trainlab.train", *args, cwd=cwd)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def at_next_second() -> None:
    time.sleep(1.05 - time.time() % 1)  # just after a second starts: all starts fall within it


def record(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def log_dir_arg(path: Path) -> str:
    return f"paths.log_dir='{path}'"  # quoted for Hydra, as a user would


def test_claims_racing_for_one_name_all_get_their_own(tmp_path):
    wanted = tmp_path / "runs" / "2026-12-02_10-00-00"
    got, go = [], threading.Barrier(8)

    def take():
        go.wait()
        got.append(claim(wanted))

    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert wanted in got and wanted.with_name(wanted.name + "_8") in got


def test_newest_run_first_counts_suffixes_as_numbers():
    names = ["2026-12-02_10-00-00", "2026-12-02_10-00-00_2", "2026-12-02_10-00-00_10"]
    names += ["2026-12-02_09-59-59_3", "2026-12-02_10-00-01"]
    ordered = [p.name for p in newest_first([Path(n) for n in names])]
    assert ordered == [
        "2026-12-02_10-00-01",
        "2026-12-02_10-00-00_10",
        "2026-12-02_10-00-00_2",
        "2026-12-02_10-00-00",
        "2026-12-02_09-59-59_3",
    ]


def test_eval_accepts_a_group_added_with_plus():
    check_command_line("eval", ["ckpt_path=some.ckpt", "+model=mlp"])  # raised before the fix


@pytest.mark.parametrize(
    "args",
    [
        ("paths.log_dir=blocker",),  # a file where the folder should be
        ("paths.log_dir=blocker/logs",),  # a file above it
        ("paths.log_dir=" + "x" * 300,),  # a name too long for the file system
        ("hydra.run.dir=blocker",),
        ("paths.data_dir=blocker",),
        ("paths.data_dir=blocker/data",),
        ("paths.data_dir=" + "x" * 300,),
    ],
)
def test_unusable_log_or_data_dir_is_one_line(tmp_path, args):
    (tmp_path / "blocker").write_text("a file\n")
    result = run_cli("trainlab.train", *args, *QUICK, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot ") and "Choose another with" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # nothing was created


def test_commands_that_run_nothing_leave_no_directories(tmp_path):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    for args, code in (
        (("--help",), 0),
        (("--cfg", "job"), 0),
        (("-m", "optimizer.lr=1e-3,2e-3", "--dry-run"), 0),
        (("hydra.mode=MULTIRUN", "optimizer.lr=1e-3,2e-3", "--dry-run"), 0),
        (("optimizer.lrr=1",), 2),  # refused: no such key
        (("optimizer.lr=1e-3,2e-3",), 2),  # refused: a sweep without -m
    ):
        result = run_cli("trainlab.train", *args, cwd=work, env={"TMPDIR": str(scratch)})
        assert result.returncode == code, result.stderr
    result = run_cli("trainlab.eval", cwd=work)  # no ckpt_path
    assert result.returncode == 2 and "ckpt_path must be given" in result.stderr
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []


@pytest.mark.slow
def test_runs_started_together_get_their_own_directories(tmp_path):
    at_next_second()
    procs = [start(tmp_path, *QUICK) for _ in range(3)]
    for proc in procs:
        finish(proc)
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 3
    for run_dir in runs:
        metrics = record(run_dir)
        assert metrics["status"] == "finished" and metrics["run_dir"] == str(run_dir)
        assert metrics["steps"] == 10  # debug=limit: 2 epochs of 5 batches, this run's alone
        rows = (run_dir / "metrics.csv").read_text().splitlines()
        assert len(rows) > 2 and len(rows) == len(set(rows))  # no row written twice
    # the same seed: the same rows, each run's own
    assert len({(r / "metrics.csv").read_text() for r in runs}) == 1


@pytest.mark.slow
def test_sweeps_started_together_get_their_own_directories(tmp_path):
    at_next_second()
    procs = [start(tmp_path, "-m", f"seed={seed}", *QUICK) for seed in (1, 2)]
    for proc in procs:
        finish(proc)
    sweeps = list((tmp_path / "logs" / "train" / "sweeps").iterdir())
    assert len(sweeps) == 2
    assert sorted(record(s / "0")["seed"] for s in sweeps) == [1, 2]


@pytest.mark.slow
def test_ddp_processes_write_to_their_parents_run_directory(tmp_path):
    finish(start(tmp_path, "trainer=ddp_cpu", "trainer.devices=2", *QUICK))
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert record(run_dir)["world_size"] == 2 and record(run_dir)["ranks_agree"] is True


@pytest.mark.slow
def test_odd_log_dir_signal_then_the_printed_resume_command(tmp_path):
    logs = tmp_path / ODD
    run = (log_dir_arg(logs), "model=cnn", "data.batch_size=16", "trainer.max_epochs=3")
    proc = start(tmp_path, *run, "logger=csv", "test=false")
    runs = logs / "train" / "runs"
    while not list(runs.glob("*/checkpoints/last.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    printed = err.split("Resume with: ", 1)[1].splitlines()[0]

    venv = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    resumed = subprocess.run(
        ["bash", "-c", printed], cwd=tmp_path, env=child_env(**venv), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    assert "Resuming from" in resumed.stdout
    assert record(run_dir)["status"] == "finished" and record(run_dir)["epochs"] == 3


@pytest.mark.slow
def test_odd_log_dir_killed_then_resume_auto(tmp_path):
    logs = tmp_path / ODD
    run = (log_dir_arg(logs), "model=cnn", "data.batch_size=16", "trainer.max_epochs=3")
    run += ("logger=csv", "test=false")
    proc = start(tmp_path, *run)
    runs = logs / "train" / "runs"
    while not list(runs.glob("*/checkpoints/last.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    (killed,) = runs.iterdir()
    assert not (killed / "metrics.json").exists()  # it died mid-run

    out = finish(start(tmp_path, *run, "resume=auto"))
    assert f"resume=auto: continuing {killed}" in out
    assert list(runs.iterdir()) == [killed]
    assert record(killed)["status"] == "finished" and record(killed)["resumed_from"]


@pytest.mark.slow
def test_odd_log_dir_sweep(tmp_path):
    logs = tmp_path / ODD
    finish(start(tmp_path, "-m", log_dir_arg(logs), "optimizer.lr=1e-3,2e-3", *QUICK))
    (sweep,) = (logs / "train" / "sweeps").iterdir()
    lrs = [record(sweep / job)["effective_lr"] for job in ("0", "1")]
    assert lrs == [1e-3, 2e-3]
    assert json.loads((sweep / "sweep.json").read_text())["failed"] == 0


@pytest.mark.slow
def test_eval_with_a_group_added_runs_in_its_own_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("trainlab.train", *QUICK, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    result = run_cli("trainlab.eval", ckpt, "+model=mlp", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (eval_dir,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    assert "test/acc" in record(eval_dir)
