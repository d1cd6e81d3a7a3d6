"""Shared fixtures. Tests are hermetic: no network, no W&B account, nothing outside tmp dirs."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports wandb or torch: no credentials, W&B's own files in a temp dir,
# one CPU thread (the machine has two, and pytest is one process among others).
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
os.environ["NETRC"] = os.devnull
_wandb_home = Path(os.environ.get("PYTEST_WANDB_HOME", "/tmp/trainlab-tests-wandb"))
for var, sub in (
    ("WANDB_CONFIG_DIR", "config"),
    ("WANDB_CACHE_DIR", "cache"),
    ("WANDB_DATA_DIR", "data"),
):
    os.environ[var] = str(_wandb_home / sub)
os.environ.setdefault("OMP_NUM_THREADS", "1")


_composed: dict[tuple, object] = {}  # (config, overrides) -> composed, paths left to each test


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides, config="train") -> DictConfig with data and logs inside tmp_path.

    Each config is composed once per test process (about 0.6 s a time here), and each test gets
    a copy with its own paths: they are set after composing, which is what composing them does,
    as the configs only refer to them (`${paths.data_dir}`), resolved when read."""
    import copy

    from hydra import initialize_config_dir

    from trainlab.engine.config import CONF_DIR, compose_with_parameters

    def _compose(*overrides: str, config: str = "train"):
        key = (config, overrides)
        if key not in _composed:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="test"):
                _composed[key] = compose_with_parameters(config, list(overrides))
        cfg = copy.deepcopy(_composed[key])
        for name, path in (("data_dir", tmp_path / "data"), ("log_dir", tmp_path / "logs")):
            if "paths" in cfg and not any(
                o.lstrip("+").startswith(f"paths.{name}=") for o in overrides
            ):
                cfg.paths[name] = str(path)
        return cfg

    return _compose


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, less the address of a W&B service that
    a run made earlier in this process left behind (a child must start its own), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, **extra}


# Runs of `python -m trainlab.<entry point>` fork from one warm server (engine.warm) that has
# imported torch, Lightning and the project once for the whole session: each is still a process
# of its own (own pid, session, environment, signals, exit code) and skips ~5 s of imports. A
# run with `cold=True` (what a fresh interpreter does is the point, or a variable read at
# import) starts a fresh interpreter; TRAINLAB_TESTS_COLD=1 starts every run so.
_server = None  # trainlab.engine.warm.Server once started; False where runs start cold
_outputs = Path(tempfile.mkdtemp(prefix="trainlab-tests-"))  # the warm runs' stdout and stderr
atexit.register(shutil.rmtree, _outputs, ignore_errors=True)


def _warm_server():
    global _server
    if _server is None:
        from trainlab.engine import warm

        wanted = warm.available() and os.environ.get("TRAINLAB_TESTS_COLD") != "1"
        _server = warm.Server() if wanted else False
    return _server if _server and _server.ready() else None


class WarmProcess:
    """What the tests use of a text-mode subprocess.Popen, for a run the warm server forked:
    its stdout and stderr go to files, read by communicate()."""

    def __init__(self, job, stdout: Path, stderr: Path) -> None:
        self._job, self._stdout, self._stderr = job, stdout, stderr
        self.pid = job.pid
        self.args = None

    @property
    def returncode(self) -> int | None:
        return self._job.returncode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._job.ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # ended and reaped: as Popen does
            self._job.send_signal(signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self._stdout.read_text(errors="replace"), self._stderr.read_text(errors="replace")


def start_cli(
    module: str,
    *args: str,
    cwd: Path,
    env: dict | None = None,
    cold: bool = False,
    new_session: bool = False,
) -> subprocess.Popen | WarmProcess:
    """Start `python -m <module> <args>` as a user would, stdout and stderr captured as text:
    forked by the warm server (in a session of its own), or with this interpreter anew (cold;
    `new_session` as a terminal starts a command); `env` is added to this one's environment."""
    server = None if cold else _warm_server()
    if server is not None:
        out = Path(tempfile.mkdtemp(dir=_outputs))
        stdout, stderr = out / "stdout", out / "stderr"
        environment = child_env(**(env or {}))
        job = server.start(module, list(args), environment, str(cwd), str(stdout), str(stderr))
        if job is not None:
            proc = WarmProcess(job, stdout, stderr)
            proc.args = [sys.executable, "-m", module, *args]
            return proc
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=child_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def stderr_of(proc) -> str:
    """The end of a run's stderr, for a failed assertion: the run is killed first if it still
    runs (a test gave up waiting for it), so that reading it cannot wait forever."""
    if proc.poll() is None:
        proc.kill()
    return proc.communicate(timeout=30)[1][-3000:]


def tiny_trainer(**overrides):
    """A real pl.Trainer on the CPU that writes and prints nothing of its own, for a test of a
    model or a callback: one epoch unless `overrides` say otherwise."""
    import lightning.pytorch as pl

    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    defaults = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, **quiet}
    return pl.Trainer(**{**defaults, "enable_model_summary": False, **overrides})


def run_cli(
    module: str,
    *args: str,
    cwd: Path,
    env: dict | None = None,
    timeout: float = 300,
    cold: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` to its end (see start_cli); killed after `timeout`."""
    proc = start_cli(module, *args, cwd=cwd, env=env, cold=cold)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
