"""The benchmark's contract, on MNIST files written here in their real format: it runs the
template, the raw loop and the floor for every case, and its last line is the smallest
template/raw ratio of its table. No speed is asserted: speed is what it prints."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env
from test_data import write_mnist

ROOT = Path(__file__).resolve().parents[1]
CASES = [f"{m} {d} bs{b}" for d in ("mnist", "cifar10") for m in ("mlp", "cnn") for b in (64, 256)]


@pytest.mark.slow
def test_quick_benchmark_ends_with_the_smallest_ratio_of_its_table(tmp_path):
    write_mnist(tmp_path, n_train=6000, n_test=1000)  # 5,000 go to validation, as in MNIST
    command = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick"]
    command += ["--seconds", "0.05", "--rounds", "1", "--data-dir", str(tmp_path)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=child_env(), timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert "MNIST-sized data: MNIST;" in done.stdout  # the files under --data-dir, not generated
    rows = [[c.strip() for c in x.split("|")[1:-1]] for x in lines if re.match(r"\| \w+ \w+ bs", x)]
    assert [row[0] for row in rows] == CASES
    ratios = []
    for name, floor, raw, one, template, n, one_ratio, ratio, _ in rows:
        floor, raw, template = (float(v.replace(",", "")) for v in (floor, raw, template))
        assert min(floor, raw, template) > 0, name
        assert float(ratio) == pytest.approx(template / raw, abs=0.01), name
        one = float(one.replace(",", ""))  # steps_per_call=1, beside auto's choice n
        assert float(one_ratio) == pytest.approx(one / raw, abs=0.01) and int(n) >= 1, name
        ratios.append(float(ratio))
    assert lines[-1] == f"min template/raw ratio: {min(ratios):.2f}"
