"""Where the training runs: device, mixed precision, torchrun ranks and the stop signal."""

import os
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flags import InputError, launched_rank


# --- device and precision ----------------------------------------------------------------

def pick_device(flag, tf32=True):
    """The device of --device; on CUDA, float32 matrix products and cuDNN (the LSTMs) run in
    TF32 unless `tf32` is False (--no-tf32). The CPU's settings are left as they are."""
    if flag == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return device


def out_of_memory(error):
    """True when `error` is an allocator's refusal (CPU or CUDA)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("alloc" in str(error) or "out of memory" in str(error)))


def amp_mode(device, amp):
    """What --amp means on `device`: 'fp16', 'bf16' or 'none' (float32). `auto` is fp16 on
    CUDA and float32 on the CPU."""
    if amp == "auto":
        return "fp16" if device.type == "cuda" else "none"
    return amp


def amp_dtype(device, amp):
    """The autocast dtype of --amp on `device`, or None for float32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}[amp_mode(device, amp)]


def autocast(device, amp):
    """Mixed precision (CUDA or CPU autocast) in the dtype of --amp; a no-op for float32.
    Under autocast the attention's query path and the loss stay float32 (model.py), and the
    LSTMs run in the dtype of model.lstm_dtype."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


class ConstantScaler(torch.amp.GradScaler):
    """A loss scale fixed at 1 (multiplying by 1 changes no value), kept for the scaler's
    other job: a step whose gradients hold an inf or nan is skipped, for LAMB without a host
    synchronisation."""

    def __init__(self, device):
        super().__init__(device.type, init_scale=1.0)

    def update(self, new_scale=None):
        super().update(1.0)  # no halving after a skipped step, no growth


def make_scaler(device, amp):
    """The training step's scaler: dynamic loss scaling for fp16, else a constant 1."""
    if amp_dtype(device, amp) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return ConstantScaler(device)


# --- torchrun ----------------------------------------------------------------------------

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


def setup_distributed(device):
    """Join the torchrun process group (gloo on CPU, nccl on CUDA); (Dist, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank = launched_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


def leave(code):
    """End a torchrun worker with exit code `code`, at once, once its work is done (its
    checkpoints, records and locks written and released). The usual teardown would destroy
    the gloo process group with the interpreter lock held, while the group's worker thread
    may still need that lock to free the tensors of the last collective: a deadlock, or an
    abort at exit, that torch hits now and then. Exiting here skips that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_sum(t, d):
    if d.world > 1:
        dist.all_reduce(t)
    return t


def agree(d, device, *values):
    """The maximum of each value over the ranks, so that every rank decides alike."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(t.tolist())


def gather_columns(t, d):
    """All ranks' column shares of a [..., B_local, E] state tensor, in rank order."""
    if d.world == 1 or t is None:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=-2)


# --- stopping ----------------------------------------------------------------------------

class Stop:
    """Signal handling. SIGINT (Ctrl-C): stop after the current step, then test the best
    checkpoint, as the original did; a second Ctrl-C quits at once. SIGTERM (pre-emption):
    stop after the current step, write the last checkpoint, exit 0.

    "records": the run records could not be written (a full disk): stop after the current
    step, write the last checkpoint, exit 2.

    `reason` is what this process received; `agreed` is the ranks' common decision (the
    highest reason of any rank), the only one the run acts on under torchrun."""

    REASONS = (None, "terminate", "interrupt", "records")  # ranks agree on the highest

    def __init__(self):
        self.reason = None
        self.agreed = None
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

    def decide(self, code):
        """Take the ranks' agreed code (from `agree`); True when stopping."""
        self.agreed = self.REASONS[int(code)]
        return self.agreed is not None

    def agree(self, d, device):
        """Agree with the other ranks on whether (and why) to stop; True when stopping."""
        return self.decide(agree(d, device, self.code)[0])

    def _raise(self, reason):
        """Keep the highest reason received (the same order the ranks agree in)."""
        if self.REASONS.index(reason) > self.REASONS.index(self.reason):
            self.reason = reason

    def records_failed(self):
        """The run records could not be written: stop, whatever else was asked."""
        self._raise("records")

    def _interrupt(self, signum, frame):
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = "interrupt"
        print("stopping after this step (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    def _terminate(self, signum, frame):
        self._raise("terminate")
