"""main.py's training loop against a reference written out by hand: the weights and the
learning rate of every batch over two epochs (warmup across the epoch boundary, --when) with
--accumulate's groups; --max-steps and the cooldown ending at the last step, also when the
epochs run longer than the nominal count; --eval-interval's extra validations."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import SMALL, run_cli, sentences, tiny_model, write_corpus
from data import Corpus, batchify
from lamb import Lamb

LR, WARMUP, CLIP, WDECAY, SEED, BSZ, BPTT = 3e-3, 50, 0.25, 1.2e-6, 11, 4, 16


def flag(name):
    return SMALL[SMALL.index(name) + 1]


def reference_run(folder, epochs, accumulate, when):
    """Two epochs as the original trains them, written out with no code from main.py:
    returns (final weights, lr of every batch, optimizer steps)."""
    corpus = Corpus(folder, cache=False)
    rng = np.random.RandomState(SEED)
    model = tiny_model(len(corpus.dictionary), int(flag("--emsize")), int(flag("--nhid")),
                       int(flag("--nlayers")), attn_layers=[0], mem_len=int(flag("--mem-len")),
                       seed=SEED)
    params = list(model.parameters())
    optimizer = Lamb(params, lr=LR, weight_decay=WDECAY, min_trust=0.25)
    train = batchify(corpus.train, BSZ)
    rows = train.shape[0]
    nominal = rows // BPTT
    lrs, steps = [], 0
    for epoch in range(epochs):
        i = b = 0
        hidden = mems = None
        group_loss = None
        model.train()
        while i < rows - 2:
            base = BPTT if rng.random_sample() < 0.95 else BPTT / 2
            seq = min(min(max(5, int(rng.normal(base, 5))), BPTT), rows - 1 - i)
            count = epoch * nominal + b + 1
            lr = LR * min(count, WARMUP) / WARMUP * (0.1 if epoch + 1 > when else 1.0)
            lrs.append(lr)
            out, hidden, mems = model(train[i:i + seq], hidden, mems)
            loss = model.loss(out, train[i + 1:i + 1 + seq]).mean()
            group_loss = loss if group_loss is None else group_loss + loss
            if b % accumulate == 0:  # groups {0}, {1..N}, {N+1..2N}, ...
                for g in optimizer.param_groups:
                    g["lr"] = lr
                group_loss.backward()
                torch.nn.utils.clip_grad_norm_(params, CLIP)
                optimizer.step()
                optimizer.zero_grad()
                hidden = [tuple(t.detach() for t in h) for h in hidden]
                mems = [None if m is None else m.detach() for m in mems]
                group_loss = None
                steps += 1
            i += seq
            b += 1
    return model.state_dict(), lrs, steps


@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_two_epochs_equal_the_hand_written_loop(capsys, tmp_path, accumulate):
    """Weights, per-batch learning rates and step counts of main.py after two epochs with
    --when 1 and a warmup longer than an epoch equal the reference loop's."""
    folder = write_corpus(tmp_path / "data", sentences(60, 1), sentences(10, 2), sentences(10, 3))
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", folder, "--save", save, *SMALL, "--epochs", "2",
                           "--seed", str(SEED), "--lr", str(LR), "--warmup", str(WARMUP),
                           "--when", "1", "--accumulate", str(accumulate), "--log-interval", "1",
                           "--dropout", "0", "--dropouth", "0", "--dropouti", "0")
    assert code == 0, err
    weights, lrs, steps = reference_run(folder, 2, accumulate, when=1)
    nominal = batchify(Corpus(folder, cache=False).train, BSZ).shape[0] // BPTT
    assert nominal < WARMUP < len(lrs)  # the warmup crosses the epoch boundary

    records = [json.loads(line) for line in open(tmp_path / "m.run" / "metrics.jsonl")]
    logged = [r["lr"] for r in records if r["type"] == "train"]
    assert logged == pytest.approx(lrs, rel=1e-12)

    last = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)
    assert last["progress"]["steps"] == steps
    for name, value in weights.items():
        torch.testing.assert_close(last["model"][name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_max_steps_ends_training_and_the_cooldown_there(capsys, tmp_path):
    folder = write_corpus(tmp_path / "data", sentences(60, 1), sentences(10, 2), sentences(10, 3))
    nominal = batchify(Corpus(folder, cache=False).train, BSZ).shape[0] // BPTT
    steps = nominal + 10  # inside the second epoch
    code, out, err = run_cli(capsys, "--data", folder, "--save", str(tmp_path / "m.pt"), *SMALL,
                             "--epochs", "3", "--max-steps", str(steps), "--cooldown", "10",
                             "--warmup", "5", "--lr", "1e-2", "--log-interval", "1")
    assert code == 0, err
    records = [json.loads(line) for line in open(tmp_path / "m.run" / "metrics.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert train[-1]["epoch"] == 2
    second = re.findall(r"\| epoch +2 \| +\d+/ *(\d+) batches", out)
    assert set(second) == {str(len(second))}  # the epoch's count ends at the last step
    for r in train:  # warmup 5 (nominal batch count), then linear to 0 at optimizer step `steps`
        n = (r["epoch"] - 1) * nominal + r["batch"]
        assert r["lr"] == pytest.approx(1e-2 * min(n, 5) / 5 * min(1.0, max(0.0, (steps - r["step"]) / 10)))
    assert train[-1]["lr"] == 0.0 and train[-2]["lr"] > 0.0
    assert [r["epoch"] for r in records if r["type"] == "valid"] == [1, 2]  # validated at the stop
    assert "| End of training | test loss" in out
    last = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)
    assert last["progress"]["steps"] == steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_cooldown_reaches_zero_at_the_last_step_when_epochs_run_longer_than_nominal(
        capsys, tmp_path, accumulate):
    """--epochs without --max-steps: the real epochs take more batches than the nominal
    rows // bptt, and the cooldown still ends exactly at the run's last optimizer step."""
    folder = write_corpus(tmp_path / "data", sentences(60, 1), sentences(10, 2), sentences(10, 3))
    nominal = batchify(Corpus(folder, cache=False).train, BSZ).shape[0] // BPTT
    code, out, err = run_cli(capsys, "--data", folder, "--save", str(tmp_path / "m.pt"), *SMALL,
                             "--epochs", "3", "--cooldown", "8", "--warmup", "5", "--lr", "1e-2",
                             "--log-interval", "1", "--accumulate", str(accumulate))
    assert code == 0, err
    records = [json.loads(line) for line in open(tmp_path / "m.run" / "metrics.jsonl")]
    train = [r for r in records if r["type"] == "train"]
    per_epoch = [sum(r["epoch"] == e for r in train) for e in (1, 2, 3)]
    assert min(per_epoch) > nominal  # the epochs are longer than the schedule's nominal count
    last_step = train[-1]["step"]
    steps_taken = [r for r in train if r["batch"] % accumulate == 1 or accumulate == 1]
    assert steps_taken[-1]["lr"] == 0.0  # the last optimizer step runs at 0
    before = [r for r in steps_taken if r["step"] == last_step - 4][-1]
    assert before["lr"] == pytest.approx(1e-2 * 4 / 8)  # linear over the last 8 steps
    assert all(r["lr"] > 0 for r in steps_taken[:-1])


@pytest.mark.slow
def test_eval_interval_adds_points_to_the_curve_and_changes_no_weight(corpus_dir, tmp_path, capsys):
    """--eval-interval 40: a validation every 40 optimizer steps as well as at the epoch ends,
    each a metrics record and a chance for the best checkpoint; the training is the same."""
    runs = {}
    for name, extra in (("plain", []), ("every40", ["--eval-interval", "40"])):
        code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / f"{name}.pt"),
                                 *SMALL, "--epochs", "2", *extra)
        assert code == 0, err
        valid = [json.loads(line) for line in open(tmp_path / f"{name}.run" / "metrics.jsonl")
                 if '"valid"' in line]
        runs[name] = (torch.load(str(tmp_path / f"{name}.last.pt"), weights_only=True), valid, out)
    plain, every = runs["plain"], runs["every40"]
    for key, value in plain[0]["model"].items():
        assert torch.equal(value, every[0]["model"][key]), key
    steps = plain[0]["progress"]["steps"]
    ends = {r["step"] for r in plain[1]}
    within = {r["step"] for r in every[1]} - ends
    assert within == {s for s in range(40, steps, 40)} - ends
    assert len(within) >= 3 and f"| step {min(within):7,d} |" in every[2]
    best = torch.load(str(tmp_path / "every40.pt"), weights_only=True)["metrics"]
    assert best["valid_loss"] == min(r["valid_loss"] for r in every[1])
