"""A newcomer's second hour: every run setting follows a checkpoint, a Settings line that
shows the model, README commands and printed hints that work outside the environment,
dry runs that say what they do, word-level corpora in bits per token, and the small
things (an Outputs line that names only written files, a publishable model folder, the
.raw copies, a next step after --gpu-check, no flag abbreviations, the README's numbers)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import budget
import export
import flags
import main
import outputs
import prepare
from conftest import ROOT, SMALL, run_cli, sentences, write_corpus


def line_of(out, start):
    return next(line for line in out.splitlines() if line.startswith(start))


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


def test_every_flag_is_a_model_flag_a_run_setting_the_schedule_or_the_commands_own():
    """--resume and --eval-only take every run setting a checkpoint recorded: a new flag
    must say which kind it is."""
    kinds = [set(flags.MODEL_FLAGS) | {"adaptive_softmax"}, set(flags.RUN_SETTINGS),
             set(flags.SCHEDULE), set(flags.OWN)]
    dests = {a.dest for a in flags.build_parser()._actions if a.dest != "help"}
    assert set().union(*kinds) == dests
    assert sum(map(len, kinds)) == len(dests)  # each flag of one kind only


def test_settings_line_shows_the_model_seed_and_threads_and_hides_what_is_off():
    args, _, sources, _ = flags.resolve_flags(["--recipe", "cpu-small"], lambda args: None)
    line = flags.settings_line(args, sources)
    for shown in ("--emsize 192 [recipe cpu-small]", "--nhid 384 [recipe cpu-small]",
                  "--nlayers 2 [recipe cpu-small]", "--attn-layers 0 [default]",
                  "--mem-len 256 [recipe cpu-small]", "--seed 5512 [default]",
                  "--threads 1 [recipe cpu-small]", "--dropout 0.0 [recipe cpu-small]"):
        assert shown in line, shown
    assert "None" not in line and "--budget" not in line and "--dropoute" not in line
    args, _, sources, _ = flags.resolve_flags(["--attn-layers", "none", "--adaptive-softmax"],
                                              lambda args: None)
    line = flags.settings_line(args, sources)
    assert "--attn-layers none [given]" in line and "--adaptive-softmax [given]" in line
    assert "--threads" not in line and "--max-steps" not in line  # None: torch's, no limit
