"""Many processes: DDP over gloo on CPU inside sweeps, two "nodes" under torchrun on the
loopback address, a rank that fails, SLURM through submitit, and torch.compile."""

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env, run_cli

from trainlab.engine import checkpoint
from trainlab.engine.errors import UserError
from trainlab.train import _effective_batch_size_and_lr

DDP = ("trainer=ddp_cpu", "trainer.devices=2", "debug=limit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(cwd: Path, node_rank: int, port: int, *args: str) -> subprocess.Popen:
    env = child_env()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "trainlab.train",
        "trainer=ddp_cpu",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "debug=limit",
        "logger=csv",
        *args,
    ]
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


# Each DDP rank beyond the first is a fresh interpreter (about 15 s of imports): in test-all.
@pytest.mark.slow
def test_ddp_inside_a_sweep_runs_each_job_once(tmp_path):
    # one job (each job starts its own DDP processes afresh, so more would add only time)
    result = run_cli("trainlab.train", "-m", "optimizer.lr=1e-3", *DDP, "test=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "train" / "sweeps").iterdir()
    # exactly the one job: DDP's child process did not re-run the sweep
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml", "sweep.json"]
    for job in ("0",):
        record = json.loads((sweep / job / "metrics.json").read_text())
        assert record["status"] == "finished"
        assert record["world_size"] == 2 and record["ranks_agree"] is True
        assert record["effective_batch_size"] == 64  # global: 32 on each of the two ranks
        # one W&B run per job, from rank zero only
        assert len(list((sweep / job / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_two_nodes_under_torchrun_share_one_run_and_its_weights(tmp_path):
    port = free_port()
    nodes = [torchrun_node(tmp_path, rank, port) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert run_dir.name == f"torchrun-127.0.0.1-{port}"
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2
    assert record["ranks_agree"] is True  # both ranks checked their weights' checksums


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_soon(tmp_path):
    port = free_port()
    started = time.monotonic()
    ok = torchrun_node(tmp_path, 0, port, "trainer.strategy.timeout.seconds=30")
    # node 1 cannot start: its batch is larger than the data set
    bad = torchrun_node(
        tmp_path, 1, port, "trainer.strategy.timeout.seconds=30", "data.batch_size=4096"
    )
    ok.communicate(timeout=240)
    out_bad = bad.communicate(timeout=240)[0]
    assert bad.returncode != 0 and "fewer than one batch" in out_bad
    assert ok.returncode != 0  # the healthy rank did not wait forever
    assert time.monotonic() - started < 120


def test_batch_size_and_learning_rate_policy(compose):
    from hydra.utils import instantiate

    def effective(*overrides):
        cfg = compose("logger=csv", *overrides)
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        return _effective_batch_size_and_lr(cfg, trainer)

    assert effective("data.batch_size=64") == (64, 1e-3)
    # the batch size is global: two devices do not change what one step sees
    assert effective("data.batch_size=64", "trainer=ddp_cpu", "trainer.devices=2") == (64, 1e-3)
    assert effective("data.batch_size=128", "lr_scaling.rule=linear") == (128, 2e-3)
    assert effective("data.batch_size=256", "lr_scaling.rule=sqrt") == (256, pytest.approx(2e-3))
    assert effective(
        "data.batch_size=64", "+trainer.accumulate_grad_batches=4", "lr_scaling.rule=linear"
    ) == (256, 4e-3)
    # the option that makes data.batch_size each device's batch
    two = ("trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=32")
    assert effective(*two, "data.per_device=true", "lr_scaling.rule=linear") == (64, 1e-3)

    for per_device, expected in (("false", 16), ("true", 32)):
        cfg = compose("logger=csv", *two, f"data.per_device={per_device}")
        datamodule = instantiate(cfg.data)
        datamodule.trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert datamodule.batch_size_per_device == expected
    datamodule.per_device = False
    datamodule.batch_size = 33
    with pytest.raises(UserError, match="divide evenly across the 2 devices"):
        datamodule.batch_size_per_device  # noqa: B018


@pytest.mark.slow
def test_sweep_through_submitit_runs_the_jobs(tmp_path):
    result = run_cli(
        "trainlab.train",
        "-m",
        "optimizer.lr=1e-3,1e-2",
        "debug=limit",
        "logger=csv",
        "hydra/launcher=submitit_local",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "logs" / "train" / "sweeps").iterdir()
    for job in ("0", "1"):
        assert json.loads((sweep / job / "metrics.json").read_text())["status"] == "finished"


def test_slurm_submission_script_carries_the_configured_resources(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from trainlab.engine.config import CONF_DIR

    # submitit looks for srun to believe it is on a cluster; nothing is submitted here
    fake_srun = tmp_path / "bin" / "srun"
    fake_srun.parent.mkdir()
    fake_srun.write_text("#!/bin/sh\nexit 0\n")
    fake_srun.chmod(fake_srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake_srun.parent}:{os.environ['PATH']}")

    overrides = [
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.timeout_min=600",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    # the translation hydra-submitit's launcher makes before it submits
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=str(tmp_path / "submitit"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m trainlab.train", "0")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=8",
        "--ntasks-per-node=8",
        "--cpus-per-task=8",
        "--time=600",
        "--mem=64GB",
    ):
        assert f"#SBATCH {line}" in script, line


@pytest.mark.slow
def test_compiled_model_checkpoints_load_into_a_plain_model(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "trainlab.train",
        "compile=true",
        "debug=limit",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoint.read(run_dir / "checkpoints" / "last.ckpt")
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])
    model = checkpoint.build_model(ckpt)  # plain, uncompiled
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_ddp_run_is_reproducible_from_its_seed(tmp_path):
    records = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        result = run_cli(
            "trainlab.train", *DDP, "logger=csv", "seed=3", f"hydra.run.dir={run_dir}", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
        records.append(json.loads((run_dir / "metrics.json").read_text()))
    metrics = [{k: v for k, v in r.items() if "/" in k} for r in records]
    assert metrics[0] == metrics[1]
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
