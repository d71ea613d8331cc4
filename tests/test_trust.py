"""Nothing lost, nothing hung: outputs that never overwrite data or another run's files, one
run per --save, a changed corpus caught, every stop collective, a full disk survived, honest
messages and logs."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import main
import training
import utils
from conftest import ENV, ROOT, SMALL, cli, run_cli, start, wait_for

def digests(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_a_new_run_tests_only_what_it_wrote_and_keeps_records_apart(corpus_dir, tmp_path, capsys):
    """An older run's --save (another architecture) and run folder stay untouched by a new
    run that writes no best checkpoint of its own (--epochs 0)."""
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL,
                           "--emsize", "24", "--nhid", "48")
    assert code == 0, err
    old_save = open(save, "rb").read()
    old_records = digests(tmp_path / "m.run")
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "0", *SMALL)
    assert code == 2 and "--overwrite" in err  # another run's weights are not replaced silently
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "0", *SMALL,
                             "--overwrite")
    assert code == 0, err
    assert "This run wrote no best checkpoint" in out and "| End of training | test loss" in out
    assert open(save, "rb").read() == old_save
    assert digests(tmp_path / "m.run") == old_records
    assert "Run records in " + str(tmp_path / "m.run.2") in out
    assert (tmp_path / "m.run.2" / "log.txt").read_text() == out
    # Its --continue goes on in m.run.2 and moves nothing: no line about an earlier run.
    code, more, err = run_cli(capsys, "--continue", str(tmp_path / "m.last.pt"))
    assert code == 0 and "This run is finished" in more, err
    assert "earlier run" not in more and "run records " + str(tmp_path / "m.run.2") in more
    assert (tmp_path / "m.run.2" / "log.txt").read_text() == out + more


@pytest.mark.slow
def test_a_second_run_on_the_same_save_is_refused_until_the_first_dies(corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    first = start("--data", corpus_dir, "--save", save, "--epochs", "50", *SMALL)
    try:
        wait_for(first, "| epoch")
        second = cli("--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert "another run is writing" in second.stderr
    finally:
        first.kill()  # kill -9: the kernel drops the lock
        first.communicate()
    third = cli("--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)
    assert third.returncode == 0, third.stderr


@pytest.mark.slow
def test_continue_refuses_a_changed_corpus_unless_allowed(corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    assert cli("--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL).returncode == 0
    valid = os.path.join(corpus_dir, "valid.txt")
    with open(valid) as f:
        lines = f.read().splitlines()
    with open(valid, "w") as f:
        f.write("\n".join(reversed(lines)) + "\n")  # same bytes, another order
    last = str(tmp_path / "m.last.pt")
    before = open(last, "rb").read()
    refused = cli("--continue", last, "--epochs", "2")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "valid.txt" in refused.stderr and "--allow-changed-data" in refused.stderr
    assert open(last, "rb").read() == before
    allowed = cli("--continue", last, "--epochs", "2", "--allow-changed-data")
    assert allowed.returncode == 0, allowed.stderr


@pytest.mark.parametrize("flag,value", [("--optimizer", "adam"), ("--seed", "3"),
                                        ("--batch_size", "2")])
@pytest.mark.slow
def test_continue_refuses_a_change_it_cannot_honour(corpus_dir, tmp_path, flag, value):
    save = str(tmp_path / "m.pt")
    assert cli("--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL).returncode == 0
    result = cli("--continue", str(tmp_path / "m.last.pt"), "--epochs", "2", flag, value)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert flag in result.stderr and "--resume" in result.stderr


@pytest.mark.slow
def test_a_full_disk_keeps_the_epoch_in_the_last_checkpoint(corpus_dir, tmp_path, capsys, monkeypatch):
    save = str(tmp_path / "m.pt")
    real = utils.atomic_save

    def full(obj, path):
        if path == save:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(utils, "atomic_save", full)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "2", *SMALL)
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert not os.path.exists(save)
    last = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)
    assert last["progress"]["epoch"] == 0 and last["progress"]["batch"] > 0  # the epoch's work
    monkeypatch.setattr(utils, "atomic_save", real)
    code, out, err = run_cli(capsys, "--continue", str(tmp_path / "m.last.pt"))
    assert code == 0, err
    assert "| end of epoch   1 |" in out and "| end of epoch   2 |" in out


def test_a_signal_during_start_up_exits_0(corpus_dir, tmp_path, capsys, monkeypatch):
    corpus = data.Corpus

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return corpus(*args, **kwargs)

    monkeypatch.setattr(data, "Corpus", interrupted)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"), *SMALL)
    assert code == 0, err
    assert "Stopped by a signal during start-up" in out and "| epoch" not in out


def test_a_signal_during_the_final_test_exits_0(corpus_dir, tmp_path, capsys, monkeypatch):
    evaluate = training.evaluate

    def evaluate_then_signal(model, source, bsz, *args, **kwargs):
        if bsz == main.TEST_BATCH_SIZE:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(model, source, bsz, *args, **kwargs)

    monkeypatch.setattr(training, "evaluate", evaluate_then_signal)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"),
                             "--epochs", "1", *SMALL)
    assert code == 0, err
    assert "The test was stopped by a signal" in out and "| End of training" not in out
    assert os.path.exists(str(tmp_path / "m.pt")) and os.path.exists(str(tmp_path / "m.last.pt"))
    monkeypatch.setattr(training, "evaluate", evaluate)
    code, out, err = run_cli(capsys, "--continue", str(tmp_path / "m.last.pt"))  # the test's turn
    assert code == 0, err
    assert "Training is complete; running the final test" in out and "| End of training" in out
    assert "| epoch" not in out


def worker_pids(parent):
    """{rank: pid} of torchrun's workers (the children of its process)."""
    found = {}
    deadline = time.time() + 60
    while len(found) < 2 and time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent and b"RANK" in env:
                found[int(env[b"RANK"])] = int(pid)
        time.sleep(0.2)
    return found


@pytest.mark.parametrize("moment", ["| epoch   1 |", "Saving model", "end of epoch   1"])
@pytest.mark.slow
def test_sigterm_to_one_torchrun_rank_stops_all_ranks_cleanly(corpus_dir, tmp_path, moment):
    """SIGTERM to rank 1 alone, while training, while rank 0 writes checkpoints (a save at
    every step), or at the end of an epoch: both ranks stop within seconds, exit 0, and the
    run continues in one process."""
    save = str(tmp_path / "m.pt")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(ROOT, "main.py"), "--data",
                             corpus_dir, "--save", save, "--epochs", "20", *SMALL,
                             "--log-interval", "2", "--save-interval", "1"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, moment)
        ranks = worker_pids(proc.pid)
        os.kill(ranks[1], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)  # a hang fails here
    finally:  # a hang fails the test and leaves nothing running
        for pid in worker_pids(proc.pid).values() if proc.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "Stopped by SIGTERM" in out
    stopped = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)["progress"]
    assert stopped["epoch"] <= 1  # stopped where it was told, far from its 20 epochs
    cont = cli("--continue", str(tmp_path / "m.last.pt"), "--epochs", "2")
    assert cont.returncode == 0, cont.stderr


def test_nonfinite_intervals_are_logged_as_such(corpus_dir, tmp_path):
    result = cli("--data", corpus_dir, "--save", str(tmp_path / "m.pt"), "--epochs", "2", *SMALL,
                 "--optimizer", "sgd", "--lr", "1e30", "--warmup", "1", "--clip", "0",
                 "--max-nonfinite", "5", "--log-interval", "5")
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if line.startswith("| epoch")]
    assert lines and "loss   nan" in lines[-1] and "non-finite losses 5" in lines[-1]
    assert not any("ppl     1.00" in line for line in lines)


@pytest.mark.slow
def test_stale_temporaries_are_removed_and_files_follow_the_umask(corpus_dir, tmp_path):
    stale = tmp_path / "m.last.pt.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.abcd1234.tmp"  # not ours: kept
    other.write_bytes(b"x")
    old = os.umask(0o027)
    try:
        result = cli("--data", corpus_dir, "--save", str(tmp_path / "m.pt"), "--epochs", "1", *SMALL)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and other.exists()
    for name in ("m.pt", "m.last.pt", os.path.join(os.path.basename(corpus_dir), "corpus.cache.pt")):
        path = tmp_path / name if not name.startswith(os.path.basename(corpus_dir)) else \
            os.path.join(corpus_dir, "corpus.cache.pt")
        assert os.stat(path).st_mode & 0o777 == 0o640, name


@pytest.mark.slow
def test_pickled_file_advice_is_safe_and_the_converter_needs_consent(corpus_dir, tmp_path):
    path = str(tmp_path / "ENWIK8.pt")
    torch.save([torch.nn.Linear(3, 2), None, None], path)
    refused = cli("--data", corpus_dir, "--eval-only", "--resume", path, *SMALL)
    assert refused.returncode == 2
    assert "weights_only=False" not in refused.stderr
    assert "trust" in refused.stderr and "runs any code" in refused.stderr
    convert = [sys.executable, os.path.join(ROOT, "checkpoint.py"), "convert-pickle", path]
    without = subprocess.run(convert, capture_output=True, text=True, timeout=120)
    assert without.returncode == 2 and not os.path.exists(path + ".state_dict.pt")
    done = subprocess.run(convert + ["--trust-this-file"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = torch.load(path + ".state_dict.pt", weights_only=True)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 3)
    again = subprocess.run(convert + ["--trust-this-file"], capture_output=True, text=True,
                           timeout=120)  # the converter has no --overwrite: none is advised
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "exists; choose a new path" in again.stderr and "--overwrite" not in again.stderr
