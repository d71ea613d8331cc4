"""A newcomer's first hour: own text in one command, honest dry runs, --threads, the data
folder remembered by a checkpoint, run records that keep every start, exact batch counts."""

import json
import os
import re
import subprocess
import sys

import pytest

import data
import prepare
from conftest import ROOT, SMALL, run_cli, sentences

TEXT = sentences(900, 5)  # about 37k bytes of English-like text


def make_text_corpus(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(TEXT)
    out = tmp_path / "book"
    assert prepare.main(["text", str(path), str(out)]) == 0
    return str(path), str(out)


def test_own_text_file_becomes_a_byte_corpus_split_in_order(tmp_path):
    _, out = make_text_corpus(tmp_path)
    raw = {split: open(os.path.join(out, f"{split}.txt.raw"), "rb").read() for split in data.SPLITS}
    held = int(len(TEXT) * 0.05)
    assert len(raw["valid"]) == len(raw["test"]) == held
    assert raw["train"] + raw["valid"] + raw["test"] == TEXT  # in order, nothing lost
    with open(os.path.join(out, "train.txt"), "rb") as f:
        assert f.read() == prepare.byte_format(raw["train"])
    corpus = data.Corpus(out, cache=False)
    assert corpus.byte_level
    assert data.decode_tokens(corpus.test, corpus.dictionary.idx2word, True) == raw["test"]


def test_three_named_splits_are_used_as_they_are_and_nothing_is_overwritten(tmp_path, capsys):
    files = []
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        (tmp_path / name).write_bytes(sentences(50, seed))
        files.append(str(tmp_path / name))
    out = str(tmp_path / "three")
    assert prepare.main(["text", "--train", files[0], "--valid", files[1], "--test", files[2],
                         out]) == 0
    for split, path in zip(data.SPLITS, files):
        assert open(os.path.join(out, f"{split}.txt.raw"), "rb").read() == open(path, "rb").read()
    before = open(os.path.join(out, "train.txt"), "rb").read()
    capsys.readouterr()
    assert prepare.main(["text", files[0], out]) == 2  # the folder holds a corpus already
    assert "exists" in capsys.readouterr().err
    assert open(os.path.join(out, "train.txt"), "rb").read() == before
    assert prepare.main(["text", "--train", files[0], "--valid", files[1], out + "2"]) == 2
    assert "--test" in capsys.readouterr().err


def test_readme_two_commands_train_on_own_text(tmp_path, capsys):
    path, out = make_text_corpus(tmp_path)
    code, stdout, err = run_cli(capsys, "--data", out, "--save", str(tmp_path / "book.pt"),
                                "--epochs", "1", *SMALL)
    assert code == 0, err
    assert "| End of training | test loss" in stdout


def test_dry_run_checks_the_real_paths(capsys, corpus_dir, tmp_path):
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "no" / "x.pt"),
                           "--dry-run", *SMALL)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.slow
def test_threads_flag_sets_torch_threads_and_is_recorded(corpus_dir, tmp_path):
    """torch would start 2 threads here (OMP_NUM_THREADS=2); --threads 1 wins and is recorded."""
    for flags, expected in ((["--dry-run"], 2), (["--threads", "1", "--epochs", "1"], 1)):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--data", corpus_dir,
                                 "--save", str(tmp_path / "m.pt"), *SMALL, *flags],
                                capture_output=True, text=True, timeout=300,
                                env=dict(os.environ, OMP_NUM_THREADS="2"))
        assert result.returncode == 0, result.stderr
        model_line = next(line for line in result.stdout.splitlines() if line.startswith("Model:"))
        assert f", threads {expected}" in model_line
    env = json.loads((tmp_path / "m.run" / "env.json").read_text())
    assert env["cpu_threads"] == 1
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--threads", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--threads" in result.stderr


def test_eval_only_and_resume_take_the_data_folder_from_the_checkpoint(capsys, corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)
    assert code == 0, err
    code, out, err = run_cli(capsys, "--eval-only", "--resume", save, "--no-progress")
    assert code == 0, err
    assert out.count("| eval only |") == 2
    code, _, err = run_cli(capsys, "--eval-only", "--resume", save, "--data", str(tmp_path / "nope"))
    assert code == 2 and "nope" in err  # a given --data still wins


def test_log_counts_the_epochs_real_batches(capsys, corpus_dir, tmp_path):
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"),
                             "--epochs", "2", *SMALL, "--log-interval", "1")
    assert code == 0, err
    for epoch in (1, 2):
        done = [(int(a), int(b)) for a, b in
                re.findall(rf"\| epoch +{epoch} \| +(\d+)/ *(\d+) batches", out)]
        assert [a for a, _ in done] == list(range(1, len(done) + 1))
        assert {b for _, b in done} == {len(done)}  # the count logged is the one reached


@pytest.mark.slow
def test_continue_keeps_a_record_of_every_start(corpus_dir, tmp_path):
    def cli(*argv):
        return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv],
                              capture_output=True, text=True, timeout=300)

    first = cli("--data", corpus_dir, "--save", str(tmp_path / "m.pt"), "--epochs", "1", *SMALL)
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "m.run"
    args = (folder / "args.json").read_text()
    env = (folder / "env.json").read_text()
    for epochs in ("2", "3"):
        cont = cli("--continue", str(tmp_path / "m.last.pt"), "--epochs", epochs)
        assert cont.returncode == 0, cont.stderr
    assert (folder / "args.json").read_text() == args and (folder / "env.json").read_text() == env
    starts = [json.loads(line) for line in (folder / "continues.jsonl").read_text().splitlines()]
    assert [s["args"]["epochs"] for s in starts] == [2, 3]
    assert all(s["env"]["argv"][-2:] == ["--epochs", e] for s, e in zip(starts, ("2", "3")))


@pytest.mark.slow
def test_bad_flag_under_torchrun_is_printed_by_rank_0_only():
    for rank, lines in (("0", 1), ("1", 0)):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--bptt", "x"],
                                capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, RANK=rank, WORLD_SIZE="2"))
        assert result.returncode == 2 and result.stderr.count("\n") == lines, rank
