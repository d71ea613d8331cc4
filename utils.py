"""Small helpers shared by main.py, data.py and the scripts: errors, checkpoints, run records."""

import argparse
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile

import torch

FORMAT = "sha-rnn"  # marks checkpoints written by this project


class InputError(ValueError):
    """Bad user input (flags, files, checkpoints): reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def safe_exp(x):
    """exp() for printing perplexities: inf instead of OverflowError."""
    return math.exp(x) if x < 700 else float("inf")


# --- checkpoints -------------------------------------------------------------------------

def check_writable(path):
    """Raise InputError unless a file can be created at `path` (checked before training)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror}") from None
    if os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder")


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, flush + fsync, then rename over
    `path`: a crash at any moment leaves either the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def convert_hint(path):
    return (f"convert it once where the original code is importable: python -c \"import torch; "
            f"m = torch.load('{path}', weights_only=False)[0]; "
            f"torch.save(m.state_dict(), '{path}.state_dict.pt')\" and pass that file")


def load_checkpoint(path):
    """Load a checkpoint safely (`weights_only=True`: no code runs) and say what it is.

    Returns a dict with "kind": "sha-rnn" (a checkpoint of this project: model, config,
    vocab, ...) or "state_dict" (bare weights, e.g. written by the original code, under
    "model"). Raises InputError for a missing, truncated, corrupt, pickled-object or
    unrecognised file."""
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) files
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise InputError(f"{path} holds pickled Python objects ({found.group(1)}), like the "
                             f"original code's [model, criterion, optimizer] files; they are not "
                             f"loaded because unpickling can run code; {convert_hint(path)}") from None
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise InputError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                         f"({detail[0] if detail else type(e).__name__})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise InputError(f"checkpoint {path} is truncated or corrupt: {first_line(e)}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return dict(obj, kind="sha-rnn")
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if "encoder.weight" not in obj:
            raise InputError(f"{path} is a state_dict but not of a SHA-RNN (no encoder.weight)")
        return {"kind": "state_dict", "model": obj}
    raise InputError(f"{path} is not a SHA-RNN checkpoint or state_dict")


def model_from_checkpoint(ckpt, **kwargs):
    """The SHARNN of a checkpoint of this project (its config and weights), on the CPU."""
    from model import SHARNN

    if ckpt.get("kind") != "sha-rnn":
        raise InputError("this needs a checkpoint written by main.py (with its config and "
                         "vocabulary), not a bare state_dict")
    model = SHARNN(**ckpt["config"], **kwargs)
    try:
        model.load_strict(ckpt["model"])
    except ValueError as e:
        raise InputError(str(e)) from None
    return model


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def all_finite(module):
    """True when every parameter is finite (one host synchronisation)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


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
