"""Beyond the original, through main.py's CLI: variants by flag (and --resume rebuilding
them), evaluation-only, --dynamic-eval, and the adaptive softmax on a word corpus. The units
of these features are in test_model.py and test_dyneval.py."""

import os
import random
import re

import pytest
import torch

from checkpoint import load_checkpoint
from conftest import SMALL, run_cli
from model import model_from_checkpoint


def tree(folder):
    return sorted((os.path.join(d, f), os.path.getmtime(os.path.join(d, f)))
                  for d, _, files in os.walk(folder) for f in files)


# --- variants by flag --------------------------------------------------------------------

@pytest.mark.parametrize("flags, attn, heads, mem_len", [
    ([], [0], 1, 32),
    (["--attn-layers", "all"], [0, 1], 1, 32),
    (["--attn-layers", "none"], [], 1, 32),
    (["--attn-layers", "1", "--heads", "2"], [1], 2, 32),
    (["--mem-len", "0"], [0], 1, 0),
])
def test_variants_by_flag_are_built_and_stored(capsys, corpus_dir, tmp_path, flags, attn, heads, mem_len):
    save = str(tmp_path / "v.pt")
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL,
                             *flags, "--log-interval", "1000")
    assert code == 0, err
    config = load_checkpoint(save)["config"]
    assert (config["attn_layers"], config["heads"], config["mem_len"]) == (attn, heads, mem_len)
    model = model_from_checkpoint(load_checkpoint(save))
    # Each attention block adds lnmid, lnmem (2 * 2E), qs/ks/vs (3E), q (E^2 + E), qln (2E)
    # and vq.l1 (2E^2 + 2E) to the 2-block base model.
    E, base = 16, 2 * (8 * 16 * 16 + 8 * 16 + 16 * 32 + 32 + 3 * 2 * 16) + 24 * 16 + 24
    assert sum(p.numel() for p in model.parameters()) == base + len(attn) * (3 * E * E + 12 * E)
    assert f"attention in blocks {attn}" in out


@pytest.mark.slow
def test_resume_rebuilds_the_variant_and_rejects_contradicting_flags(capsys, corpus_dir, tmp_path):
    save = str(tmp_path / "all.pt")
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL,
                           "--attn-layers", "all", "--heads", "2", "--log-interval", "1000")
    assert code == 0, err
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--eval-only", "--resume", save, *SMALL)
    assert code == 0, err
    assert "attention in blocks [0, 1]" in out
    for flag, value in (("--attn-layers", "none"), ("--heads", "1"), ("--mem-len", "64")):
        code, _, err = run_cli(capsys, "--data", corpus_dir, "--eval-only", "--resume", save,
                               *SMALL, flag, value)
        assert code == 2 and f"{flag} {value} contradicts the checkpoint" in err
        assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--eval-only", "--resume", save,
                           *SMALL, "--attn-layers", "0,1", "--heads", "2")
    assert code == 0, err  # agreeing flags are fine


# --- evaluation only ---------------------------------------------------------------------

def test_eval_only_reports_valid_and_test_and_writes_nothing(capsys, corpus_dir, tmp_path):
    save = str(tmp_path / "m.pt")
    assert run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)[0] == 0
    os.remove(os.path.join(corpus_dir, "corpus.cache.pt"))
    before = tree(tmp_path)
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--eval-only", "--resume", save,
                             *SMALL, "--save", str(tmp_path / "other.pt"))
    assert code == 0, err
    assert tree(tmp_path) == before
    valid = re.search(r"\| eval only \| valid loss +(\S+) \| valid ppl +\S+ \| valid bpc +(\S+)", out)
    test = re.search(r"\| eval only \| test loss +(\S+) \| test ppl +\S+ \| test bpc +(\S+)", out)
    assert valid and test
    ckpt = load_checkpoint(save)
    assert float(valid.group(2)) == pytest.approx(ckpt["metrics"]["valid_bpc"], abs=1e-3)


# --- dynamic evaluation ------------------------------------------------------------------

def test_dynamic_eval_flag_prints_static_and_dynamic(capsys, tmp_path, shifted):
    save = str(tmp_path / "m.pt")
    code, out, err = run_cli(capsys, "--data", str(tmp_path / "shift"), "--eval-only", "--resume",
                             save, *SMALL, "--dynamic-eval", "--dyn-lr", "3e-4",
                             "--dyn-stat-batches", "20")
    assert code == 0, err
    static = float(re.search(r"\| eval only \| test loss .* test bpc +(\S+)", out).group(1))
    dynamic = float(re.search(r"\| dynamic eval \| test loss .* test bpc +(\S+)", out).group(1))
    assert dynamic < static


# --- adaptive softmax --------------------------------------------------------------------

def word_corpus(folder):
    """Word-level text from a template: 'the ANIMAL VERB the THING .' per line."""
    os.makedirs(folder, exist_ok=True)
    for name, n, seed in (("train", 1500, 1), ("valid", 100, 2), ("test", 100, 3)):
        rng = random.Random(seed)
        lines = [f"the {rng.choice(['cat', 'dog', 'owl'])} {rng.choice(['saw', 'ate', 'met'])} "
                 f"the {rng.choice(['mat', 'hat', 'bat'])} ." for _ in range(n)]
        with open(os.path.join(folder, f"{name}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(folder)


def test_adaptive_softmax_trains_and_evaluates(capsys, tmp_path):
    data = word_corpus(tmp_path / "words")
    save = str(tmp_path / "a.pt")
    code, out, err = run_cli(capsys, "--data", data, "--save", save, "--epochs", "2", *SMALL,
                             "--adaptive-softmax", "--cutoffs", "4", "8", "--log-interval", "20")
    assert code == 0, err
    ckpt = load_checkpoint(save)
    assert ckpt["config"]["cutoffs"] == [4, 8] and "adaptive.head.weight" in ckpt["model"]
    assert "decoder.bias" not in ckpt["model"]
    losses = [float(v) for v in re.findall(r"\| loss +(\d+\.\d+)", out)]
    assert losses[-1] < losses[0] - 0.5 and losses[-1] < 1.0  # uniform guessing: ln 13 = 2.56
    test_loss = float(re.search(r"test loss +(\d+\.\d+)", out).group(1))
    assert test_loss < 1.0
    model = model_from_checkpoint(ckpt).eval()
    out_h = model(torch.tensor([[1], [2], [3]]))[0]
    logp = model.log_probs(out_h.reshape(-1, 16))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(model.loss(out_h, torch.tensor([[4], [5], [6]])),
                               -logp.gather(1, torch.tensor([[4], [5], [6]])).view(-1))
    code, out, err = run_cli(capsys, "--data", data, "--eval-only", "--resume", save, *SMALL,
                             "--dynamic-eval", "--dyn-stat-batches", "5")
    assert code == 0, err
    assert "| eval only | test loss" in out and "| dynamic eval | test loss" in out


def test_adaptive_softmax_refused_on_byte_corpora(capsys, corpus_dir):
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--dry-run", *SMALL, "--adaptive-softmax")
    assert code == 2 and "byte-level" in err
