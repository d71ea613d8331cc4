"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it has
just scored. docs/model.md, Evaluation, gives the update."""

import torch

from data import get_batch
from training import detach


def gradient_rms(model, params, train_data, bptt, amp_ctx, stat_batches):
    """Root mean square of each parameter's gradient over `stat_batches` training batches."""
    ms = [torch.zeros_like(p) for p in params]
    hidden = mems = None
    n = 0
    for n, i in enumerate(range(0, min(train_data.shape[0] - 1, stat_batches * bptt), bptt), 1):
        model.zero_grad(set_to_none=True)
        x, y = get_batch(train_data, i, bptt)
        with amp_ctx:
            output, hidden, mems = model(x, hidden, mems)
            model.loss(output, y).mean().backward()
        hidden, mems = detach(hidden, mems)
        for m, p in zip(ms, params):
            if p.grad is not None:  # an adaptive-softmax cluster without targets has none
                m.add_(p.grad.float() ** 2)
    return [(m / max(n, 1)).sqrt() for m in ms]


def dynamic_evaluate(model, train_data, source, bsz, bptt, amp_ctx, lr, decay, eps,
                     stat_batches, max_batches=None):
    """Dynamic evaluation, RMS-normalised with decay toward the trained weights. Each chunk
    is scored first, then the weights take a step on that chunk:

        p += decay * decrate * (p0 - p) - lr * grad / (rms + eps)

    rms: root mean square of training gradients over `stat_batches` batches; decrate = rms
    divided by the mean over parameters of mean(rms), clipped at 1 / decay. The model's
    weights are restored afterwards. Returns (loss as main.evaluate's, per-chunk loss sums)."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model.eval()  # no dropout; gradients are still taken
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN RNN backward needs train()
        rms = gradient_rms(model, params, train_data, bptt, amp_ctx, stat_batches)
        mean_rms = torch.stack([r.mean() for r in rms]).mean()
        decrate = [(r / mean_rms).clamp(max=1.0 / decay) for r in rms]

        chunk_losses = []
        hidden = mems = None
        rows = source.shape[0]
        for c, i in enumerate(range(0, source.shape[0] - 1, bptt)):
            if max_batches is not None and c >= max_batches:
                rows = i  # cut short: the mean over the rows scored
                break
            model.zero_grad(set_to_none=True)
            x, y = get_batch(source, i, bptt)
            with amp_ctx:
                output, hidden, mems = model(x, hidden, mems)
                losses = model.loss(output, y)
            chunk_losses.append(losses.detach().sum(dtype=torch.float64))  # scored first
            losses.mean().backward()
            hidden, mems = detach(hidden, mems)
            with torch.no_grad():
                for p, p0, r, dr in zip(params, start, rms, decrate):
                    p.add_(decay * dr * (p0 - p))
                    if p.grad is not None:
                        p.add_(-lr * p.grad / (r + eps))
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    model.zero_grad(set_to_none=True)
    chunk_losses = torch.stack(chunk_losses)
    return chunk_losses.sum().item() / (rows * bsz), chunk_losses
