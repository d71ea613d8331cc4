"""Nothing of the user's lost: outputs claimed and locked before any work, another run's
weights kept, full disks and killed writers that cost no checkpoint, stale temporaries
cleared safely (through main.py's CLI); and the printed commands, which name the
interpreter that ran."""

import errno
import fcntl
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
import outputs
import utils
from conftest import ROOT, SMALL, cli, digest, run_cli
from outputs import Locks, Output


def train(capsys, corpus_dir, save, *flags):
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL, *flags)
    assert code == 0, err
    return out


def test_the_lock_covers_every_output_of_a_run(corpus_dir, tmp_path, capsys):
    """While run 1 (--save w1.pt) lives, no run may write its --last or --run-dir either."""
    w1 = str(tmp_path / "w1.pt")
    held = Locks([Output("--save", w1), Output("--last", str(tmp_path / "w1.last.pt")),
                  Output("--run-dir", str(tmp_path / "w1.run"), folder=True)])
    try:
        for flags, flag in ((["--last", str(tmp_path / "w1.last.pt")], "--last"),
                            (["--run-dir", str(tmp_path / "w1.run")], "--run-dir"),
                            ([], "--save")):
            save = w1 if flag == "--save" else str(tmp_path / "w2.pt")
            code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, *flags,
                                     "--epochs", "1", *SMALL)
            assert code == 2 and f"another run is writing {flag}" in err, err
            assert err.count("\n") == 1
        assert not os.path.exists(tmp_path / "w2.pt")
    finally:
        held.release()
    assert sorted(os.listdir(tmp_path)) == ["data"]  # the lock files are gone
    train(capsys, corpus_dir, tmp_path / "w2.pt", "--last", str(tmp_path / "w1.last.pt"),
          "--epochs", "1")


@pytest.mark.slow
def test_the_papers_second_pass_replaces_its_own_checkpoints(corpus_dir, tmp_path, capsys):
    save, last = tmp_path / "m.pt", tmp_path / "m.last.pt"
    train(capsys, corpus_dir, save, "--epochs", "1")
    first_last = digest(last)
    out = train(capsys, corpus_dir, save, "--epochs", "1", "--resume", str(save), "--lr", "1e-3")
    assert "| End of training |" in out and digest(last) != first_last
    # Resuming into a new --save is a new run: the old run's last checkpoint stays its own.
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "n.pt"),
                           "--last", str(last), *SMALL, "--epochs", "1", "--resume", str(save))
    assert code == 2 and "--overwrite" in err


def limited(fsize):
    """A preexec_fn: files of this process may grow to `fsize` bytes; a write beyond fails
    (EFBIG) as a full disk does, instead of killing the process with SIGXFSZ."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return apply


@pytest.mark.slow
def test_a_write_that_fails_inside_torch_save_is_one_line_and_loses_nothing(corpus_dir, tmp_path, capsys):
    """torch.save reports a failed write as a RuntimeError ("unexpected pos"): it is a
    failed write all the same, one line and exit 2, and the checkpoints before it stay."""
    save, last = tmp_path / "m.pt", tmp_path / "m.last.pt"
    train(capsys, corpus_dir, save, "--epochs", "1")
    before = {p: digest(p) for p in (save, last)}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--continue",
                             str(last), "--epochs", "2"], capture_output=True, text=True,
                            timeout=300, preexec_fn=limited(20_000))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot write" in result.stderr and "too large" in result.stderr.lower()
    assert {p: digest(p) for p in (save, last)} == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


@pytest.mark.slow
def test_a_full_disk_under_torch_save_is_an_oserror_and_the_last_checkpoint_is_tried(
        corpus_dir, tmp_path, capsys, monkeypatch):
    """On a full disk torch.save's writer may report "unexpected pos" (a RuntimeError): the
    checkpoint writer turns it into the disk's own error, so the run fails in one line."""
    save, last = tmp_path / "m.pt", tmp_path / "m.last.pt"
    train(capsys, corpus_dir, save, "--epochs", "1")
    before = {p: digest(p) for p in (save, last)}
    real = os.fdopen

    def full_disk(fd, *args, **kwargs):  # the checkpoints' temporary files land on /dev/full
        if ".pt." in os.readlink(f"/proc/self/fd/{fd}"):
            os.dup2(os.open("/dev/full", os.O_WRONLY), fd)
        return real(fd, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", full_disk)
    code, out, err = run_cli(capsys, "--continue", str(last), "--epochs", "2")
    monkeypatch.setattr(os, "fdopen", real)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err, err
    assert {p: digest(p) for p in (save, last)} == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


class FailingAfter:
    """A file whose writes fail like a full disk's after `n` of them."""

    def __init__(self, f, n):
        self.f, self.n = f, n

    def write(self, text):
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.slow
def test_run_records_that_cannot_be_written_cost_no_checkpoint(corpus_dir, tmp_path, capsys,
                                                                monkeypatch):
    real = open

    def full_log(path, mode="r", *args, **kwargs):
        f = real(path, mode, *args, **kwargs)
        return FailingAfter(f, 8) if str(path).endswith("log.txt") else f

    monkeypatch.setattr(utils, "open", full_log, raising=False)
    save, last = tmp_path / "m.pt", tmp_path / "m.last.pt"
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL,
                             "--epochs", "3", "--log-interval", "5")
    assert code == 2 and err.count("\n") == 1
    assert "No space left on device" in err and f"--continue {last}" in err
    assert "| End of training |" not in out  # stopped at the next step
    progress = torch.load(str(last), weights_only=True)["progress"]
    assert progress["epoch"] == 0 and progress["steps"] > 0
    monkeypatch.setattr(utils, "open", real, raising=False)
    code, out, err = run_cli(capsys, "--continue", str(last))
    assert code == 0, err
    assert "| End of training |" in out


def test_stale_temporaries_of_the_cache_go_and_a_live_writers_stay(corpus_dir, tmp_path, capsys):
    stale = os.path.join(corpus_dir, "corpus.cache.pt.abcd1234.tmp")
    live = os.path.join(corpus_dir, "corpus.cache.pt.live5678.tmp")
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
    with open(live, "rb") as writer:  # another run writing the same cache holds its lock
        fcntl.flock(writer, fcntl.LOCK_EX)
        train(capsys, corpus_dir, tmp_path / "m.pt", "--epochs", "1")
        assert not os.path.exists(stale) and os.path.exists(live)
    train(capsys, corpus_dir, tmp_path / "n.pt", "--epochs", "0")  # the writer has died
    assert not os.path.exists(live)


# main.py, stopped forever in its first write of NAME once both checkpoints exist: after
# the payload is written to the temporary file, before the rename.
HOLD = """
import os, sys, time, utils
name, marker = sys.argv[1:3]
def hold(path):
    folder = os.path.dirname(path)
    both = all(os.path.exists(os.path.join(folder, n)) for n in ("m.pt", "m.last.pt"))
    if path.endswith(name) and both:
        open(marker, "w").close()
        time.sleep(600)
utils.WRITE_HOOKS.append(hold)
import main
sys.exit(main.main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["m.last.pt", "m.pt"])
def test_kill_9_in_the_middle_of_a_write_leaves_the_previous_checkpoints(corpus_dir, tmp_path,
                                                                         name):
    """A writer killed between writing its temporary file and renaming it: the checkpoints
    before it load, and the next run on them removes the temporary and goes on."""
    marker = tmp_path / "holding"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, "/" + name, str(marker),
                             "--data", corpus_dir, "--save", str(tmp_path / "m.pt"), *SMALL,
                             "--epochs", "3", "--save-interval", "1", "--log-interval", "10"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    proc.stderr.close()
    temporaries = [n for n in os.listdir(tmp_path) if n.startswith(name + ".") and n.endswith(".tmp")]
    assert len(temporaries) == 1
    for path in (tmp_path / "m.pt", tmp_path / "m.last.pt"):
        ckpt = checkpoint.load_checkpoint(str(path))
        assert ckpt["kind"] == "sha-rnn" and "encoder.weight" in ckpt["model"]
    result = cli("--continue", str(tmp_path / "m.last.pt"))
    assert result.returncode == 0, result.stderr
    assert "| End of training |" in result.stdout
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_hints_name_the_interpreter_that_ran(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "executable", os.path.join(ROOT, ".venv", "bin", "python"))
    assert outputs.command(1, "--continue", "m.last.pt") == \
        ".venv/bin/python -u main.py --continue m.last.pt"
    assert outputs.sample_command({"save": "a b.pt"}) == \
        ".venv/bin/python generate.py --checkpoint 'a b.pt' --length 500"
    assert outputs.command(2, "--continue", "x") == \
        ".venv/bin/python -m torch.distributed.run --nproc_per_node=2 main.py --continue x"
    monkeypatch.setattr(sys, "executable", "/opt/py 3/bin/python3")  # outside the clone
    monkeypatch.chdir(tmp_path)
    assert outputs.command(1, "--continue", "m.last.pt") == \
        f"'/opt/py 3/bin/python3' -u {os.path.relpath(os.path.join(ROOT, 'main.py'))} " \
        f"--continue m.last.pt"
