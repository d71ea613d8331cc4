"""Beyond the original: variants by flag, evaluation-only, dynamic evaluation and the
adaptive softmax."""

import os
import random
import re

import pytest
import torch

from training import evaluate
from conftest import SMALL, run_cli, sentences, write_corpus
from data import Corpus, batchify
from model import SHARNN
from checkpoint import load_checkpoint
from model import model_from_checkpoint
from dyneval import dynamic_evaluate
from runtime import Dist


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

@pytest.fixture
def shifted(capsys, tmp_path):
    """A model trained on varied sentences, and a corpus whose valid/test part uses only a
    few of the training words (so adapting to it pays)."""
    folder = write_corpus(tmp_path / "shift", sentences(600, 1), sentences(80, 2, words=["cat", "sat", "mat"]),
                          sentences(80, 3, words=["dog", "ran", "park"]))
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", folder, "--save", save, "--epochs", "2", *SMALL)
    assert code == 0, err
    model = model_from_checkpoint(load_checkpoint(save)).eval()
    return model, Corpus(folder)


def dyn(model, corpus, source, lr=3e-4, stat_batches=20):
    train = batchify(corpus.train, 4)
    return dynamic_evaluate(model, train, source, 8, 16, "none",
                                 lr=lr, decay=2e-3, eps=2e-5, stat_batches=stat_batches)


def test_dynamic_evaluation_lowers_bpc_on_shifted_text(shifted):
    model, corpus = shifted
    test = batchify(corpus.test, 8)
    static = evaluate(model, test, 8, 16, torch.autocast("cpu", enabled=False), Dist())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dynamic, chunks = dyn(model, corpus, test)
    assert dynamic < static - 0.05
    # Chunk scores add up to the reported loss, and the weights are restored afterwards.
    assert chunks.sum().item() / (test.shape[0] * 8) == pytest.approx(dynamic)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_dynamic_evaluation_scores_each_chunk_before_learning_from_it(shifted):
    model, corpus = shifted
    test = batchify(corpus.test, 8)  # [n, 8]
    _, chunks = dyn(model, corpus, test)
    # The first chunk is scored with the trained weights: exactly its static loss.
    with torch.no_grad():
        out = model(test[:16].long())[0]
        first = model.loss(out, test[1:17].long()).sum(dtype=torch.float64)
    torch.testing.assert_close(chunks[0], first)
    # Changing the data from chunk 5 on never changes the scores of chunks 0..4: no chunk
    # is scored with anything learned from its own or later targets.
    changed = test.clone()
    changed[5 * 16 + 1:] = changed[5 * 16 + 1:].flip(0)
    _, chunks2 = dyn(model, corpus, changed)
    torch.testing.assert_close(chunks2[:5], chunks[:5], rtol=0, atol=0)
    assert not torch.equal(chunks2[5:], chunks[5:])


def test_dynamic_eval_flag_prints_static_and_dynamic(capsys, tmp_path, shifted):
    save = str(tmp_path / "m.pt")
    code, out, err = run_cli(capsys, "--data", str(tmp_path / "shift"), "--eval-only", "--resume",
                             save, *SMALL, "--dynamic-eval", "--dyn-lr", "3e-4",
                             "--dyn-stat-batches", "20")
    assert code == 0, err
    static = float(re.search(r"\| eval only \| test loss .* test bpc +(\S+)", out).group(1))
    dynamic = float(re.search(r"\| dynamic eval \| test loss .* test bpc +(\S+)", out).group(1))
    assert dynamic < static


# --- weight drop, embedding dropout ------------------------------------------------------


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


def test_dynamic_evaluation_with_adaptive_clusters_that_get_no_gradient():
    """Tokens from the head only: the tail clusters' weights get no gradient, and dynamic
    evaluation leaves them to their decay term."""
    torch.manual_seed(0)
    model = SHARNN(20, 32, 32, 2, cutoffs=[5, 10]).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 5, (400,))
    loss, chunks = dynamic_evaluate(model, batchify(ids, 4), batchify(ids[:200], 2), 2, 8,
                                         "none", lr=1e-3,
                                         decay=2e-3, eps=2e-5, stat_batches=5)
    assert torch.isfinite(chunks).all() and loss > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
