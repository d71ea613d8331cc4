"""The GPU check: the first numbers of a new GPU, in at most 8 minutes, as Markdown for the
README.

    python bench.py --gpu-check

1. Tokens per second and peak memory of the training step and of evaluation at the paper's
   sizes (bptt 1024, batch 16, emsize 1024, nhid 4096, 4 blocks, memory 5000), with
   attention in block 2 and in every block, in fp16 with the loss scaler, bf16 and float32,
   eager and with --compile (bench.py's measurement, the median of the timed steps).
2. The paper's model trained on data/sample by main.py --budget: its learning curve, and
   the time per enwik8 epoch (5,493 batches) its step time implies, against the paper's
   1,800 s on a Titan V.
A measurement that could not end before the deadline is skipped, and its row says so.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import bench
from flags import PAPER, InputError, budget_seconds
from outputs import script_command

DEADLINE = 8 * 60           # seconds for the whole check
TRAIN_BUDGET = "150s"       # main.py --budget of the training run
ENWIK8_BATCHES = 5493       # nominal batches of an enwik8 epoch at bptt 1024, batch 16
PAPER_EPOCH = 1800          # seconds per epoch of the original code on a Titan V
PAPER_SIZES = {k: PAPER[k] for k in ("emsize", "nhid", "nlayers", "mem_len", "bptt", "batch_size")}
MODELS = ("default", "all")  # --attn-layers: the paper's one block (nlayers - 2), every block
PRECISIONS = (("fp16", "fp16 + loss scaler"), ("bf16", "bf16"), ("none", "float32"))
ESTIMATE = {False: 20, True: 120}  # seconds a row may take, eager and compiled, at most


def machine():
    """GPU name, driver, torch and CUDA versions."""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        driver = "unknown"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else bench.cpu_name()
    return f"{name}, driver {driver}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def measure_row(device, sizes, attn, amp, compile_, steps):
    """(train tokens/s, train peak GiB, eval tokens/s, eval peak GiB) of one configuration,
    from bench.py's timing of its step."""
    flags = ["--device", device, "--amp", amp, "--steps", str(steps), "--warmup-steps", "2"]
    flags += [x for k, v in sizes.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    flags += [] if attn == "default" else ["--attn-layers", attn]
    result = []
    for mode in ([], ["--eval"]):
        args = bench.build_parser().parse_args(flags + mode + (["--compile"] if compile_ else []))
        times, dev = bench.timed(args, quiet=True)
        median = statistics.median(times["model"])
        result += [sizes["bptt"] * sizes["batch_size"] / median, bench.peak_memory_mb(dev) / 1024]
    return tuple(result)


def throughput_table(device, sizes, deadline, reserve, compile_modes=(False, True), steps=5):
    """The Markdown rows of every model x precision x compile within the deadline, leaving
    `reserve` seconds."""
    rows = []
    for compile_ in compile_modes:
        for attn in MODELS:
            label = (f"attention in block {sizes['nlayers'] - 2}" if attn == "default"
                     else "attention in every block")
            for amp, precision in PRECISIONS:
                cells = f"| {label} | {precision} | {'yes' if compile_ else 'no'} |"
                if time.monotonic() + ESTIMATE[compile_] + reserve > deadline:
                    rows.append(cells + " skipped: no time left | | | |")
                    continue
                try:
                    train, train_mem, evaluate, eval_mem = measure_row(
                        device, sizes, attn, amp, compile_, steps)
                except (RuntimeError, InputError) as e:  # out of memory, a compiler failure
                    rows.append(cells + f" failed: {str(e).strip().splitlines()[0][:60]} | | | |")
                    continue
                rows.append(cells + f" {train:,.0f} | {train_mem:,.1f} | {evaluate:,.0f} | "
                                    f"{eval_mem:,.1f} |")
    header = ["| model | precision | compile | train tokens/s | train peak GiB | eval tokens/s "
              "| eval peak GiB |", "|---|---|---|---:|---:|---:|---:|"]
    return header + rows


def train_run(device, budget, extra=()):
    """Train the paper's model (or `extra`'s) on data/sample with main.py --budget; returns
    its metrics records."""
    root = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result = subprocess.run([sys.executable, "-u", os.path.join(root, "main.py"), "--data",
                                 os.path.join(root, "data", "sample"), "--save",
                                 os.path.join(tmp, "gpu.pt"), "--budget", budget, "--device",
                                 device, "--no-progress", *extra],
                                capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise InputError(f"the training run failed: {result.stderr.strip()[-300:]}")
        with open(os.path.join(tmp, "gpu.run", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def curve_lines(records, budget):
    """The learning curve (about ten rows) and the enwik8 epoch time it implies."""
    train = [r for r in records if r["type"] == "train"]
    valid = {r["step"]: r["valid_bpc"] for r in records if r["type"] == "valid"}
    test = [r["test_bpc"] for r in records if r["type"] == "test"]
    ms = statistics.median(r["ms_per_batch"] for r in train)
    epoch = ms * ENWIK8_BATCHES / 1000
    lines = [f"Training the model on data/sample for --budget {budget}: {train[-1]['step']:,} "
             f"optimizer steps, {ms:,.1f} ms per batch: an enwik8 epoch ({ENWIK8_BATCHES:,} "
             f"batches) would take {epoch:,.0f} s, {PAPER_EPOCH / epoch:.1f}x as fast as the "
             f"paper's {PAPER_EPOCH:,} s on a Titan V; test bpc "
             + (f"{test[-1]:.3f}." if test else "not reported."),
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


def check(device="cuda", sizes=PAPER_SIZES, budget=TRAIN_BUDGET, deadline_s=DEADLINE,
          compile_modes=(False, True), steps=5, train_extra=()):
    """The whole check; returns its Markdown lines."""
    started = time.monotonic()
    deadline = started + deadline_s
    reserve = budget_seconds(budget) + 30  # the training run, with its start and end
    table = throughput_table(device, sizes, deadline, reserve, compile_modes, steps)
    lines = [f"GPU check on {machine()}, {time.strftime('%Y-%m-%d')}: the training step and "
             f"evaluation at bptt {sizes['bptt']}, batch {sizes['batch_size']}, emsize "
             f"{sizes['emsize']}, nhid {sizes['nhid']}, {sizes['nlayers']} blocks, memory "
             f"{sizes['mem_len']} (median of {steps} timed steps)", ""] + table + [""]
    lines += curve_lines(train_run(device, budget, train_extra), budget)
    lines += ["", f"(the check took {time.monotonic() - started:,.0f} s)"]
    return lines


def run(args):
    """bench.py --gpu-check."""
    if not torch.cuda.is_available():
        cpu = script_command("bench.py", "--device", "cpu", "--emsize", 128, "--nhid", 512,
                             "--bptt", 128, "--batch_size", 8, "--steps", 20, "--floor")
        raise InputError(f"--gpu-check measures a CUDA GPU, and torch {torch.__version__} sees "
                         f"none here; next: run it where nvidia-smi lists a GPU (make demo "
                         f"installs torch's CUDA build there), or time this CPU with {cpu}")
    print("\n".join(check()), flush=True)
