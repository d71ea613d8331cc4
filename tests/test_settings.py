"""Through main.py's CLI: settings that follow the checkpoint (and say where each came
from), a named recipe that trains as its flag list does, and a finished run that says
where its outputs went and what comes next. flags.py's own tests are in test_flags.py."""

import json
import os
import re

import pytest
import torch

import outputs
from conftest import SMALL, line_of, run_cli


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def settings_line(out):
    """(flag, value, source) of each flag on the run's Settings line."""
    return re.findall(r"--([\w-]+) (\S+) \[([^\]]+)\]", line_of(out, "Settings: "))


def settings(out):
    return {flag: value for flag, value, _ in settings_line(out)}


def sources(out):
    return {flag: source for flag, _, source in settings_line(out)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run at bptt 24 and batch 4 with dropout, as a user's small run would be."""
    import contextlib
    import io

    from conftest import sentences, write_corpus
    import main
    tmp = tmp_path_factory.mktemp("settings")
    data = write_corpus(tmp / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    save = str(tmp / "m.pt")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main.main(["--data", data, "--save", save, *SMALL, "--bptt", "24",
                          "--dropout", "0.2", "--warmup", "30", "--epochs", "1"])
    assert code == 0
    return tmp, data, save, out.getvalue()


def bpc(out, name):
    return re.findall(rf"{name} bpc +([\d.]+)", out)[-1]


def test_eval_only_of_a_checkpoint_gives_the_numbers_its_training_printed(trained, capsys):
    _, _, save, trained_out = trained
    code, out, err = run_cli(capsys, "--eval-only", "--resume", save, "--no-progress")
    assert code == 0, err
    assert bpc(out, "valid") == bpc(trained_out, "valid")
    assert bpc(out, "test") == bpc(trained_out, "test")
    shown = settings(out)
    assert shown["bptt"] == "24" and sources(out)["bptt"] == "checkpoint"
    assert shown["batch_size"] == "4" and sources(out)["data"] == "checkpoint"


def test_resume_takes_the_run_settings_and_says_where_each_came_from(trained, capsys):
    tmp, _, save, _ = trained
    code, out, err = run_cli(capsys, "--resume", save, "--save", str(tmp / "ft.pt"),
                             "--max-steps", "5", "--lr", "1e-3", "--no-progress")
    assert code == 0, err
    shown, source = settings(out), sources(out)
    assert (shown["bptt"], shown["dropout"], shown["warmup"]) == ("24", "0.2", "30")
    assert source["bptt"] == source["dropout"] == source["warmup"] == "checkpoint"
    assert (shown["lr"], source["lr"]) == ("0.001", "given")
    assert (shown["max-steps"], source["max-steps"]) == ("5", "given")
    assert source["epochs"] == "default"  # the schedule comes from the checkpoint only whole
    records = metrics(str(tmp / "ft.run"))
    assert [r["step"] for r in records if r["type"] == "train"] == []  # log interval 50 > 5
    with open(tmp / "ft.run" / "args.json") as f:
        recorded = json.load(f)
    assert (recorded["bptt"], recorded["dropout"], recorded["max_steps"]) == (24, 0.2, 5)


def test_recipe_cpu_small_trains_exactly_like_its_flag_list(corpus_dir, tmp_path, capsys):
    spelled = ["--emsize", "192", "--nhid", "384", "--nlayers", "2", "--mem-len", "256",
               "--bptt", "64", "--batch_size", "16", "--dropout", "0", "--dropouth", "0",
               "--dropouti", "0", "--lr", "4e-3", "--warmup", "100", "--epochs", "4",
               "--max-steps", "1400", "--cooldown", "700", "--log-interval", "50",
               "--threads", "1"]
    short = ["--max-steps", "6", "--cooldown", "3", "--no-progress"]
    weights = []
    for name, recipe in (("a", ["--recipe", "cpu-small"]), ("b", spelled)):
        code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / f"{name}.pt"),
                                 *recipe, *short)
        assert code == 0, err
        weights.append(torch.load(str(tmp_path / f"{name}.last.pt"), weights_only=True)["model"])
        if name == "a":
            assert sources(out)["bptt"] == "recipe cpu-small" and sources(out)["max-steps"] == "given"
            with open(tmp_path / "a.run" / "args.json") as f:
                recorded = json.load(f)
            assert (recorded["recipe"], recorded["emsize"], recorded["max_steps"]) == ("cpu-small", 192, 6)
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


# --- outputs named, next steps said -------------------------------------------------------

def test_a_finished_run_says_so_on_continue_and_trains_further_when_asked(corpus_dir, tmp_path, capsys):
    save, last = tmp_path / "m.pt", tmp_path / "m.last.pt"
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), *SMALL,
                             "--max-steps", "20", "--epochs", "3")
    assert code == 0, err
    assert f"Outputs: best checkpoint {save}, last checkpoint {last} (to continue), run records " \
           f"{tmp_path / 'm.run'}/" in out.splitlines()
    assert out.splitlines()[-1] == ("Sample from the best checkpoint: "
                                    + outputs.sample_command({"save": str(save)}))
    before = open(last, "rb").read()
    code, out, err = run_cli(capsys, "--continue", str(last))
    assert code == 0, err
    assert "This run is finished" in out and "--continue" in out and "--max-steps 40" in out
    assert "| End of training |" not in out and open(last, "rb").read() == before
    code, out, err = run_cli(capsys, "--continue", str(last), "--max-steps", "30")
    assert code == 0, err
    assert "| End of training |" in out
    assert torch.load(str(last), weights_only=True)["progress"]["steps"] == 30

