"""What pruning saves: one fixed Optuna study of the default experiment (the digits MLP), run
once per pruner, counting the epochs its trials trained and the best val/acc_best it found.

    python bench/pruning.py                        # none, median, hyperband: 20 trials each
    python bench/pruning.py --pruners none median --trials 20 --out /tmp/pruning

Each study is `hparams_search=optuna_lr_batch` (TPE over the learning rate and the batch size,
sampler seed 0), one trial at a time so that the sampler's choices repeat, `logger=csv
test=false`; any further arguments are passed to every study (e.g. trainer.max_epochs=10).
Prints a Markdown table for bench/RESULTS.md. Run again with the same --out, finished studies
are read, not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from trainlab.engine.commands import override

ROOT = Path(__file__).resolve().parents[1]


def run_study(pruner: str, trials: int, out: Path, extra: list[str]) -> dict:
    sweep = out / pruner
    command = [
        sys.executable,
        "-m",
        "trainlab.train",
        "-m",
        "hparams_search=optuna_lr_batch",
        "logger=csv",
        "test=false",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.seed=0",
        f"hydra.sweeper.pruner={pruner}",
        f"hydra.sweeper.study_name=bench_{pruner}",
        override("hydra.sweep.dir", sweep),
        *extra,
    ]
    # Run again on the same --out, a finished study is kept as it is (the sweep continues it).
    subprocess.run(command, cwd=out, stdout=subprocess.DEVNULL)  # a failed trial is counted
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"].values()
    records = [json.loads(p.read_text()) for p in sweep.glob("[0-9]*/metrics.json")]
    finished = [r for r in records if r["status"] == "finished"]
    return {
        "pruner": pruner,
        "trials": len(jobs),
        "pruned": sum(r["status"] == "pruned" for r in records),
        "failed": sum(j["status"] == "failed" for j in jobs),
        "epochs": sum(r["epochs"] for r in records),
        "best": max(r["val/acc_best"] for r in finished),
        "trial_s": sum(j.get("duration_s", 0) for j in jobs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruners", nargs="+", default=["none", "median", "hyperband"])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary dir")
    args, extra = parser.parse_known_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="trainlab-pruning-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for pruner in args.pruners:
        rows.append(run_study(pruner, args.trials, out.resolve(), extra))
        row = rows[-1]
        print(f"{pruner}: {row['epochs']} epochs, best {row['best']:.4f}", file=sys.stderr)
    base = rows[0]
    print(
        "| pruner | trials | pruned | failed | epochs trained | share | best val/acc_best | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['pruner']} | {row['trials']} | {row['pruned']} | {row['failed']} | "
            f"{row['epochs']} | {row['epochs'] / base['epochs']:.0%} | {row['best']:.4f} "
            f"({100 * (row['best'] - base['best']):+.2f} points) | {row['trial_s']:.0f} s |"
        )
    print("(time: the trials' own durations added up, start-up included)")
    print(f"(studies in {out})")


if __name__ == "__main__":
    main()
