"""Small helpers shared by main.py and the scripts: printing numbers and run records."""

import json
import math
import os
import platform
import subprocess
import sys

import torch


def safe_exp(x):
    """exp() for printing perplexities: inf instead of OverflowError."""
    return float("inf") if x >= 700 else math.exp(x)  # nan stays nan


# --- run records -------------------------------------------------------------------------

class RunLog:
    """Prints the log lines and keeps the run folder: log.txt (a copy of stdout) and
    metrics.jsonl (one JSON object per record). Only rank 0 writes (`enabled`)."""

    def __init__(self, run_dir=None, enabled=True, append=False):
        self.enabled = enabled
        self.log = self.metrics_file = None
        if enabled and run_dir:
            os.makedirs(run_dir, exist_ok=True)
            mode = "a" if append else "w"
            self.log = open(os.path.join(run_dir, "log.txt"), mode, encoding="utf-8")
            self.metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), mode, encoding="utf-8")

    def __call__(self, line=""):
        if not self.enabled:
            return
        print(line, flush=True)
        if self.log:
            self.log.write(line + "\n")
            self.log.flush()

    def metrics(self, **record):
        if self.metrics_file:
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()

    def close(self):
        for f in (self.log, self.metrics_file):
            if f:
                f.close()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def append_json_line(path, obj):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def environment():
    """What the run ran on: Python, torch, CUDA/cuDNN, GPU, git commit."""
    cuda = torch.cuda.is_available()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)),
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": commit,
        "argv": sys.argv,
    }
