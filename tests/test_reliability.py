"""Through main.py's CLI (and every script's on a full standard output): exact continuation
after SIGTERM, SIGINT's stop and test, non-finite guards, pickles refused without running
their code, the paper's second pass keeping the better checkpoint, and one-line errors
(exit code 2, nothing overwritten) when standard output fails. The atomic writer's own
tests are in test_utils.py."""

import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from conftest import (ROOT, SMALL, Boom, cli, digest, run_cli, sentences, start, wait_for,
                      write_corpus)
import checkpoint
import outputs


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


@pytest.mark.slow
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


# --- the paper's second pass -------------------------------------------------------------

def test_the_second_pass_replaces_its_save_only_with_a_better_validation(corpus_dir, tmp_path,
                                                                        capsys):
    """--resume X --save X: the best to beat is X's recorded validation on the same valid
    split, so a ruined epoch (lr 100) keeps X, byte for byte (its test, measured again at
    another bptt, is not written into it), and says so in one line; on another valid split
    X's number does not count and the first validation replaces it."""
    save = tmp_path / "m.pt"
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL,
                           "--epochs", "1")
    assert code == 0, err
    first = digest(save)
    ruin = ["--save", str(save), "--resume", str(save), *SMALL, "--epochs", "1",
            "--max-steps", "20", "--lr", "100", "--warmup", "1", "--bptt", "20"]
    code, out, err = run_cli(capsys, "--data", corpus_dir, *ruin)
    assert code == 0, err
    assert digest(save) == first
    assert "Saving model" not in out
    kept = [line for line in out.splitlines() if line.startswith("Not saving")]
    assert len(kept) == 1 and kept[0].endswith(f"which {save} keeps"), out
    other = write_corpus(tmp_path / "other", sentences(600, 1), sentences(60, 7),
                         sentences(60, 3))
    code, out, err = run_cli(capsys, "--data", other, *ruin)
    assert code == 0, err
    assert "Saving model (new best validation)" in out and digest(save) != first


# --- standard output on a full device ----------------------------------------------------

def to_full_disk(script, *argv):
    """Run a script with its standard output on /dev/full, where every write fails."""
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)


@pytest.mark.slow
def test_a_full_standard_output_is_one_line_for_every_script(corpus_dir, tmp_path, capsys):
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", save, *SMALL, "--epochs", "1",
                           "--max-steps", "5")
    assert code == 0, err
    book = tmp_path / "book.txt"
    book.write_bytes(sentences(200, 4))
    runs = {"main": to_full_disk("main.py", "--data", corpus_dir, "--save", str(tmp_path / "n.pt"),
                                 *SMALL, "--epochs", "1"),
            "generate": to_full_disk("generate.py", "--checkpoint", save, "--length", "20"),
            "export": to_full_disk("export.py", "--checkpoint", save, "--format", "safetensors",
                                   "--output", str(tmp_path / "m-model")),
            "prepare": to_full_disk("prepare.py", "text", str(book), str(tmp_path / "corpus"))}
    for name, result in runs.items():
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert "cannot write standard output: No space left on device" in result.stderr, name
    assert not os.path.exists(tmp_path / "n.pt")  # stopped at its first line
    assert checkpoint.load_checkpoint(str(tmp_path / "m-model"))["kind"] == "sha-rnn"
    assert "the corpus in" in runs["prepare"].stderr
    assert sorted(os.listdir(tmp_path / "corpus")) == sorted(
        f"{split}.txt{raw}" for split in ("train", "valid", "test") for raw in ("", ".raw"))


def test_a_reader_gone_mid_run_stops_it_with_the_last_checkpoint_written(corpus_dir, tmp_path):
    proc = start("--data", corpus_dir, "--save", str(tmp_path / "m.pt"), *SMALL, "--epochs", "3",
                 "--log-interval", "5")
    wait_for(proc, "| epoch   1 |")
    proc.stdout.close()  # the next log line meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cannot write standard output: Broken pipe; training stopped")
    assert f"--continue {tmp_path / 'm.last.pt'}" in err
    assert checkpoint.load_checkpoint(str(tmp_path / "m.last.pt"))["progress"]["steps"] > 0
