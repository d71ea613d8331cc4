"""Dynamic evaluation (Krause et al. 2018): the model keeps learning from the text it has
just scored. docs/model.md, Evaluation, gives the update."""

import contextlib

import torch
from torch import nn

from data import get_batch
from runtime import amp_dtype, autocast
from training import detach

INIT_SCALE = 2.0 ** 16  # the fp16 loss scale dynamic evaluation starts from (GradScaler's)
GROWTH_INTERVAL = 2000  # backwards without an overflow after which the scale doubles


class LossScale:
    """Loss scaling for dynamic evaluation's gradients under fp16, where gradients below
    float16's range would be lost to 0: the backward is taken of the loss times the scale
    (a power of 2), and the gradients are divided by it again in float32. When a scaled
    gradient overflows, the scale halves and that backward is taken again, down to a scale
    of 1; after GROWTH_INTERVAL clean backwards the scale doubles. Without fp16 (float32,
    bf16, whose range holds such gradients) the backward is the plain one."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.scale = INIT_SCALE if enabled else 1.0
        self.clean = 0

    def backward(self, loss, params):
        """The gradients of `loss` (a scalar) in the .grad of `params`."""
        if not self.enabled:
            loss.backward()
            return
        while True:
            for p in params:
                p.grad = None
            (loss * self.scale).backward(retain_graph=True)
            grads = [p.grad for p in params if p.grad is not None]
            finite = bool(torch.stack([g.isfinite().all() for g in grads]).all())
            if finite or self.scale <= 1.0:
                break
            self.scale /= 2
            self.clean = 0
        for g in grads:
            g.div_(self.scale)
        self.clean += 1
        if self.clean == GROWTH_INTERVAL:
            self.scale *= 2
            self.clean = 0


@contextlib.contextmanager
def without_dropout(model):
    """Train mode with every dropout at 0 (the dropout layers, the embedding dropout and
    DropConnect): the model computes what eval mode computes, and the cuDNN LSTM, whose
    backward needs train mode, still runs. The rates and the mode are restored after."""
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    rates = [m.p for m in drops]
    dropoute, wdrops, training = model.dropoute, [b.wdrop for b in model.blocks], model.training
    for m in drops:
        m.p = 0.0
    model.dropoute = 0.0
    for block in model.blocks:
        block.wdrop = 0.0
    model.train()
    try:
        yield
    finally:
        for m, p in zip(drops, rates):
            m.p = p
        model.dropoute = dropoute
        for block, wdrop in zip(model.blocks, wdrops):
            block.wdrop = wdrop
        model.train(training)


def learn_from(model, x, y, hidden, mems, amp_ctx, scale, params):
    """Forward a chunk [T, B] with the carried state and take the gradients of its mean loss
    (LossScale); returns (the chunk's summed loss in float64, the state detached)."""
    model.zero_grad(set_to_none=True)
    with amp_ctx:
        output, hidden, mems = model(x, hidden, mems)
        losses = model.loss(output, y)  # [T * B]
    scale.backward(losses.mean(), params)
    return losses.detach().sum(dtype=torch.float64), *detach(hidden, mems)


def gradient_rms(model, params, train_data, bptt, amp_ctx, scale, stat_batches):
    """Root mean square of each parameter's gradient over `stat_batches` training batches."""
    ms = [torch.zeros_like(p) for p in params]
    hidden = mems = None
    n = 0
    for n, i in enumerate(range(0, min(train_data.shape[0] - 1, stat_batches * bptt), bptt), 1):
        x, y = get_batch(train_data, i, bptt)
        _, hidden, mems = learn_from(model, x, y, hidden, mems, amp_ctx, scale, params)
        for m, p in zip(ms, params):
            if p.grad is not None:  # an adaptive-softmax cluster without targets has none
                m.add_(p.grad.float() ** 2)
    return [(m / max(n, 1)).sqrt() for m in ms]


def dynamic_evaluate(model, train_data, source, bsz, bptt, amp, lr, decay, eps, stat_batches,
                     max_batches=None):
    """Dynamic evaluation, RMS-normalised with decay toward the trained weights, under
    --amp `amp` on the data's device. Each chunk is scored first, then the weights take a
    step on that chunk:

        p += decay * decrate * (p0 - p) - lr * grad / (rms + eps)

    rms: root mean square of training gradients over `stat_batches` batches; decrate = rms
    divided by the mean over parameters of mean(rms), clipped at 1 / decay. Gradients are
    taken without dropout in train mode (without_dropout), under fp16 with loss scaling
    (LossScale). The model's weights are restored afterwards. Returns (loss as
    training.evaluate's, per-chunk loss sums)."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    amp_ctx = autocast(source.device, amp)
    scale = LossScale(amp_dtype(source.device, amp) == torch.float16)
    with without_dropout(model):
        rms = gradient_rms(model, params, train_data, bptt, amp_ctx, scale, stat_batches)
        mean_rms = torch.stack([r.mean() for r in rms]).mean()
        decrate = [(r / mean_rms).clamp(max=1.0 / decay) for r in rms]

        chunk_losses = []
        hidden = mems = None
        rows = source.shape[0]
        for c, i in enumerate(range(0, source.shape[0] - 1, bptt)):
            if max_batches is not None and c >= max_batches:
                rows = i  # cut short: the mean over the rows scored
                break
            x, y = get_batch(source, i, bptt)
            loss, hidden, mems = learn_from(model, x, y, hidden, mems, amp_ctx, scale, params)
            chunk_losses.append(loss)  # scored before the step below
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
