"""Sweeps: grid and Optuna searches in one process per job, failures, resumption, W&B sweep
definitions, dry runs, and the local comparison of their runs."""

import json
import os
import re
import signal
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from conftest import run_cli, start_cli

from hydra_plugins.trainlab_sweeps.process_launcher import gpu_slots
from trainlab.engine.compare import compare

FAST = ("debug=limit", "logger=csv")


def sweep_dir(root: Path, kind: str = "sweeps") -> Path:
    dirs = list((root / "logs" / "train" / kind).iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2x2 lr x batch-size grid, two jobs at a time, logging to W&B (offline)."""
    cwd = tmp_path_factory.mktemp("grid")
    result = run_cli(
        "trainlab.train",
        "-m",
        "optimizer.lr=1e-3,1e-2",
        "data.batch_size=32,64",
        "debug=limit",
        "hydra.launcher.n_jobs=2",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir(cwd)


@pytest.fixture(scope="module")
def failing_grid(tmp_path_factory):
    """A 2x2 grid in which one job cannot run: 1000 samples per batch, 934 training samples."""
    cwd = tmp_path_factory.mktemp("failing")
    result = run_cli(
        "trainlab.train",
        "-m",
        "data.batch_size=32,1000",
        "data.val_size=0.1,0.35",
        *FAST,
        "hydra.launcher.n_jobs=2",
        cwd=cwd,
    )
    return result, sweep_dir(cwd)


def test_grid_runs_each_job_in_its_own_directory_and_process(grid):
    jobs = job_dirs(grid)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "finished"
        assert record["run_dir"] == str(job)
        seen.add(frozenset(record["overrides"]))
        # one W&B run per job, not every job in the first one
        assert len(list((job / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
        # each records the packages it runs (read once by the fork server, which jobs share)
        (requirements,) = (job / "wandb").glob("offline-run-*/files/requirements.txt")
        assert f"torch=={version('torch')}" in requirements.read_text().split()
    assert seen == {
        frozenset({f"optimizer.lr={lr}", f"data.batch_size={bs}", "debug=limit"})
        for lr in ("0.001", "0.01")
        for bs in (32, 64)
    }
    summary = json.loads((grid / "sweep.json").read_text())
    assert summary["failed"] == 0 and len(summary["jobs"]) == 4


def wandb_records(path: Path):
    """The records of a W&B offline run file (run-<id>.wandb): a LevelDB-style log of 32 KiB
    blocks after a 7-byte header, each record a 7-byte header (crc, length, type: 1 whole,
    2 to 4 first, middle and last part) and a part of a serialised wandb Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_each_job_is_a_complete_wandb_run_of_the_sweeps_group(grid):
    import torch

    ids = set()
    for job in job_dirs(grid):
        (path,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
        records = list(wandb_records(path))
        kinds = [r.WhichOneof("record_type") for r in records]
        (run,) = [r.run for r in records if r.HasField("run")]
        assert run.run_group == grid.name  # the sweep's jobs are one group in W&B
        assert path.name == f"run-{run.run_id}.wandb"
        ids.add(run.run_id)
        # a resumed job continues the same W&B run: its checkpoint keeps the id
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["trainlab"]["wandb_id"] == run.run_id
        # every epoch's metrics reached the file, and the run was closed (its exit record)
        val_acc = [
            item.value_json
            for r in records
            if r.HasField("history")
            for item in r.history.item
            if (item.key or "/".join(item.nested_key)) == "val/acc"
        ]
        assert len(val_acc) == 2  # debug=limit: two epochs
        assert kinds[-1] in ("exit", "final", "footer") or "exit" in kinds
    assert len(ids) == 4


def test_two_jobs_run_at_the_same_time(grid):
    jobs = json.loads((grid / "sweep.json").read_text())["jobs"].values()
    starts = sorted(time.mktime(time.strptime(j["started"], "%Y-%m-%d %H:%M:%S")) for j in jobs)
    # with two workers the second job starts with the first, not after it (jobs take > 3 s)
    assert starts[1] - starts[0] < 2
    assert min(j["duration_s"] for j in jobs) > 2


def test_a_failed_job_is_recorded_and_the_others_finish(failing_grid):
    result, sweep = failing_grid
    assert result.returncode == 1
    assert "1 job(s) of the sweep failed" in result.stderr
    assert "data.batch_size=1000 data.val_size=0.35" in result.stderr
    summary = json.loads((sweep / "sweep.json").read_text())
    statuses = {" ".join(j["overrides"][:2]): j["status"] for j in summary["jobs"].values()}
    assert statuses == {
        "data.batch_size=32 data.val_size=0.1": "finished",
        "data.batch_size=32 data.val_size=0.35": "finished",
        "data.batch_size=1000 data.val_size=0.1": "finished",
        "data.batch_size=1000 data.val_size=0.35": "failed",
    }
    failed = next(j for j in summary["jobs"].values() if j["status"] == "failed")
    assert "fewer than one batch" in failed["error"]
    assert summary["failed"] == 1


def test_dry_run_lists_jobs_and_runs_nothing(tmp_path):
    result = run_cli(
        "trainlab.train",
        "--dry-run",
        "optimizer.lr=1e-3,1e-2",
        "data.batch_size=32,64,128",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    jobs = [line for line in result.stdout.splitlines() if line.startswith("#")]
    assert len(jobs) == 6 and "6 job(s); nothing was run" in result.stdout
    assert "#5: optimizer.lr=0.01 data.batch_size=128" in result.stdout
    assert not (tmp_path / "logs").exists()

    result = run_cli("trainlab.train", "--dry-run", "hparams_search=optuna_lr_batch", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "20 trials maximising the best val/acc of each" in result.stdout
    assert "optimizer.lr: FloatDistribution" in result.stdout and "log=True" in result.stdout
    assert not (tmp_path / "logs").exists()


def test_the_sweep_flag_may_follow_overrides(tmp_path):
    # Hydra's own parser takes no flag after an override: the entry points put -m first
    args = ("optimizer.lr=1e-3", "-m", "data.batch_size=32,64", "--dry-run")
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "#1: optimizer.lr=0.001 data.batch_size=64" in result.stdout


def test_gpus_are_shared_out_among_parallel_jobs(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert gpu_slots(2, None) == ["0,1", "2,3"]
    assert gpu_slots(4, None) == ["0", "1", "2", "3"]
    assert gpu_slots(1, 2) == ["0,1"]
    assert gpu_slots(3, 2) == ["0,1", "2,3"]  # only two jobs of two GPUs fit
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots(2, None) == [None, None]


@pytest.mark.slow  # two studies; the fast suite stops and continues a grid sweep
def test_optuna_sweep_interrupted_then_resumed(tmp_path):
    import optuna
    from optuna.trial import TrialState

    command = [
        "-m",
        "hparams_search=optuna_lr_batch",
        *FAST,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.study_name=resume",
    ]
    study_dir = tmp_path / "logs" / "train" / "optuna" / "resume"

    # Start the study and kill the whole process tree while its third trial runs.
    first = start_cli("trainlab.train", *command, cwd=tmp_path, new_session=True)
    deadline = time.monotonic() + 120
    while not (study_dir / "2").is_dir():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done_before = {
        p.name: (p / "metrics.json").read_text()
        for p in job_dirs(study_dir)
        if (p / "metrics.json").is_file()
    }
    assert set(done_before) == {"0", "1"}

    # The partial sweep can be compared already: the cut-off trial shows as running.
    partial = compare([study_dir], "val/acc_best", tmp_path / "partial")
    assert {r.dir.name for r in partial["not_finished"]} == {"2"}

    # The same command again continues the study.
    result = run_cli("trainlab.train", *command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{study_dir / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert states.count(TrialState.COMPLETE) == 4 and states[2] == TrialState.FAIL
    # finished trials were not run again; the new ones got new numbers and directories
    for name, text in done_before.items():
        assert (study_dir / name / "metrics.json").read_text() == text
    assert (study_dir / "4" / "metrics.json").is_file()
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE:
            record = json.loads((study_dir / str(trial.number) / "metrics.json").read_text())
            assert record["val/acc_best"] == pytest.approx(trial.value)
            assert f"data.batch_size={trial.params['data.batch_size']}" in record["overrides"]
    assert len(params) == 5


def test_wandb_sweep_definition_and_the_agents_command(tmp_path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    result = run_cli("trainlab.wandb_sweep", "hparams_search=optuna_lr_batch", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = yaml.safe_load(result.stdout)
    # what W&B requires of a definition
    assert sweep["method"] in {"grid", "random", "bayes"}
    assert sweep["metric"] == {"name": "val/acc", "goal": "maximize"}  # its W&B summary: the max
    lr = sweep["parameters"]["optimizer.lr"]
    assert lr == {"distribution": "log_uniform_values", "min": 1e-4, "max": 0.1}
    assert sweep["parameters"]["data.batch_size"] == {"values": [32, 64, 128]}
    assert sweep["command"][-1] == "${args_no_hyphens}"

    # Build the command exactly as `wandb agent` does for one sampled point, then run it.
    sampled = {"optimizer.lr": {"value": 0.003}, "data.batch_size": {"value": 64}}
    variables = create_sweep_command_args({"args": sampled})
    variables.update(env=[], interpreter=[sys.executable])
    command = []
    for part in create_sweep_command(sweep["command"]):
        if part.startswith("${") and part.endswith("}"):
            command += variables[part[2:-1]]
        else:
            command.append(part)
    assert command[1:4] == ["-m", "trainlab.train", "debug=limit"]
    run = run_cli(command[2], *command[3:], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(next((tmp_path / "logs").rglob("metrics.json")).read_text())
    assert record["status"] == "finished"
    assert {"optimizer.lr=0.003", "data.batch_size=64"} <= set(record["overrides"])


def test_compare_a_finished_sweep(grid, tmp_path):
    result = compare([grid], "val/acc_best", tmp_path)
    rows = result["rows"]
    assert len(rows) == 4 and not result["not_finished"]
    values = [row["val/acc_best"][0] for row in rows]
    assert values == sorted(values, reverse=True)
    for row in rows:  # the table shows what each run's metrics.json says
        (run,) = row["runs"]
        record = json.loads((run.dir / "metrics.json").read_text())
        assert row["val/acc_best"] == (pytest.approx(record["val/acc_best"]), 0.0, 1)
        assert row["test/acc"][0] == pytest.approx(record["test/acc"])
        assert set(row["overrides"].split()) <= set(record["overrides"])
    for name in ("lr_sweep.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    for row in rows:
        assert row["overrides"] in page
    for key in ("optimizer.lr", "data.batch_size"):  # a sortable column per swept key
        assert f"<th>{key}</th>" in page
    for job in job_dirs(grid):
        assert f'<a href="{os.path.relpath(job, tmp_path)}/"' in page


def test_compare_a_partly_failed_sweep_from_the_command_line(failing_grid, tmp_path):
    _, sweep = failing_grid
    result = run_cli("trainlab.compare", str(sweep), "--out", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "failed" in result.stdout and "fewer than one batch" in result.stdout
    page = (tmp_path / "report.html").read_text()
    assert "Not finished" in page and "data.batch_size=1000 data.val_size=0.35" in page
    assert len((tmp_path / "lr_sweep.png").read_bytes()) > 10_000


@pytest.mark.slow
def test_compare_groups_runs_that_differ_only_by_seed(tmp_path):
    result = run_cli("trainlab.train", "-m", "seed=1,2", *FAST, "test=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = compare([sweep_dir(tmp_path)], "val/acc_best", tmp_path / "cmp")
    (row,) = out["rows"]
    values = [json.loads((r.dir / "metrics.json").read_text())["val/acc_best"] for r in row["runs"]]
    assert len(values) == 2
    mean, std, count = row["val/acc_best"]
    assert count == 2
    assert mean == pytest.approx(sum(values) / 2)
    assert std == pytest.approx(abs(values[0] - values[1]) / 2**0.5)


def test_a_glob_sweep_lists_each_matching_experiment(tmp_path):
    # Hydra expands glob() only once it runs; the command-line checks expand it themselves
    every = run_cli("trainlab.train", "-m", "experiment=glob(mnist_*)", "--dry-run", cwd=tmp_path)
    assert every.returncode == 0, every.stderr
    for n, name in enumerate(("mnist_cnn", "mnist_gan", "mnist_mlp", "mnist_vit")):
        assert f"#{n}: experiment={name}\n" in every.stdout
    assert "4 job(s); nothing was run" in every.stdout
    assert not (tmp_path / "logs").exists()


def test_sweep_syntaxes_are_checked_as_they_expand():
    from hydra_plugins.trainlab_sweeps.optuna_sweeper import search_space
    from trainlab.engine.config import check_command_line
    from trainlab.engine.errors import UserError

    argv = ["-m", "optimizer=glob(adam*)", "model=choice(mlp,cnn)", "optimizer.lr=range(1,3)"]
    assert check_command_line("train", argv) == argv
    space = search_space({"optimizer": "glob(adam*)", "optimizer.lr": "interval(1e-4, 1e-2)"})
    assert list(space["optimizer"].choices) == ["adam", "adamw"]
    optuna = ["-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log,interval(1e-4,1e-2))"]
    assert check_command_line("train", optuna) == optuna

    for args, words in (
        # the checks apply to every option a group sweep expands to: momentum is SGD's only
        (["optimizer=glob(*)", "optimizer.momentum=0.9"], "in the jobs with optimizer=adam:"),
        (["model=glob(zz*)"], "matches no config in conf/model/"),
        (["optimizer.lr=glob(*)"], "'optimizer.lr' is none"),
        (["optimizer.lr=interval(1e-4,1e-2)"], "add hydra/sweeper=optuna"),
    ):
        with pytest.raises(UserError, match=re.escape(words)):
            check_command_line("train", ["-m", *args])


@pytest.mark.slow  # several dry runs
def test_every_sweep_syntax_lists_its_jobs(tmp_path):
    def dry_run(*args):
        return run_cli("trainlab.train", "-m", *args, "--dry-run", cwd=tmp_path)

    adams = dry_run("optimizer=glob(adam*)", "optimizer.lr=range(1,3)")
    assert adams.returncode == 0, adams.stderr
    assert "#3: optimizer=adamw optimizer.lr=2\n" in adams.stdout and "4 job(s)" in adams.stdout
    chosen = dry_run("model=choice(mlp,cnn)", "optimizer=glob(*,exclude=adam*)")
    assert "#1: model=cnn optimizer=sgd\n" in chosen.stdout and "2 job(s)" in chosen.stdout
    search = ("hydra/sweeper=optuna", "hydra.sweeper.n_trials=2")
    drawn = dry_run(*search, "optimizer=glob(adam*)", "optimizer.lr=tag(log,interval(1e-4,1e-2))")
    assert drawn.returncode == 0, drawn.stderr
    assert "optimizer: CategoricalDistribution(choices=('adam', 'adamw'))" in drawn.stdout
    assert "optimizer.lr: FloatDistribution(high=0.01, log=True" in drawn.stdout
    refused = dry_run("optimizer=glob(*)", "optimizer.momentum=0.9")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # four short runs; the dry run above lists them
def test_a_glob_sweep_runs_every_matching_experiment(tmp_path):
    from test_data import N_VAL, write_mnist

    write_mnist(tmp_path / "data")  # the real IDX files, tiny
    offline = ("data.download=false", f"data.val_size={N_VAL}", "data.batch_size=8")
    result = run_cli(
        "trainlab.train",
        "-m",
        "experiment=glob(mnist_*)",
        *FAST,
        *offline,
        "trainer.max_epochs=1",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep_dir(tmp_path) / "sweep.json").read_text())
    ran = sorted(job["overrides"][0] for job in summary["jobs"].values())
    assert ran == [f"experiment=mnist_{n}" for n in ("cnn", "gan", "mlp", "vit")]
    assert all(job["status"] == "finished" for job in summary["jobs"].values())
