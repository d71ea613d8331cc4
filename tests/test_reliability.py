"""Crash-safe checkpoints, exact continuation, signals, non-finite guards, safe loading and
one-line errors for bad input (exit code 2, nothing overwritten)."""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SMALL, sentences, write_corpus
import checkpoint


def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv],
                          capture_output=True, text=True, timeout=timeout)


def start(*argv):
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "main.py"), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, text):
    """Read the process's stdout until a line containing `text`; returns all lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)}\n{proc.stderr.read()}")


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- atomic writes -----------------------------------------------------------------------

def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.atomic_save({"a": torch.ones(3)}, path)
    before = digest(path)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        checkpoint.atomic_save({"a": torch.zeros(3)}, path)
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_kill_9_at_any_moment_leaves_loadable_checkpoints(corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    last = str(tmp_path / "m.last.pt")
    for delay in (0.0, 0.13, 0.41):
        proc = start("--data", corpus_dir, "--save", save, "--epochs", "50", *SMALL,
                     "--save-interval", "1", "--log-interval", "10")
        wait_for(proc, "Saving model" if delay == 0.0 else "| epoch")
        time.sleep(delay)
        proc.kill()  # SIGKILL, typically in the middle of writing m.last.pt
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        for path in (save, last):
            ckpt = checkpoint.load_checkpoint(path)
            assert ckpt["kind"] == "sha-rnn" and "encoder.weight" in ckpt["model"]


# --- exact continuation ------------------------------------------------------------------

@pytest.mark.parametrize("stop_at", ["| epoch   1 |", "end of epoch   1"])
def test_continue_after_sigterm_ends_with_the_weights_of_an_uninterrupted_run(corpus_dir, tmp_path, stop_at):
    flags = ["--data", corpus_dir, "--epochs", "3", *SMALL, "--dropouth", "0.2", "--wdrop", "0.1",
             "--accumulate", "2"]
    ref = cli(*flags, "--save", str(tmp_path / "ref.pt"))
    assert ref.returncode == 0, ref.stderr

    save = str(tmp_path / "run.pt")
    proc = start(*flags, "--save", save)
    wait_for(proc, stop_at)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Stopped by SIGTERM" in out and "End of training" not in out

    cont = cli("--continue", str(tmp_path / "run.last.pt"))
    assert cont.returncode == 0, cont.stderr
    assert "End of training" in cont.stdout
    a = torch.load(str(tmp_path / "ref.last.pt"), weights_only=True)
    b = torch.load(str(tmp_path / "run.last.pt"), weights_only=True)
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("best_val", "steps", "tokens", "val_history"):
        assert a["progress"][key] == b["progress"][key], key
    # The continued run appended to the same run records.
    with open(str(tmp_path / "run.run" / "log.txt")) as f:
        log = f.read()
    assert log.count("end of epoch") == 3


def test_sigint_stops_then_tests_the_best_checkpoint(corpus_dir, tmp_path):
    proc = start("--data", corpus_dir, "--save", str(tmp_path / "m.pt"), "--epochs", "50", *SMALL)
    wait_for(proc, "Saving model (new best validation)")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Exiting from training early" in out
    assert "| End of training | test loss" in out
    assert out.splitlines()[-1] == f"Stopped by Ctrl-C; continue with --continue {tmp_path / 'm.last.pt'}"
    assert os.path.exists(str(tmp_path / "m.last.pt"))
    assert "Traceback" not in err


# --- non-finite losses -------------------------------------------------------------------

def test_consecutive_nonfinite_losses_stop_the_run_without_saving_bad_weights(corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    result = cli("--data", corpus_dir, "--save", save, "--epochs", "2", *SMALL,
                 "--optimizer", "sgd", "--lr", "1e30", "--warmup", "1", "--clip", "0",
                 "--max-nonfinite", "5", "--log-interval", "5")
    assert result.returncode == 1
    assert "consecutive non-finite losses" in result.stdout
    assert not os.path.exists(save)
    # Steps with non-finite gradients are skipped, so the weights stay finite and the last
    # checkpoint is written on the way out; it must hold those finite weights.
    model = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in model.values())


# --- safe loading ------------------------------------------------------------------------

class Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_crafted_pickle_does_not_run_code(corpus_dir, tmp_path):
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil.pt")
    torch.save({"model": Boom(str(marker))}, evil)
    with open(str(tmp_path / "evil.pkl"), "wb") as f:
        pickle.dump(Boom(str(marker)), f)
    for path in (evil, str(tmp_path / "evil.pkl")):
        result = cli("--data", corpus_dir, "--eval-only", "--resume", path, *SMALL)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


class SHARNN(torch.nn.Module):
    """Stands in for the original's pickled model class."""


def test_pickled_model_file_is_refused_with_conversion_advice(corpus_dir, tmp_path):
    path = str(tmp_path / "ENWIK8.pt")
    torch.save([SHARNN(), None, None], path)  # the original's [model, criterion, optimizer]
    result = cli("--data", corpus_dir, "--eval-only", "--resume", path, *SMALL)
    assert result.returncode == 2
    assert "pickled" in result.stderr and "state_dict" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- bad input: one line, exit 2, nothing overwritten ------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A corpus and a checkpoint trained on it, shared by the bad-input cases."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_corpus(tmp / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    save = str(tmp / "good.pt")
    result = cli("--data", data, "--save", save, "--epochs", "1", *SMALL)
    assert result.returncode == 0, result.stderr
    return data, save


def bad_cases(corpus_dir, tmp_path, trained):
    other = write_corpus(tmp_path / "other", sentences(50, 1, words=["zebra", "quokka"]),
                         sentences(5, 2, words=["zebra"]), sentences(5, 3, words=["quokka"]))
    empty = write_corpus(tmp_path / "empty", sentences(50, 1), b"", sentences(5, 3))
    unseen = write_corpus(tmp_path / "unseen", sentences(50, 1), sentences(5, 2), b"~~~\n")
    no_test = write_corpus(tmp_path / "notest", sentences(50, 1), sentences(5, 2), sentences(5, 3))
    os.remove(os.path.join(no_test, "test.txt"))
    truncated = str(tmp_path / "truncated.pt")
    with open(trained, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    corrupt = str(tmp_path / "corrupt.pt")
    with open(corrupt, "wb") as f:
        f.write(b"\x00garbage" * 100)
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere but in sysfs
        readonly = "/sys"
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a checkpoint\n")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 7)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    folder = tmp_path / "afolder"
    folder.mkdir()
    records = tmp_path / "records"
    records.mkdir()
    (records / "log.txt").write_text("another run\n")
    (tmp_path / "rd").mkdir()
    save = ["--save", str(tmp_path / "new.pt")]
    last = ["--last", str(tmp_path / "new.last.pt")]
    pickled = str(tmp_path / "model.pt")
    torch.save([torch.nn.Linear(2, 2), None, None], pickled)
    return {
        "missing data folder": (["--data", str(tmp_path / "nope")], "nope"),
        "missing split file": (["--data", no_test], "test.txt"),
        "empty split": (["--data", empty], "valid.txt"),
        "unseen token": (["--data", unseen], "'126'"),
        "bptt below 5": (["--data", corpus_dir, "--bptt", "4"], "--bptt"),
        "bptt larger than the data": (["--data", corpus_dir, "--bptt", "100000"], "--bptt"),
        "batch larger than the data": (["--data", corpus_dir, "--batch_size", "10000000"], "batch"),
        "unknown optimizer": (["--data", corpus_dir, "--optimizer", "rmsprop"], "--optimizer"),
        "resume path missing": (["--data", corpus_dir, "--resume", str(tmp_path / "x.pt")], "x.pt"),
        "truncated checkpoint": (["--data", corpus_dir, "--resume", truncated], "truncated"),
        "corrupt checkpoint": (["--data", corpus_dir, "--resume", corrupt], "corrupt"),
        "vocabulary mismatch": (["--data", other, "--resume", trained], "vocabulary"),
        "sizes contradict the checkpoint": (["--data", corpus_dir, "--resume", trained,
                                             "--emsize", "32"], "--emsize 32"),
        "unwritable save location": (["--data", corpus_dir, "--save",
                                      os.path.join(readonly, "m.pt")], "cannot write"),
        "save is a split file": (["--data", corpus_dir, "--save",
                                  os.path.join(corpus_dir, "train.txt")], "file of the corpus"),
        "last is a split file": (["--data", corpus_dir, *save, "--last",
                                  os.path.join(corpus_dir, "valid.txt")], "file of the corpus"),
        "last is the save file": (["--data", corpus_dir, *save, "--last", save[1]], "same file"),
        "save is a folder": (["--data", corpus_dir, "--save", str(folder)], "folder"),
        "save is empty": (["--data", corpus_dir, "--save", ""], "--save"),
        "run dir is a file": (["--data", corpus_dir, *save, "--run-dir", str(a_file)], "--run-dir"),
        "run dir holds another run": (["--data", corpus_dir, *save, "--run-dir", str(records)],
                                      "another run"),
        "run dir file is the last": (["--data", corpus_dir, *save, "--run-dir", str(tmp_path / "rd"),
                                      "--last", str(tmp_path / "rd" / "log.txt")], "same file"),
        "resume a text file": (["--data", corpus_dir, *save, "--resume", str(text)], "not a torch"),
        "resume random bytes": (["--data", corpus_dir, *save, "--resume", str(noise)], "not a torch"),
        "resume a pickle": (["--data", corpus_dir, *save, "--resume", pickled], "trust"),
        "lr nan": (["--data", corpus_dir, *save, "--lr", "nan"], "--lr"),
        "lr inf": (["--data", corpus_dir, *save, "--lr", "inf"], "--lr"),
        "negative wdecay": (["--data", corpus_dir, *save, "--wdecay", "-1"], "--wdecay"),
        "negative seed": (["--data", corpus_dir, *save, "--seed", "-1"], "--seed"),
        "seed beyond 32 bits": (["--data", corpus_dir, *save, "--seed", "8589934592"], "--seed"),
        "negative clip": (["--data", corpus_dir, *save, "--clip", "-0.5"], "--clip"),
        "negative cooldown": (["--data", corpus_dir, *save, "--cooldown", "-3"], "--cooldown"),
        "negative nonmono": (["--data", corpus_dir, *save, "--nonmono", "-1"], "--nonmono"),
        "no dynamic statistics": (["--data", corpus_dir, *save, "--dyn-stat-batches", "0"],
                                  "--dyn-stat-batches"),
        "zero threads": (["--data", corpus_dir, *save, "--threads", "0"], "--threads"),
        "zero max steps": (["--data", corpus_dir, *save, "--max-steps", "0"], "--max-steps"),
        "model beyond memory": (["--data", corpus_dir, *save, *last, "--emsize", "200000",
                                 "--nhid", "200000"], "does not fit in memory"),
    }


CASES = ["missing data folder", "missing split file", "empty split", "unseen token",
         "bptt below 5", "bptt larger than the data", "batch larger than the data",
         "unknown optimizer", "resume path missing", "truncated checkpoint", "corrupt checkpoint",
         "vocabulary mismatch", "sizes contradict the checkpoint", "unwritable save location",
         "save is a split file", "last is a split file", "last is the save file",
         "save is a folder", "save is empty", "run dir is a file", "run dir holds another run",
         "run dir file is the last", "resume a text file", "resume random bytes",
         "resume a pickle", "lr nan", "lr inf", "negative wdecay", "negative seed",
         "seed beyond 32 bits", "negative clip", "negative cooldown", "negative nonmono",
         "no dynamic statistics", "zero threads", "zero max steps", "model beyond memory"]


def checksums(*folders):
    """{path: sha256} of every file under the folders."""
    sums = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                sums[os.path.join(root, name)] = digest(os.path.join(root, name))
    return sums


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(case, tmp_path, trained):
    corpus_dir, trained = trained
    argv, needle = bad_cases(corpus_dir, tmp_path, trained)[case]
    before = checksums(tmp_path, os.path.dirname(trained))
    flags = [f for f in SMALL]
    result = cli(*flags, "--save", trained, *argv) if "--save" not in argv else cli(*flags, *argv)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert needle in lines[0], lines[0]
    assert checksums(tmp_path, os.path.dirname(trained)) == before
