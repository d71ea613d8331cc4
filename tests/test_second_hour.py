"""A newcomer's second hour, through main.py's CLI: the run settings a checkpoint carries
(a recipe's threads), the README's commands and the printed hint run where `python` is not
the environment's, an Outputs line that names only written files, dry runs that say what
they do, word-level corpora in bits per token, a publishable model folder; and what the
README says of the word format, the .raw copies and the budget's timed steps. Units once
here are in test_flags.py, test_outputs.py, test_prepare.py and test_gpu_check.py."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

import budget
import export
import main
import prepare
from conftest import ROOT, SMALL, line_of, run_cli, sentences, write_corpus


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def readme_section(title):
    text = readme()
    start = text.index(f"## {title}\n")
    return text[start: text.index("\n## ", start + 1)]


# --- settings that follow the checkpoint -------------------------------------------------

@pytest.fixture(scope="module")
def cpu_small(tmp_path_factory):
    """A checkpoint of the cpu-small recipe (one thread), trained for a few steps."""
    import contextlib
    import io
    tmp = tmp_path_factory.mktemp("cpu-small")
    data = write_corpus(tmp / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    save = str(tmp / "small.pt")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main.main(["--recipe", "cpu-small", "--data", data, "--save", save,
                          "--max-steps", "2", "--no-progress"]) == 0
    return tmp, save


def test_eval_only_of_a_cpu_small_checkpoint_runs_with_its_threads(cpu_small, capsys):
    """torch would run 2 threads here; the checkpoint's --threads 1 (the recipe's) wins
    unless --threads is given, and the recipe's name comes along."""
    tmp, save = cpu_small
    try:
        torch.set_num_threads(2)
        code, out, err = run_cli(capsys, "--eval-only", "--resume", save, "--no-progress")
        assert code == 0, err
        assert ", threads 1," in line_of(out, "Model:")
        settings = line_of(out, "Settings:")
        assert "--threads 1 [checkpoint]" in settings
        assert "--recipe cpu-small [checkpoint]" in settings
        torch.set_num_threads(2)
        code, out, err = run_cli(capsys, "--eval-only", "--resume", save, "--no-progress",
                                 "--threads", "2")
        assert code == 0, err
        assert ", threads 2," in line_of(out, "Model:")
        torch.set_num_threads(2)
        code, out, err = run_cli(capsys, "--resume", save, "--save", str(tmp / "again.pt"),
                                 "--max-steps", "1", "--no-progress")
        assert code == 0, err
        assert ", threads 1," in line_of(out, "Model:")
    finally:
        torch.set_num_threads(1)
    with open(tmp / "again.run" / "args.json") as f:
        recorded = json.load(f)
    assert (recorded["recipe"], recorded["threads"]) == ("cpu-small", 1)


# --- commands and printed hints that work outside the environment -----------------------

@pytest.mark.slow
def test_the_readme_own_text_commands_run_where_python_is_not_the_venvs(tmp_path):
    """The README's own-text block, as written, in a shell whose `python` fails; only the
    file names are pointed at a tiny text, and the run is cut to a few steps. Then the
    sampling hint the run printed, as printed."""
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(venv):
        pytest.skip("no .venv in this clone (make demo or make test makes it)")
    block = re.search(r"```bash\n(.*?)```", readme_section("Your own text"), re.S).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(lines) == 3 and all(line.startswith(".venv/bin/python ") for line in lines)
    (tmp_path / "mybook.txt").write_bytes(b"Once upon a time.\n" * 20 + sentences(700, 4))
    names = {"mybook.txt": tmp_path / "mybook.txt", "data/mybook": tmp_path / "mybook",
             "mybook.pt": tmp_path / "mybook.pt"}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho 'not the environment' >&2\nexit 127\n")
        (bin_dir / name).chmod(0o755)
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if ".venv" not in d and os.path.dirname(sys.executable) != d]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join([str(bin_dir), *path])

    def shell(command):
        result = subprocess.run(["sh", "-c", command], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        return result.stdout

    assert "not the environment" in subprocess.run(
        ["sh", "-c", "python -c 1"], env=env, capture_output=True, text=True).stderr
    outs = []
    for line in lines:
        argv = [str(names.get(word, word)) for word in shlex.split(line)]
        if "main.py" in argv:
            argv += ["--max-steps", "3", "--no-progress"]
        if "generate.py" in argv:
            argv[argv.index("--length") + 1] = "20"
        outs.append(shell(shlex.join(argv)))
    hint = line_of(outs[1], "Sample from the best checkpoint: ").split(": ", 1)[1]
    assert hint.startswith(".venv/bin/python generate.py ")
    assert shell(hint)


def test_a_run_stopped_before_any_validation_names_no_best_checkpoint(
        corpus_dir, tmp_path, capsys, monkeypatch):
    real_log_train = main.log_train

    def log_train(*args):
        real_log_train(*args)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(main, "log_train", log_train)
    save = tmp_path / "m.pt"
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL,
                             "--log-interval", "2")
    assert code == 0, err
    assert "Exiting from training early" in out and not save.exists()
    assert f"best checkpoint {save}" not in out.split("Exiting from training early")[1]
    assert (f"Outputs: no best checkpoint (no validation finished), last checkpoint "
            f"{tmp_path / 'm.last.pt'} (to continue)") in out


# --- dry runs ----------------------------------------------------------------------------

def test_a_dry_run_logs_each_batch_and_a_stopped_one_prints_no_continue_command(
        corpus_dir, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"),
                             "--dry-run", *SMALL)
    assert code == 0, err
    assert "Dry run: 3 training batches of up to 16 x 4 tokens" in out
    assert re.findall(r"\| epoch   1 \| +(\d+)/", out) == ["1", "2", "3"]  # --log-interval 50 given
    folders = []
    real_mkdtemp, real_log_train = tempfile.mkdtemp, main.log_train

    def mkdtemp(**kwargs):
        folders.append(real_mkdtemp(**kwargs))
        return folders[-1]

    def log_train(*args):
        real_log_train(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(main, "log_train", log_train)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"),
                             "--dry-run", *SMALL)
    assert code == 0, err
    assert out.splitlines()[-1] == "Stopped by SIGTERM; a dry run keeps nothing to continue"
    assert "--continue" not in out and len(folders) == 1 and not os.path.exists(folders[0])


# --- word-level corpora --------------------------------------------------------------------

def test_a_word_corpus_from_own_text_reports_bits_per_token(tmp_path, capsys):
    text = sentences(900, 5)
    (tmp_path / "book.txt").write_bytes(text)
    out_dir = tmp_path / "words"
    assert prepare.main(["text", "--words", str(tmp_path / "book.txt"), str(out_dir)]) == 0
    printed = capsys.readouterr().out
    parts = {split: (out_dir / f"{split}.txt").read_bytes() for split in ("train", "valid", "test")}
    assert parts["train"] + parts["valid"] + parts["test"] == text  # copied, in order
    assert all(part.endswith(b"\n") for part in parts.values())  # cut at line starts
    held = len(text) * 0.05
    assert held <= len(parts["test"]) < held + 100 and held <= len(parts["valid"]) < held + 100
    assert not list(out_dir.glob("*.raw"))
    assert "--unk" not in printed and f"--data {out_dir}" in line_of(printed, "Next: ")
    code, out, err = run_cli(capsys, "--data", str(out_dir), "--save", str(tmp_path / "w.pt"),
                             "--dry-run", *SMALL)
    assert code == 0, err
    results = [line for line in out.splitlines() if line.startswith("| ")]
    assert any(re.search(r"\| valid bpt +[\d.]+", line) for line in results)
    assert any(re.search(r"\| test bpt +[\d.]+", line) for line in results)
    assert any(re.search(r"\| ppl +[\d.]+ \| bpt +[\d.]+", line) for line in results)
    assert not any("bpc" in line for line in results)


def test_a_byte_corpus_keeps_the_originals_bpc(corpus_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"),
                             "--dry-run", *SMALL)
    assert code == 0, err
    assert re.search(r"\| valid ppl +[\d.]+ \| valid bpc +[\d.]+", out)
    assert re.search(r"\| test ppl +[\d.]+ \| test bpc +[\d.]+", out)
    assert re.search(r"\| ppl +[\d.]+ \| bpc +[\d.]+", out) and not re.search(r"\bbpt\b", out)


def test_the_readme_describes_the_word_format_and_the_raw_copies():
    section = readme_section("Your own text")
    assert "prepare.py text --words" in section and "`<eos>`" in section and "`bpt`" in section
    assert "train.txt.raw" in section and "nothing reads the `.raw` copies" in section


# --- the smaller things --------------------------------------------------------------------

def test_a_model_folder_keeps_no_paths_of_the_run_and_says_the_decoder_is_tied(
        corpus_dir, tmp_path, capsys):
    save, folder = tmp_path / "m.pt", tmp_path / "m-model"
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL,
                           "--max-steps", "2")
    assert code == 0, err
    assert export.main(["--checkpoint", str(save), "--format", "safetensors",
                        "--output", str(folder)]) == 0
    description = json.loads((folder / "config.json").read_text())
    assert description["tied"] == {"decoder.weight": "encoder.weight"}
    assert not {"save", "last", "run_dir", "tensorboard", "resume"} & set(description["args"])
    text = (folder / "config.json").read_text()
    assert str(tmp_path / "m") not in text
    assert description["args"]["data"] == corpus_dir  # --eval-only of the folder reads it


def test_the_readme_says_how_many_steps_the_budget_times_and_that_its_times_are_quiet():
    text = " ".join(readme().split())
    found = re.search(r"the run times its own step .*? over (\d+) steps after (\d+) untimed ones",
                      text)
    assert found and (int(found.group(1)), int(found.group(2))) == (budget.TIMED, budget.WARM)
    timing = re.search(r"On this project's 2-core Intel Xeon, (.*?)`make demo` takes about", text)
    assert timing and "quiet" in timing.group(1)
    assert "These times were measured on the quiet machine" in text
