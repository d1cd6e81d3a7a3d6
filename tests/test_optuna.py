"""Optuna sweeps: trials that start as soon as a slot frees, pruning, and one study shared by
several sweep commands through a journal file."""

import json
import subprocess
import sys
import time

import pytest
from conftest import child_env, run_cli

from hydra_plugins.trainlab_sweeps.optuna_sweeper import STORAGE_FILE, storage_url
from trainlab.engine.compare import compare

SEARCH = ("hparams_search=optuna_lr_batch", "logger=csv", "test=false")


def load_study(name: str, storage: str):
    import optuna

    from hydra_plugins.trainlab_sweeps.optuna_sweeper import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def test_storage_is_a_url_or_a_journal_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep dir"
    assert storage_url(None, sweep) == f"sqlite:///{sweep / STORAGE_FILE}"
    assert storage_url("postgresql://me@db/studies", sweep) == "postgresql://me@db/studies"
    # A path (no "://") is a journal file, made absolute for trials and other machines.
    assert storage_url("shared/study.log", sweep) == str(tmp_path / "shared" / "study.log")


def test_a_pruned_trial_stops_early_and_is_recorded_as_pruned(tmp_path):
    # val/acc is never above 1.01: the threshold pruner stops the trial after epoch 0.
    result = run_cli(
        "trainlab.train",
        "-m",
        *SEARCH,
        "debug=limit",
        "trainer.max_epochs=3",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=pruned",
        "hydra.sweeper.pruner=threshold",
        "+hydra.sweeper.pruner_args.lower=1.01",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "optuna" / "pruned"
    job = sweep / "0"
    record = json.loads((job / "metrics.json").read_text())
    assert record["status"] == "pruned" and "error" not in record
    assert record["epochs"] == 1 < 3  # stopped after its first epoch of three
    validated = {row.split(",")[0] for row in (job / "metrics.csv").read_text().splitlines()[1:]}
    assert validated <= {"", "0"}  # curves kept, for epoch 0 alone
    assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "checkpoints").glob("*.ckpt")
    assert "Trial 0 pruned after epoch 1" in (job / "console.log").read_text()

    summary = json.loads((sweep / "sweep.json").read_text())
    assert summary["jobs"]["0"]["status"] == "pruned" and summary["failed"] == 0
    (trial,) = load_study("pruned", f"sqlite:///{sweep / STORAGE_FILE}").trials
    assert trial.state.name == "PRUNED"
    assert trial.intermediate_values == {0: pytest.approx(record["monitor"]["best"])}

    out = compare([sweep], "val/acc_best", tmp_path / "cmp")
    assert [r.dir for r in out["pruned"]] == [job] and not out["not_finished"]
    assert "<h2>Pruned" in (tmp_path / "cmp" / "report.html").read_text()


@pytest.mark.slow  # a whole sweep; the direction alone: the dry run below
def test_the_study_follows_the_monitor(tmp_path):
    # monitor.mode=min: the study minimises; a trial's value is its lowest val/loss, and what it
    # reports each epoch is its lowest so far.
    result = run_cli(
        "trainlab.train",
        "-m",
        *SEARCH,
        "debug=limit",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.study_name=loss",
        "monitor.metric=val/loss",
        "monitor.mode=min",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "optuna" / "loss"
    study = load_study("loss", f"sqlite:///{sweep / STORAGE_FILE}")
    assert study.direction.name == "MINIMIZE"
    (trial,) = study.trials
    rows = (sweep / "0" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("val/loss")
    losses = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(losses) == 2 and trial.value == pytest.approx(min(losses))
    assert trial.intermediate_values == pytest.approx({0: losses[0], 1: min(losses)})
    record = json.loads((sweep / "0" / "metrics.json").read_text())
    assert record["monitor"]["metric"] == "val/loss" and record["monitor"]["best"] == trial.value


@pytest.mark.slow
def test_the_direction_follows_monitor_mode_unless_set(tmp_path):
    def dry_run(*args):
        return run_cli("trainlab.train", "-m", *SEARCH, *args, "--dry-run", cwd=tmp_path)

    loss = ("monitor.metric=val/loss", "monitor.mode=min")
    assert "20 trials minimising the best val/loss of each" in dry_run(*loss).stdout
    maximise = dry_run(*loss, "hydra.sweeper.direction=maximize")
    assert "20 trials maximising the best val/loss of each" in maximise.stdout
    # The objective is the monitor, in one place: the sweeper's old key says where it went.
    old = dry_run("+hydra.sweeper.metric=val/loss")
    assert old.returncode == 2 and "set monitor.metric (and monitor.mode" in old.stderr
    nothing = dry_run("experiment=mnist_gan")  # no validation, nothing monitored
    assert nothing.returncode == 2 and "monitor.metric is null" in nothing.stderr
    assert not (tmp_path / "logs").exists()


def test_a_wrong_pruner_storage_or_direction_is_one_paragraph(tmp_path):
    result = run_cli("trainlab.train", "-m", *SEARCH, "hydra.sweeper.pruner=medain", cwd=tmp_path)
    assert result.returncode == 2
    assert "hydra.sweeper.pruner=medain is not a pruner: choose one of none, median" in (
        result.stderr
    )
    result = run_cli(
        "trainlab.train",
        "-m",
        *SEARCH,
        "hydra.sweeper.storage=postgresql://me@localhost:1/studies",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not be opened" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))
    args = ("-m", *SEARCH, "hydra.sweeper.direction=maximise")
    result = run_cli("trainlab.train", *args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hydra.sweeper.direction=maximise is neither maximize nor minimize" in result.stderr
    # the study's directory, created for the command, does not stay behind empty
    assert not [p for p in (tmp_path / "logs").rglob("*") if p.is_dir() and not any(p.iterdir())]


@pytest.mark.slow
def test_a_free_slot_takes_the_next_trial_before_the_slow_one_ends(tmp_path):
    # With seed 1 the sampler asks for 60 epochs, then 1 and 1: the short trial's slot
    # takes trial 2 while trial 0 still trains (in lock-step batches it would wait for it).
    result = run_cli(
        "trainlab.train",
        "-m",
        *SEARCH,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=overlap",
        "hydra.sweeper.seed=1",
        "+hydra.sweeper.params.trainer.max_epochs='choice(60, 1)'",
        "hydra.launcher.n_jobs=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "logs" / "train" / "optuna" / "overlap"
    slow, fast, third = load_study("overlap", f"sqlite:///{sweep / STORAGE_FILE}").trials
    assert (slow.params["trainer.max_epochs"], fast.params["trainer.max_epochs"]) == (60, 1)
    assert fast.datetime_complete < slow.datetime_complete
    assert (slow.datetime_complete - third.datetime_start).total_seconds() > 2
    for trial in (slow, fast, third):
        assert trial.state.name == "COMPLETE"
        record = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert record["epochs"] == trial.params["trainer.max_epochs"]


@pytest.mark.slow
def test_two_sweeps_share_one_study_in_a_journal_file(tmp_path):
    journal = tmp_path / "shared fs" / "study.log"
    command = [
        sys.executable,
        "-m",
        "trainlab.train",
        "-m",
        *SEARCH,
        "debug=limit",
        "trainer.max_epochs=1",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.study_name=shared",
        f"hydra.sweeper.storage={journal}",
    ]
    sweeps = [  # as on two machines: each its own sweep dir, the journal on a shared disk
        subprocess.Popen(
            [*command, f"hydra.sweep.dir={tmp_path / name}"],
            cwd=tmp_path,
            env=child_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for sweep in sweeps:
        assert sweep.wait(timeout=600) == 0, sweep.stderr.read()[-3000:]

    trials = load_study("shared", str(journal)).trials
    ran = [t for t in trials if "skipped" not in t.user_attrs]
    assert len(ran) == 6 and all(t.state.name == "COMPLETE" for t in ran)
    assert len({t.number for t in ran}) == 6
    assert len({t.user_attrs["owner"] for t in ran}) == 2  # both sweeps ran trials
    # a trial asked for by both at the last moment is told apart, never run
    assert all(t.state.name == "FAIL" for t in trials if t not in ran)
    dirs = sorted((p.name for p in tmp_path.glob("[ab]/[0-9]*")), key=int)
    assert dirs == [str(t.number) for t in ran]  # each trial ran once, in one of the two
    for trial in ran:
        (job,) = tmp_path.glob(f"[ab]/{trial.number}")
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "finished"
        assert record["monitor"]["best"] == pytest.approx(trial.value)
        assert f"data.batch_size={trial.params['data.batch_size']}" in record["overrides"]


@pytest.mark.slow
def test_a_grid_sweep_keeps_every_slot_busy(tmp_path):
    # The same for a grid (one launch of every job, a pool of n_jobs threads): job 2 takes the
    # slot of the short job 1 while the long job 0 still trains.
    result = run_cli(
        "trainlab.train",
        "-m",
        "trainer.max_epochs=60,1,1",
        "logger=csv",
        "test=false",
        "hydra.launcher.n_jobs=2",
        "hydra.sweep.dir=grid",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = json.loads((tmp_path / "grid" / "sweep.json").read_text())["jobs"]

    def started(num: str) -> float:
        return time.mktime(time.strptime(jobs[num]["started"], "%Y-%m-%d %H:%M:%S"))

    assert started("2") + 2 < started("0") + jobs["0"]["duration_s"]  # to the second


def test_a_sweep_on_the_command_line_joins_the_search_space(tmp_path):
    # as with Hydra's own Optuna sweeper; optimizer.eps, a parameter of torch.optim.Adam that
    # no config file writes, reaches each trial as `++optimizer.eps=...`
    eps = "optimizer.eps=tag(log, interval(1e-8, 1e-6))"
    args = ("-m", *SEARCH, eps, "model=mlp,cnn")
    result = run_cli("trainlab.train", *args, "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "optimizer.eps: FloatDistribution(high=1e-06, log=True, low=1e-08" in result.stdout
    assert "model: CategoricalDistribution(choices=('mlp', 'cnn'))" in result.stdout
    assert "Each trial also gets: hparams_search=optuna_lr_batch logger=csv" in result.stdout

    one = ("hydra.sweeper.n_trials=1", "debug=limit")
    result = run_cli("trainlab.train", "-m", *SEARCH, eps, *one, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = tmp_path.glob("logs/train/optuna/*/sweep.json")
    (job,) = json.loads(record.read_text())["jobs"].values()
    assert job["status"] == "finished"
    (eps_set,) = [o for o in job["overrides"] if "optimizer.eps" in o]
    assert eps_set.startswith("++optimizer.eps=") and 1e-8 <= float(eps_set.split("=")[1]) <= 1e-6


@pytest.mark.slow  # two studies of fresh processes: about 25 s
def test_a_continued_study_draws_new_points(tmp_path):
    # the sampler's seed is fixed for a repeatable study; continued, it must not ask for its
    # first points again (the same trials trained twice)
    args = ("-m", *SEARCH, "debug=limit")
    for n_trials in (2, 4):
        result = run_cli(
            "trainlab.train", *args, f"hydra.sweeper.n_trials={n_trials}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
    (db,) = tmp_path.glob("logs/train/optuna/*/optuna.db")
    study = load_study("lr_batch", f"sqlite:///{db}")
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(points) == 4 and len(set(points)) == 4, points
