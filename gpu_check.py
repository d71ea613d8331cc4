"""The GPU check: the first numbers of a new GPU in at most 8 minutes, as Markdown for
docs/speed.md, printed row by row as they are measured (each line flushed), so that
whatever ends the check early leaves every row measured before it:

    PYTHONUNBUFFERED=1 timeout 540 python3 bench.py --gpu-check | tee gpu_check.md

It needs nothing but a Python with a CUDA build of torch, numpy, tqdm and safetensors (no
setup.sh, no network). Each measurement runs in a process of its own (bench.py or main.py,
with the same Python), stopped at its time limit; one that fails or is stopped gives its row
the reason, and the check goes on. In this order, within an 8-minute deadline (Limits):

1. EAGER rows: tokens per second and peak memory of the training step and of evaluation at
   the paper's sizes (bptt 1024, batch 16, emsize 1024, nhid 4096, 4 blocks, memory 5000),
   attention in block 2 and in every block, fp16 (the loss scaler), bf16 and float32 (TF32),
   and fp16 with the attention as two plain matrix products beside the SDPA rows; the dtype
   the LSTMs computed in, against model.lstm_dtype's; the warm-up steps' seconds. At most
   90 s a row, about 2 minutes in all.
2. The attention product alone, with each SDPA kernel and as two matrix products, in fp16
   (bench.py --attention-kernels): which kernel PyTorch picks, and at what cost. At most 60 s.
3. The paper's model trained on data/sample by main.py --budget 120s, its warmup a tenth of
   the steps the budget buys at the step time measured in 1: its learning curve, and the
   time per enwik8 epoch its step implies against the paper's 1,800 s. About 2.5 minutes.
4. COMPILED rows (--compile) in the time left; their warm-up column is mostly compilation.

The closing line gives the check's time and whether every LSTM ran in its expected dtype.
"""

import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from flags import PAPER, InputError, budget_seconds
from model import lstm_dtype
from outputs import script_command

ROOT = os.path.dirname(os.path.abspath(__file__))
BENCH, MAIN = os.path.join(ROOT, "bench.py"), os.path.join(ROOT, "main.py")
TRAIN_BUDGET = "120s"       # main.py --budget of the training run
WARMUP_SHARE = 0.1          # its warmup: this share of the steps the budget buys
WARMUP_UNMEASURED = 50      # its warmup when the step time could not be measured
ENWIK8_BATCHES = 5493       # nominal batches of an enwik8 epoch at bptt 1024, batch 16
PAPER_EPOCH = 1800          # seconds per epoch of the original code on a Titan V
PAPER_SIZES = {k: PAPER[k] for k in ("emsize", "nhid", "nlayers", "mem_len", "bptt", "batch_size")}
PRECISIONS = {"fp16": "fp16 + loss scaler", "bf16": "bf16", "none": "float32"}
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}


@dataclass(frozen=True)
class Limits:
    """Seconds: the whole check, and what each of its parts may take."""
    deadline: float = 8 * 60
    row: float = 90             # an eager row
    fewest: float = 15          # no eager row or kernel timing starts with less for it
    kernels: float = 60         # the attention kernels
    train_extra: float = 60     # the training run beyond its budget: start-up, the test
    compiled_fewest: float = 60  # no compiled row starts with less
    end: float = 5              # kept for the closing lines


@dataclass(frozen=True)
class Row:
    attn: str        # --attn-layers: "default" (the paper's block nlayers - 2) or "all"
    amp: str         # --amp
    attention: str   # --attention: sdpa or matmul
    compile: bool


EAGER = tuple(Row(attn, amp, attention, False) for attn in ("default", "all")
              for amp, attention in (("fp16", "sdpa"), ("fp16", "matmul"), ("bf16", "sdpa"),
                                     ("none", "sdpa")))
COMPILED = tuple(Row(attn, amp, "sdpa", True) for amp in ("fp16", "bf16", "none")
                 for attn in ("default", "all"))
TABLE = ["| model | precision | attention | compile | LSTM | train tokens/s | train peak GiB "
         "| eval tokens/s | eval peak GiB | warm-up s |",
         "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
RESULT = re.compile(r"^(train|eval): ([\d,.]+) ms/batch, ([\d,]+) tokens/s, peak ([\d,]+) MB$", re.M)
LSTM = re.compile(r"^LSTM output: (\w+)$", re.M)
WARM = re.compile(r"^warm-up: \d+ steps in ([\d,.]+) s$", re.M)
KERNEL = re.compile(r"^(.+?): (refused \(.*\)|[\d,.]+ ms)$", re.M)


class SubRunFailed(Exception):
    """A measurement's process failed, or was stopped at its time limit."""


def sub_run(script, argv, timeout):
    """The output of `python -u script argv` in the project's folder, this process's Python,
    within `timeout` seconds; SubRunFailed naming its last error line, or its time limit
    (the process and any it started are then killed)."""
    proc = subprocess.Popen([sys.executable, "-u", script, *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(timeout, 0))
    except subprocess.TimeoutExpired:
        raise SubRunFailed(f"stopped at its time limit, {timeout:,.0f} s") from None
    finally:
        if proc.poll() is None:  # its limit, or this check stopped (SIGTERM, Ctrl-C)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    if proc.returncode != 0:
        lines = (err.strip() or out.strip() or f"exit code {proc.returncode}").splitlines()
        raise SubRunFailed("failed: " + lines[-1].strip()[:120])
    return out


def machine(device):
    """GPU name and driver (nvidia-smi, without starting CUDA here), torch and CUDA versions."""
    try:
        name, driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.splitlines()[0].split(", ")
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        name, driver = "unknown GPU", "unknown"
    if device != "cuda":
        name, driver = platform.processor() or platform.machine(), "none"
    return f"{name}, driver {driver}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def size_flags(sizes):
    return [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def model_name(row, sizes):
    return (f"attention in block {sizes['nlayers'] - 2}" if row.attn == "default"
            else "attention in every block")


def measure_row(row, device, sizes, steps, timeout):
    """The measurements of one row (bench.py --also-eval): {train_ms, train, train_gib, eval,
    eval_gib, warm, lstm}; SubRunFailed when its process fails or runs out of time."""
    argv = ["--device", device, "--amp", row.amp, "--attention", row.attention, "--steps",
            str(steps), "--warmup-steps", "2", "--also-eval", *size_flags(sizes)]
    argv += ([] if row.attn == "default" else ["--attn-layers", row.attn])
    argv += ["--compile"] if row.compile else []
    out = sub_run(BENCH, argv, timeout)
    results = {kind: (ms, tokens, peak) for kind, ms, tokens, peak in RESULT.findall(out)}
    lstm, warm = LSTM.findall(out), WARM.findall(out)
    if set(results) != {"train", "eval"} or not lstm or not warm:
        raise SubRunFailed("failed: bench.py printed no train and eval lines")

    def number(text):
        return float(text.replace(",", ""))

    return dict(train_ms=number(results["train"][0]), train=number(results["train"][1]),
                train_gib=number(results["train"][2]) / 1024, eval=number(results["eval"][1]),
                eval_gib=number(results["eval"][2]) / 1024,
                warm=sum(number(w) for w in warm), lstm=lstm[0])


def row_line(row, sizes, device, result=None, why=None):
    """The Markdown row: measured, or `why` not; its LSTM cell names the dtype the table
    (model.lstm_dtype) expects when another one was seen."""
    cells = f"| {model_name(row, sizes)} | {PRECISIONS[row.amp]} | {row.attention} | " \
            f"{'yes' if row.compile else 'no'} |"
    if result is None:
        return cells + f" {why} | | | | | |"
    lstm = result["lstm"]
    expected = str(lstm_dtype(device, AMP_DTYPES[row.amp])).replace("torch.", "")
    lstm_cell = lstm if lstm == expected else f"{lstm}, expected {expected}"
    return cells + (f" {lstm_cell} | {result['train']:,.0f} | {result['train_gib']:,.1f} | "
                    f"{result['eval']:,.0f} | {result['eval_gib']:,.1f} | {result['warm']:,.1f} |")


def fitted_warmup(budget, train_ms):
    """The training run's warmup: WARMUP_SHARE of the steps `budget` buys at `train_ms` per
    step (fewer are taken: the budget also holds its evaluations), or WARMUP_UNMEASURED."""
    if train_ms is None:
        return WARMUP_UNMEASURED
    return max(1, round(WARMUP_SHARE * budget_seconds(budget) * 1000 / train_ms))


def train_run(device, budget, warmup, extra, timeout):
    """Train the paper's model (or `extra`'s) on data/sample with main.py --budget; returns
    its metrics records."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        sub_run(MAIN, ["--data", os.path.join(ROOT, "data", "sample"), "--save",
                       os.path.join(tmp, "gpu.pt"), "--budget", budget, "--warmup", str(warmup),
                       "--device", device, "--no-progress", *extra], timeout)
        with open(os.path.join(tmp, "gpu.run", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def curve_lines(records, budget, warmup):
    """The learning curve (about ten rows) and the enwik8 epoch time it implies."""
    train = [r for r in records if r["type"] == "train"]
    valid = {r["step"]: r["valid_bpc"] for r in records if r["type"] == "valid"}
    test = [r["test_bpc"] for r in records if r["type"] == "test"]
    ms = statistics.median(r["ms_per_batch"] for r in train)
    epoch = ms * ENWIK8_BATCHES / 1000
    lines = [f"Training the model on data/sample for --budget {budget} (--warmup {warmup}): "
             f"{train[-1]['step']:,} optimizer steps, {ms:,.1f} ms per batch: an enwik8 epoch "
             f"({ENWIK8_BATCHES:,} batches) would take {epoch:,.0f} s, "
             f"{PAPER_EPOCH / epoch:.1f}x as fast as the paper's {PAPER_EPOCH:,} s on a "
             f"Titan V; test bpc " + (f"{test[-1]:.3f}." if test else "not reported."),
             "", "| step | train bpc | valid bpc |", "|---:|---:|---:|"]
    bpc = {r["step"]: r["bpc"] for r in train}
    steps = sorted(set(every_tenth(list(bpc)) + every_tenth(sorted(valid))))
    for step in steps:
        cells = [f"{step:,}"] + [f"{column[step]:.3f}" if step in column else ""
                                 for column in (bpc, valid)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def every_tenth(items):
    """About ten of `items`, evenly spaced, the last one included."""
    return items[:: max(1, len(items) // 10)] + items[-1:]


def kernel_lines(device, sizes, timeout):
    """The attention product alone (bench.py --attention-kernels, fp16) as a Markdown table."""
    argv = ["--device", device, "--amp", "fp16", "--attention-kernels", *size_flags(sizes)]
    try:
        out = sub_run(BENCH, argv, timeout)
    except SubRunFailed as e:
        return [f"Attention kernels: {e}."]
    first, rows = out.strip().splitlines()[0], KERNEL.findall(out)
    return [f"The {first}:", "", "| kernel | time |", "|---|---:|"] + [
        f"| {name} | {value} |" for name, value in rows]


def check(out=sys.stdout, device="cuda", sizes=PAPER_SIZES, budget=TRAIN_BUDGET,
          limits=Limits(), steps=5, train_extra=()):
    """The whole check, written to `out` line by line; returns its lines."""
    started = time.monotonic()
    deadline = started + limits.deadline
    train_reserve = budget_seconds(budget) + limits.train_extra
    lines, wrong = [], []

    def left():
        return deadline - time.monotonic()

    def emit(*new):
        for line in new:
            out.write(line + "\n")
            out.flush()
        lines.extend(new)

    def measure(row, limit, fewest):
        """Measure `row` within `limit` seconds (skipped under `fewest`) and emit its line."""
        if limit < fewest:
            emit(row_line(row, sizes, device, why="skipped: no time left"))
            return None
        try:
            result = measure_row(row, device, sizes, steps, limit)
        except SubRunFailed as e:
            emit(row_line(row, sizes, device, why=str(e)))
            return None
        line = row_line(row, sizes, device, result)
        if "expected" in line:
            wrong.append(row)
        emit(line)
        return result

    emit(f"GPU check on {machine(device)}, {time.strftime('%Y-%m-%d')}: the training step and "
         f"evaluation at bptt {sizes['bptt']}, batch {sizes['batch_size']}, emsize "
         f"{sizes['emsize']}, nhid {sizes['nhid']}, {sizes['nlayers']} blocks, memory "
         f"{sizes['mem_len']} (median of {steps} timed steps; float32 matrix products in TF32 "
         f"on CUDA)", "", *TABLE)
    eager = {}
    for r in EAGER:
        limit = min(limits.row, left() - train_reserve - limits.kernels - limits.end)
        eager[r] = measure(r, limit, limits.fewest)
    limit = min(limits.kernels, left() - train_reserve - limits.end)
    emit("", *(kernel_lines(device, sizes, limit) if limit >= limits.fewest
               else ["Attention kernels: skipped, no time left."]), "")
    first = eager[EAGER[0]]
    warmup = fitted_warmup(budget, first and first["train_ms"])
    try:
        records = train_run(device, budget, warmup, train_extra,
                            min(train_reserve, left() - limits.end))
        emit(*curve_lines(records, budget, warmup))
    except SubRunFailed as e:
        emit(f"Training on data/sample for --budget {budget}: {e}.")
    emit("", "The same with --compile, in the time left (warm-up s: mostly compilation):", "",
         *TABLE)
    for r in COMPILED:
        measure(r, left() - limits.end, limits.compiled_fewest)
    emit("", "LSTM dtypes: " + ("as model.lstm_dtype expects in every measured row" if not wrong
                                else f"NOT as model.lstm_dtype expects in {len(wrong)} row(s)")
         + f". (The check took {time.monotonic() - started:,.0f} s.)")
    return lines


def run():
    """bench.py --gpu-check. A SIGTERM (an outer `timeout`) ends the check, and the
    measurement then running, at once."""
    if not torch.cuda.is_available():
        cpu = script_command("bench.py", "--device", "cpu", "--emsize", 128, "--nhid", 512,
                             "--bptt", 128, "--batch_size", 8, "--steps", 20, "--floor")
        raise InputError(f"--gpu-check measures a CUDA GPU, and torch {torch.__version__} sees "
                         f"none here; next: run it where nvidia-smi lists a GPU, with the "
                         f"python3 that has torch's CUDA build there (no setup needed), or "
                         f"time this CPU with {cpu}")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    check()
