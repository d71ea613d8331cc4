"""Train and evaluate the SHA-RNN language model.

The defaults are the paper's enwik8 first pass (SPEC.md section 8):

    python -u main.py --data data/enwik8/ --save ENWIK8.pt
    python -u main.py --data data/enwik8/ --save ENWIK8.pt --resume ENWIK8.pt --lr 1e-3 \\
        --epochs 5 --seed 125                                   # the second pass

Also runs under `torchrun --nproc_per_node=N main.py ...` (DistributedDataParallel).
"""

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import Corpus, batchify, compact_dtype, get_batch
from lamb import Lamb
from model import SHARNN, attn_layers_in
from utils import (FORMAT, InputError, Parser, RunLog, all_finite, atomic_save, check_writable,
                   environment, load_checkpoint, safe_exp, write_json)

OPTIMIZERS = ("lamb", "sgd", "adam", "adamw", "adagrad")
MIN_TRUST = 0.25  # LAMB's trust-ratio floor in the paper's runs
TEST_BATCH_SIZE = 8
LOG2 = math.log(2)

# Used when --adaptive-softmax is given without --cutoffs (AWD-LSTM's splits).
DEFAULT_CUTOFFS = {500_000: [4200, 35000, 180000], 75_000: [2800, 20000, 76000], 0: [2000, 10000]}


# --- flags -------------------------------------------------------------------------------

def attn_layers_flag(text):
    """--attn-layers: 'all', 'none' or a comma list of block indices."""
    if text in ("all", "none"):
        return text
    try:
        return sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, none or a comma list of block "
                                         f"indices, got {text!r}") from None


def interval_flag(text):
    """--save-interval: N batches, or N followed by 'min' for minutes."""
    try:
        if text.endswith("min"):
            value, unit = float(text[:-3]), "min"
        else:
            value, unit = int(text), "batches"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N (batches) or Nmin (minutes), got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the interval must be positive, got {text!r}")
    return value, unit


def add_model_flags(g):
    """The architecture flags (main.py and bench.py)."""
    g.add_argument("--emsize", type=int, default=1024, help="embedding and LSTM size (ninp)")
    g.add_argument("--nhid", type=int, default=4096, help="Boom feed-forward width, a multiple of --emsize")
    g.add_argument("--nlayers", type=int, default=4, help="number of blocks")
    g.add_argument("--attn-layers", type=attn_layers_flag, default=None,
                   help="blocks with attention: all, none, or a comma list of indices; "
                        "None means block nlayers-2, the paper's single attention")
    g.add_argument("--heads", type=int, default=1, help="split the attention into this many heads")
    g.add_argument("--mem-len", type=int, default=5000,
                   help="total attention window (memory + current positions); 0 carries no memory")


def add_device_flags(g):
    """Where and how the step runs (main.py and bench.py)."""
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks CUDA when present")
    g.add_argument("--amp", choices=("fp16", "bf16", "none"), default="fp16",
                   help="CUDA mixed precision: fp16 with loss scaling (like the original's "
                        "apex O1), bf16, or none; CPU always runs float32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the attention and feed-forward parts (LSTMs stay eager)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute attention and feed-forward activations in backward to save memory")


def build_parser():
    p = Parser(description="Train and evaluate the SHA-RNN (Merity 2019) language model. "
                           "Defaults reproduce the paper's enwik8 first pass.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default="data/enwik8/", help="corpus folder with train.txt, valid.txt, test.txt")
    a("--unk", action="store_true", help="map valid/test tokens unseen in train to <unk> "
      "instead of stopping with an error")
    g = p.add_argument_group("model (stored in the checkpoint; a value that contradicts a "
                             "resumed checkpoint is an error)")
    add_model_flags(g)
    g.add_argument("--adaptive-softmax", action="store_true",
                   help="adaptive softmax output for large word vocabularies (untied)")
    g.add_argument("--cutoffs", type=int, nargs="+", default=None,
                   help="adaptive softmax cluster boundaries; None picks them by vocabulary size")
    g = p.add_argument_group("regularisation")
    g.add_argument("--dropout", type=float, default=0.1, help="dropout on the final output")
    g.add_argument("--dropouth", type=float, default=0.1,
                   help="dropout inside blocks (LSTM output, attention, feed-forward)")
    g.add_argument("--dropouti", type=float, default=0.1, help="dropout on the embedding output")
    g.add_argument("--dropoute", type=float, default=0.0,
                   help="embedding dropout: drop whole token rows (AWD-LSTM); off in the paper")
    g.add_argument("--wdrop", type=float, default=0.0,
                   help="DropConnect on each LSTM's hidden-to-hidden weights (AWD-LSTM); off in the paper")
    g.add_argument("--wdecay", type=float, default=1.2e-6, help="weight decay on all parameters")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="lamb",
                   help="lamb (min trust 0.25), sgd (switches to averaged SGD after --nonmono "
                        "epochs without improvement), adam, adamw, adagrad")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=800, help="linear warmup steps (batches)")
    g.add_argument("--cooldown", type=int, default=None,
                   help="decay the learning rate linearly to 0 over the last N nominal steps "
                        "(epochs x batches per epoch); None: no cooldown")
    g.add_argument("--when", type=int, nargs="+", default=[],
                   help="epochs after which the learning rate is divided by 10")
    g.add_argument("--nonmono", type=int, default=5,
                   help="sgd: non-improving epochs before switching to averaged SGD")
    g.add_argument("--clip", type=float, default=0.25, help="gradient norm clipping (0: off)")
    g.add_argument("--epochs", type=int, default=32, help="number of epochs")
    g.add_argument("--batch_size", type=int, default=16, metavar="N",
                   help="training batch size (global, split across torchrun ranks)")
    g.add_argument("--bptt", type=int, default=1024, help="sequence length")
    g.add_argument("--accumulate", type=int, default=1,
                   help="sum the gradients of N batches before each optimizer step")
    g.add_argument("--seed", type=int, default=5512, help="random seed")
    g = p.add_argument_group("run")
    add_device_flags(g)
    g.add_argument("--save", default="ENWIK8.pt", help="best-validation checkpoint path")
    g.add_argument("--last", default=None,
                   help="checkpoint to continue from after a stop; None: SAVE with .last.pt")
    g.add_argument("--save-interval", type=interval_flag, default="30min",
                   help="also write the last checkpoint every N batches, or every N minutes as Nmin")
    g.add_argument("--resume", default="",
                   help="start from these weights (this project's checkpoint or an original "
                        "state_dict) with a fresh optimizer and warmup: the paper's second pass")
    g.add_argument("--continue", dest="continue_from", default="", metavar="PATH",
                   help="continue an interrupted run exactly from its last checkpoint")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume on valid and test; train nothing, write nothing")
    g.add_argument("--dynamic-eval", action="store_true",
                   help="also report dynamic evaluation (Krause et al. 2018) on test "
                        "(and valid with --eval-only)")
    g.add_argument("--dyn-lr", type=float, default=5e-5, help="dynamic evaluation learning rate (eta)")
    g.add_argument("--dyn-decay", type=float, default=2e-3,
                   help="dynamic evaluation decay toward the trained weights (lambda)")
    g.add_argument("--dyn-eps", type=float, default=2e-5, help="dynamic evaluation epsilon")
    g.add_argument("--dyn-stat-batches", type=int, default=100,
                   help="training batches for dynamic evaluation's gradient statistics")
    g.add_argument("--log-interval", type=int, default=10, metavar="N", help="log every N batches")
    g.add_argument("--max-nonfinite", type=int, default=100,
                   help="stop after this many consecutive non-finite losses")
    g.add_argument("--run-dir", default=None,
                   help="folder for args.json, env.json, log.txt, metrics.jsonl; None: SAVE with .run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    g.add_argument("--dry-run", action="store_true",
                   help="smoke test: a few batches of train, valid and test, checkpoints in a "
                        "temporary folder")
    return p


def explicit_flags(parser, argv):
    """The destinations given explicitly on the command line."""
    shadow = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = dict(dest=action.dest, default=argparse.SUPPRESS)
            if action.nargs == 0:
                shadow.add_argument(*action.option_strings, action="store_const", const=True, **kwargs)
            else:
                shadow.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    known, _ = shadow.parse_known_args(argv)
    return set(vars(known))


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser, argv)
    return args


def check_args(args):
    """Impossible flag combinations, as InputError (before anything is loaded)."""
    if args.bptt < 5:
        raise InputError(f"--bptt must be at least 5 (the shortest sampled sequence), got {args.bptt}")
    for flag in ("--batch_size", "--accumulate", "--log-interval", "--epochs", "--max-nonfinite"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < (0 if flag == "--epochs" else 1):
            raise InputError(f"{flag} must be positive, got {value}")
    if args.warmup < 1:
        raise InputError(f"--warmup must be at least 1, got {args.warmup}")
    if args.lr <= 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    if args.eval_only and not args.resume:
        raise InputError("--eval-only needs --resume CHECKPOINT")
    if args.resume and args.continue_from:
        raise InputError("--resume (new run from weights) and --continue (same run) exclude each other")
    if args.cutoffs and not args.adaptive_softmax:
        raise InputError("--cutoffs needs --adaptive-softmax")


# --- schedule and sampling ---------------------------------------------------------------

def lr_at(step, base_lr, warmup, epoch=0, when=(), cooldown=None, total_steps=None):
    """Learning rate at optimizer step `step` (1-based) of 0-based `epoch`: linear warmup
    over `warmup` steps, divided by 10 after each epoch in `when` (1-based, as printed),
    and an optional linear cooldown to 0 over the last `cooldown` of `total_steps`."""
    lr = base_lr * min(step, warmup) / warmup
    lr *= 0.1 ** sum(1 for w in when if w <= epoch)
    if cooldown:
        lr *= min(1.0, max(0.0, (total_steps - step) / cooldown))
    return lr


def sample_seq_len(rng, bptt):
    """The original's random sequence length: bptt (p = 0.95) or bptt / 2, plus N(0, 5),
    clamped to [5, bptt]. `rng` is a numpy RandomState (the original's global stream)."""
    base = bptt if rng.random_sample() < 0.95 else bptt / 2.0
    return min(max(5, int(rng.normal(base, 5))), bptt)


# --- devices, precision, distribution ---------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    def share(self, n):
        """This rank's contiguous slice of n batch columns."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def pick_device(flag):
    if flag == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
                        else "cpu")


def setup_distributed(device):
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); (Dist, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


def all_sum(t, d):
    if d.world > 1:
        dist.all_reduce(t)
    return t


def autocast(device, amp):
    """Mixed precision on CUDA only; a no-op context on CPU or with --amp none."""
    enabled = device.type == "cuda" and amp != "none"
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def make_scaler(device, amp):
    """Dynamic loss scaling for fp16; disabled (a pass-through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp == "fp16")


# --- model and optimizer -----------------------------------------------------------------

def attn_blocks(attn, nlayers):
    """The block indices of an --attn-layers value for nlayers blocks."""
    if attn == "all":
        return list(range(nlayers))
    if attn == "none":
        return []
    return [nlayers - 2] if attn is None else attn


def default_cutoffs(ntokens):
    """AWD-LSTM's adaptive softmax splits for a vocabulary of this size."""
    cuts = next(c for n, c in DEFAULT_CUTOFFS.items() if ntokens > n)
    cuts = [c for c in cuts if c < ntokens]
    if not cuts:
        raise InputError(f"give --cutoffs for a vocabulary of {ntokens} tokens")
    return cuts


def model_config(args, ntokens, checkpoint=None, byte_level=True):
    """The architecture: from the flags, or from the checkpoint, where an explicit flag that
    contradicts the checkpoint is an error. Returns the SHARNN keyword arguments."""
    if args.adaptive_softmax and byte_level:
        raise InputError("--adaptive-softmax is for word-level vocabularies; this corpus is "
                         "byte-level and keeps the plain softmax")
    if checkpoint is None:
        return dict(ntoken=ntokens, ninp=args.emsize, nhid=args.nhid, nlayers=args.nlayers,
                    attn_layers=attn_blocks(args.attn_layers, args.nlayers), heads=args.heads,
                    mem_len=args.mem_len,
                    cutoffs=(args.cutoffs or default_cutoffs(ntokens)) if args.adaptive_softmax
                    else None)
    saved = dict(checkpoint["config"])
    if saved["ntoken"] != ntokens:
        raise InputError(f"the checkpoint has {saved['ntoken']} tokens, the data {args.data} "
                         f"has {ntokens}")
    nlayers = args.nlayers if "nlayers" in args.explicit else saved["nlayers"]
    given = {  # flag -> (config key, the flag's value in config terms)
        "emsize": ("ninp", args.emsize), "nhid": ("nhid", args.nhid),
        "nlayers": ("nlayers", args.nlayers), "heads": ("heads", args.heads),
        "mem_len": ("mem_len", args.mem_len),
        "attn_layers": ("attn_layers", attn_blocks(args.attn_layers, nlayers)),
        "cutoffs": ("cutoffs", args.cutoffs),
    }
    for flag, (key, value) in given.items():
        if flag in args.explicit and value != saved[key]:
            raise InputError(f"--{flag.replace('_', '-')} {flag_value(args, flag)} contradicts the "
                             f"checkpoint's {key}={saved[key]}; drop the flag to use the checkpoint's")
    if "adaptive_softmax" in args.explicit and saved["cutoffs"] is None:
        raise InputError("--adaptive-softmax contradicts the checkpoint, which has the plain "
                         "softmax; drop the flag to use the checkpoint's")
    return saved


def flag_value(args, flag):
    value = getattr(args, flag)
    return ",".join(map(str, value)) if isinstance(value, list) else value


def config_for_state_dict(args, ntokens, state_dict):
    """Architecture for an original state_dict: the flags, with attention blocks taken from
    the weights unless --attn-layers is given."""
    config = model_config(args, ntokens)
    if "attn_layers" not in args.explicit:
        config["attn_layers"] = attn_layers_in(state_dict)
    if state_dict["encoder.weight"].shape[0] != ntokens:
        raise InputError(f"the weights have {state_dict['encoder.weight'].shape[0]} tokens, "
                         f"the data {args.data} has {ntokens}")
    return config


def build_model(config, args):
    try:
        return SHARNN(**config, dropout=args.dropout, dropouth=args.dropouth,
                      dropouti=args.dropouti, dropoute=args.dropoute, wdrop=args.wdrop)
    except ValueError as e:
        raise InputError(str(e)) from None


def build_optimizer(name, params, args):
    if name == "lamb":
        return Lamb(params, lr=args.lr, weight_decay=args.wdecay, min_trust=MIN_TRUST)
    if name == "asgd":
        return torch.optim.ASGD(params, lr=args.lr, t0=0, lambd=0.0, weight_decay=args.wdecay)
    cls = dict(sgd=torch.optim.SGD, adam=torch.optim.Adam, adamw=torch.optim.AdamW,
               adagrad=torch.optim.Adagrad)[name]
    return cls(params, lr=args.lr, weight_decay=args.wdecay)


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


# --- the training step -------------------------------------------------------------------

def detach(hidden, mems):
    hidden = [None if h is None else tuple(x.detach() for x in h) for h in hidden]
    mems = [None if m is None else m.detach() for m in mems]
    return hidden, mems


def forward_backward(net, model, x, y, hidden, mems, scaler, amp_ctx):
    """Forward one batch with the carried state, backward its (scaled) mean loss.
    Returns the detached loss and the detached new state. `net` may be the DDP wrapper."""
    with amp_ctx:
        output, hidden, mems = net(x, hidden, mems)  # output: [T, B, E]
        loss = model.loss(output, y).mean()
    scaler.scale(loss).backward()
    return (loss.detach(),) + detach(hidden, mems)


def apply_gradients(params, optimizer, scaler, clip):
    """Unscale, clip the global gradient norm, step, update the loss scale, zero the grads.
    A step whose gradients are not finite is skipped, without host synchronisation for
    LAMB on CUDA. Returns the (pre-clip) gradient norm as a tensor."""
    scaler.unscale_(optimizer)
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips the step on inf/nan gradients
    elif norm.is_cuda and getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~torch.isfinite(norm)).float()  # LAMB skips on the device
        optimizer.step()
        del optimizer.found_inf
    elif torch.isfinite(norm):  # a host check: free on the CPU, one sync for other optimizers
        optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm


# --- evaluation --------------------------------------------------------------------------

def split_columns(data, bsz, d, device):
    """Batchify a split with the global batch size and keep this rank's columns on device."""
    return batchify(data, bsz)[:, d.share(bsz)].contiguous().to(device)


@torch.no_grad()
def evaluate(model, source, bsz, bptt, amp_ctx, d, max_batches=None, stop=None, bar=None):
    """SPEC.md section 6: state carried over chunks of bptt; the sum over chunks of
    len(chunk) * mean loss(chunk), divided by the split's (batchified) length. `bsz` is the
    global batch size: ranks hold shares of its columns and their sums are added.
    Returns None if stopped by a signal."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=source.device)
    hidden = mems = None
    for n, i in enumerate(range(0, source.shape[0] - 1, bptt)):
        if (max_batches is not None and n >= max_batches) or (stop and stop.reason):
            break
        x, y = get_batch(source, i, bptt)
        with amp_ctx:
            output, hidden, mems = model(x, hidden, mems)
            total += model.loss(output, y).sum(dtype=torch.float64)
        if bar:
            bar.update(x.numel() * d.world)
    if stop and stop.reason:
        return None
    return all_sum(total, d).item() / (source.shape[0] * bsz)


def dynamic_evaluate(model, train_data, source, bsz, bptt, amp_ctx, lr, decay, eps,
                     stat_batches, max_batches=None):
    """Dynamic evaluation (Krause et al. 2018), RMS-normalised with decay toward the trained
    weights. Each chunk is scored first, then the weights take a step on that chunk:

        p += decay * decrate * (p0 - p) - lr * grad / (rms + eps)

    rms: root mean square of training gradients over `stat_batches` batches; decrate = rms
    divided by the mean over parameters of mean(rms), clipped at 1 / decay. The model's
    weights are restored afterwards. Returns (loss as in `evaluate`, per-chunk loss sums)."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    model.eval()  # no dropout; gradients are still taken
    cudnn_off = torch.backends.cudnn.flags(enabled=False)  # cuDNN RNN backward needs train()
    with cudnn_off:
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
        rms = [(m / max(n, 1)).sqrt() for m in ms]
        mean_rms = torch.stack([r.mean() for r in rms]).mean()
        decrate = [(r / mean_rms).clamp(max=1.0 / decay) for r in rms]

        chunk_losses = []
        hidden = mems = None
        for c, i in enumerate(range(0, source.shape[0] - 1, bptt)):
            if max_batches is not None and c >= max_batches:
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
    return chunk_losses.sum().item() / (source.shape[0] * bsz), chunk_losses


# --- run state and checkpoints ----------------------------------------------------------

class Stop:
    """Signal handling. SIGINT (Ctrl-C): stop after the current step, then test the best
    checkpoint, as the original did; a second Ctrl-C quits at once. SIGTERM (pre-emption):
    stop after the current step, write the last checkpoint, exit 0."""

    REASONS = (None, "terminate", "interrupt")  # ranks agree on the highest

    def __init__(self):
        self.reason = None
        self._previous = {}

    def __enter__(self):
        for sig, handler in ((signal.SIGINT, self._interrupt), (signal.SIGTERM, self._terminate)):
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def code(self):
        return float(self.REASONS.index(self.reason))

    def agree(self, run):
        """Make every rank's reason the highest among the ranks; True when stopping."""
        self.reason = self.REASONS[int(agree(run, self.code)[0])]
        return self.reason is not None

    def _interrupt(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupt"
        print("stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def _terminate(self, signum, frame):
        self.reason = "terminate"


@dataclass
class Progress:
    """Where training stands; everything here goes into the last checkpoint."""
    epoch: int = 0          # 0-based epoch in progress (or next to start)
    i: int = 0              # position in the batchified train stream
    batch: int = 0          # batches done in this epoch
    tokens: int = 0         # training tokens seen, all ranks
    steps: int = 0          # optimizer steps taken
    best_val: float = float("inf")
    val_history: list = field(default_factory=list)
    optimizer_name: str = "lamb"
    hidden: list = None
    mems: list = None
    epoch_time: float = 0.0  # seconds spent on the current epoch before a continue


def gather_columns(t, d):
    """All ranks' column shares of a [..., B_local, E] state tensor, on rank order."""
    if d.world == 1 or t is None:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-2)


def carried_state(progress, d):
    """The carried LSTM states and memories of the whole batch (gathered across ranks)."""
    if progress.hidden is None:
        return None
    return {"hidden": [None if h is None else [gather_columns(x, d).cpu() for x in h]
                       for h in progress.hidden],
            "mems": [None if m is None else gather_columns(m, d).cpu() for m in progress.mems]}


def rng_state(rng, d):
    mt = rng.get_state(legacy=False)
    state = {"numpy_key": torch.from_numpy(mt["state"]["key"].astype(np.int64)),
             "numpy_pos": int(mt["state"]["pos"]), "numpy_has_gauss": int(mt["has_gauss"]),
             "numpy_gauss": float(mt["gauss"]), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if d.world > 1:
        per_rank = [None] * d.world
        dist.all_gather_object(per_rank, {"torch": state["torch"], "cuda": state["cuda"]})
        state["ranks"] = per_rank
    return state


def restore_rng(rng, state, d):
    rng.set_state({"bit_generator": "MT19937",
                   "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                             "pos": state["numpy_pos"]},
                   "has_gauss": state["numpy_has_gauss"], "gauss": state["numpy_gauss"]})
    own = state
    if "ranks" in state and d.world == len(state["ranks"]):
        own = state["ranks"][d.rank]
    torch.set_rng_state(own["torch"])
    if own["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])


def base_checkpoint(model, config, vocab, args, metrics):
    return {"format": FORMAT, "version": 1, "model": model.state_dict(), "config": config,
            "vocab": list(vocab), "metrics": metrics, "args": saved_args(args)}


def saved_args(args):
    return {k: v for k, v in vars(args).items() if k != "explicit"}


# --- the run -----------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run works with (built once in main)."""
    args: argparse.Namespace
    model: SHARNN
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    config: dict
    vocab: list
    train_data: torch.Tensor
    val_data: torch.Tensor
    test_data: torch.Tensor
    device: torch.device
    d: Dist
    log: RunLog
    rng: np.random.RandomState
    stop: Stop
    paths: dict

    def amp(self):
        return autocast(self.device, self.args.amp)


def progress_bar(run, total, desc):
    if run.args.no_progress or not run.d.main or not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, leave=False,
                dynamic_ncols=True, file=sys.stderr)


def save_best(run, progress, val_loss):
    if run.d.main:
        if all_finite(run.model):
            atomic_save(base_checkpoint(run.model, run.config, run.vocab, run.args,
                                        {"valid_loss": val_loss, "valid_bpc": val_loss / LOG2,
                                         "epoch": progress.epoch + 1}), run.paths["save"])
            run.log("Saving model (new best validation)")
        else:
            run.log("Not saving: the weights are not finite")
    if run.d.world > 1:
        dist.barrier()


def save_last(run, progress):
    """Everything needed to continue exactly: written at save intervals, epoch ends and exits."""
    carry = carried_state(progress, run.d)
    rng = rng_state(run.rng, run.d)
    if run.d.main:
        if not all_finite(run.model):
            run.log("Not saving the last checkpoint: the weights are not finite")
        else:
            ckpt = base_checkpoint(run.model, run.config, run.vocab, run.args,
                                   {"best_valid_loss": progress.best_val})
            ckpt.update(optimizer=run.optimizer.state_dict(),
                        scaler=run.scaler.state_dict(), carry=carry, rng=rng,
                        progress={k: getattr(progress, k) for k in (
                            "epoch", "i", "batch", "tokens", "steps", "best_val", "val_history",
                            "optimizer_name", "epoch_time")})
            atomic_save(ckpt, run.paths["last"])
    if run.d.world > 1:
        dist.barrier()


def agree(run, *flags):
    """Combine per-rank flags/counters (max over ranks) so that every rank acts alike."""
    if run.d.world == 1:
        return flags
    t = torch.tensor(flags, dtype=torch.float64, device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def train_epoch(run, progress, epoch_start):
    """Train until the end of the epoch (True) or an agreed stop (False)."""
    args, model, d = run.args, run.model, run.d
    params = [p for p in model.parameters() if p.requires_grad]
    n = run.train_data.shape[0]
    nominal = n // args.bptt  # the original's batches per epoch, used in the lr schedule
    total_steps = args.epochs * nominal
    model.train()
    total_loss = torch.zeros((), device=run.device)
    streak = torch.zeros((), device=run.device)  # consecutive non-finite losses
    worst = torch.zeros((), device=run.device)   # longest streak since the last check
    logged_batches = logged_tokens = pending = 0
    log_start = last_save = time.time()
    interval, unit = args.save_interval
    bar = progress_bar(run, (n - 1) * args.batch_size, f"epoch {progress.epoch + 1}")
    if bar:
        bar.update(progress.i * args.batch_size)
    while progress.i < n - 2 and not (args.dry_run and progress.batch >= 3):
        seq_len = sample_seq_len(run.rng, args.bptt)
        step = progress.epoch * nominal + progress.batch + 1
        lr = lr_at(step, args.lr, args.warmup, progress.epoch, args.when, args.cooldown, total_steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(run.train_data, progress.i, seq_len)  # [T, B_local] each
        boundary = (progress.batch + 1) % args.accumulate == 0
        sync = contextlib.nullcontext() if boundary or d.world == 1 else run.net.no_sync()
        with sync:
            loss, progress.hidden, progress.mems = forward_backward(
                run.net, model, x, y, progress.hidden, progress.mems, run.scaler, run.amp())
        pending += 1
        if boundary:
            apply_gradients(params, run.optimizer, run.scaler, args.clip)
            progress.steps += 1
            pending = 0
        tokens = x.shape[0] * args.batch_size
        progress.i += x.shape[0]
        progress.batch += 1
        progress.tokens += tokens
        logged_batches += 1
        logged_tokens += tokens
        finite = torch.isfinite(loss)  # no host synchronisation until the log interval
        total_loss += torch.where(finite, loss, 0.0)
        streak = torch.where(finite, 0.0, streak + 1)
        worst = torch.maximum(worst, streak)
        if bar:
            bar.update(tokens)

        at_log = progress.batch % args.log_interval == 0
        if at_log:
            elapsed = time.time() - log_start
            cur_loss = all_sum(total_loss.clone(), d).item() / (logged_batches * d.world)
            ms = elapsed * 1000 / logged_batches
            run.log(f"| epoch {progress.epoch + 1:3d} | {progress.batch:5d}/{nominal:5d} batches | "
                    f"lr {lr:05.5f} | ms/batch {ms:5.2f} | loss {cur_loss:5.2f} | "
                    f"ppl {safe_exp(cur_loss):8.2f} | bpc {cur_loss / LOG2:8.3f}")
            run.log.metrics(type="train", epoch=progress.epoch + 1, step=progress.steps,
                            batch=progress.batch, tokens=progress.tokens, lr=lr, loss=cur_loss,
                            bpc=cur_loss / LOG2, ms_per_batch=ms,
                            tokens_per_s=logged_tokens / max(elapsed, 1e-9), time=time.time())
            total_loss.zero_()
            logged_batches = logged_tokens = 0
            log_start = time.time()
        # Between optimizer steps: stop, save, non-finite checks. Distributed runs decide
        # together, at log intervals; the non-finite count is read at log intervals only.
        if not boundary or (d.world > 1 and not at_log):
            continue
        save_due = (progress.batch % interval == 0 if unit == "batches"
                    else time.time() - last_save >= 60 * interval)
        bad = worst.item() if at_log else 0.0
        stop_code, save_due, bad = agree(run, run.stop.code, float(save_due), bad)
        run.stop.reason = Stop.REASONS[int(stop_code)]
        if at_log:
            worst.zero_()
        if bad >= args.max_nonfinite:
            raise NonFinite(f"{int(bad)} consecutive non-finite losses at epoch "
                            f"{progress.epoch + 1}, batch {progress.batch}; stopping (try a "
                            f"lower --lr or --amp bf16)")
        if run.stop.reason or save_due:
            progress.epoch_time = time.time() - epoch_start
            save_last(run, progress)
            last_save = time.time()
        if run.stop.reason:
            break
    if bar:
        bar.close()
    if run.stop.reason:
        return False
    if pending:  # a partial accumulation at the end of the epoch
        apply_gradients(params, run.optimizer, run.scaler, args.clip)
        progress.steps += 1
    return True


class NonFinite(RuntimeError):
    """Too many consecutive non-finite losses."""


def validate(run, progress):
    """Validation after an epoch: returns the loss, or None if stopped by a signal."""
    args = run.args
    bar = progress_bar(run, (run.val_data.shape[0] - 1) * eval_batch_size(args), "valid")
    with averaged_weights(run.model, run.optimizer):
        val_loss = evaluate(run.model, run.val_data, eval_batch_size(args), args.bptt, run.amp(),
                            run.d, max_batches=2 if args.dry_run else None,
                            stop=run.stop if run.d.world == 1 else None, bar=bar)
        if bar:
            bar.close()
        if val_loss is None:
            return None
        epoch_time = progress.epoch_time
        run.log("-" * 89)
        run.log(f"| end of epoch {progress.epoch + 1:3d} | time: {epoch_time:5.2f}s | "
                f"valid loss {val_loss:5.2f} | valid ppl {safe_exp(val_loss):8.2f} | "
                f"valid bpc {val_loss / LOG2:8.3f}")
        run.log("-" * 89)
        run.log.metrics(type="valid", epoch=progress.epoch + 1, step=progress.steps,
                        tokens=progress.tokens, valid_loss=val_loss, valid_bpc=val_loss / LOG2,
                        epoch_time=epoch_time, time=time.time())
        if val_loss < progress.best_val:
            save_best(run, progress, val_loss)
            progress.best_val = val_loss
    return val_loss


def eval_batch_size(args):
    return min(100, args.batch_size)


def end_of_epoch(run, progress, val_loss):
    """--when learning-rate drops and the switch to averaged SGD, then the next epoch."""
    args = run.args
    epoch = progress.epoch + 1
    progress.val_history.append(val_loss)
    if epoch in args.when:
        if run.d.main:
            run.log("Saving model before learning rate decreased")
            atomic_save(base_checkpoint(run.model, run.config, run.vocab, args, {"epoch": epoch}),
                        f"{run.paths['save']}.e{epoch}")
        run.log("Dividing learning rate by 10")
    history = progress.val_history
    if (progress.optimizer_name == "sgd" and len(history) > args.nonmono
            and val_loss > min(history[:-args.nonmono])):
        run.log("Switching to ASGD")
        progress.optimizer_name = "asgd"
        run.optimizer = build_optimizer("asgd", run.model.parameters(), args)
    progress.epoch += 1
    progress.i = progress.batch = 0
    progress.hidden = progress.mems = None
    progress.epoch_time = 0.0


def train(run, progress):
    """Epochs of training and validation; returns how it ended: 'done', 'interrupt' or
    'terminate' (the last checkpoint is written in every case)."""
    epochs = 1 if run.args.dry_run else run.args.epochs
    while progress.epoch < epochs:
        start = time.time() - progress.epoch_time
        if not train_epoch(run, progress, start):
            return run.stop.reason
        progress.epoch_time = time.time() - start
        val_loss = validate(run, progress)
        if val_loss is not None:
            end_of_epoch(run, progress, val_loss)
        save_last(run, progress)
        if run.stop.agree(run):
            return run.stop.reason
    return "done"


def test(run, dynamic):
    """Load the best checkpoint (if one was written) and report test loss/ppl/bpc."""
    args = run.args
    path = run.paths["save"]
    if os.path.exists(path):
        run.model.load_strict(load_checkpoint(path)["model"])
    else:
        run.log(f"No checkpoint at {path}; testing the current weights")
    bar = progress_bar(run, (run.test_data.shape[0] - 1) * TEST_BATCH_SIZE, "test")
    limit = 2 if args.dry_run else None
    test_loss = evaluate(run.model, run.test_data, TEST_BATCH_SIZE, args.bptt, run.amp(), run.d,
                         max_batches=limit, bar=bar)
    if bar:
        bar.close()
    run.log("=" * 89)
    run.log(f"| End of training | test loss {test_loss:5.2f} | test ppl {safe_exp(test_loss):8.2f} | "
            f"test bpc {test_loss / LOG2:8.3f}")
    run.log("=" * 89)
    run.log.metrics(type="test", test_loss=test_loss, test_bpc=test_loss / LOG2, time=time.time())
    if dynamic:
        report_dynamic(run, run.test_data, TEST_BATCH_SIZE, "test", limit)


def report_dynamic(run, source, bsz, name, limit=None):
    args = run.args
    loss, _ = dynamic_evaluate(run.model, run.train_data, source, bsz, args.bptt, run.amp(),
                               args.dyn_lr, args.dyn_decay, args.dyn_eps, args.dyn_stat_batches,
                               max_batches=limit)
    run.log(f"| dynamic eval | {name} loss {loss:5.2f} | {name} ppl {safe_exp(loss):8.2f} | "
            f"{name} bpc {loss / LOG2:8.3f}")
    run.log.metrics(type=f"dynamic_{name}", loss=loss, bpc=loss / LOG2, time=time.time())
    return loss


def eval_only(run):
    """--eval-only: valid and test of the resumed weights; nothing is trained or written."""
    args = run.args
    limit = 2 if args.dry_run else None
    for name, source, bsz in (("valid", run.val_data, eval_batch_size(args)),
                              ("test", run.test_data, TEST_BATCH_SIZE)):
        loss = evaluate(run.model, source, bsz, args.bptt, run.amp(), run.d, max_batches=limit)
        run.log(f"| eval only | {name} loss {loss:5.2f} | {name} ppl {safe_exp(loss):8.2f} | "
                f"{name} bpc {loss / LOG2:8.3f}")
        if args.dynamic_eval:
            report_dynamic(run, source, bsz, name, limit)


# --- setup -------------------------------------------------------------------------------

def load_start(args):
    """The checkpoint to start from (--continue or --resume), with --continue's saved flags
    filling in every flag not given on the command line."""
    if args.continue_from:
        ckpt = load_checkpoint(args.continue_from)
        if ckpt.get("kind") != "sha-rnn" or "progress" not in ckpt:
            raise InputError(f"{args.continue_from} is not a last checkpoint (SAVE.last.pt or "
                             f"--last); use --resume to start a new run from weights")
        changed = []
        for key, value in ckpt["args"].items():
            value = tuple(value) if key == "save_interval" else value
            if key in ("continue_from", "resume", "dry_run"):
                continue
            if key not in args.explicit:
                setattr(args, key, value)
            elif getattr(args, key) != value:
                changed.append(f"{key} {value} -> {getattr(args, key)}")
        if changed:
            print("note: continuing with changed flags: " + ", ".join(changed), file=sys.stderr)
        return ckpt
    if args.resume:
        return load_checkpoint(args.resume)
    return None


def paths_for(args, tmp):
    save = os.path.join(tmp, "model.pt") if tmp else args.save
    stem = os.path.splitext(save)[0]
    last = os.path.join(tmp, "last.pt") if tmp else (args.last or stem + ".last.pt")
    run_dir = os.path.join(tmp, "run") if tmp else (args.run_dir or stem + ".run")
    return {"save": save, "last": last, "run_dir": run_dir}


def model_for(args, start, corpus):
    """The model of the flags or of the checkpoint to start from, with its weights loaded;
    returns (model, config)."""
    ntokens = len(corpus.dictionary)
    if start is None:
        config = model_config(args, ntokens, None, corpus.byte_level)
    elif start["kind"] == "sha-rnn":
        if start["vocab"] != corpus.dictionary.idx2word:
            raise InputError(f"the checkpoint's vocabulary ({len(start['vocab'])} tokens) differs "
                             f"from that of {args.data} ({ntokens} tokens)")
        config = model_config(args, ntokens, start, corpus.byte_level)
    else:
        config = config_for_state_dict(args, ntokens, start["model"])
    model = build_model(config, args)
    try:
        if start is not None and start["kind"] == "state_dict":
            model.load_original_state_dict(start["model"])
        elif start is not None:
            model.load_strict(start["model"])
    except ValueError as e:
        raise InputError(str(e)) from None
    return model, config


def device_data(corpus, args, d, device):
    """The three splits batchified, this rank's columns, in a compact dtype on the device."""
    dtype = compact_dtype(len(corpus.dictionary))
    train = split_columns(corpus.train.to(dtype), args.batch_size, d, device)
    valid = split_columns(corpus.valid.to(dtype), eval_batch_size(args), d, device)
    test = split_columns(corpus.test.to(dtype), TEST_BATCH_SIZE, d, device)
    if args.bptt >= train.shape[0] - 1:
        raise InputError(f"--bptt {args.bptt} is longer than the training stream "
                         f"({train.shape[0]} tokens per column at batch size {args.batch_size})")
    return train, valid, test


def progress_from(start, args, d, device):
    """A fresh Progress, or the one of the last checkpoint with this rank's carried state."""
    if not args.continue_from:
        return Progress(optimizer_name=args.optimizer)
    progress = Progress(**start["progress"])
    carry = start["carry"]
    if carry is not None:
        cols = d.share(args.batch_size)
        progress.hidden = [None if h is None else tuple(x[:, cols].to(device) for x in h)
                           for h in carry["hidden"]]
        progress.mems = [None if m is None else m[:, cols].to(device) for m in carry["mems"]]
    return progress


def setup(args, tmp):
    """Check the flags, load data and weights, and build the Run and its Progress."""
    check_args(args)
    start = load_start(args)
    d, device = setup_distributed(pick_device(args.device))
    paths = paths_for(args, tmp)
    writes = not args.eval_only
    if writes and d.main:
        for key in ("save", "last"):
            check_writable(paths[key])
    if args.dynamic_eval and d.world > 1:
        raise InputError("--dynamic-eval runs in one process; launch it without torchrun")
    if args.batch_size % d.world:
        raise InputError(f"--batch_size {args.batch_size} does not divide over {d.world} ranks")
    if device.type == "cpu" and args.amp != "none" and "amp" in args.explicit:
        print(f"note: --amp {args.amp} is CUDA-only; the CPU runs float32", file=sys.stderr)

    rng = np.random.RandomState(args.seed)  # sequence lengths: the same on every rank
    torch.manual_seed(args.seed)
    corpus = Corpus(args.data, unk=args.unk, cache=writes)
    model, config = model_for(args, start, corpus)
    model.to(device)
    model.set_checkpoint_activations(args.checkpoint_activations)
    if args.compile:
        model.compile_blocks()
    if d.world > 1:
        torch.manual_seed(args.seed + d.rank)  # distinct dropout masks per rank
    train_data, val_data, test_data = device_data(corpus, args, d, device)

    net = model
    if d.world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=config["cutoffs"] is not None)
    progress = progress_from(start, args, d, device)
    optimizer = build_optimizer(progress.optimizer_name, model.parameters(), args)
    scaler = make_scaler(device, args.amp)
    if args.continue_from:
        optimizer.load_state_dict(start["optimizer"])
        if scaler.is_enabled() and start["scaler"]:
            scaler.load_state_dict(start["scaler"])
        restore_rng(rng, start["rng"], d)

    log = RunLog(paths["run_dir"] if writes else None, enabled=d.main,
                 append=bool(args.continue_from))
    if writes and d.main:
        write_json(os.path.join(paths["run_dir"], "args.json"), dict(saved_args(args), model=config))
        write_json(os.path.join(paths["run_dir"], "env.json"), environment())
    run = Run(args, model, net, optimizer, scaler, config, corpus.dictionary.idx2word,
              train_data, val_data, test_data, device, d, log, rng, Stop(), paths)
    return run, progress


def execute(run, progress):
    """Evaluate only, or train then test; returns the exit code."""
    args, config = run.args, run.config
    nparams = sum(p.numel() for p in run.model.parameters())
    run.log(f"Model: {nparams:,} parameters, attention in blocks {config['attn_layers']}, "
            f"{config['ntoken']} tokens, device {run.device}"
            + (f" x {run.d.world} ranks" if run.d.world > 1 else "")
            + (f", amp {args.amp}" if run.device.type == "cuda" else ""))
    if args.eval_only:
        eval_only(run)
        return 0
    with run.stop:
        try:
            ended = train(run, progress)
        except NonFinite as e:
            run.log(f"error: {e}")
            save_last(run, progress)
            return 1
    if ended == "terminate":
        run.log(f"Stopped by SIGTERM; continue with --continue {run.paths['last']}")
        return 0
    if ended == "interrupt":
        run.log("-" * 89)
        run.log("Exiting from training early")
    test(run, args.dynamic_eval)
    return 0


def run_main(args, tmp):
    run, progress = setup(args, tmp)
    try:
        return execute(run, progress)
    finally:
        run.log.close()


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="sharnn-dry-run-") if args.dry_run else None
    try:
        code = run_main(args, tmp)
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks to it
        return code
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
