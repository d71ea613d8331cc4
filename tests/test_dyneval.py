"""dyneval.py: dynamic evaluation against the update written out by hand (with its decay
term, its gradients taken without dropout and with cuDNN on), its fp16 loss scale, and on
a trained model: it lowers the bpc of shifted text, scores each chunk before learning from
it, and leaves clusters of the adaptive softmax that get no gradient to their decay."""

import pytest
import torch

from conftest import perturb, tiny_model
from data import batchify
from dyneval import GROWTH_INTERVAL, LossScale, dynamic_evaluate
from runtime import Dist
from training import evaluate


def reference_dynamic(model, train, source, bptt, lr, decay, eps, stat_batches):
    """Dynamic evaluation written out: per-chunk loss sums."""
    params = list(model.parameters())
    p0 = [p.detach().clone() for p in params]
    model.eval()
    sq = [torch.zeros_like(p) for p in params]
    hidden = mems = None
    n = 0
    for i in range(0, min(train.shape[0] - 1, stat_batches * bptt), bptt):
        model.zero_grad()
        seq = min(bptt, train.shape[0] - 1 - i)
        out, hidden, mems = model(train[i:i + seq], hidden, mems)
        model.loss(out, train[i + 1:i + 1 + seq]).mean().backward()
        hidden = [tuple(t.detach() for t in h) for h in hidden]
        mems = [None if m is None else m.detach() for m in mems]
        for s, p in zip(sq, params):
            s += p.grad ** 2
        n += 1
    rms = [(s / n).sqrt() for s in sq]
    mean = sum(r.mean() for r in rms) / len(rms)
    rate = [torch.clamp(r / mean, max=1 / decay) for r in rms]
    scores = []
    hidden = mems = None
    for i in range(0, source.shape[0] - 1, bptt):
        model.zero_grad()
        seq = min(bptt, source.shape[0] - 1 - i)
        out, hidden, mems = model(source[i:i + seq], hidden, mems)
        losses = model.loss(out, source[i + 1:i + 1 + seq])
        scores.append(losses.detach().double().sum())
        losses.mean().backward()
        hidden = [tuple(t.detach() for t in h) for h in hidden]
        mems = [None if m is None else m.detach() for m in mems]
        with torch.no_grad():
            for p, start, r, dr in zip(params, p0, rms, rate):
                p += decay * dr * (start - p)
                p -= lr * p.grad / (r + eps)
    with torch.no_grad():
        for p, start in zip(params, p0):
            p.copy_(start)
    return torch.stack(scores)


def test_dynamic_evaluation_equals_the_written_out_update_with_its_decay():
    model = perturb(tiny_model(12, 8, 16, attn_layers=[1], mem_len=10, seed=3))
    train = torch.randint(0, 12, (90, 3))
    source = torch.randint(0, 12, (60, 2))
    kwargs = dict(lr=2e-3, decay=0.3, eps=2e-5, stat_batches=4)
    expected = reference_dynamic(model, train, source, 8, **kwargs)
    loss, chunks = dynamic_evaluate(model, train, source, 2, 8, "none", **kwargs)
    torch.testing.assert_close(chunks, expected, rtol=1e-6, atol=1e-6)
    assert loss == pytest.approx(expected.sum().item() / (60 * 2))
    # The decay term matters here: without it the scores differ.
    no_decay = reference_dynamic(model, train, source, 8, **dict(kwargs, decay=1e-12))
    assert not torch.allclose(no_decay, expected, rtol=1e-4, atol=1e-4)


def test_dynamic_evaluation_takes_its_gradients_without_dropout_and_with_cudnn_on():
    """With every dropout of the model on, dynamic evaluation computes what the written-out
    update computes in eval mode, with cuDNN left on (its LSTM backward needs train mode,
    which dynamic evaluation takes with the dropouts at 0); rates and mode are restored."""
    model = perturb(tiny_model(12, 8, 16, attn_layers=[1], mem_len=10, seed=3, dropout=0.3,
                               dropouth=0.2, dropouti=0.4, dropoute=0.1, wdrop=0.5))
    train = torch.randint(0, 12, (90, 3))
    source = torch.randint(0, 12, (60, 2))
    kwargs = dict(lr=2e-3, decay=0.3, eps=2e-5, stat_batches=4)
    expected = reference_dynamic(model, train, source, 8, **kwargs)
    seen = []  # (cuDNN on, the LSTM in train mode) at each forward
    model.blocks[0].rnn.register_forward_hook(
        lambda m, i, o: seen.append((torch.backends.cudnn.enabled, m.training)))
    model.eval()
    _, chunks = dynamic_evaluate(model, train, source, 2, 8, "none", **kwargs)
    torch.testing.assert_close(chunks, expected, rtol=1e-6, atol=1e-6)
    assert seen and all(cudnn and training for cudnn, training in seen)
    assert not model.training and model.dropoute == 0.1 and model.drop.p == 0.3
    assert [b.wdrop for b in model.blocks] == [0.5, 0.5] and model.blocks[1].attn.drop.p == 0.2


def test_dynamic_evaluation_scales_its_fp16_loss_so_small_gradients_survive():
    """A gradient below float16's range: 0 from a plain fp16 backward, its true value from
    LossScale's; a scaled gradient that overflows halves the scale and is taken again."""
    w = torch.ones(4, requires_grad=True)
    x = torch.tensor([0.5, 1.0, 1.5, 2.0])

    def loss(factor):
        with torch.autocast("cpu", dtype=torch.float16):
            out = torch.nn.functional.linear(x[None], w[None])  # [1, 1] float16
        return out.float().sum() * factor  # d loss / d out = factor, in float16 in backward

    LossScale(False).backward(loss(1e-8), [w])  # 1e-8 is below float16's smallest, 6e-8
    assert torch.equal(w.grad, torch.zeros(4))
    scale = LossScale(True)
    scale.backward(loss(1e-8), [w])
    torch.testing.assert_close(w.grad, x * 1e-8, rtol=1e-3, atol=0)
    assert scale.scale == 2.0 ** 16
    scale.backward(loss(10.0), [w])  # 10 * 2^16 is past float16's largest, 65504
    torch.testing.assert_close(w.grad, x * 10, rtol=1e-3, atol=0)
    assert scale.scale == 2.0 ** 11  # halved until 2 * 10 * scale < 65504
    scale.clean = GROWTH_INTERVAL - 1
    scale.backward(loss(1.0), [w])
    assert scale.scale == 2.0 ** 12 and scale.clean == 0  # doubled after clean backwards


def test_dynamic_evaluation_under_fp16_tracks_float32():
    model = perturb(tiny_model(12, 8, 16, attn_layers=[1], mem_len=10, seed=3, dropout=0.1,
                               dropouth=0.1, dropouti=0.1))  # the paper's, turned off inside
    train = torch.randint(0, 12, (90, 3))
    source = torch.randint(0, 12, (60, 2))
    kwargs = dict(lr=2e-3, decay=0.3, eps=2e-5, stat_batches=4)
    _, exact = dynamic_evaluate(model, train, source, 2, 8, "none", **kwargs)
    _, half = dynamic_evaluate(model, train, source, 2, 8, "fp16", **kwargs)
    torch.testing.assert_close(half, exact, rtol=1e-2, atol=0)


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


def test_dynamic_evaluation_with_adaptive_clusters_that_get_no_gradient():
    """Tokens from the head only: the tail clusters' weights get no gradient, and dynamic
    evaluation leaves them to their decay term."""
    model = tiny_model(20, 32, 32, cutoffs=[5, 10], dropout=0.1, dropouth=0.1,
                       dropouti=0.1).eval()  # the paper's dropouts, turned off inside
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 5, (400,))
    loss, chunks = dynamic_evaluate(model, batchify(ids, 4), batchify(ids[:200], 2), 2, 8,
                                         "none", lr=1e-3,
                                         decay=2e-3, eps=2e-5, stat_batches=5)
    assert torch.isfinite(chunks).all() and loss > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
