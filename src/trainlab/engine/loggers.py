"""Experiment loggers, from the `logger` config group, plus the local CSV record every run keeps.

W&B never prompts and never hangs: without credentials, or with credentials but no route to
the server, it logs offline into the run directory and says how to upload later.
"""

from __future__ import annotations

import csv
import io
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

REACH_TIMEOUT_S = 3.0


def build_loggers(
    cfg: DictConfig,
    run_dir: Path,
    group: str | None = None,
    name: str | None = None,
    wandb_id: str | None = None,
    resume_step: int | None = None,
) -> list:
    """Instantiate `cfg.logger` into run_dir, always including a CSVLogger (run_dir/metrics.csv).

    `group` and `name` label the run in W&B: a sweep's jobs share the group. `wandb_id`
    continues an earlier W&B run (a resumed run); `resume_step` is the step a resumed run
    logs from (metrics.csv drops the rows it would log twice).
    """
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    loggers = [RunCSVLogger(save_dir=run_dir, name="", version="", resume_step=resume_step)]
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None or "_target_" not in logger_cfg:
            continue
        if logger_cfg._target_.endswith("WandbLogger"):
            offline, why = wandb_offline_reason()
            _skip_unstaged_launch_inputs()
            logger = instantiate(
                logger_cfg,
                save_dir=str(run_dir),
                # wandb.init's own `mode`, not Lightning's `offline`, which would set WANDB_MODE
                # for the rest of the process and every process it starts.
                mode="offline" if offline else None,
                group=group,
                name=name,
                tags=list(cfg.get("tags") or []),
                id=wandb_id,
                settings=_wandb_settings(),
            )
            assert isinstance(logger, WandbLogger)
            # Lightning passes anonymous=None, which current wandb warns about on every run.
            logger._wandb_init.pop("anonymous", None)
            if rank_zero_only.rank == 0:  # the W&B run exists on rank zero only
                if offline and why:
                    _announce_offline(logger, why)
                # W&B's run table (and a W&B sweep) shows the best epoch's value, not the last.
                if cfg.monitor.metric:
                    logger.experiment.define_metric(cfg.monitor.metric, summary=cfg.monitor.mode)
        elif logger_cfg._target_.endswith("TensorBoardLogger") and group and name:
            # A sweep's job: <sweep dir>/tensorboard/<number> <overrides>, so that TensorBoard
            # names each run by what it changed (run_dir is <sweep dir>/<number>).
            version = f"{run_dir.name} {name}".replace("/", "_")
            logger = instantiate(logger_cfg, save_dir=str(run_dir.parent), version=version)
        else:
            logger = instantiate(logger_cfg, save_dir=str(run_dir))
        loggers.append(logger)
    return loggers


def log_ranked_hparams(
    loggers: list, hparams: dict[str, Any], metrics: dict[str, float], step: int
) -> None:
    """TensorBoard's HParams of a run that ended: the values `hparams` a user chose, against
    `metrics` (the monitored best, the final validation and test values), which the HParams tab
    ranks runs by. Each metric is also a scalar at the last step, where the tab reads it."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    plain = (int, float, str, bool)  # what TensorBoard shows: lists and None as their text
    shown = {k: v if isinstance(v, plain) else str(v) for k, v in hparams.items()}
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        with SummaryWriter(logger.log_dir) as writer:  # Lightning closed its own at the end
            for summary in hparams_summary(shown, metrics):
                writer.file_writer.add_summary(summary)
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger, writing <run dir>/metrics.csv so that no kill loses its history.

    Lightning's writer deletes an existing metrics.csv when it starts, and rewrites the whole
    file in place each time a new column appears (the end of the first epoch adds several): a
    run killed during that rewrite kept a header and part of its rows. Here a resumed run
    appends to the file, and a rewrite goes to a temporary file that replaces it in one step.
    A run resumed from a checkpoint at `resume_step` logs that step and the ones after it again:
    the rows from there on, written before the run stopped, are dropped first, so that each
    step or epoch has its rows once.
    """

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _HistoryWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self.resume_step = resume_step  # read by _check_log_dir_exists, which __init__ calls
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)  # a rewrite cut short
        if not path.is_file():
            return
        text = path.read_text()
        whole = text[: text.rfind("\n") + 1]  # a row cut short by a kill: dropped
        reader = csv.DictReader(io.StringIO(whole))
        rows = list(reader)
        self.metrics_keys = list(reader.fieldnames or [])
        if self.resume_step is not None:
            rows = [r for r in rows if not r.get("step") or float(r["step"]) < self.resume_step]
        if whole != text or len(rows) < reader.line_num - 1:
            self._write(rows)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with Path(self.metrics_file_path).open(newline="") as f:
            rows = list(csv.DictReader(f))
        self._write(rows, fieldnames)

    def _write(self, rows: list[dict[str, str]], fieldnames: list[str] | None = None) -> None:
        """The file anew, through a temporary file that replaces it in one step."""
        path = Path(self.metrics_file_path)
        partial = path.with_name(path.name + ".partial")
        fieldnames = fieldnames or self.metrics_keys
        with partial.open("w", newline="") as f:
            if fieldnames:  # (no header yet: an empty file, as a new run's first save expects)
                writer = csv.DictWriter(f, fieldnames=fieldnames)
                writer.writeheader()
                writer.writerows(rows)
        os.replace(partial, path)


def wandb_offline_reason() -> tuple[bool, str]:
    """(offline, why). WANDB_MODE, when set, decides; else credentials and a reachable server."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun"):
        return True, ""
    if mode in ("online", "disabled"):
        return False, ""
    if not _has_wandb_credentials():
        return True, "no W&B credentials found (WANDB_API_KEY, `wandb login`)"
    host = urlparse(_wandb_base_url())
    if not _reachable(host.hostname or "", host.port or 443):
        return True, f"{host.hostname} is not reachable"
    return False, ""


def _wandb_base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        path = os.environ.get("NETRC") or None
        return netrc.netrc(path).authenticators(urlparse(_wandb_base_url()).hostname) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int) -> bool:
    """A TCP connection within REACH_TIMEOUT_S. Run in a thread: name lookups ignore timeouts."""
    result = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=REACH_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT_S)
    return bool(result)


def _wandb_settings() -> Any:
    import wandb

    # A bound on start-up even when the server is reachable but slow; no console capture,
    # so that the terminal shows exactly what the run prints.
    return wandb.Settings(init_timeout=60, console="off", silent=True)


def _skip_unstaged_launch_inputs() -> None:
    """wandb.init ends by applying the inputs a W&B Launch job staged, and imports W&B Launch
    to look for them: about 2 s, more than the rest of init. Inputs are staged only through
    that module, so while it is not imported there are none, and the import is skipped."""
    from wandb.sdk.wandb_run import Run

    apply = getattr(Run, "_detect_and_apply_job_inputs", None)
    if apply is None or getattr(apply, "skips_unstaged", False):
        return

    def apply_if_staged(run: Any) -> None:
        if "wandb.sdk.launch.inputs.internal" in sys.modules:
            apply(run)

    apply_if_staged.skips_unstaged = True  # type: ignore[attr-defined]
    Run._detect_and_apply_job_inputs = apply_if_staged


def _announce_offline(logger: Any, why: str) -> None:
    run_dir = Path(logger.experiment.dir).parent  # .../wandb/offline-run-<time>-<id>
    print(f"W&B: {why}; logging offline. Upload later with: wandb sync {run_dir}")


def log_image(loggers: list[Any], tag: str, image: Any, step: int) -> None:
    """An H x W x 3 uint8 array to every logger that shows images: TensorBoard and W&B (the CSV
    logger keeps none; callers also write the image into the run directory)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(tag, [image], step=step)
