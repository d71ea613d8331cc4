"""Model folders (model.safetensors + config.json): export.py writes them; main.py,
generate.py and export.py read them as they read a checkpoint, with the same numbers, and
never unpickle anything to do so."""

import contextlib
import io
import json
import os
import pickle
import re

import pytest
import torch

import checkpoint
import export
import generate
import main
from conftest import SMALL, run_cli, sentences, write_corpus
from model import model_from_checkpoint

safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained checkpoint and its model folder."""
    tmp = tmp_path_factory.mktemp("folder")
    data = write_corpus(tmp / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    save, folder = str(tmp / "m.pt"), str(tmp / "m-model")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main.main(["--data", data, "--save", save, *SMALL, "--bptt", "24",
                          "--epochs", "1"]) == 0
        assert export.main(["--checkpoint", save, "--format", "safetensors",
                            "--output", folder]) == 0
    return tmp, data, save, folder


def test_the_folder_holds_the_weights_and_a_description(exported):
    _, _, save, folder = exported
    ckpt = torch.load(save, weights_only=True)
    with open(os.path.join(folder, "config.json")) as f:
        description = json.load(f)
    assert description["format"] == "sha-rnn" and description["format_version"] == 1
    assert description["config"] == ckpt["config"] and description["vocab"] == ckpt["vocab"]
    summary = description["summary"]
    assert summary["corpus"] == ckpt["corpus"] and summary["steps"] == ckpt["metrics"]["steps"] > 0
    assert summary["valid_bpc"] == ckpt["metrics"]["valid_bpc"]
    assert summary["test_bpc"] == ckpt["metrics"]["test_bpc"] > 0  # the run's own test
    tensors = safetensors.load_file(os.path.join(folder, "model.safetensors"))
    assert set(tensors) == set(ckpt["model"]) - {"decoder.weight"}  # tied: stored once
    for name, value in tensors.items():
        assert torch.equal(value, ckpt["model"][name]), name


def test_loading_a_folder_never_unpickles(exported, monkeypatch):
    _, _, save, folder = exported

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling while loading a model folder")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded = checkpoint.load_checkpoint(folder)
    model = model_from_checkpoint(loaded)
    assert model.decoder.weight is model.encoder.weight
    monkeypatch.undo()
    for name, value in torch.load(save, weights_only=True)["model"].items():
        assert torch.equal(loaded["model"][name], value), name


def test_a_folder_gives_the_numbers_and_samples_of_its_checkpoint(exported, capsys):
    tmp, _, save, folder = exported
    results = []
    for source in (save, folder):
        code, out, err = run_cli(capsys, "--eval-only", "--resume", source, "--no-progress")
        assert code == 0, err
        results.append(re.findall(r"(valid|test) bpc +([\d.]+)", out))
        assert generate.main(["--checkpoint", source, "--prime", "the cat", "--length", "60",
                              "--seed", "3"]) == 0
        results.append(capsys.readouterr().out)
    assert results[0] == results[2] and results[1] == results[3]
    assert "--bptt 24 [checkpoint]" in out  # the run settings travel in config.json too


@pytest.mark.slow
def test_a_folder_resumes_training_and_exports_to_onnx(exported, capsys):
    tmp, _, _, folder = exported
    code, out, err = run_cli(capsys, "--resume", folder, "--save", str(tmp / "again.pt"),
                             "--max-steps", "3", "--no-progress")
    assert code == 0, err
    assert "| End of training |" in out
    pytest.importorskip("onnxruntime")
    assert export.main(["--checkpoint", folder, "--output", str(tmp / "m.onnx")]) == 0
    assert "onnxruntime matches torch" in capsys.readouterr().out


def test_exporting_over_a_folder_needs_overwrite(exported, capsys):
    _, _, save, folder = exported
    before = open(os.path.join(folder, "config.json")).read()
    assert export.main(["--checkpoint", save, "--format", "safetensors", "--output", folder]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert export.main(["--checkpoint", save, "--format", "safetensors", "--output", folder,
                        "--overwrite"]) == 0
    assert open(os.path.join(folder, "config.json")).read() == before
