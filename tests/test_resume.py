"""Resuming: last.ckpt is the latest state whatever the metric did, damaged checkpoints stop a
resume without touching the run, and a resume with another config is refused unless allowed.

The best epoch is made early on purpose: `callbacks.checkpoint.mode=min` on val/acc keeps the
worst epoch as "best", which is epoch 0 (accuracy only rises from there on the digits).
"""

import csv
import datetime
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, start_cli

from trainlab.engine.checkpoint import config_changes
from trainlab.train import train

STEPS_PER_EPOCH = 21  # 1293 training digits in batches of 64
# The MLP on the digits, the best epoch first.
RUN = ("logger=csv", "test=false", "callbacks.checkpoint.mode=min")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def ckpt_names(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints").iterdir()}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_last_checkpoint_is_the_last_step_after_an_early_best_epoch(compose, tmp_path):
    record = train(compose(*RUN, "trainer.max_epochs=3"), tmp_path)
    assert record["steps"] == 3 * STEPS_PER_EPOCH
    last, best = load(tmp_path / "checkpoints" / "last.ckpt"), load(Path(record["best_ckpt"]))
    assert (last["epoch"], last["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    assert (best["epoch"], best["global_step"]) == (0, STEPS_PER_EPOCH)
    assert ckpt_names(tmp_path) == {"best.ckpt", "last.ckpt"}


def start(run_dir: Path, *args: str):
    return start_cli("trainlab.train", *args, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)


def kill_when(last: Path, proc: subprocess.Popen, done, timeout: float = 180) -> dict:
    """SIGKILL the run once its last.ckpt satisfies done(ckpt); the checkpoint it left."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never wrote the checkpoint waited for"
        if last.is_file() and done(load(last)):
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return load(last)


def kill_late_and_resume(tmp_path: Path, epochs: int, kill_at_epoch: int) -> None:
    run = (*RUN, f"trainer.max_epochs={epochs}")
    straight = tmp_path / "straight"
    result = run_cli("trainlab.train", *run, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    kill_when(last, start(killed, *run), lambda ckpt: ckpt["epoch"] >= kill_at_epoch)
    saved = load(last)  # read again: the kill may have come after one more save
    assert saved["global_step"] == (saved["epoch"] + 1) * STEPS_PER_EPOCH
    assert saved["global_step"] > load(killed / "checkpoints" / "best.ckpt")["global_step"]

    result = run_cli("trainlab.train", *run, "resume=auto", f"hydra.run.dir={killed}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"Resuming from {last} (saved in epoch {saved['epoch'] + 1}, step {saved['global_step']})"
        in (result.stdout)
    )
    resumed, reference = metrics(killed), metrics(straight)
    assert resumed["resumed_from"] == str(last) and resumed["resume_changes"] is None
    assert resumed["steps"] == reference["steps"] == epochs * STEPS_PER_EPOCH
    for key in ("val/acc", "val/acc_best", "val/loss", "train/loss"):
        assert resumed[key] == reference[key], key
    a, b = load(straight / "checkpoints" / "last.ckpt"), load(last)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
def test_killed_late_then_resumed_continues_from_its_last_step(tmp_path):
    kill_late_and_resume(tmp_path, epochs=4, kill_at_epoch=1)


@pytest.mark.slow
def test_killed_late_in_a_20_epoch_run_then_resumed(tmp_path):
    kill_late_and_resume(tmp_path, epochs=20, kill_at_epoch=15)


# --- a run's record is whole whatever it resumed from ----------------------------------------


def recorded(record: dict) -> dict:
    """What metrics.json says of a run's training: its val, train, test and learning rate
    values, and the best value of its monitored metric."""
    values = {k: v for k, v in record.items() if k.startswith(("val/", "train/", "test/", "lr-"))}
    return {**values, "monitor": record["monitor"]}


def history(run_dir: Path) -> list[dict]:
    """metrics.csv's rows, each as the values it holds."""
    with (run_dir / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def assert_each_row_once(rows: list[dict]) -> None:
    """One row per step and kind (a step's training values, an epoch's validation, ...)."""
    kinds = [(row["step"], tuple(sorted(row))) for row in rows]
    assert len(kinds) == len(set(kinds)), [k for k in kinds if kinds.count(k) > 1]


def test_resumed_after_its_last_checkpoint_the_run_keeps_its_whole_record(tmp_path):
    run = ("logger=csv", "trainer.max_epochs=1")  # and its test
    straight = tmp_path / "straight"
    result = run_cli("trainlab.train", *run, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, rows = metrics(straight), history(straight)
    assert {"val/acc", "val/acc_best", "val/loss", "train/loss", "lr-Adam", "test/acc"} <= set(
        reference
    )
    assert_each_row_once(rows)

    # SIGKILL once the end of training is saved: while it tests, or writes its record (or, on
    # a slow machine, after it: then its metrics.json is damaged, as a full disk would leave it)
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    proc = start(killed, *run)
    deadline = time.monotonic() + 180
    while proc.poll() is None and not (last.is_file() and load(last)["epoch"] == 0):
        assert time.monotonic() < deadline, "the run never saved its end of training"
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    if (killed / "metrics.json").is_file():
        (killed / "metrics.json").write_text('{"status": "fin')
    # the same run finished, its metrics.json damaged afterwards
    damaged = tmp_path / "damaged"
    shutil.copytree(straight, damaged)
    (damaged / "metrics.json").write_text('{"status": "fin')

    for run_dir in (killed, damaged):
        result = run_cli(
            "trainlab.train", *run, "resume=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in result.stdout
        resumed = metrics(run_dir)
        assert resumed["status"] == "finished" and resumed["steps"] == STEPS_PER_EPOCH
        assert recorded(resumed) == recorded(reference)
        assert resumed["best_ckpt"] == str(run_dir / "checkpoints" / "best.ckpt")
        assert_each_row_once(history(run_dir))
        # (a kill may land before the last epoch's training row reached the file)
        assert all(row in rows for row in history(run_dir))
    assert history(damaged) == rows


@pytest.mark.slow
def test_a_checkpoint_saved_at_a_signal_after_training_keeps_the_training_values(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = start(run_dir, "logger=csv", "trainer.max_epochs=1")
    deadline = time.monotonic() + 180
    while proc.poll() is None and not last.is_file():
        assert time.monotonic() < deadline, "the run never saved its end of training"
        time.sleep(0.01)
    proc.terminate()  # after training, while it tests (or still saving, or done)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (0, 143), stderr[-3000:]
    saved = load(last)["trainlab"]["metrics"]  # (saved again at the signal, if it came in time)
    assert {"val/acc", "val/acc_best", "train/loss", "lr-Adam"} <= set(saved), stderr[-3000:]
    assert not [key for key in saved if key.startswith("test/")]
    if proc.returncode == 143:
        result = run_cli(
            "trainlab.train",
            "logger=csv",
            "trainer.max_epochs=1",
            "resume=auto",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    record = metrics(run_dir)
    assert record["status"] == "finished"
    assert {"val/acc", "val/acc_best", "train/loss", "lr-Adam", "test/acc"} <= set(record)
    assert {key: record[key] for key in saved} == saved


def test_a_copied_run_dir_resumes_into_its_own_best_checkpoint(compose, tmp_path):
    first, copy = tmp_path / "first", tmp_path / "copy"
    train(compose("logger=csv", "test=false", "trainer.max_epochs=1"), first)
    shutil.copytree(first, copy)
    kept = (first / "checkpoints" / "best.ckpt").read_bytes()

    longer = ("logger=csv", "test=false", "trainer.max_epochs=2", "resume_allow_changes=true")
    record = train(compose(*longer, "resume=auto"), copy)
    assert record["monitor"]["epoch"] == 1  # val/acc rose: the new best is saved ...
    assert ckpt_names(copy) == {"best.ckpt", "last.ckpt"}  # ... over best.ckpt
    assert record["best_ckpt"] == str(copy / "checkpoints" / "best.ckpt")
    assert load(copy / "checkpoints" / "best.ckpt")["epoch"] == 1
    assert (first / "checkpoints" / "best.ckpt").read_bytes() == kept  # the original as it was


def test_step_checkpoints_keep_one_last_checkpoint_at_the_latest_step(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = start(run_dir, *RUN, "trainer.max_epochs=50", "checkpoint_every_n_steps=5")
    steps = set()

    def seen(ckpt: dict) -> bool:
        steps.add(ckpt["global_step"])
        return ckpt["global_step"] >= 2 * STEPS_PER_EPOCH + 5

    ckpt = kill_when(last, proc, seen)
    assert {p for p in ckpt_names(run_dir) if p.endswith(".ckpt")} == {"best.ckpt", "last.ckpt"}
    assert ckpt["global_step"] >= max(steps)
    # saved every 5 steps, and at the end of each epoch (after its validation)
    assert all(s % 5 == 0 or s % STEPS_PER_EPOCH == 0 for s in steps), sorted(steps)
    assert any(s % 5 == 0 and s % STEPS_PER_EPOCH for s in steps)  # mid-epoch saves seen


def test_damaged_checkpoints_stop_the_resume_and_restart_keeps_the_history(compose, tmp_path):
    run_dir = tmp_path / "run"
    train(compose(*RUN, "trainer.max_epochs=1"), run_dir)
    last, best = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "best.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # cut short
    best.write_bytes(b"not a checkpoint" * 100)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    args = (*RUN, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    result = run_cli("trainlab.train", *args, "resume=auto", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr
    assert f"{last}: it is damaged" in error and f"{best}: it is damaged" in error, error
    assert "resume=restart" in error and "Traceback" not in error
    assert "no checkpoint yet" not in result.stdout
    for path, content in before.items():  # the run's history as it was
        assert (run_dir / path).read_bytes() == content, path

    result = run_cli("trainlab.train", *args, "resume=restart", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    kept = run_dir / "previous-1"
    for path, content in before.items():
        assert (kept / path).read_bytes() == content, path
    assert metrics(run_dir)["status"] == "finished" and metrics(run_dir)["steps"] == 21
    assert load(last)["global_step"] == STEPS_PER_EPOCH


def test_refused_pickle_is_named_without_torchs_advice(tmp_path):
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "day": datetime.date(2020, 1, 1)}, bad)
    result = run_cli("trainlab.eval", f"ckpt_path={bad}", cwd=tmp_path)
    assert result.returncode == 2
    assert f"checkpoint {bad} cannot be read" in result.stderr
    assert "pickled Python object (datetime.date)" in result.stderr
    assert "weights_only" not in result.stderr and "Traceback" not in result.stderr


def test_changed_lr_on_resume_is_refused_unless_allowed_then_applied(compose, tmp_path):
    run_dir = tmp_path / "run"
    train(compose(*RUN, "trainer.max_epochs=1"), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = last.read_bytes()

    changed = (*RUN, "trainer.max_epochs=2", "optimizer.lr=0.01", "tags=[again]")
    args = (*changed, "resume=auto", f"hydra.run.dir={run_dir}")
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "optimizer.lr: 0.001 -> 0.01" in result.stderr
    assert "trainer.max_epochs: 1 -> 2" in result.stderr and "resume_allow_changes" in result.stderr
    assert "tags" not in result.stderr  # bookkeeping, not a change of the run
    assert last.read_bytes() == saved

    record = train(compose(*changed, "resume=auto", "resume_allow_changes=true"), run_dir)
    assert record["resume_changes"] == {
        "optimizer.lr": [0.001, 0.01],
        "trainer.max_epochs": [1, 2],
    }
    assert metrics(run_dir)["resume_changes"] == record["resume_changes"]
    ckpt = load(last)
    assert ckpt["trainlab"]["config"]["optimizer"]["lr"] == 0.01
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(0.01)  # the run went on with the new rate
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(0.01)]


def test_config_changes_leave_bookkeeping_out_and_see_a_section_replaced():
    stored = {
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.001},
        "scheduler": {"_target_": "trainlab.models.schedulers.cosine", "warmup_steps": 0},
        "data": {"data_dir": "/old/data", "batch_size": 64},
        "paths": {"log_dir": "/old/logs"},
        "tags": [],
        "an_option_removed_since": 1,
    }
    current = {
        "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.001},
        "scheduler": None,  # scheduler=none
        "data": {"data_dir": "/new/data", "batch_size": 32},
        "paths": {"log_dir": "/new/logs"},
        "tags": ["again"],
        "an_option_added_since": 2,
    }
    assert config_changes(stored, current) == {
        "data.batch_size": [64, 32],
        "scheduler": [stored["scheduler"], None],
    }
