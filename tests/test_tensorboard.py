"""--tensorboard: the run's scalars as TensorBoard events, read back with tensorboard's own
reader; a continued run extends the same curves without a jump or a duplicate."""

import os
import sys

import pytest

import training
from conftest import SMALL, run_cli

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder):
    """{tag: [(step, value)]} of the events in a folder."""
    events = event_accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def test_scalars_by_step_and_a_continued_run_extends_the_same_curves(corpus_dir, tmp_path, capsys,
                                                                      monkeypatch):
    flags = ["--data", corpus_dir, *SMALL, "--epochs", "2", "--log-interval", "5",
             "--max-steps", "60"]
    code, out, err = run_cli(capsys, *flags, "--save", str(tmp_path / "a.pt"),
                             "--tensorboard", str(tmp_path / "tb-a"))
    assert code == 0, err
    whole = scalars(tmp_path / "tb-a")
    assert set(whole) == {"train/loss", "train/bpc", "train/lr", "train/grad_norm",
                          "train/tokens_per_s", "valid/loss", "valid/bpc", "test/loss", "test/bpc"}
    assert [s for s, _ in whole["train/lr"]] == list(range(5, 61, 5))
    assert [s for s, _ in whole["test/bpc"]] == [60]
    assert all(v > 0 for _, v in whole["train/grad_norm"])

    # The same run, crashed at step 33 after its last checkpoint at step 28 (every 7 steps).
    real, calls = training.train_step, []

    def crash(*args):
        calls.append(1)
        if len(calls) > 33:
            raise RuntimeError("the machine went away")
        return real(*args)

    monkeypatch.setattr(training, "train_step", crash)
    with pytest.raises(RuntimeError):
        run_cli(capsys, *flags, "--save", str(tmp_path / "b.pt"), "--save-interval", "7",
                "--tensorboard", str(tmp_path / "tb-b"))
    capsys.readouterr()
    assert [s for s, _ in scalars(tmp_path / "tb-b")["train/lr"]] == list(range(5, 31, 5))
    monkeypatch.setattr(training, "train_step", real)
    code, out, err = run_cli(capsys, "--continue", str(tmp_path / "b.last.pt"))
    assert code == 0, err
    continued = scalars(tmp_path / "tb-b")
    for tag in ("train/lr", "valid/bpc", "test/bpc"):  # steps and values, once each
        assert [s for s, _ in continued[tag]] == [s for s, _ in whole[tag]], tag
        assert [v for _, v in continued[tag]] == pytest.approx([v for _, v in whole[tag]]), tag
    steps = [s for s, _ in continued["train/loss"]]
    assert steps == [s for s, _ in whole["train/loss"]]


def test_tensorboard_is_optional_and_says_how_to_install(corpus_dir, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, out, err = run_cli(capsys, "--data", corpus_dir, *SMALL, "--save", str(tmp_path / "m.pt"),
                             "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and err.count("\n") == 1 and "pip install tensorboard" in err
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "tb").exists()


class BrokenImport:
    """A finder under which torch.utils.tensorboard fails to import, as with a protobuf of
    another version."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch.utils.tensorboard":
            raise TypeError("Descriptors cannot be created directly.")
        return None


def test_a_tensorboard_that_does_not_import_is_one_line_before_any_record(corpus_dir, tmp_path,
                                                                          capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenImport()] + sys.meta_path)
    code, out, err = run_cli(capsys, "--data", corpus_dir, *SMALL, "--save", str(tmp_path / "m.pt"),
                             "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "does not import (TypeError: Descriptors cannot be created directly.)" in err
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no records, no checkpoint, no events
