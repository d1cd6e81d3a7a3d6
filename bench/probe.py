"""`python bench/probe.py <overrides>` runs `python -m trainlab.train <overrides>` unchanged and
prints the wall-clock time of the first optimizer step: for the start-up part of
bench/throughput.py, which notes when it started this process.

It imports torch before the run does (the run imports it anyway) to hook every optimizer's step.
"""

import runpy
import sys
import time

from torch.optim.optimizer import register_optimizer_step_pre_hook

_printed = False


def _first_step(optimizer, args, kwargs) -> None:
    global _printed
    if not _printed:
        _printed = True
        print(f"first training step at {time.time():.6f}", flush=True)


register_optimizer_step_pre_hook(_first_step)
sys.argv = ["trainlab.train", *sys.argv[1:]]
runpy.run_module("trainlab.train", run_name="__main__", alter_sys=True)
