"""checkpoint.py: what a last checkpoint keeps of where training stands (every field of
training.Progress but its carried state); a checkpoint of the first version, without the
progress fields added since, loads and continues; a checkpoint without a field every
version has, or written by a newer sha-rnn, is refused in one line that says why."""

import dataclasses

import pytest
import torch

import checkpoint
from conftest import SMALL, run_cli, tweaked
from flags import InputError
from training import Progress


@pytest.fixture
def run(capsys, corpus_dir, tmp_path):
    """(best, last): the checkpoints of a tiny run of a few steps."""
    best, last = str(tmp_path / "m.pt"), str(tmp_path / "m.last.pt")
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", best, *SMALL, "--max-steps", "5")
    assert code == 0, err
    return best, last


def refusal(path):
    """The message of the InputError that loading the checkpoint at `path` raises."""
    with pytest.raises(InputError) as refused:
        checkpoint.load_checkpoint(path)
    return str(refused.value)


def test_a_last_checkpoint_keeps_every_field_of_progress_but_the_carried_state(run):
    _, last = run
    fields = {f.name for f in dataclasses.fields(Progress)} - {"carry"}
    assert set(Progress().saved()) == fields
    assert set(checkpoint.PROGRESS) | set(checkpoint.PROGRESS_OPTIONAL) == fields
    assert set(torch.load(last, weights_only=True)["progress"]) == fields


def test_a_checkpoint_without_the_progress_fields_added_since_loads_and_continues(run, capsys):
    """A last checkpoint of the first version has no progress.tested and progress.replans:
    it loads, and --continue goes on from it with their defaults."""
    _, last = run

    def first_version(ckpt):
        del ckpt["progress"]["tested"], ckpt["progress"]["replans"]

    tweaked(last, last, first_version)
    loaded = checkpoint.load_checkpoint(last)
    assert loaded["kind"] == "sha-rnn" and loaded["progress"]["steps"] == 5
    code, out, err = run_cli(capsys, "--continue", last, "--max-steps", "8")
    assert code == 0, err
    assert "| End of training |" in out
    progress = torch.load(last, weights_only=True)["progress"]
    assert progress["steps"] == 8 and progress["tested"] and progress["replans"] == []


def test_a_checkpoint_without_progress_steps_is_refused_in_one_line_naming_it(run):
    _, last = run
    tweaked(last, last, lambda ckpt: ckpt["progress"].pop("steps"))
    message = refusal(last)
    assert len(message.splitlines()) == 1
    assert message == f"checkpoint {last}: progress.steps is missing"


def test_a_checkpoint_of_a_newer_version_is_refused_in_one_line(run):
    for path in run:  # the best checkpoint and the last
        tweaked(path, path, lambda ckpt: ckpt.update(version=checkpoint.VERSION + 1))
        message = refusal(path)
        assert len(message.splitlines()) == 1
        assert (f"checkpoint {path}: version {checkpoint.VERSION + 1} was written by a newer "
                f"sha-rnn") in message
