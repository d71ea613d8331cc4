"""Crash-safe checkpoints, exact continuation, signals, non-finite guards, safe loading and
one-line errors for bad input (exit code 2, nothing overwritten)."""

import hashlib
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SMALL
import checkpoint
import outputs


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


# --- exact continuation ------------------------------------------------------------------

@pytest.mark.parametrize("stop_at", ["| epoch   1 |", "end of epoch   1"])
@pytest.mark.slow
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
    assert out.splitlines()[-1] == ("Stopped by SIGTERM; continue with: "
                                    + outputs.command(1, "--continue", tmp_path / "run.last.pt"))

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
    last = tmp_path / "m.last.pt"
    assert out.splitlines()[-1] == ("Stopped by Ctrl-C; continue with: "
                                    + outputs.command(1, "--continue", last))
    assert f"Outputs: best checkpoint {tmp_path / 'm.pt'}, last checkpoint {last}" in out
    assert outputs.sample_command({"save": str(tmp_path / "m.pt")}) in out
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
