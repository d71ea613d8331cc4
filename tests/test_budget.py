"""--budget: the run measures its step on a clock (here one the test drives), fixes its
steps, and from then on is exactly the run of --max-steps N --cooldown M."""

import itertools
import json
import os
import re
import signal

import pytest
import torch

import budget
import flags
import main
from conftest import SMALL, run_cli


@pytest.fixture
def ticking(monkeypatch):
    """A clock that advances 10 ms at each reading: every measurement is the same."""
    ticks = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: next(ticks) * 0.01)


def budget_line(out):
    return next(line for line in out.splitlines() if line.startswith("Budget "))


def test_the_budget_run_is_the_run_of_the_steps_it_chose(corpus_dir, tmp_path, capsys, ticking):
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "b.pt"),
                             *SMALL, "--budget", "0.5s")
    assert code == 0, err
    chosen = json.load(open(tmp_path / "b.run" / "args.json"))
    steps, cooldown, epochs = chosen["max_steps"], chosen["cooldown"], chosen["epochs"]
    assert chosen["budget"] == "0.5s" and steps > 50 and cooldown == round(0.2 * steps)
    line = budget_line(out)
    assert f"{steps:,} optimizer steps of 0.5 ms (measured over 20 steps)" in line
    assert f"--max-steps {steps} [budget 0.5s]" in out and f"--epochs {epochs} [budget 0.5s]" in out
    last = torch.load(str(tmp_path / "b.last.pt"), weights_only=True)
    assert last["progress"]["steps"] == steps

    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "r.pt"),
                             *SMALL, "--max-steps", str(steps), "--cooldown", str(cooldown),
                             "--epochs", str(epochs))
    assert code == 0, err
    reference = torch.load(str(tmp_path / "r.last.pt"), weights_only=True)
    for key, value in reference["model"].items():
        assert torch.equal(value, last["model"][key]), key  # measuring left no trace


def test_the_fit_pays_for_every_validation_and_the_test():
    measured = budget.Measured(step=0.1, valid=2.0, test=3.0)
    ends = lambda n: [40, 80, 120, 160][: max(1, -(-n // 40))]  # epochs of 40 steps  # noqa: E731
    steps = budget.fit(20.0, measured, ends)
    # 110 steps (11 s), validations at the epoch ends 40 and 80 and at step 110 (6 s), and the
    # test (3 s): 20 s; one step more would not fit.
    assert steps == 110
    validations = sum(1 for e in ends(steps) if e < steps) + 1
    assert steps * 0.1 + validations * 2.0 + 3.0 <= 20.0
    more = steps + 1
    assert more * 0.1 + (sum(1 for e in ends(more) if e < more) + 1) * 2.0 + 3.0 > 20.0


def test_a_continued_budget_run_ends_at_the_same_step_without_measuring(corpus_dir, tmp_path,
                                                                         capsys, monkeypatch, ticking):
    real, calls = main.train_step, []

    def stop_midway(*args):
        calls.append(1)
        if len(calls) == 100:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(main, "train_step", stop_midway)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "b.pt"),
                             *SMALL, "--budget", "0.5s", "--recipe", "cpu-small",
                             "--emsize", "16", "--nhid", "32", "--bptt", "16",
                             "--batch_size", "4", "--mem-len", "32", "--threads", "1")
    assert code == 0 and "Stopped by SIGTERM" in out, err
    chosen = json.load(open(tmp_path / "b.run" / "args.json"))
    assert chosen["cooldown"] == round(0.5 * chosen["max_steps"])  # cpu-small's share
    monkeypatch.setattr(main, "train_step", real)
    monkeypatch.setattr(budget, "measure", lambda *a: pytest.fail("measured again"))
    code, out, err = run_cli(capsys, "--continue", str(tmp_path / "b.last.pt"))
    assert code == 0, err
    assert "Budget " not in out and "| End of training |" in out
    last = torch.load(str(tmp_path / "b.last.pt"), weights_only=True)
    assert last["progress"]["steps"] == chosen["max_steps"]
    code, out, err = run_cli(capsys, "--continue", str(tmp_path / "b.last.pt"), "--budget", "1h")
    assert code == 2 and "--max-steps" in err and err.count("\n") == 1


def test_cpu_small_regularises_more_the_more_epochs_its_budget_covers():
    rule = flags.BUDGET_RULES["cpu-small"]["regularise"]
    assert flags.by_limit(rule, 4.2) == {}  # about 2 minutes on data/sample
    assert flags.by_limit(rule, 6.5)["dropout"] == 0.1 and flags.by_limit(rule, 6.5)["wdecay"] == 0.1
    assert flags.by_limit(rule, 25)["dropout"] == 0.2 and flags.by_limit(rule, 25)["wdrop"] == 0.3
    sizes = flags.BUDGET_RULES["cpu-small"]["size"]
    assert flags.by_limit(sizes, 120) == {} and flags.by_limit(sizes, 300)["emsize"] == 256


def test_budget_and_max_steps_exclude_each_other():
    with pytest.raises(flags.InputError, match="--budget"):
        flags.resolve_flags(["--budget", "5min", "--max-steps", "10"], lambda args: None)
    assert flags.budget_seconds("1.5h") == 5400 and flags.budget_seconds("90s") == 90
    assert flags.budget_seconds("5 min") is None and flags.budget_seconds("abc") is None
    assert flags.budget_seconds("24h") == 86400


def test_a_budget_that_covers_many_epochs_regularises_as_its_recipe_says(tmp_path, capsys, ticking):
    """cpu-small's rule: past 4 epochs of the data, the cheap dropouts and weight decay,
    set after the first measurement (which then runs again); the run is then that of the
    flags it recorded, from the first step."""
    from conftest import sentences, write_corpus
    data = write_corpus(tmp_path / "data", sentences(120, 1), sentences(30, 2), sentences(30, 3))
    tiny = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--mem-len", "32", "--bptt", "16",
            "--batch_size", "4", "--no-progress"]
    code, out, err = run_cli(capsys, "--data", data, "--save", str(tmp_path / "b.pt"),
                             "--recipe", "cpu-small", *tiny, "--budget", "2s")
    assert code == 0, err
    chosen = json.load(open(tmp_path / "b.run" / "args.json"))
    epochs = float(re.search(r"for ([\d.]+) epochs of data", out).group(1))
    expected = flags.by_limit(flags.BUDGET_RULES["cpu-small"]["regularise"], epochs)
    assert epochs > 5 and expected  # past cpu-small's first tier: regularised
    assert {k: chosen[k] for k in expected} == expected
    assert f"--dropout {expected['dropout']} [budget 2s]" in out
    flags_of_run = [x for k, v in expected.items() for x in (f"--{k}", str(v))]
    flags_of_run += ["--max-steps", str(chosen["max_steps"]), "--cooldown", str(chosen["cooldown"]),
                     "--epochs", str(chosen["epochs"])]
    code, out, err = run_cli(capsys, "--data", data, "--save", str(tmp_path / "r.pt"),
                             "--recipe", "cpu-small", *tiny, *flags_of_run)
    assert code == 0, err
    a = torch.load(str(tmp_path / "b.last.pt"), weights_only=True)["model"]
    b = torch.load(str(tmp_path / "r.last.pt"), weights_only=True)["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
