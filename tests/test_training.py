"""training.py: evaluation's sum against hand-made cases (the whole split, and a dry run's
mean over what it evaluated), the training step (an fp16 overflow skips exactly that step;
no host synchronisation inside a step), and the splits on the device in a compact dtype."""

from types import SimpleNamespace

import pytest
import torch

from conftest import CPU, perturb, tiny_model
from data import batchify, get_batch
from lamb import Lamb
from runtime import Dist, make_scaler
from tokens import compact_dtype
from training import Carry, Step, WithLoss, device_data, evaluate, train_step


class TargetLoss(torch.nn.Module):
    """A stand-in model whose per-token loss is the target id itself."""

    def forward(self, x, hidden=None, mems=None):
        return x.float()[..., None], hidden, mems

    def loss(self, output, targets):
        return targets.reshape(-1).float()


def test_evaluation_sum_hand_made_case():
    source = torch.arange(10).view(10, 1)  # one column: 0..9
    # bptt 4 -> chunks with targets 1-4, 5-8, 9: sum of len(chunk) * mean = 10 + 26 + 9 = 45,
    # divided by len(source) = 10.
    loss = evaluate(TargetLoss(), source, 1, 4, torch.autocast("cpu", enabled=False), Dist())
    assert loss == pytest.approx(4.5)
    two = torch.stack([torch.arange(10), 100 + torch.arange(10)], dim=1)  # [10, 2]
    loss = evaluate(TargetLoss(), two, 2, 4, torch.autocast("cpu", enabled=False), Dist())
    # per chunk: 4 * mean(1..4, 101..104) + 4 * mean(5..8, 105..108) + 1 * mean(9, 109)
    expected = (4 * 52.5 + 4 * 56.5 + 1 * 59) / 10
    assert loss == pytest.approx(expected)


def test_dry_run_reports_the_mean_over_what_it_evaluated():
    source = torch.arange(10).view(10, 1)
    off = torch.autocast("cpu", enabled=False)
    # The first chunk (bptt 4) has targets 1..4: its mean is 2.5, whatever follows.
    assert evaluate(TargetLoss(), source, 1, 4, off, Dist(), max_batches=1) == pytest.approx(2.5)
    # Two chunks: targets 1..8, mean 4.5.
    assert evaluate(TargetLoss(), source, 1, 4, off, Dist(), max_batches=2) == pytest.approx(4.5)
    # The whole split keeps the original's sum / length.
    assert evaluate(TargetLoss(), source, 1, 4, off, Dist()) == pytest.approx(4.5)


def test_fp16_overflow_skips_exactly_that_step_and_halves_the_scale(monkeypatch):
    model = perturb(tiny_model(ntoken=13, ninp=8, nhid=16, attn_layers=[0], mem_len=12))
    params = list(model.parameters())
    optimizer = Lamb(params, lr=1e-2, weight_decay=1e-6, min_trust=0.25)
    scaler = make_scaler(CPU, "fp16")
    run = Step(model, WithLoss(model), optimizer, scaler, 0.25, CPU, "fp16")
    batches = [(torch.randint(0, 13, (8, 2)), torch.randint(0, 13, (8, 2))) for _ in range(3)]
    poison = {"on": False}
    handle = params[3].register_hook(lambda g: g * float("inf") if poison["on"] else g)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    train_step(run, Carry(), *batches[0], 1e-2, True)
    scale = scaler.get_scale()
    weights = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    poison["on"] = True
    with monkeypatch.context() as m:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
            m.setattr(torch.Tensor, name, forbidden)
        train_step(run, Carry(), *batches[1], 1e-2, True)
    assert all(torch.equal(p, w) for p, w in zip(params, weights))  # the step was skipped
    assert all(torch.equal(optimizer.state[params[0]][k], v) for k, v in state.items())
    assert scaler.get_scale() == scale / 2
    poison["on"] = False
    handle.remove()
    train_step(run, Carry(), *batches[2], 1e-2, True)
    assert all(not torch.equal(p, w) for p, w in zip(params, weights))  # the next step ran
    assert scaler.get_scale() == scale / 2


def test_training_steps_never_synchronise_with_the_host(monkeypatch):
    """The CUDA training step, replayed on the CPU: reading any tensor value on the host
    (item, bool, float, int, tolist, numpy) between log intervals is an error."""
    model = perturb(tiny_model(ntoken=13, nlayers=3, attn_layers=[0, 2], mem_len=24, dropout=0.1,
                               dropouth=0.1, dropouti=0.1))  # dropout masks drawn in the step too
    params = list(model.parameters())
    optimizer = Lamb(params, lr=1e-3, weight_decay=1e-6, min_trust=0.25)
    run = Step(model, WithLoss(model), optimizer, make_scaler(torch.device("cpu"), "none"), 0.25,
               torch.device("cpu"), "none")
    carry = Carry()
    batches = [(torch.randint(0, 13, (8, 2)), torch.randint(0, 13, (8, 2))) for _ in range(3)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation inside a training step")

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # the CUDA path
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    total = torch.zeros(())
    for x, y in batches:
        loss, _ = train_step(run, carry, x, y, 1e-3, True)
        total += loss
    monkeypatch.undo()
    assert total.item() > 0


def test_data_is_compact_on_the_device_and_batches_are_long():
    ids = torch.randint(0, 205, (1000,))
    corpus = SimpleNamespace(train=ids, valid=ids[:500], test=ids[:300], dictionary=range(205))
    args = SimpleNamespace(batch_size=4, bptt=16, data="corpus")
    data, valid, test = device_data(corpus, args, Dist(), torch.device("cpu"))
    assert data.dtype == valid.dtype == test.dtype == torch.uint8 and data.is_contiguous()
    assert test.shape == (300 // 8, 8)
    x, y = get_batch(data, 3, 10)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x, batchify(ids, 4)[3:13])
    assert compact_dtype(50_000) == torch.int32 and compact_dtype(300) == torch.int16
