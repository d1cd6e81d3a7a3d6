"""Evaluate a checkpoint: `python -m trainlab.eval ckpt_path=<file> [split=val] [+data.KEY=...]`.

The model and data set are rebuilt from the config stored in the checkpoint; the results go to
<run dir>/metrics.json like a training run's.
"""

from __future__ import annotations

# ruff: noqa: E402
# The stop handler first of all, then the imports (see trainlab.engine.stopping).
from trainlab.engine import stopping

if __name__ == "__main__":
    stopping.install()

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from trainlab.engine import cli, warm
from trainlab.engine.config import CONF_DIR, check_targets, check_values
from trainlab.engine.errors import UserError, exit_on_user_error


def evaluate(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Test (or validate) the checkpoint at cfg.ckpt_path; write and return metrics.json."""
    check_values(cfg)
    if cfg.split not in ("test", "val"):
        raise UserError(f"split must be test or val, but it is {cfg.split!r}.")
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.model_helpers import is_overridden

    from trainlab.engine import checkpoint, compute, console, run_record
    from trainlab.engine.callbacks.confusion import ConfusionMatrix
    from trainlab.engine.callbacks.progress import progress_bar
    from trainlab.engine.loggers import RunCSVLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    console.quiet_lightning()
    compute.set_threads(cfg.threads)
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, verbose=False)

    ckpt = checkpoint.read(cfg.ckpt_path)
    model = checkpoint.build_model(ckpt)
    step = "test_step" if cfg.split == "test" else "validation_step"
    if not is_overridden(step, model):
        raise UserError(
            f"{cfg.ckpt_path} holds a {type(model).__name__}, which has no {step}: it has no "
            f"{cfg.split} metrics to compute. A GAN is judged by the image grids in its run "
            "directory's samples/ folder instead."
        )
    data_cfg = OmegaConf.merge(
        checkpoint.stored_config(ckpt).data, {"data_dir": cfg.paths.data_dir}, cfg.data
    )
    check_targets(data_cfg, "the checkpoint's data config")
    datamodule = instantiate(data_cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        logger=RunCSVLogger(save_dir=run_dir, name="", version=""),
        callbacks=[progress_bar(), ConfusionMatrix()],
        default_root_dir=str(run_dir),
    )
    run_split = trainer.test if cfg.split == "test" else trainer.validate
    results = run_split(model, datamodule=datamodule)[0]
    record = {
        "status": "finished",
        "ckpt_path": str(Path(cfg.ckpt_path).resolve()),
        "split": cfg.split,
        "overrides": list(overrides),
        **{k: float(v) for k, v in results.items()},
    }
    if trainer.is_global_zero:
        run_record.write_json(run_dir / run_record.METRICS_FILE, record)
    return record


@hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    warm.wait_for_turn()  # a sweep's next job, composed ahead of its turn, waits here
    hc = HydraConfig.get()
    with exit_on_user_error():
        record = evaluate(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
    print(f"metrics written to {Path(hc.runtime.output_dir) / 'metrics.json'}")
    return record


def main() -> None:
    """Check and complete the command line (trainlab.engine.cli), then run Hydra."""
    cli.run("eval", _hydra_main)


if __name__ == "__main__":
    main()
