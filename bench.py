"""Throughput and peak memory of the real SHA-RNN training (or evaluation) step.

The step timed is the one main.py runs: forward with the carried LSTM states and attention
memories, loss, scaled backward, unscale and clip, LAMB step, zero_grad. Timing starts once
the attention memory is full (steady state) and reports the median step:

    python bench.py --device cuda --amp fp16 --steps 20          # the paper's sizes
    python bench.py --emsize 128 --nhid 512 --bptt 128 --batch_size 8 --steps 20 --floor

`--floor` also times a bare implementation of the same computation (plain functions over
the same parameter tensors, no modules) and prints the model's overhead over it;
`--also-eval` times evaluation after the training step; `--attention-kernels` times the
attention product alone with each of PyTorch's attention kernels; `--gpu-check` runs
gpu_check.py's sequence of these.
"""

import argparse
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpu_check
import runtime
from flags import (PAPER, InputError, Parser, add_device_flags, add_model_flags, check_model_flags,
                   check_seed, run_script)
from model import LN_EPS, autocast_dtype, gelu, lstm_dtype, model_config
from model import build_model as build_sharnn
from runtime import amp_dtype, amp_mode, autocast, make_scaler, out_of_memory
from schedule import Schedule
from training import (Progress, build_optimizer, check_fits, device_memory, make_step,
                      place_model, train_batch)

LSTM_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


# --- flags -------------------------------------------------------------------------------

def build_parser():
    """The flags: main.py's model and step flags, plus the measurement's; the defaults are
    the paper's (flags.PAPER), and the optimizer is its LAMB."""
    p = Parser(description="Time the SHA-RNN training step (or evaluation with --eval) on "
                           "synthetic tokens, at steady state with the attention memory "
                           "full. Defaults are the paper's sizes.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model (as in main.py)")
    add_model_flags(g)
    g.add_argument("--ntoken", type=int, default=205,
                   help="vocabulary size (205 is enwik8's byte vocabulary)")
    g.add_argument("--dropout", type=float, default=PAPER["dropout"], help="dropout on the final output")
    g.add_argument("--dropouth", type=float, default=PAPER["dropouth"], help="dropout inside blocks")
    g.add_argument("--dropouti", type=float, default=PAPER["dropouti"],
                   help="dropout on the embedding output")
    g.add_argument("--attention", choices=("sdpa", "matmul"), default="sdpa",
                   help="attention product: scaled_dot_product_attention (the model's default) "
                        "or the plain matmul-softmax-matmul reference")
    g = p.add_argument_group("step")
    g.add_argument("--bptt", type=int, default=PAPER["bptt"], help="sequence length of every step")
    g.add_argument("--batch_size", "--batch-size", type=int, default=PAPER["batch_size"],
                   metavar="N", help="batch size")
    add_device_flags(g)
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    g.add_argument("--warmup-steps", type=int, default=3,
                   help="untimed steps before timing; raised as needed so that the attention "
                        "memory is full (ceil(mem_len / bptt) + 2)")
    g.add_argument("--eval", action="store_true",
                   help="time evaluation (eval mode, no gradients) instead of training")
    g.add_argument("--also-eval", action="store_true",
                   help="after the training step, also time evaluation on a freshly built model "
                        "(its line comes last; on the CPU its peak memory is the whole "
                        "process's, training included)")
    g.add_argument("--attention-kernels", action="store_true",
                   help="instead of the step, time the attention product alone at the flags' "
                        "sizes (--batch_size x --heads, --bptt queries over max(--mem-len, "
                        "--bptt) keys, the model's mask, in --amp's dtype, forward and "
                        "backward) with each of PyTorch's scaled-dot-product kernels and with "
                        "two plain matrix products; a kernel that refuses these inputs says why")
    g.add_argument("--floor", action="store_true",
                   help="also time a bare functional implementation of the same step (eager, "
                        "no activation checkpointing) on the same weights and batches, "
                        "interleaved with the model's steps, and print the model's overhead")
    g.add_argument("--seed", type=int, default=PAPER["seed"], help="seed for the weights and the tokens")
    g.add_argument("--gpu-check", action="store_true",
                   help="the first measurements of a new GPU, in at most 8 minutes, printed row "
                        "by row as Markdown for docs/speed.md (gpu_check.py): training and "
                        "evaluation at the paper's sizes (one attention block and every block; "
                        "fp16, bf16 and float32; the attention as SDPA and as two matrix "
                        "products), the attention kernels, two minutes of training the paper's "
                        "model on data/sample, then --compile rows in the time left. Needs CUDA; "
                        "every other flag is ignored")
    # The byte-level model (full softmax, tied decoder) and the paper's LAMB step.
    p.set_defaults(adaptive_softmax=False, cutoffs=None,
                   **{k: PAPER[k] for k in ("optimizer", "lr", "wdecay", "clip", "dropoute", "wdrop")})
    return p


MAX_STEPS = 10**6  # most timed (or warm-up) steps


def check_args(args):
    """Raise InputError on a flag value the benchmark cannot run with."""
    check_model_flags(args)
    for flag in ("bptt", "batch_size", "steps", "ntoken"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} must be positive, got {getattr(args, flag)}")
    for flag in ("steps", "warmup_steps"):
        if not 0 <= getattr(args, flag) <= MAX_STEPS:
            raise InputError(f"--{flag.replace('_', '-')} must be between 0 and {MAX_STEPS:,}, "
                             f"got {getattr(args, flag)}")
    check_seed(args.seed)
    tokens = (args.warmup_steps + args.steps + 2) * args.bptt * args.batch_size
    if tokens * 8 > device_memory(torch.device("cpu")):
        raise InputError(f"--bptt {args.bptt} x --batch_size {args.batch_size} over "
                         f"{args.warmup_steps + args.steps} steps does not fit in memory: "
                         f"{tokens * 8 / 2**30:,.1f} GiB of token ids alone")


def build_model(args, device):
    """The SHA-RNN of the flags on `device`, with --compile and --checkpoint-activations."""
    model = build_sharnn(model_config(args, args.ntoken), args, sdpa=args.attention == "sdpa")
    return place_model(model, args, device)


# --- the real step -----------------------------------------------------------------------

def model_train_step(step, lr):
    """A closure `step(x, y) -> loss` training one batch as main.py does (training.train_batch,
    an optimizer step each batch) with a Step at the constant learning rate `lr`, carrying
    the LSTM states and memories from call to call."""
    progress, schedule = Progress(), Schedule(lr=lr, warmup=1, nominal=1)

    def run(x, y):
        progress.i = progress.batch = 0  # each call trains a stream that holds one batch
        source = torch.cat([x, y[-1:]])  # [T + 1, B]: y is x shifted by one
        return train_batch(step, progress, schedule, source, seq_len=x.shape[0], accumulate=1,
                           batch_size=x.shape[1]).loss

    return run


def model_eval_step(model, device, amp):
    """A closure `step(x, y) -> summed loss` running main.py's evaluation of one chunk
    (eval mode, no gradients, autocast), carrying the state from call to call."""
    hidden = mems = None

    def step(x, y):
        nonlocal hidden, mems
        with torch.no_grad(), autocast(device, amp):
            output, hidden, mems = model(x, hidden, mems)
            return model.loss(output, y).sum(dtype=torch.float64)

    return step


# --- the floor: the same computation as plain functions ----------------------------------

@dataclass(frozen=True)
class FloorConfig:
    """What the bare implementation needs to know about the model."""
    ninp: int
    nlayers: int
    attn_layers: tuple
    heads: int
    mem_len: int
    dropout: float
    dropouth: float
    dropouti: float
    sdpa: bool


def floor_config(model):
    """The FloorConfig of a SHARNN."""
    attn = [b.attn for b in model.blocks if b.attn is not None]
    return FloorConfig(model.ninp, model.nlayers, tuple(model.attn_layers), model.heads,
                       model.mem_len, model.drop.p, model.blocks[0].drop.p, model.idrop.p,
                       attn[0].sdpa if attn else True)


def layer_norm(P, name, x):
    """LayerNorm over the last dimension with the parameters `name`.weight and .bias."""
    return F.layer_norm(x, x.shape[-1:], P[name + ".weight"], P[name + ".bias"], LN_EPS)


def floor_lstm(P, prefix, x, hidden, training):
    """One-layer LSTM through the fused kernel; hidden None starts from zeros."""
    # x: [T, B, E]; hidden: ([1, B, E], [1, B, E]) or None
    if hidden is None:
        zeros = x.new_zeros(1, x.shape[1], x.shape[2])
        hidden = (zeros, zeros)
    weights = [P[prefix + name] for name in LSTM_WEIGHTS]
    amp = autocast_dtype(x.device.type)
    if amp is not None and lstm_dtype(x.device.type, amp) == torch.float32:
        with torch.autocast(x.device.type, enabled=False):
            x, hidden = x.float(), tuple(t.float() for t in hidden)
            out, h, c = torch._VF.lstm(x, hidden, weights, True, 1, 0.0, training, False, False)
        return out, (h, c)
    out, h, c = torch._VF.lstm(x, hidden, weights, True, 1, 0.0, training, False, False)
    return out, (h, c)  # out: [T, B, E]


def floor_attention(P, prefix, cfg, query, kv, mask, training):
    """Single-headed attention (docs/model.md, Model) of `query` over `kv`."""
    # query: [T, B, E]; kv: [S, B, E]; mask: [T, S] bool, True = visible
    E, H, p = cfg.ninp, cfg.heads, cfg.dropouth
    qs, ks = torch.sigmoid(P[prefix + "qs"]), torch.sigmoid(P[prefix + "ks"])  # [1, 1, E]
    c, f = F.linear(torch.sigmoid(P[prefix + "vs"]), P[prefix + "vq.l1.weight"],
                    P[prefix + "vq.l1.bias"]).split(E, dim=-1)
    vs = torch.sigmoid(f) * torch.tanh(c)  # [1, 1, E]
    weight = P[prefix + "q.weight"]
    with torch.autocast(query.device.type, enabled=False):
        query = layer_norm(P, prefix + "qln",
                           F.linear(query.to(weight.dtype), weight, P[prefix + "q.bias"]))
    q = F.dropout(qs * query, p, training) * ks  # the key and value gates as in the model
    k = kv
    v = F.dropout(kv, p, training)
    T, B, S = q.shape[0], q.shape[1], k.shape[0]
    q = q.reshape(T, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, T, D]
    k = k.reshape(S, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, S, D]
    v = v.reshape(S, B, H, E // H).permute(1, 2, 0, 3)  # [B, H, S, D]
    if cfg.sdpa:
        mix = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=p if training else 0.0)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(E // H)  # [B, H, T, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        mix = torch.matmul(F.dropout(F.softmax(scores, dim=-1), p, training), v)  # [B, H, T, D]
    return mix.permute(2, 0, 1, 3).reshape(T, B, E) * vs  # [T, B, E]


def floor_boom(P, prefix, x, p, training):
    """GELU(linear1(x)), dropout, then the nhid / ninp chunks summed."""
    # x: [T, B, E]
    y = F.dropout(gelu(F.linear(x, P[prefix + "linear1.weight"], P[prefix + "linear1.bias"])),
                  p, training)  # [T, B, nhid]
    return y.view(*y.shape[:-1], -1, x.shape[-1]).sum(dim=-2)  # [T, B, E]


def floor_block(P, i, cfg, h, mask, mem, hidden, training):
    """One block: LSTM, attention over memory if the block has it, Boom."""
    # h: [T, B, E]; mem: [m, B, E] or None
    prefix, p = f"blocks.{i}.", cfg.dropouth
    h = layer_norm(P, prefix + "lnstart", h)
    x, hidden = floor_lstm(P, prefix + "rnn.", h, hidden, training)
    h = F.dropout(x, p, training)
    new_mem = None
    if i in cfg.attn_layers:
        mh, h = layer_norm(P, prefix + "lnmem", h), layer_norm(P, prefix + "lnmid", h)
        big = mh if mem is None else torch.cat([mem, mh], dim=0)  # [m + T, B, E]
        if cfg.mem_len > 0:
            new_mem = big[max(big.shape[0] - cfg.mem_len, 0):]
        h = h + F.dropout(floor_attention(P, prefix + "attn.", cfg, h, big, mask, training),
                          p, training)
    ff = floor_boom(P, prefix + "ff.", layer_norm(P, prefix + "lnxff", h), p, training)
    return layer_norm(P, prefix + "lnff", h) + F.dropout(ff, p, training), hidden, new_mem


def floor_forward(P, cfg, x, hidden, mems, training):
    """The SHA-RNN forward over parameter dict P; returns (output, hidden, mems)."""
    # x: [T, B] token ids
    T = x.shape[0]
    h = F.dropout(F.embedding(x, P["encoder.weight"]), cfg.dropouti, training)  # [T, B, E]
    hidden = hidden or [None] * cfg.nlayers
    mems = mems if mems and cfg.mem_len else [None] * cfg.nlayers
    keep = max(cfg.mem_len - T, 0)
    mems = [None if mem is None else mem[max(mem.shape[0] - keep, 0):] for mem in mems]
    m = max((mem.shape[0] for mem in mems if mem is not None), default=0)
    mask = torch.ones(T, m + T, dtype=torch.bool, device=x.device).tril(diagonal=m)  # [T, m + T]
    new_hidden, new_mems = [], []
    for i in range(cfg.nlayers):
        h, hid, mem = floor_block(P, i, cfg, h, mask, mems[i], hidden[i], training)
        new_hidden.append(hid)
        new_mems.append(mem)
    return F.dropout(h, cfg.dropout, training), new_hidden, new_mems


def floor_loss(P, output, y):
    """Mean cross-entropy of the tied decoder's logits, in float32."""
    # output: [T, B, E]; y: [T, B]
    logits = F.linear(output.reshape(-1, output.shape[-1]), P["encoder.weight"], P["decoder.bias"])
    return F.cross_entropy(logits.float(), y.reshape(-1))


def floor_train_step(P, cfg, optimizer, scaler, device, amp, clip):
    """A closure `step(x, y) -> loss`: the floor's forward and loss, scaled backward,
    unscale, clip, LAMB step, zero_grad, carrying the detached state between calls."""
    params = list(P.values())
    hidden = mems = None

    def step(x, y):
        nonlocal hidden, mems
        with autocast(device, amp):
            output, hidden, mems = floor_forward(P, cfg, x, hidden, mems, True)
            loss = floor_loss(P, output, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        hidden = [tuple(t.detach() for t in hc) for hc in hidden]
        mems = [None if mem is None else mem.detach() for mem in mems]
        return loss.detach()

    return step


def floor_eval_step(P, cfg, device, amp):
    """A closure `step(x, y) -> summed loss`: the floor's forward without gradients."""
    hidden = mems = None

    def step(x, y):
        nonlocal hidden, mems
        with torch.no_grad(), autocast(device, amp):
            output, hidden, mems = floor_forward(P, cfg, x, hidden, mems, False)
            return floor_loss(P, output, y) * y.numel()

    return step


# --- measurement -------------------------------------------------------------------------

def warmup_steps(args, model):
    """Untimed steps: --warmup-steps, and enough that the attention memory is full."""
    if model.attn_layers and args.mem_len > 0:
        return max(args.warmup_steps, math.ceil(args.mem_len / args.bptt) + 2)
    return args.warmup_steps


def synthetic_batches(n, bptt, bsz, ntoken, seed, device):
    """`n` (input, target) pairs of seeded random tokens, each `[bptt, bsz]`, cut from one
    stream so that targets are the inputs shifted by one."""
    gen = torch.Generator().manual_seed(seed)
    stream = torch.randint(ntoken, (n * bptt + 1, bsz), generator=gen).to(device)  # [n bptt + 1, B]
    return [(stream[i * bptt:(i + 1) * bptt], stream[i * bptt + 1:(i + 1) * bptt + 1])
            for i in range(n)]


def synchronize(device):
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(steps, batches, warmup, device):
    """Run every named step function on the same batches, the first `warmup` untimed; the
    functions alternate order from batch to batch. Returns ({name: [seconds per timed
    step]}, {name: seconds of its warm-up steps}); under --compile the warm-up holds the
    compilation."""
    names = list(steps)
    times = {name: [] for name in names}
    warm = {name: 0.0 for name in names}
    for i, (x, y) in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            steps[name](x, y)
            synchronize(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            else:
                warm[name] += time.perf_counter() - start
    return times, warm


def peak_memory_mb(device):
    """Peak memory of the whole run in MiB: CUDA max allocated, or the process peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


BF16_FEATURES = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16"}


def cpu_flags():
    """The feature flags of this CPU (from /proc/cpuinfo; empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_support(flags):
    """Whether this CPU computes in bfloat16 natively: without AVX-512 BF16 or AMX, --amp
    bf16 is emulated and slower than float32 (34% slower was seen on such a Xeon)."""
    have = [name for flag, name in BF16_FEATURES.items() if flag in flags]
    if have:
        return f"bf16 in hardware ({', '.join(have)})"
    return "no bf16 in hardware (neither AVX-512 BF16 nor AMX-BF16): --amp bf16 is slower than float32 here"


def cpu_name():
    """The CPU model from /proc/cpuinfo (or the platform's description)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def header(args, model, device, warmup):
    """The lines describing the machine, the model and the measurement."""
    whole_run = "the whole run" + (", model and floor" if args.floor else "")
    if device.type == "cuda":
        machine = f"device: {torch.cuda.get_device_name(device)}, amp {amp_mode(device, args.amp)}"
        memory = f"peak memory: torch.cuda.max_memory_allocated over {whole_run}"
    else:
        machine = (f"device: CPU {cpu_name()}, {torch.get_num_threads()} threads, "
                   f"amp {amp_mode(device, args.amp)}, "
                   f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
                   f"{bf16_support(cpu_flags())}")
        memory = f"peak memory: peak resident set size of the process over {whole_run}"
    nparams = sum(p.numel() for p in model.parameters())
    return [machine,
            f"torch {torch.__version__}",
            f"model: emsize {args.emsize}, nhid {args.nhid}, {args.nlayers} blocks, attention in "
            f"blocks {model.attn_layers} ({args.heads} head(s), {args.attention}), mem_len "
            f"{args.mem_len}, ntoken {args.ntoken}, {nparams:,} parameters"
            + (", compiled" if args.compile else "")
            + (", activation checkpointing" if args.checkpoint_activations else ""),
            f"{'eval' if args.eval else 'train'}: bptt {args.bptt}, batch {args.batch_size}, "
            f"{warmup} warm-up steps, {args.steps} timed steps (median reported)",
            memory]


def summary(times):
    """min / median / max of a list of seconds, as milliseconds."""
    return (f"{1000 * min(times):,.1f} / {1000 * statistics.median(times):,.1f} / "
            f"{1000 * max(times):,.1f} ms")


@dataclass
class Timing:
    """What `timed` measured."""
    times: dict         # {name: [seconds per timed step]}
    warm: dict          # {name: seconds of its warm-up steps}
    warmup: int         # warm-up steps
    lstm: torch.dtype   # the dtype of the model's LSTM outputs, seen at its first step
    device: torch.device


def start_device(args):
    """The device of the flags, with --threads, and (CUDA) its memory freed and its peak
    memory count restarted."""
    device = runtime.pick_device(args.device, not args.no_tf32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        gc.collect()  # a compiled model of an earlier measurement is held in a cycle
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return device


def timed(args, quiet=False):
    """Build the model of the flags, warm up, time its steps; returns a Timing. Prints the
    header unless `quiet`."""
    check_args(args)
    device = start_device(args)
    torch.manual_seed(args.seed)
    check_fits(model_config(args, args.ntoken), args.bptt, args.batch_size, device)
    model = build_model(args, device)
    warmup = warmup_steps(args, model)
    batches = synthetic_batches(warmup + args.steps, args.bptt, args.batch_size, args.ntoken,
                                args.seed, device)
    steps = step_functions(args, model, device)
    if not quiet:
        print("\n".join(header(args, model, device, warmup)), flush=True)
    lstm = []
    hook = model.blocks[0].rnn.register_forward_hook(lambda m, i, out: lstm.append(out[0].dtype))
    times, warm = measure(steps, batches, warmup, device)
    hook.remove()
    return Timing(times, warm, warmup, lstm[0], device)


def run(args):
    """Build, print the header, warm up, time, print the results (or the attention
    kernels', or the GPU check's)."""
    if args.gpu_check:
        gpu_check.run()
        return
    if args.attention_kernels:
        check_args(args)
        print("\n".join(attention_kernels(args, start_device(args))), flush=True)
        return
    report(args, timed(args))
    if args.also_eval and not args.eval:
        evaluation = argparse.Namespace(**dict(vars(args), eval=True))
        report(evaluation, timed(evaluation, quiet=True))


def report(args, timing):
    """Print the timings; the last line is `train: ...` (or `eval: ...`)."""
    times, device = timing.times, timing.device
    median = statistics.median(times["model"])
    print(f"LSTM output: {str(timing.lstm).replace('torch.', '')}")
    print(f"warm-up: {timing.warmup} steps in {timing.warm['model']:,.1f} s")
    print(f"model step min / median / max: {summary(times['model'])}")
    if max(times["model"]) > 2 * min(times["model"]):
        print("note: step times vary more than 2x; the machine is busy or throttled "
              "(on a shared CPU, --threads 1 is steadier)")
    if args.floor:
        floor = statistics.median(times["floor"])
        paired = statistics.median(m / f for m, f in zip(times["model"], times["floor"]))
        print(f"floor step min / median / max: {summary(times['floor'])}")
        print(f"floor: {1000 * floor:,.1f} ms/batch")
        print(f"overhead: {100 * (paired - 1):+.1f}% (the model's step time over the floor's, "
              f"step by step: the median of their ratios, each model step against the floor "
              f"step run beside it on the same batch, so that a change in machine load cancels)")
    tokens = args.bptt * args.batch_size / median
    print(f"{'eval' if args.eval else 'train'}: {1000 * median:,.1f} ms/batch, "
          f"{tokens:,.0f} tokens/s, peak {peak_memory_mb(device):,.0f} MB", flush=True)


# --- the attention product alone ---------------------------------------------------------

KERNELS = (("sdpa, PyTorch's choice", None), ("sdpa flash", SDPBackend.FLASH_ATTENTION),
           ("sdpa memory-efficient", SDPBackend.EFFICIENT_ATTENTION),
           ("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION), ("sdpa math", SDPBackend.MATH))
KERNEL_STEPS = 5  # timed forward and backward passes per kernel, after one untimed


def attention_kernels(args, device):
    """The lines of --attention-kernels: the attention product of the model at the flags'
    sizes, forward and backward, timed with each scaled-dot-product kernel (or why it
    refuses these inputs) and as two plain matrix products around a softmax."""
    B, H, T = args.batch_size, args.heads, args.bptt
    S, D = max(args.mem_len, T), args.emsize // H
    dtype = amp_dtype(device, args.amp) or torch.float32
    gen = torch.Generator().manual_seed(args.seed)

    def tensor(n):  # laid out as the model's: [n, B, E] viewed as [B, H, n, D]
        return (torch.randn(n, B, H, D, generator=gen).to(device, dtype).permute(1, 2, 0, 3)
                .requires_grad_())

    q, k, v = tensor(T), tensor(S), tensor(S)
    mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)  # [T, S]

    def matmuls():
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)  # [B, H, T, S]
        return torch.matmul(F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), v)

    def sdpa(backend):
        if backend is None:
            return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return run

    lines = [f"attention product: batch {B}, {H} head(s) of width {D}, {T:,} queries over "
             f"{S:,} keys, the model's mask, {str(dtype).replace('torch.', '')}, forward and "
             f"backward, median of {KERNEL_STEPS} on {device.type}"]
    for name, fn in [(name, sdpa(backend)) for name, backend in KERNELS] + [("two matmuls", matmuls)]:
        lines.append(f"{name}: {time_attention(fn, device)}")
    return lines


def time_attention(fn, device):
    """'N.N ms', the median forward and backward of `fn`, or 'refused (why)'."""
    times = []
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            for i in range(KERNEL_STEPS + 1):
                synchronize(device)
                start = time.perf_counter()
                fn().sum().backward()
                synchronize(device)
                times.append(time.perf_counter() - start)
    except RuntimeError as e:
        why = [str(w.message) for w in said] + [str(e)]
        return "refused (" + " ".join(why[0].split())[:150] + ")"
    return f"{1000 * statistics.median(times[1:]):,.2f} ms"


def step_functions(args, model, device):
    """{"model": step} and, with --floor, {"floor": step} over the same parameters."""
    P = dict(model.named_parameters())
    cfg = floor_config(model)
    if args.eval:
        model.eval()
        steps = {"model": model_eval_step(model, device, args.amp)}
        if args.floor:
            steps["floor"] = floor_eval_step(P, cfg, device, args.amp)
        return steps
    model.train()
    steps = {"model": model_train_step(make_step(model, args, device), args.lr)}
    if args.floor:
        optimizer = build_optimizer(args.optimizer, list(P.values()), args.lr, args.wdecay)
        steps["floor"] = floor_train_step(P, cfg, optimizer, make_scaler(device, args.amp),
                                          device, args.amp, args.clip)
    return steps


def main_cli(argv=None):
    """Run the benchmark; returns the exit code (2 on a bad flag value)."""
    args = build_parser().parse_args(argv)
    return run_script(run_fitting, args)


def run_fitting(args):
    """run(), with running out of memory as an InputError that names the sizes."""
    try:
        run(args)
    except RuntimeError as e:
        if not out_of_memory(e):
            raise
        raise InputError(f"the step does not fit in memory at --bptt {args.bptt} --batch_size "
                         f"{args.batch_size} with --emsize {args.emsize} --nhid {args.nhid} (the "
                         f"allocator: {str(e).strip().splitlines()[0][:120]})") from None


if __name__ == "__main__":
    sys.exit(main_cli())
