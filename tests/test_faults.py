"""Runs die; work must not. Real processes are killed and signalled here, and resumed."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env, run_cli, start_cli
from test_resume import assert_each_row_once, history

# A run long enough to be interrupted between epochs (about a second an epoch here).
RUN = ("model=cnn", "data.batch_size=16", "logger=csv", "test=false")


def start(cwd: Path, *args: str):
    return start_cli("trainlab.train", *args, cwd=cwd)


def wait_for(path_glob: str, root: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        found = list(root.glob(path_glob))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def weights(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def run_dirs(root: Path) -> list[Path]:
    return sorted((root / "logs" / "train" / "runs").iterdir())


# (test_resume kills runs at two moments in the fast suite; this one compares them to the bit)
@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    straight = tmp_path / "straight"
    result = run_cli(
        "trainlab.train", *RUN, "trainer.max_epochs=4", f"hydra.run.dir={straight}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]

    work = tmp_path / "work"
    work.mkdir()
    proc = start(work, *RUN, "trainer.max_epochs=4")
    wait_for("logs/train/runs/*/checkpoints/last.ckpt", work, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = run_dirs(work)
    assert not (killed / "metrics.json").exists()  # it really died mid-run

    result = run_cli("trainlab.train", *RUN, "trainer.max_epochs=4", "resume=auto", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume=auto: continuing {killed}" in result.stdout
    assert run_dirs(work) == [killed]  # the same directory, not a new run

    resumed = json.loads((killed / "metrics.json").read_text())
    reference = json.loads((straight / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt")
    assert resumed["steps"] == reference["steps"] and resumed["epochs"] == 4
    for key in ("val/acc", "val/acc_best", "val/loss", "train/loss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    a, b = (
        weights(straight / "checkpoints" / "last.ckpt"),
        weights(killed / "checkpoints" / "last.ckpt"),
    )
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the history of the epochs before the kill is still there
    lines = (killed / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    epochs_with_val = {
        row.split(",")[header.index("epoch")]
        for row in lines[1:]
        if row.split(",")[header.index("val/acc")]
    }
    assert epochs_with_val == {"0", "1", "2", "3"}
    assert_each_row_once(history(killed))  # none logged twice: before the kill and after


# Writes 5000 rows to metrics.csv, then adds a column after each new row: each addition
# rewrites the whole file (Lightning's writer, engine.loggers.RunCSVLogger), again and again.
REWRITING = """
import sys
from trainlab.engine.loggers import RunCSVLogger
logger = RunCSVLogger(save_dir=sys.argv[1], name="", version="")
for step in range(5000):
    logger.log_metrics({"loss": 1.0}, step=step)
logger.save()
print("written", flush=True)
for step in range(5000, 10**9):
    logger.log_metrics({"loss": 1.0, f"column{step}": 2.0}, step=step)
    logger.save()
"""


@pytest.mark.slow
def test_metrics_csv_keeps_every_row_when_killed_while_adding_a_column(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", REWRITING, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "written\n"
        for _ in range(10):  # a reader, then the kill, lands inside a rewrite (most of the time)
            time.sleep(0.05)
            rows = list(csv.DictReader((tmp_path / "metrics.csv").open(newline="")))
            assert len(rows) >= 5000
    finally:
        proc.kill()
        proc.wait()
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open(newline="")))
    assert len(rows) >= 5000 and [r["step"] for r in rows[:3]] == ["0", "1", "2"]

    # a run resumed in that directory appends to the history and clears the half-written copy
    from trainlab.engine.loggers import RunCSVLogger

    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    logger.log_metrics({"loss": 0.5, "new": 1.0}, step=10**9)
    logger.save()
    after = list(csv.DictReader((tmp_path / "metrics.csv").open(newline="")))
    assert after[: len(rows)] == [{**r, "new": ""} for r in rows]
    assert after[-1]["loss"] == "0.5" and not (tmp_path / "metrics.csv.partial").exists()


@pytest.mark.parametrize(
    ("signum", "code"),
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
def test_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, signum, code):
    proc = start(tmp_path, *RUN, "trainer.max_epochs=50")
    first = wait_for("logs/train/runs/*/checkpoints/last.ckpt", tmp_path, proc)
    saved_epoch = torch.load(first, weights_only=True)["epoch"]
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}" in stderr and "resume=auto" in stderr
    run_dir = first.parent.parent
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == record["steps"] and ckpt["epoch"] >= saved_epoch
    assert "Traceback" not in stderr

    # python -m trainlab.train ..., a shell line
    hint = shlex.split(stderr.split("Resume with: ")[1].splitlines()[0])
    assert hint[:3] == ["python", "-m", "trainlab.train"]
    result = run_cli(
        "trainlab.train",
        *hint[3:],
        "trainer.max_epochs=" + str(ckpt["epoch"] + 2),
        "resume_allow_changes=true",  # a longer run than the one stopped
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_sigint_early_stops_a_run_started_with_sigint_ignored(tmp_path):
    """A script's background job (`cmd &`) starts with SIGINT ignored; a SIGINT sent to it on
    purpose stops it all the same, from its first moments: one line, exit 130."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainlab.train", *RUN, "trainer.max_epochs=2"],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a shell does
    )
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = _error_lines(stderr)
    assert line.startswith("error: stopped by SIGINT")
    assert not list(tmp_path.glob("logs/train/runs/*"))  # nothing left that could be continued


def test_ctrl_c_before_training_is_one_line_and_leaves_no_run_dir(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the run directory
    exists, before training: held there with SIGSTOP so that the moment is certain."""
    proc = start_cli("trainlab.train", *RUN, "trainer.max_epochs=2", cwd=tmp_path, new_session=True)
    wait_for("logs/train/runs/*/.hydra", tmp_path, proc, timeout=120)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert not list(tmp_path.glob("logs/train/runs/*/checkpoints/*"))  # before training
        os.killpg(proc.pid, signal.SIGINT)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert _error_lines(stderr) == [
        "error: stopped by SIGINT before train had saved anything; nothing is left behind."
    ]
    assert not list(tmp_path.glob("logs/train/runs/*"))  # (resume=auto: starts anew)


def test_ctrl_c_in_process_stops_after_the_step_and_gives_sigint_back(tmp_path):
    """Trained in-process (a notebook), with no entry point's handler: Ctrl-C still stops after
    the step with a checkpoint, and the fit hands SIGINT back as it found it."""
    import lightning.pytorch as pl
    from conftest import tiny_trainer
    from test_values import LossSchedule

    from trainlab.engine.callbacks.guards import StopOnSignal
    from trainlab.engine.errors import Interrupted

    class CtrlC(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    trainer = tiny_trainer(callbacks=[CtrlC(), StopOnSignal()], default_root_dir=tmp_path)
    with pytest.raises(Interrupted) as stopped:
        trainer.fit(LossSchedule([1.0] * 20))
    assert stopped.value.signum == signal.SIGINT and trainer.global_step == 3
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert signal.getsignal(signal.SIGINT) is before


def test_step_checkpoints_bound_what_a_kill_loses(tmp_path):
    proc = start(tmp_path, *RUN, "trainer.max_epochs=50", "checkpoint_every_n_steps=7")
    last = wait_for("logs/train/runs/*/checkpoints/last.ckpt", tmp_path, proc)
    steps_per_epoch = 81  # 1293 training digits in batches of 16
    ckpt = None
    while ckpt is None or ckpt["global_step"] < 3 * 7:
        ckpt = torch.load(last, weights_only=True)
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] % 7 == 0 or ckpt["global_step"] % steps_per_epoch == 0


def test_damaged_last_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "trainlab.train", *RUN, "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir / "metrics.json").unlink()  # as if it had died
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:3000])  # truncated
    result = run_cli(
        "trainlab.train",
        *RUN,
        "trainer.max_epochs=3",
        "resume=auto",
        "resume_allow_changes=true",  # a longer run than the one that wrote the checkpoints
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {last}" in result.stdout and "cannot be read" in result.stdout
    assert f"Resuming from {run_dir / 'checkpoints' / 'best.ckpt'}" in result.stdout


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run_dir = tmp_path / "mlp"
    result = run_cli(
        "trainlab.train", "debug=limit", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0
    result = run_cli(
        "trainlab.train",
        "model=cnn",
        "logger=csv",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "was written by a different model" in result.stderr
    assert "model._target_" not in result.stderr and "model.net._target_" in result.stderr


def test_nan_loss_stops_the_run_and_only_that_job_of_a_sweep(tmp_path):
    result = run_cli(
        "trainlab.train",
        "-m",
        "optimizer=sgd",
        "optimizer.lr=0.01,1e12",
        "debug=limit",
        "logger=csv",
        "scheduler=none",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    sweep = next((tmp_path / "logs" / "train" / "sweeps").iterdir())
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert jobs["0"]["status"] == "finished"
    assert jobs["1"]["status"] == "failed"
    error = jobs["1"]["error"]
    # 1e12 blows the loss up by orders of magnitude first: the divergence guard stops it there
    assert "training loss is" in error and "divergence_factor" in error
    assert "learning rate 1e+12" in error and "step" in error


def test_disk_full_while_saving_keeps_the_earlier_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # a 900 kB file system: room for a checkpoint or two of the MLP (about 620 kB each), no more
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a small file system here (needs root)")
    try:
        result = run_cli(
            "trainlab.train",
            "trainer.max_epochs=3",
            "logger=csv",
            "test=false",
            f"hydra.run.dir={mount / 'run'}",
            cwd=tmp_path,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "no space left to write" in result.stderr and "intact" in result.stderr
        assert "Traceback" not in result.stderr
        survivors = list((mount / "run" / "checkpoints").glob("*.ckpt"))
        assert survivors
        for path in survivors:  # what was saved before the disk filled is whole
            assert "state_dict" in torch.load(path, weights_only=True)
        assert not list((mount / "run" / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_checkpoints_describe_themselves(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("trainlab.train", "debug=limit", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    record = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["trainlab"]
    assert record["config"]["optimizer"]["lr"] == 1e-3
    assert {"torch", "lightning", "trainlab"} <= set(record["packages"])
    offline_run = next((run_dir / "wandb").glob("offline-run-*"))
    assert offline_run.name.endswith(record["wandb_id"])
    assert set(record["rng"]) == {"torch", "numpy", "python"}
