"""Train a model: `python -m trainlab.train [group=option ...] [key=value ...]`, `-m` to sweep.

Only Hydra is imported at start-up; torch and Lightning load once the command line has been
checked, so `--help` and typos answer at once.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.trainlab_sweeps import process_launcher
from trainlab.config import CONF_DIR, check_command_line, check_values
from trainlab.errors import UserError, exit_with


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    choices: dict[str, str] | None = None,
    wandb_group: str | None = None,
    wandb_name: str | None = None,
) -> dict[str, Any]:
    """Fit the model, test its best checkpoint, and write run_dir/metrics.json, which it returns."""
    check_values(cfg)
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from trainlab import run
    from trainlab.callbacks import progress_bar
    from trainlab.checkpoint import StoreConfig
    from trainlab.loggers import build_loggers

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.quiet_lightning()
    threads = run.set_threads(cfg.threads)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    config = OmegaConf.to_container(cfg, resolve=True)

    datamodule = instantiate(cfg.data)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    model = instantiate(cfg.model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks += [StoreConfig(config), progress_bar()]
    loggers = build_loggers(cfg, run_dir, group=wandb_group, name=wandb_name)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir)
    )
    for logger in loggers:
        logger.log_hyperparams(run.flat_hparams(config, choices))

    record: dict[str, Any] = {
        "status": "running",
        "overrides": list(overrides),
        "run_dir": str(run_dir),
        "seed": cfg.seed,
        "threads": threads,
    }
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule)
        record.update(run.final_metrics(trainer))  # testing replaces Lightning's record of these
        if trainer.interrupted:
            record["status"] = "interrupted"
        elif cfg.get("test"):
            best = (
                trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            )
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        if record["status"] == "running":
            record["status"] = "finished"
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record.update(run.final_metrics(trainer))
        record["epochs"] = trainer.current_epoch
        record["steps"] = trainer.global_step
        record["duration_s"] = round(time.perf_counter() - started, 3)
        callback = trainer.checkpoint_callback
        record["best_ckpt"] = (callback.best_model_path or None) if callback else None
        if trainer.is_global_zero:
            run.write_json(run_dir / run.METRICS_FILE, record)
        _finish_wandb()
    return record


def _finish_wandb() -> None:
    # Each job of a sweep must be its own W&B run: close this one before the next job starts.
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainlab.run import print_config

    hc = HydraConfig.get()
    # A job of a sweep runs as a single run in its own process; the launcher names its sweep.
    sweep = os.environ.get(process_launcher.SWEEP_ENV) or (
        Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    )
    print_config(cfg)
    try:
        record = train(
            cfg,
            run_dir=hc.runtime.output_dir,
            overrides=list(hc.overrides.task),
            choices=dict(hc.runtime.choices),
            wandb_group=sweep,
            wandb_name=hc.job.override_dirname or None,
        )
    except UserError as e:
        exit_with(e)
    return record.get("val/acc_best")


def main() -> None:
    """Check the command line, run Hydra, and exit non-zero if any job of a sweep failed.

    `--dry-run` lists the jobs a sweep would run (their overrides and their number) and stops.
    """
    dry_run = "--dry-run" in sys.argv
    if dry_run:
        sys.argv = [arg for arg in sys.argv if arg != "--dry-run"]
    try:
        check_command_line("train", sys.argv[1:])
    except UserError as e:
        exit_with(e)
    if dry_run:
        _dry_run_arguments()
    _hydra_main()
    # Read through the module: Hydra's plugin scan re-executes it, rebinding its globals.
    failed = process_launcher.FAILED_JOBS
    if failed:
        summary = Path(failed[0]["dir"]).parent / process_launcher.SUMMARY_FILE
        jobs = "; ".join(
            f"#{job['num']} ({' '.join(job['overrides'])}): {job['error'].rstrip('.')}"
            for job in failed
        )
        print(
            f"error: {len(failed)} job(s) of the sweep failed: {jobs}. Details in {summary}.",
            file=sys.stderr,
        )
        raise SystemExit(1)


def _dry_run_arguments() -> None:
    """Turn the command into a multirun whose launcher only prints its jobs, in a scratch dir."""
    import tempfile

    if not {"-m", "--multirun"} & set(sys.argv):
        sys.argv.insert(1, "-m")
    scratch = tempfile.mkdtemp(prefix="trainlab-dry-run-")
    sys.argv += ["hydra.launcher.dry_run=true", f"hydra.sweep.dir={scratch}"]


if __name__ == "__main__":
    main()
