"""What a training run computes, apart from the story main.py tells: the learning rate, the
sequence lengths and the plan of an epoch, the one training step, the counters of the log,
and evaluation. main.py trains with these; bench.py times the same step. docs/model.md
(Training loop, Evaluation) describes them in words.
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data import batchify, get_batch
from flags import DRY_RUN, MIN_TRUST, TEST_BATCH_SIZE, InputError, eval_batch_size
from tokens import compact_dtype
from lamb import Lamb
from runtime import all_sum, autocast, make_scaler


# --- the learning rate -------------------------------------------------------------------

def lr_at(batch, step, base_lr, warmup, epoch=0, when=(), cooldown=None, last_step=None):
    """The learning rate of a batch.

    Warmup counts the original's global batch number `batch` (1-based: epoch * nominal
    batches per epoch + batch in epoch + 1): linear over `warmup` batches. The rate is
    divided by 10 after each epoch in `when` (1-based, as printed; `epoch` is 0-based).
    `--cooldown` counts optimizer steps: `step` is the 1-based number of the optimizer step
    this batch belongs to, and the rate falls linearly to 0 over the last `cooldown` steps,
    reaching 0 at `last_step`, the run's last optimizer step."""
    lr = base_lr * min(batch, warmup) / warmup
    lr *= 0.1 ** sum(1 for w in when if w <= epoch)
    if cooldown:
        lr *= min(1.0, max(0.0, (last_step - step) / cooldown))
    return lr


# --- sequence lengths and the plan of a run ----------------------------------------------

def sample_seq_len(rng, bptt):
    """The original's random sequence length: bptt (p = 0.95) or bptt / 2, plus N(0, 5),
    clamped to [5, bptt]. `rng` is a numpy RandomState (the original's global stream)."""
    base = bptt if rng.random_sample() < 0.95 else bptt / 2.0
    return min(max(5, int(rng.normal(base, 5))), bptt)


def twin(rng):
    """A copy of a numpy RandomState: drawing from it leaves `rng` untouched."""
    copy = np.random.RandomState()
    copy.set_state(rng.get_state())
    return copy


def epoch_batches(rng, i, rows, bptt):
    """How many batches an epoch still takes from stream position `i`, drawing the sequence
    lengths from `rng` (pass a twin to keep the real stream untouched)."""
    n = 0
    while i < rows - 2:
        i += min(sample_seq_len(rng, bptt), rows - 1 - i)
        n += 1
    return n


def steps_in(first, last, accumulate):
    """Optimizer steps taken by batches first..last-1 of an epoch: one at each batch b with
    b % accumulate == 0 (docs/model.md, Training loop)."""
    return max(0, -(-last // accumulate) - -(-first // accumulate))


@dataclass(frozen=True)
class Plan:
    """Where the run goes from here: the batch count of the epoch in progress (the N of
    `b/N batches`, where it ends) and the run's last optimizer step (where --cooldown
    reaches 0)."""
    epoch_batches: int
    last_step: int


def plan_run(rng, epoch, i, batch, steps, rows, bptt, epochs, accumulate, max_steps=None,
             batch_limit=None):
    """The Plan of a run that stands in 0-based `epoch` at stream position `i`, `batch`
    batches into the epoch, with `steps` optimizer steps taken: a pure function of its
    arguments (it draws the sequence lengths from a twin of `rng`). An epoch ends at the
    end of the stream, after `batch_limit` batches (a dry run) or at the batch that takes
    step `max_steps`; the run ends after `epochs` epochs or at step `max_steps`."""
    if epoch >= epochs or (max_steps and steps >= max_steps):
        return Plan(batch, steps)  # nothing left to train
    rng = twin(rng)

    def end(n):
        return min(n, batch_limit) if batch_limit else n

    first_end = end(batch + epoch_batches(rng, i, rows, bptt))
    last = steps + steps_in(batch, first_end, accumulate)
    for _ in range(epoch + 1, epochs):
        if max_steps and last >= max_steps:
            break
        last += steps_in(0, end(epoch_batches(rng, 0, rows, bptt)), accumulate)
    if max_steps and last >= max_steps:
        last = max_steps
        next_step = -(-batch // accumulate) * accumulate  # the batch of step steps + 1
        first_end = min(first_end, next_step + (max_steps - steps - 1) * accumulate + 1)
    return Plan(first_end, last)


@dataclass(frozen=True)
class Limits:
    """How much of the work a run does, decided once at setup: everything, or a --dry-run's
    few batches (None: no limit)."""
    epochs: int
    train_batches: int = None
    eval_batches: int = None

    @classmethod
    def of(cls, args):
        if args.dry_run:
            return cls(DRY_RUN["epochs"], DRY_RUN["train_batches"], DRY_RUN["eval_batches"])
        return cls(args.epochs)

    def note(self, source, bptt):
        """What an evaluation of `source` covered when it was cut short, to mark its numbers."""
        if self.eval_batches is None:
            return ""
        chunks = len(range(0, source.shape[0] - 1, bptt))
        return f" | dry run: {min(chunks, self.eval_batches)} of {chunks} chunks"


class SaveTimer:
    """--save-interval: N optimizer steps, or N minutes, since the last checkpoint."""

    def __init__(self, interval, steps):
        self.interval, self.unit = interval
        self.restart(steps)

    def restart(self, steps):
        self.time, self.steps = time.time(), steps

    def due(self, steps):
        if self.unit == "min":
            return time.time() - self.time >= 60 * self.interval
        return steps - self.steps >= self.interval


def device_data(corpus, args, d, device):
    """The three splits batchified with the global batch sizes, this rank's columns, in a
    compact dtype on the device: [rows, B_local] each."""
    dtype = compact_dtype(len(corpus.dictionary))

    def columns(split, bsz):
        ids = getattr(corpus, split).to(dtype)
        name = f"the {split} split ({os.path.join(args.data, split + '.txt')})"
        return batchify(ids, bsz, name)[:, d.share(bsz)].contiguous().to(device)

    train = columns("train", args.batch_size)
    if args.bptt >= train.shape[0] - 1:
        raise InputError(f"--bptt {args.bptt} is longer than the training stream "
                         f"({train.shape[0]} tokens per column at batch size {args.batch_size})")
    return train, columns("valid", eval_batch_size(args)), columns("test", TEST_BATCH_SIZE)


# --- memory ------------------------------------------------------------------------------

def step_bytes(emsize, nhid, nlayers, attn_blocks, heads, mem_len, bptt, batch):
    """A lower bound of one training step's memory: the activations kept for backward
    (about 16 floats of width emsize and 2 of width nhid per token and block) and the
    attention scores of each attention block over its window."""
    tokens = bptt * batch
    scores = attn_blocks * batch * heads * bptt * (bptt + mem_len)
    return 4 * (tokens * nlayers * (16 * emsize + 2 * nhid) + scores)


def device_memory(device):
    """Bytes of memory of the device: the GPU's, or this machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(config, bptt, batch, device):
    """InputError when one step of the model `config` at bptt x batch cannot fit in the
    device's memory (step_bytes), before anything is allocated for it."""
    need = step_bytes(config["ninp"], config["nhid"], config["nlayers"],
                      len(config["attn_layers"]), config["heads"], config["mem_len"], bptt, batch)
    have = device_memory(device)
    if need > have:
        raise InputError(f"one step at --bptt {bptt} x --batch_size {batch} does not fit in "
                         f"memory: it needs at least {need / 2**30:,.1f} GiB, "
                         f"{'the GPU' if device.type == 'cuda' else 'this machine'} has "
                         f"{have / 2**30:,.1f} GiB; lower --bptt or --batch_size")


# --- the optimizer -----------------------------------------------------------------------

def build_optimizer(name, params, lr, wdecay):
    """The optimizer of --optimizer: the paper's LAMB (minimum trust 0.25), or a torch one."""
    if name == "lamb":
        return Lamb(params, lr=lr, weight_decay=wdecay, min_trust=MIN_TRUST)
    if name == "asgd":
        return torch.optim.ASGD(params, lr=lr, t0=0, lambd=0.0, weight_decay=wdecay)
    cls = dict(sgd=torch.optim.SGD, adam=torch.optim.Adam, adamw=torch.optim.AdamW,
               adagrad=torch.optim.Adagrad)[name]
    return cls(params, lr=lr, weight_decay=wdecay)


@contextlib.contextmanager
def averaged_weights(model, optimizer):
    """Averaged SGD: evaluate (and save) with the averaged parameters, then swap back."""
    if not isinstance(optimizer, torch.optim.ASGD):
        yield
        return
    saved = {}
    with torch.no_grad():
        for p in model.parameters():
            if "ax" in optimizer.state[p]:
                saved[p] = p.detach().clone()
                p.copy_(optimizer.state[p]["ax"])
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in saved.items():
                p.copy_(value)


# --- one training step -------------------------------------------------------------------

class WithLoss(torch.nn.Module):
    """The model's forward and its per-token loss as one forward. Under torchrun the DDP
    wrapper wraps this, so that every parameter the loss uses (the adaptive softmax's
    clusters) is used inside the forward DDP sees: find_unused_parameters, which the
    adaptive softmax needs, otherwise marks those as unused and fails at the first
    backward ("Expected to mark a variable ready only once")."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, hidden=None, mems=None):
        # x, y: [T, B] token ids
        output, hidden, mems = self.model(x, hidden, mems)  # output: [T, B, E]
        return self.model.loss(output, y), hidden, mems      # loss: [T * B], float32


def distributed(model, device):
    """The DDP wrapper of `model` and its loss (WithLoss) that a torchrun rank trains with;
    unused parameters are looked for only with the adaptive softmax, whose clusters without
    targets in a batch get no gradient."""
    return DistributedDataParallel(WithLoss(model),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=model.adaptive is not None)


@dataclass
class Step:
    """Everything one training step works with; main.py and bench.py build it alike."""
    model: torch.nn.Module      # the SHARNN
    net: torch.nn.Module        # what runs the forward and the loss: WithLoss, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    clip: float                 # --clip; 0: no clipping
    device: torch.device
    amp: str                    # --amp

    def autocast(self):
        return autocast(self.device, self.amp)

    @property
    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]


def make_step(model, args, device, optimizer_name=None, net=None):
    """The Step of the flags (--optimizer unless `optimizer_name`, --lr, --wdecay, --clip,
    --amp) for a model on `device`; `net` is its DDP wrapper under torchrun (distributed)."""
    optimizer = build_optimizer(optimizer_name or args.optimizer, model.parameters(), args.lr,
                                args.wdecay)
    return Step(model, net or WithLoss(model), optimizer, make_scaler(device, args.amp),
                args.clip, device, args.amp)


def place_model(model, args, device):
    """Move the model to `device`, with --checkpoint-activations and --compile."""
    model.to(device)
    model.set_checkpoint_activations(args.checkpoint_activations)
    if args.compile:
        model.compile_blocks()
    return model


def detach(hidden, mems):
    """Cut the carried LSTM states and memories from the graph of the batch before."""
    hidden = [None if hc is None else tuple(t.detach() for t in hc) for hc in hidden]
    mems = [None if mem is None else mem.detach() for mem in mems]
    return hidden, mems


def train_step(step, x, y, hidden, mems, pending, lr, update):
    """Forward one batch [T, B] with the carried state and add its mean loss to `pending`,
    the loss of the batches since the last optimizer step. When `update`: backward that sum
    once (gradients flow through the state carried between those batches), then unscale,
    clip, step, update the loss scale and zero the gradients; a step whose gradients hold
    an inf or nan is skipped by the scaler. Returns (this batch's loss, hidden, mems,
    pending, the gradient norm before clipping or None), the state detached after a step."""
    with step.autocast():
        losses, hidden, mems = step.net(x, y, hidden, mems)  # losses: [T * B]
        loss = losses.mean()                                  # float32 under autocast too
    pending = loss if pending is None else pending + loss
    if not update:
        return loss.detach(), hidden, mems, pending, None
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    step.scaler.scale(pending).backward()
    step.scaler.unscale_(step.optimizer)  # true gradients, so that clipping sees true norms
    norm = torch.nn.utils.clip_grad_norm_(step.params, step.clip if step.clip > 0 else math.inf)
    step.scaler.step(step.optimizer)      # skipped on inf/nan gradients
    step.scaler.update()
    step.optimizer.zero_grad(set_to_none=True)
    return (loss.detach(), *detach(hidden, mems), None, norm.detach())


# --- the counters of the training log ----------------------------------------------------

class Meter:
    """What the log lines report, counted between them. The per-batch counters are device
    tensors, so that counting needs no host synchronisation; `read` takes them to the host
    (summed over the ranks) once per log line."""

    def __init__(self, device):
        self.device = device
        self.streak = torch.zeros((), device=device)  # consecutive non-finite losses
        self.worst = torch.zeros((), device=device)   # longest streak since the last check
        self.reset()

    def reset(self):
        zeros = torch.zeros(4, device=self.device)
        self.sums = zeros  # loss of finite batches, finite batches, gradient norms, steps
        self.batches = self.tokens = 0
        self.start = time.time()

    def add(self, loss, tokens, norm=None):
        """Count one batch (its loss, a device scalar) and, after a step, its gradient norm."""
        finite = torch.isfinite(loss)
        self.sums[0] += torch.where(finite, loss, 0.0)
        self.sums[1] += finite
        if norm is not None:
            good = torch.isfinite(norm)
            self.sums[2] += torch.where(good, norm, 0.0)
            self.sums[3] += good
        self.streak = torch.where(finite, 0.0, self.streak + 1)
        self.worst = torch.maximum(self.worst, self.streak)
        self.batches += 1
        self.tokens += tokens

    def read(self, d):
        """The interval since the last read, over all ranks: {loss (mean of the finite
        losses), nonfinite (count), grad_norm (mean over the steps, finite ones), ms_per_batch,
        tokens_per_s}; then start a new interval."""
        loss, finite, norms, steps = all_sum(self.sums.clone(), d).tolist()
        elapsed = max(time.time() - self.start, 1e-9)
        interval = dict(loss=loss / finite if finite else float("nan"),
                        nonfinite=self.batches * d.world - int(finite),
                        grad_norm=norms / steps if steps else float("nan"),
                        ms_per_batch=elapsed * 1000 / self.batches,
                        tokens_per_s=self.tokens / elapsed)
        self.reset()
        return interval

    def worst_streak(self):
        """The longest run of non-finite losses since the last call (one host read)."""
        worst = self.worst.item()
        self.worst.zero_()
        return worst


# --- evaluation --------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, source, bsz, bptt, amp_ctx, d, max_batches=None, stop=None, bar=None):
    """The sum over chunks of bptt of len(chunk) * mean loss(chunk), state carried from chunk
    to chunk, divided by the split's (batchified) length: docs/model.md, Evaluation. `bsz`
    is the global batch size: ranks hold shares of its columns and their sums are added.
    Cut short by `max_batches`, the sum is divided by the rows scored instead: the mean
    loss of what was evaluated. Returns None if stopped by a signal."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    hidden = mems = None
    rows = source.shape[0]
    for n, i in enumerate(range(0, source.shape[0] - 1, bptt)):
        if max_batches is not None and n >= max_batches:
            rows = i  # the rows scored so far
            break
        if stop and stop.reason:
            break
        x, y = get_batch(source, i, bptt)
        with amp_ctx:
            output, hidden, mems = model(x, hidden, mems)
            total += model.loss(output, y).sum(dtype=torch.float64)
        if bar:
            bar.update(x.numel() * d.world)
    if stop and stop.reason:
        return None
    return all_sum(total, d).item() / (rows * bsz)
