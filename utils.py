"""Small helpers shared by main.py and the scripts: numbers for printing, the one atomic
file writer, and the run records. torch is imported only where it is used, so that light
scripts (plot.py) can use the rest."""

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile

LOG2 = math.log(2)  # bits per character = loss / LOG2


def safe_exp(x):
    """exp() for printing perplexities: inf instead of OverflowError."""
    return float("inf") if x >= 700 else math.exp(x)  # nan stays nan


# --- writing files atomically ------------------------------------------------------------

WRITE_HOOKS = []  # test seam: each hook(path) runs after the payload is written, before the rename


class _Recording:
    """A file's write() that remembers an OSError, which torch.save would otherwise report
    as a RuntimeError ("unexpected pos") on a full disk."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


@contextlib.contextmanager
def atomic_path(path):
    """A temporary path in the folder of `path` to write in full; when the block ends without
    an error the file is fsynced and renamed over `path`: a crash at any moment leaves the
    old file or the new one, never half of one. On any error the temporary is removed and
    the error goes on. The temporary is locked until it is renamed, so that
    `remove_stale_temporaries` only removes what a dead writer left. For writers that take a
    file name (an exporter); atomic_write takes a file object."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(tmp, fd):
            break
        os.close(fd)  # removed as stale between its creation and the lock: take another
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as any file the user writes, not mkstemp's 0600
        yield tmp
        for hook in WRITE_HOOKS:
            hook(path)
        written = os.open(tmp, os.O_RDONLY)  # the file at tmp now, whoever wrote it
        try:
            os.fsync(written)
        finally:
            os.close(written)
        os.replace(tmp, path)  # while still locked
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        os.close(fd)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path, write):
    """Call write(f) on a temporary binary file in the folder of `path`, then put it in place
    (atomic_path). Any failure to write (a full disk among them) is an OSError; the temporary
    is removed."""
    with atomic_path(path) as tmp:  # os.fdopen: where the tests put a full disk
        with os.fdopen(os.open(tmp, os.O_WRONLY), "wb") as f:
            recording = _Recording(f)
            try:
                write(recording)
                f.flush()
            except RuntimeError as e:  # torch.save's report of a failed write
                if recording.error:
                    raise recording.error from None
                raise OSError(errno.EIO, f"write failed ({str(e).strip().splitlines()[-1]})") from None


def atomic_save(obj, path):
    """torch.save `obj` to `path` through atomic_write."""
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def _same_file(path, fd):
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_stale_temporaries(path):
    """Delete the temporary files that writers of `path` killed mid-write left behind (a
    kill -9 during atomic_write). A temporary still locked by its writer, in this or another
    process, is left alone."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(re.escape(os.path.basename(path)) + r"\.[A-Za-z0-9_]{8}\.tmp")
    for name in os.listdir(folder):
        if not pattern.fullmatch(name):
            continue
        stale = os.path.join(folder, name)
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(stale, fd):
                os.remove(stale)
        except OSError:
            pass  # locked: a live writer
        finally:
            os.close(fd)


# --- standard output ---------------------------------------------------------------------

def drop_stdout():
    """Send what is left of standard output to /dev/null once writing it failed (a full
    disk under `> file`), so that the interpreter's last flush does not fail on it again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind it (a test's capture)
        pass


def say(line):
    """Print a result line now; a standard output that cannot be written (a full disk, a
    reader gone) is an InputError: one line on stderr."""
    from flags import InputError
    try:
        print(line, flush=True)
    except OSError as e:
        drop_stdout()
        raise InputError(f"cannot write standard output: {e.strerror or e}") from None


# --- run records -------------------------------------------------------------------------

class RunLog:
    """Prints the log lines and keeps the run folder: log.txt (a copy of stdout) and
    metrics.jsonl (one JSON object per record). Only rank 0 writes (`enabled`).

    A record, or a log line's standard output, that cannot be written (a full disk) never
    stops the caller with an error:
    the records stop there, `failure` says why, and `on_failure()` is called once (main.py
    then stops the run and writes its last checkpoint)."""

    def __init__(self, run_dir=None, enabled=True, append=False, on_failure=None,
                 tensorboard=None, first_step=1):
        self.enabled = enabled
        self.run_dir = run_dir
        self.failure = None
        self.on_failure = on_failure
        self.log = self.metrics_file = self.board = None
        if enabled and run_dir:
            os.makedirs(run_dir, exist_ok=True)
            mode = "a" if append else "w"
            self.log = open(os.path.join(run_dir, "log.txt"), mode, encoding="utf-8")
            self.metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), mode, encoding="utf-8")
        if enabled and tensorboard:
            self.board = Board(tensorboard, first_step)

    def __call__(self, line=""):
        if not self.enabled:
            return
        self._write(self.log, line + "\n")
        try:
            print(line, flush=True)
        except OSError as e:  # a full disk under `> run.log`, a reader gone: as a record's
            drop_stdout()
            self.fail(f"cannot write standard output: {e.strerror or e}")

    def metrics(self, **record):
        self._write(self.metrics_file, json.dumps(record) + "\n")
        if self.board:
            self.board.add(record)

    def _write(self, f, text):
        if f is None or self.failure:
            return
        try:
            f.write(text)
            f.flush()
        except OSError as e:
            self.fail(f"cannot write the run records in {self.run_dir}: {e.strerror or e}")

    def fail(self, why):
        """A record could not be written: no record after it, and the run is told once."""
        if self.failure:
            return
        self.failure = why
        if self.on_failure:
            self.on_failure()

    def close(self):
        for f in (self.log, self.metrics_file, self.board):
            if f:
                try:
                    f.close()
                except OSError:  # what could not be flushed is already reported
                    pass


class Board:
    """The scalars of the run records as TensorBoard events (torch.utils.tensorboard), at
    the optimizer step of each record: train loss, bpc, learning rate, gradient norm before
    clipping and tokens/s per log interval; valid loss and bpc per validation; test loss and
    bpc at the end. A run continued from step S starts at S + 1 and hides (TensorBoard's
    purge_step) what the stopped run had logged after its last checkpoint, so the curves go
    on without a jump or a duplicate."""

    TAGS = {"train": ("loss", "bpc", "lr", "grad_norm", "tokens_per_s"),
            "valid": ("valid_loss", "valid_bpc"), "test": ("test_loss", "test_bpc"),
            "dynamic_test": ("loss", "bpc"), "dynamic_valid": ("loss", "bpc")}

    def __init__(self, folder, first_step=1):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(folder, purge_step=first_step if first_step > 1 else None)

    def add(self, record):
        kind = record.get("type")
        for key in self.TAGS.get(kind, ()):
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = key.removeprefix(kind + "_")
                self.writer.add_scalar(f"{kind}/{name}", value, record["step"],
                                       walltime=record.get("time"))

    def close(self):
        self.writer.close()


def write_json(path, obj):
    """`obj` as indented JSON, written atomically (atomic_write)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def append_json_line(path, obj):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def environment():
    """What the run ran on: Python, torch, CUDA/cuDNN, GPU, git commit."""
    import torch
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
