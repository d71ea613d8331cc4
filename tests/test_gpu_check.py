"""bench.py --gpu-check: its one-line refusal without CUDA, and its logic on the CPU at tiny
sizes (the GPU measures the paper's)."""

import re
import subprocess
import sys
import os

import pytest

import gpu_check
from conftest import ROOT

TINY = {"emsize": 16, "nhid": 32, "nlayers": 2, "mem_len": 24, "bptt": 8, "batch_size": 4}
TINY_TRAIN = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--mem-len", "32",
              "--bptt", "32", "--batch_size", "64", "--log-interval", "5", "--threads", "1"]


def test_without_cuda_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--gpu-check"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "CUDA" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_the_check_measures_every_row_it_has_time_for_and_trains(monkeypatch):
    """Eager rows are measured; with a deadline too near for compiled ones, they are
    skipped, and the training run and its curve still come."""
    lines = gpu_check.check(device="cpu", sizes=TINY, budget="12s", deadline_s=40 + 42,
                            steps=2, train_extra=TINY_TRAIN)
    text = "\n".join(lines)
    rows = [line for line in lines if line.startswith("| attention")]
    assert len(rows) == 12  # 2 models x 3 precisions x eager and compiled
    measured = [r for r in rows if re.search(r"\| no \| [\d,]+ \| [\d.]+ \| [\d,]+ \| [\d.]+ \|$", r)]
    assert len(measured) == 6
    assert all("skipped: no time left" in r for r in rows if "| yes |" in r)
    assert "fp16 + loss scaler" in text and "float32" in text and "bf16" in text
    assert re.search(r"an enwik8 epoch \(5,493 batches\) would take [\d,]+ s", text)
    curve = [line for line in lines if re.fullmatch(r"\| [\d,]+ \| ([\d.]+)? \| ([\d.]+)? \|", line)]
    assert len(curve) >= 10
    assert sum(bool(re.search(r"\| [\d.]+ \|$", c)) for c in curve) >= 2  # validations
    assert sum(bool(re.match(r"\| [\d,]+ \| [\d.]+ \|", c)) for c in curve) >= 5  # train
