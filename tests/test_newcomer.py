"""A newcomer's first hour, through main.py's CLI: training on own text as the README says,
a dry run that checks the real paths, --threads, the data folder remembered by a
checkpoint, run records that keep every start, exact batch counts, a bad flag under
torchrun said once. Making own text a corpus is tested in test_prepare.py."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SMALL, cli, line_of, make_text_corpus, run_cli


@pytest.mark.slow
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
        model_line = line_of(result.stdout, "Model:")
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


@pytest.mark.slow
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
