"""Shared fixtures. Tests are hermetic: no network, no W&B account, nothing outside tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
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


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides, config="train") -> DictConfig with data and logs inside tmp_path."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trainlab.config import CONF_DIR

    def _compose(*overrides: str, config: str = "train"):
        base = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'logs'}"]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="test"):
            return hydra_compose(config, overrides=base + list(overrides))

    return _compose


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this one's, less the address of a W&B service that
    a run made earlier in this process left behind (a child must start its own), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, **extra}


def run_cli(
    module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` as a user would, with this interpreter (and `env` added)."""
    env = child_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
