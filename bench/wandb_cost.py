"""`python bench/wandb_cost.py [--rounds 2]`: what the default logger, W&B (offline, as it runs
without credentials), costs against `logger=csv`.

Each round runs, one after the other in fresh directories: the default sweep
(`python -m trainlab.train -m optimizer.lr=1e-3,2e-3,3e-3,5e-3`) with `logger=csv` and with
W&B, then a single run of the default experiment with each. The order alternates from round to
round, so that a change of the machine's load does not always fall on the same side. Prints
each wall time and the W&B/CSV ratio; the target is 1.25 or less for both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["-m", "optimizer.lr=1e-3,2e-3,3e-3,5e-3"]


def env() -> dict[str, str]:
    """The user's environment, less W&B credentials and settings: W&B logs offline."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def wall(args: list[str], logger: str) -> float:
    """Seconds the command takes, in a fresh directory; checks that W&B wrote its runs."""
    command = [sys.executable, "-m", "trainlab.train", *args, f"logger={logger}"]
    with tempfile.TemporaryDirectory() as cwd:
        started = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
        runs = list(Path(cwd).glob("logs/**/wandb/offline-run-*/run-*.wandb"))
        expected = (4 if args else 1) if logger == "wandb" else 0
        if len(runs) != expected:
            raise RuntimeError(f"{expected} W&B runs expected, found {len(runs)} in {cwd}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    print("| round | what | csv s | wandb s | wandb/csv |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in range(1, rounds + 1):
        order = ("csv", "wandb") if r % 2 else ("wandb", "csv")
        for what, args in (("4-job sweep", SWEEP), ("single run", [])):
            seconds = {logger: wall(args, logger) for logger in order}
            ratio = seconds["wandb"] / seconds["csv"]
            row = f"| {r} | {what} | {seconds['csv']:.1f} | {seconds['wandb']:.1f} | {ratio:.2f} |"
            print(row, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
