"""What a training run computes, apart from the story main.py tells and the schedule
(schedule.py): where training stands (Progress, with the state carried from batch to batch),
the one training step and the one function that runs a batch, the counters of the log, and
evaluation. main.py trains with these; the --budget measurement (budget.py) and bench.py run
the same step. Change the training step here. docs/model.md (Training loop, Evaluation)
describes them in words.
"""

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, fields

import torch
from torch.nn.parallel import DistributedDataParallel

from data import batchify, get_batch
from flags import DRY_RUN, MIN_TRUST, TEST_BATCH_SIZE, InputError, eval_batch_size
from tokens import compact_dtype
from lamb import Lamb
from runtime import all_sum, autocast, make_scaler


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


@dataclass
class Carry:
    """The state a batch hands to the next: the LSTM states and attention memories of this
    rank's columns (None at an epoch's start), and the summed loss of the batches since the
    last optimizer step (--accumulate)."""
    hidden: list = None
    mems: list = None
    pending: torch.Tensor = None

    def detach(self):
        """Cut the carried state from the graph of the batches before (after a step)."""
        self.hidden, self.mems = detach(self.hidden, self.mems)
        self.pending = None


def train_step(step, carry, x, y, lr, update):
    """Forward one batch [T, B] with the carried state and add its mean loss to the pending
    sum of the batches since the last optimizer step. When `update`: backward that sum once
    (gradients flow through the state carried between those batches), then unscale, clip,
    step at rate `lr`, update the loss scale and zero the gradients; a step whose gradients
    hold an inf or nan is skipped by the scaler. Returns (this batch's loss, the gradient
    norm before clipping or None); the carried state is detached after a step."""
    with step.autocast():
        losses, carry.hidden, carry.mems = step.net(x, y, carry.hidden, carry.mems)  # [T * B]
        loss = losses.mean()                                  # float32 under autocast too
    carry.pending = loss if carry.pending is None else carry.pending + loss
    if not update:
        return loss.detach(), None
    for group in step.optimizer.param_groups:
        group["lr"] = lr
    step.scaler.scale(carry.pending).backward()
    step.scaler.unscale_(step.optimizer)  # true gradients, so that clipping sees true norms
    norm = torch.nn.utils.clip_grad_norm_(step.params, step.clip if step.clip > 0 else math.inf)
    step.scaler.step(step.optimizer)      # skipped on inf/nan gradients
    step.scaler.update()
    step.optimizer.zero_grad(set_to_none=True)
    carry.detach()
    return loss.detach(), norm.detach()


# --- where training stands, and one batch -----------------------------------------------

NEWER = {"newer": True}   # a field absent from checkpoints of older versions
UNSAVED = {"saved": False}


@dataclass
class Progress:
    """Where training stands: its fields, but the carried state, are the last checkpoint's
    `progress` (checkpoint.py checks them by these types; the carried state is saved as
    the whole batch's, under `carry`)."""
    epoch: int = 0           # 0-based epoch in progress (or next to start)
    i: int = 0               # position in the batchified train stream
    batch: int = 0           # batches done in this epoch
    tokens: int = 0          # training tokens seen, all ranks
    steps: int = 0           # optimizer steps taken
    best_val: float = float("inf")  # the validation loss the best checkpoint holds
    val_history: list = field(default_factory=list)  # the epochs' validation losses
    optimizer_name: str = "lamb"    # --optimizer, or asgd once sgd switched to it
    epoch_time: float = 0.0  # seconds spent on the current epoch so far
    tested: bool = field(default=False, metadata=NEWER)  # the final test was reported
    replans: list = field(default_factory=list, metadata=NEWER)  # --budget's (main.keep_pace)
    carry: Carry = field(default_factory=Carry, metadata=UNSAVED)  # this rank's columns

    @classmethod
    def saved_fields(cls, newer):
        """{name: type} of the saved fields: those every checkpoint has, or (`newer`) those
        added since the first version."""
        return {f.name: f.type for f in fields(cls)
                if f.metadata.get("saved", True) and f.metadata.get("newer", False) == newer}

    def saved(self):
        """The fields a last checkpoint keeps, as a dict."""
        names = {**self.saved_fields(False), **self.saved_fields(True)}
        return {name: getattr(self, name) for name in names}

    def next_epoch(self):
        """The epoch ended: the next starts at the stream's start with no carried state."""
        self.epoch += 1
        self.i = self.batch = 0
        self.carry = Carry()
        self.epoch_time = 0.0


@dataclass(frozen=True)
class Batch:
    """What train_batch did: the batch's loss, the gradient norm (None without a step),
    the rate, the tokens over all ranks, and whether an optimizer step was taken."""
    loss: torch.Tensor
    norm: torch.Tensor
    lr: float
    tokens: int
    update: bool


def train_batch(step, progress, schedule, source, seq_len, accumulate, batch_size):
    """Train the next batch of the epoch: `seq_len` rows of `source` ([rows, B_local]) from
    progress.i, at the rate the schedule gives it, with an optimizer step after batches
    0, N, 2N, ... of the epoch (N = `accumulate`), then count it in `progress` (tokens over
    the global `batch_size`). main.py, the --budget measurement and bench.py all train so."""
    lr = schedule.rate(progress.epoch, progress.batch, progress.steps)
    x, y = get_batch(source, progress.i, seq_len)  # [T, B_local] each
    update = progress.batch % accumulate == 0
    loss, norm = train_step(step, progress.carry, x, y, lr, update)
    tokens = x.shape[0] * batch_size
    progress.i += x.shape[0]
    progress.batch += 1
    progress.steps += update
    progress.tokens += tokens
    return Batch(loss, norm, lr, tokens, update)


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
