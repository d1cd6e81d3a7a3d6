"""`python bench/compose_time.py [--rounds 20]`: what one composition of a run's config costs,
with every config file parsed anew (as Hydra reads them: the baseline) and with the files parsed
once per process (hydra_plugins/trainlab_sweeps/config_files.py), alternated in one process.

A run composes its config three times before it trains (the command line's check, Hydra's
choice of mode, Hydra's run); a sweep's launcher and sweeper once more for each job.
"""

from __future__ import annotations

import argparse
import statistics
import time

from hydra import compose, initialize_config_dir

from hydra_plugins.trainlab_sweeps import config_files
from trainlab.engine.config import CONF_DIR

COMMAND = ["experiment=digits_cnn", "optimizer.lr=0.01", "debug=limit"]


def once(parse_anew: bool) -> float:
    if parse_anew:
        config_files._parsed.clear()
    started = time.perf_counter()
    compose("train", COMMAND, return_hydra_config=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    anew, kept = [], []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="bench"):
        once(False)  # imports and first reads out of the way
        for _ in range(rounds):
            anew.append(once(True))
            kept.append(once(False))
    a, k = statistics.median(anew), statistics.median(kept)
    print("| files parsed anew (baseline) | parsed once | ratio | rounds |")
    print("| ---: | ---: | ---: | ---: |")
    print(f"| {a * 1000:.0f} ms | {k * 1000:.0f} ms | {k / a:.2f} | {rounds} |")


if __name__ == "__main__":
    main()
