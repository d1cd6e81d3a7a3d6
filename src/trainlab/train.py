"""Train a model: `python -m trainlab.train [group=option ...] [key=value ...]`, `-m` to sweep.

Only Hydra is imported at start-up; torch and Lightning load once the command line has been
checked, so `--help` and typos answer at once.
"""

from __future__ import annotations

# ruff: noqa: E402
# The stop handler first of all, then the imports (see trainlab.engine.stopping).
from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.trainlab_sweeps import process_launcher
from trainlab.engine import cli, jobs, warm
from trainlab.engine.commands import override, train_command
from trainlab.engine.config import CONF_DIR, check_values
from trainlab.engine.errors import Interrupted, exit_on_user_error


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

    from trainlab.engine import blocks, checkpoint, compute, console, run_record
    from trainlab.engine.callbacks import RunInfo, pruning
    from trainlab.engine.callbacks.guards import RanksAgree
    from trainlab.engine.callbacks.monitor import Best
    from trainlab.engine.datamodule import check_net_fits
    from trainlab.engine.loggers import build_loggers

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    console.quiet_lightning()
    threads = compute.set_threads(cfg.threads)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from, carried, changes = _resume_point(cfg, run_dir)

    again = [o for o in overrides if not o.startswith("resume=")]
    resume = pruning.study_command() or train_command(
        *again, "resume=auto", override("hydra.run.dir", run_dir)
    )
    run_info = RunInfo(config=config, resume_command=resume, changes=changes)
    monitored = Best(cfg.monitor.metric, cfg.monitor.mode)  # the run's best value: metrics.json
    callbacks = [*_callbacks(cfg, run_info), monitored]
    loggers = build_loggers(
        cfg,
        run_dir,
        group=wandb_group,
        name=wandb_name,
        wandb_id=carried.get("wandb_id"),
        resume_step=carried.get("step"),
    )
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=str(run_dir),
        plugins=[checkpoint.AtomicCheckpointIO()],
    )

    datamodule = instantiate(cfg.data)
    batch_size, lr = _effective_batch_size_and_lr(cfg, trainer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    optimizer = instantiate(cfg.optimizer, lr=lr)
    model, untaken = checkpoint.instantiate_model(
        cfg.model, optimizer=optimizer, scheduler=scheduler
    )
    not_applied = _not_applied(cfg, model, untaken)
    if "optimizer" in not_applied:  # its configure_optimizers sets the lr, not optimizer.lr
        lr = None
    check_net_fits(model, datamodule, choices or {})  # a shape mismatch: one line, not a traceback
    if hasattr(model, "steps_per_call"):  # a TrainlabModule: see trainlab.engine.blocks
        model.steps_per_call = cfg.get("steps_per_call", "auto")
    if cfg.get("compile") and "compile" not in not_applied:
        model.net.compile()  # in place: parameter names, and so checkpoints, stay as they are
    config["effective_batch_size"], config["effective_lr"] = batch_size, lr
    hparams = run_record.flat_hparams(config, choices)
    for logger in loggers:
        logger.log_hyperparams(hparams)

    record: dict[str, Any] = {
        # A run resumed after its last epoch logs nothing new: its values are the checkpoint's.
        **carried.get("metrics", {}),
        "status": "running",
        "overrides": list(overrides),
        "run_dir": str(run_dir),
        "seed": cfg.seed,
        "threads": threads,
        "resumed_from": str(resume_from) if resume_from else None,
        "resume_changes": changes or None,
        "world_size": trainer.world_size,
        "effective_batch_size": batch_size,
        "effective_lr": lr,
    }
    if not_applied:  # what the config asks of a module that does not take it
        record["not_applied"] = not_applied
    stopping.raise_if_pending()  # a stop lost on its way (see there) stops the run here
    started = time.perf_counter()
    try:
        with compute.torch_cuda_check(trainer):
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
        # testing replaces Lightning's record of these
        record.update(run_record.final_metrics(trainer))
        if trainer.interrupted:
            record["status"] = "interrupted"
        elif pruning.pruned(trainer):  # stopped early by the sweep's pruner: no test
            record["status"] = "pruned"
        elif cfg.get("test") and "test" not in not_applied:
            best = checkpoint.best_path(trainer)
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
        if record["status"] == "running":
            record["status"] = "finished"
    except Interrupted as e:
        record["status"] = "interrupted"
        record["error"] = str(e)
        raise
    except stopping.Stopped as stop:  # before StopOnSignal took over, or asked again
        record["status"] = "interrupted"
        last = run_dir / "checkpoints" / "last.ckpt"
        saved = f"the last checkpoint is {last}" if last.is_file() else "no checkpoint yet"
        record["error"] = (
            f"stopped by {stop.name} at once at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; {saved}"
        )
        if not last.is_file():
            raise  # nothing to continue: the entry point says so (engine.cli)
        stopping.reported(stop)  # the line is Interrupted's
        raise Interrupted(stop.signum, f"{record['error']}. Resume with: {resume}") from None
    except BaseException as e:
        record["status"] = "failed"
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record.update(run_record.final_metrics(trainer))
        record["epochs"] = trainer.current_epoch
        record["steps"] = trainer.global_step
        record["steps_per_call"] = getattr(model, "steps_per_call_choice", None) or {
            "steps_per_call": 1,
            "why": f"{type(model).__name__} is not a TrainlabModule: {blocks.ONE_BATCH}"
            if not hasattr(model, "steps_per_call")
            else "not chosen: the run ended before training: 1",
        }
        record["duration_s"] = round(time.perf_counter() - started, 3)
        agree = next((c for c in trainer.callbacks if isinstance(c, RanksAgree)), None)
        if agree is not None and agree.agree is not None:
            record["ranks_agree"] = agree.agree
        record["best_ckpt"] = checkpoint.best_path(trainer)
        record["monitor"] = monitored.record()
        if trainer.is_global_zero:
            _log_ranked_hparams(loggers, run_record.chosen_hparams(hparams, overrides), record)
            try:
                with stopping.held():  # whole, whatever signal comes meanwhile
                    run_record.write_json(run_dir / run_record.METRICS_FILE, record)
            except OSError as e:  # e.g. the disk is full: report it, keep the original error
                print(f"could not write {run_dir / run_record.METRICS_FILE}: {e}", file=sys.stderr)
        _finish_wandb()
    return record


def _not_applied(cfg: DictConfig, model, untaken: list[str]) -> dict[str, str]:
    """What the config asks that `model` cannot take (a plain LightningModule, say), by key,
    each with why: printed now, recorded in metrics.json, and skipped."""
    import torch
    from lightning.pytorch.utilities.model_helpers import is_overridden

    name = type(model).__name__
    skipped = {
        key: f"{name}'s constructor takes no {key}: its configure_optimizers decides"
        for key in untaken
        if key == "optimizer" or cfg.get(key)
    }
    if cfg.get("compile") and not isinstance(getattr(model, "net", None), torch.nn.Module):
        skipped["compile"] = f"{name} has no `net` to compile (compile=true compiles model.net)"
    if cfg.get("test") and not is_overridden("test_step", model):
        skipped["test"] = f"{name} has no test_step: the run is not tested"
    for key, why in skipped.items():
        print(f"note: {key} not applied: {why}.")
    return skipped


def _log_ranked_hparams(loggers: list, hparams: dict[str, Any], record: dict[str, Any]) -> None:
    """TensorBoard's HParams of the ended run (trainlab.engine.loggers.log_ranked_hparams); a
    failure to write them is reported, never put in place of the run's own outcome."""
    from trainlab.engine import run_record
    from trainlab.engine.loggers import log_ranked_hparams

    try:
        log_ranked_hparams(loggers, hparams, run_record.ranked_metrics(record), record["steps"])
    except Exception as e:
        print(f"could not write TensorBoard's HParams: {type(e).__name__}: {e}", file=sys.stderr)


def _callbacks(cfg: DictConfig, run_info) -> list:
    """The callbacks conf/callbacks/ composes, Lightning's and trainlab's own, each handed
    run_info where it has that attribute (see trainlab.engine.callbacks.RunInfo)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Checkpoint

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    for callback in callbacks:
        if hasattr(callback, "run_info"):
            callback.run_info = run_info
    if not cfg.trainer.get("enable_checkpointing", True):  # Lightning refuses them then
        callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]
    return callbacks


def _effective_batch_size_and_lr(cfg: DictConfig, trainer) -> tuple[int, float]:
    """The batch size one optimizer step sees, over all devices and accumulated batches, and
    optimizer.lr scaled to it by lr_scaling.rule (none, linear or sqrt)."""
    per_step = cfg.data.batch_size * trainer.accumulate_grad_batches
    if cfg.data.get("per_device"):
        per_step *= trainer.world_size
    ratio = per_step / cfg.lr_scaling.base_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[cfg.lr_scaling.rule]
    return per_step, cfg.optimizer.lr * factor


def _resume_point(cfg: DictConfig, run_dir: Path) -> tuple[Path | None, dict, dict]:
    """(checkpoint to continue from, what the run carries on from it (checkpoint.carried),
    config changes allowed), from ckpt_path or resume=auto; resume=restart sets the run's
    earlier files aside instead."""
    from trainlab.engine import checkpoint

    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        ckpt = checkpoint.read(path)
    elif cfg.get("resume") == "auto":
        found = checkpoint.latest_good(run_dir)  # a UserError if every checkpoint is damaged
        if found is None:
            print(f"resume=auto: {run_dir} has no checkpoint yet; starting from the beginning.")
            return None, {}, {}
        path, ckpt = found
    else:
        if cfg.get("resume") == "restart":
            kept = checkpoint.set_aside(run_dir)
            if kept:
                print(f"resume=restart: starting over; the earlier files are kept in {kept}")
        return None, {}, {}
    changes = checkpoint.check_config(ckpt, path, cfg)
    print(f"Resuming from {path} (saved in {_saved_in(ckpt)}, step {ckpt.get('global_step')}).")
    return path, checkpoint.carried(ckpt), changes


def _saved_in(ckpt: dict) -> str:
    from trainlab.engine.callbacks.progress import epoch_label

    return epoch_label(ckpt["epoch"]) if isinstance(ckpt.get("epoch"), int) else "epoch ?"


def _finish_wandb() -> None:
    # Each job of a sweep must be its own W&B run: close this one before the next job starts.
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from trainlab.engine.console import print_config

    warm.wait_for_turn()  # a sweep's next job, composed ahead of its turn, waits here
    hc = HydraConfig.get()
    # A job of a sweep runs as a single run in its own process; the launcher names its sweep.
    sweep = os.environ.get(jobs.SWEEP_ENV) or (
        Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    )
    done = _finished_already(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    if done is not None:  # e.g. a job of a SLURM sweep submitted again
        print(f"resume=auto: {hc.runtime.output_dir} finished already; nothing to do.")
        return (done.get("monitor") or {}).get("best")
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        print_config(cfg)  # once, not once per process of a distributed run
    try:
        with exit_on_user_error():
            record = train(
                cfg,
                run_dir=hc.runtime.output_dir,
                overrides=list(hc.overrides.task),
                choices=dict(hc.runtime.choices),
                wandb_group=sweep,
                wandb_name=_job_name(hc) if sweep else hc.job.override_dirname or None,
            )
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    return record["monitor"]["best"]


def main() -> None:
    """Check and complete the command line (trainlab.engine.cli), run Hydra, and exit non-zero if a
    sweep was stopped or any job of it did not finish.

    `--dry-run` lists the jobs a sweep would run (their overrides and their number) and stops.
    """
    cli.run("train", _hydra_main)


def _job_name(hc: Any) -> str | None:
    """A sweep's job named by what it changes: its overrides but those that every job of the
    sweep gets (the sweep's command line, in its sweep.json, sets them once for all)."""
    import json

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(hc.overrides.task)
    try:
        # a job runs on its own (as a single run) in <sweep dir>/<number>
        summary = Path(hc.runtime.output_dir).parent / process_launcher.SUMMARY_FILE
        command = [a for a in json.loads(summary.read_text())["command"] if not a.startswith("-")]
        parsed = OverridesParser.create().parse_overrides(command)
    except Exception:  # no sweep.json (another launcher), or a command Hydra reads otherwise
        return hc.job.override_dirname or None
    shared = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    parser = OverridesParser.create()
    own = [o for o in overrides if parser.parse_override(o).key_or_group not in shared]
    return ",".join(own) or hc.job.override_dirname or None


def _finished_already(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict | None:
    """With resume=auto, the record of a run in run_dir that finished with these overrides
    (resume= aside): continuing it has nothing left to do."""
    import json

    if cfg.get("resume") != "auto":
        return None
    try:
        record = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("status") != "finished":
        return None
    same = process_launcher.same_job(record.get("overrides") or [], overrides)
    return record if same else None


if __name__ == "__main__":
    main()
