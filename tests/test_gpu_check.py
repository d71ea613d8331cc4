"""bench.py --gpu-check (gpu_check.py): its one-line refusal without CUDA, with a next step;
its logic on the CPU with the GPU parts faked (bench.py and main.py replaced by scripts
that print what they would, fail, or hang): rows streamed as measured, a failing
measurement and training run, the deadline; and once for real on the CPU at tiny sizes
(the GPU measures the paper's)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import flags
import gpu_check
import outputs
from conftest import ROOT

TINY = {"emsize": 16, "nhid": 32, "nlayers": 2, "mem_len": 24, "bptt": 8, "batch_size": 4}
TINY_TRAIN = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--mem-len", "32",
              "--bptt", "32", "--batch_size", "64", "--log-interval", "5", "--threads", "1"]
QUICK = gpu_check.Limits(deadline=400, row=10, fewest=2, kernels=10, train_extra=10,
                         compiled_fewest=2, end=1)  # the fakes take well under a second each

FAKE_BENCH = """
import json, os, subprocess, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"start": time.monotonic(), "argv": argv}) + "\\n")
amp = argv[argv.index("--amp") + 1]
if "--attention-kernels" in argv:
    print("attention product: batch 4, 1 head(s) of width 16, 8 queries over 24 keys")
    print("sdpa, PyTorch's choice: 1.50 ms")
    print("sdpa flash: refused (Flash attention does not support non-null attn_mask.)")
    print("two matmuls: 2.25 ms")
    sys.exit(0)
if "--compile" in argv and os.environ.get("FAKE_HANG"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open(os.environ["FAKE_HANG"], "w") as f:
        f.write(str(child.pid))
    time.sleep(120)
if amp == "bf16" and "--attn-layers" in argv:
    print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
    sys.exit(1)
time.sleep(0.2)
ms = {"fp16": 100.0, "bf16": 125.0, "none": 250.0}[amp]
lstm = {"fp16": "float16", "bf16": os.environ.get("FAKE_BF16_LSTM", "float32"), "none": "float32"}[amp]
for kind, factor in (("train", 1), ("eval", 4)):
    print(f"LSTM output: {lstm}")
    print("warm-up: 7 steps in 1.5 s")
    print(f"{kind}: {ms / factor:,.1f} ms/batch, {16384 * factor * 1000 / ms:,.0f} tokens/s, "
          f"peak 2,048 MB")
"""

FAKE_MAIN = """
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"main": argv}) + "\\n")
if os.environ.get("FAKE_TRAIN_FAILS"):
    print("Traceback (most recent call last):\\nRuntimeError: CUDA error: an illegal memory access",
          file=sys.stderr)
    sys.exit(1)
run = argv[argv.index("--save") + 1][:-len(".pt")] + ".run"
os.makedirs(run)
with open(os.path.join(run, "metrics.jsonl"), "w") as f:
    for step in range(5, 105, 5):
        f.write(json.dumps({"type": "train", "step": step, "bpc": 5 - step / 50,
                            "ms_per_batch": 300.0}) + "\\n")
    f.write(json.dumps({"type": "valid", "step": 100, "valid_bpc": 3.0}) + "\\n")
    f.write(json.dumps({"type": "test", "step": 100, "test_bpc": 3.1}) + "\\n")
"""


class Recorder:
    """A stream that keeps each line with the moment it was written and flushed."""

    def __init__(self):
        self.lines, self.pending = [], ""

    def write(self, text):
        self.pending += text

    def flush(self):
        *done, self.pending = self.pending.split("\n")
        self.lines += [(time.monotonic(), line) for line in done]


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """bench.py and main.py replaced by FAKE_BENCH and FAKE_MAIN; returns their log reader."""
    for name, text in (("bench.py", FAKE_BENCH), ("main.py", FAKE_MAIN)):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(gpu_check, "BENCH", str(tmp_path / "bench.py"))
    monkeypatch.setattr(gpu_check, "MAIN", str(tmp_path / "main.py"))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))

    def log():
        with open(tmp_path / "log.jsonl") as f:
            return [json.loads(line) for line in f]
    return log


def table_rows(lines):
    return [line for line in lines if line.startswith("| attention in")]


def test_without_cuda_it_says_so_in_one_line():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--gpu-check"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "CUDA" in result.stderr and "Traceback" not in result.stderr


def test_each_row_is_written_before_the_next_measurement_starts(fake):
    out = Recorder()
    lines = gpu_check.check(out, sizes=TINY, limits=QUICK, steps=2)
    assert [line for _, line in out.lines] == lines and out.pending == ""
    starts = [entry["start"] for entry in fake() if "start" in entry]
    rows = [(t, line) for t, line in out.lines if line.startswith("| attention in")]
    assert len(starts) == len(gpu_check.EAGER) + 1 + len(gpu_check.COMPILED)  # + the kernels
    eager = rows[:len(gpu_check.EAGER)]
    for (written, _), next_start in zip(eager, starts[1:]):
        assert written < next_start  # flushed before the next measurement began


def test_the_rows_the_kernels_and_the_curve(fake, monkeypatch):
    monkeypatch.setenv("FAKE_BF16_LSTM", "float16")  # the bug model.lstm_dtype rules out
    lines = gpu_check.check(Recorder(), sizes=TINY, limits=QUICK, steps=2)
    rows = table_rows(lines)
    assert len(rows) == len(gpu_check.EAGER) + len(gpu_check.COMPILED)
    assert rows[0] == ("| attention in block 0 | fp16 + loss scaler | sdpa | no | float16 | 163,840 "
                       "| 2.0 | 655,360 | 2.0 | 3.0 |")
    assert "| fp16 + loss scaler | matmul | no |" in rows[1]
    assert "| bf16 | sdpa | no | float16, expected float32 |" in rows[2]
    assert "| float32 | sdpa | no | float32 | 65,536 |" in rows[3]
    failed = [r for r in rows if "| bf16 |" in r and "every block" in r]
    assert failed and all("failed: RuntimeError: CUDA out of memory" in r for r in failed)
    assert "| sdpa flash | refused (Flash attention does not support non-null attn_mask.) |" in lines
    assert "| two matmuls | 2.25 ms |" in lines
    assert any(line.startswith("Training the model on data/sample for --budget 120s (--warmup 120)")
               for line in lines)  # a tenth of the 1,200 steps of 100 ms that 120 s buys
    main_argv = [entry["main"] for entry in fake() if "main" in entry][0]
    assert main_argv[main_argv.index("--warmup") + 1] == "120"
    assert "| 100 | 3.000 | 3.000 |" in lines
    assert lines[-1].startswith("LSTM dtypes: NOT as model.lstm_dtype expects in 2 row(s)")


def test_a_failed_training_run_leaves_the_rest(fake, monkeypatch):
    monkeypatch.setenv("FAKE_TRAIN_FAILS", "1")
    lines = gpu_check.check(Recorder(), sizes=TINY, limits=QUICK, steps=2)
    assert ("Training on data/sample for --budget 120s: failed: RuntimeError: CUDA error: an "
            "illegal memory access.") in lines
    compiled = [r for r in table_rows(lines) if "| yes |" in r]
    assert len(compiled) == len(gpu_check.COMPILED) and "| 163,840 |" in compiled[0]
    assert lines[-1].startswith("LSTM dtypes: as model.lstm_dtype expects in every measured row")


@pytest.mark.slow
def test_the_deadline_stops_a_hanging_measurement_and_what_it_started(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_HANG", str(tmp_path / "hang.pid"))
    limits = gpu_check.Limits(deadline=12, row=3, fewest=0.5, kernels=2, train_extra=2,
                              compiled_fewest=2, end=1)
    started = time.monotonic()
    lines = gpu_check.check(Recorder(), sizes=TINY, budget="1s", limits=limits, steps=2)
    assert time.monotonic() - started < 12 + 2
    compiled = [r for r in table_rows(lines) if "| yes |" in r]
    assert re.search(r"\| stopped at its time limit, \d+ s \|", compiled[0])
    assert all("skipped: no time left" in r for r in compiled[1:])
    took = int(re.fullmatch(r"LSTM dtypes: .*\(The check took (\d+) s\.\)", lines[-1]).group(1))
    assert 10 <= took <= 12
    time.sleep(0.5)
    assert not alive(int((tmp_path / "hang.pid").read_text()))  # killed with its group


def alive(pid):
    """Whether process `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_sigterm_ends_the_check_and_the_measurement_it_runs(fake, monkeypatch, tmp_path):
    """An outer `timeout` past the deadline: the check exits 143, and the measurement then
    running (started in a session of its own) is killed with what it started."""
    monkeypatch.setenv("FAKE_HANG", str(tmp_path / "hang.pid"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "check", lambda: gpu_check.sub_run(
        gpu_check.BENCH, ["--amp", "fp16", "--compile"], 60))
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    timer.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            gpu_check.run()
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143
    time.sleep(0.5)
    assert not alive(int((tmp_path / "hang.pid").read_text()))


def test_the_training_warmup_fits_its_steps():
    assert gpu_check.fitted_warmup("120s", 100.0) == 120  # 1,200 steps of 100 ms
    assert gpu_check.fitted_warmup("120s", 500.0) == 24
    assert gpu_check.fitted_warmup("1s", 5000.0) == 1
    assert gpu_check.fitted_warmup("120s", None) == gpu_check.WARMUP_UNMEASURED


@pytest.mark.slow
def test_the_check_runs_for_real_on_the_cpu():
    """bench.py and main.py for real at tiny sizes; no time for compiled rows."""
    limits = gpu_check.Limits(deadline=150, row=40, fewest=5, kernels=30, train_extra=40,
                              compiled_fewest=1000, end=2)
    lines = gpu_check.check(Recorder(), device="cpu", sizes=TINY, budget="12s", limits=limits,
                            steps=2, train_extra=TINY_TRAIN)
    rows = table_rows(lines)
    measured = [r for r in rows if re.search(r"\| no \| \w+ \| [\d,]+ \| [\d.]+ \| [\d,]+ \| [\d.]+ \| [\d.]+ \|$", r)]
    assert len(measured) == len(gpu_check.EAGER)
    assert all("skipped: no time left" in r for r in rows if "| yes |" in r)
    assert any(re.fullmatch(r"\| sdpa math \| [\d.]+ ms \|", line) for line in lines)
    assert re.search(r"an enwik8 epoch \(5,493 batches\) would take [\d,]+ s", "\n".join(lines))
    curve = [line for line in lines if re.fullmatch(r"\| [\d,]+ \| ([\d.]+)? \| ([\d.]+)? \|", line)]
    assert len(curve) >= 10
    assert sum(bool(re.search(r"\| [\d.]+ \|$", c)) for c in curve) >= 2  # validations
    assert lines[-1].startswith("LSTM dtypes: as model.lstm_dtype expects in every measured row")


def test_gpu_check_without_cuda_gives_a_next_step(monkeypatch):
    import gpu_check
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(flags.InputError) as refused:
        gpu_check.run()
    message = str(refused.value)
    assert "next:" in message and "nvidia-smi" in message
    assert outputs.script_command("bench.py", "--device", "cpu") in message
