"""--budget: as many optimizer steps as fit a time budget on this machine.

The run times its own training step over its first steps (after a few that warm the
allocator and caches) and one chunk of validation and of test, then sets --max-steps to the
steps that fit in what is left of the budget once every validation (one per epoch end, one
at the last step) and the final test are paid for, and --cooldown to its recipe's share of
them. The weights and random streams are then put back as they were, so the run is exactly
the run of `--max-steps N --cooldown M`; N and M go into its flags, records and checkpoints,
and a --continue ends at the same step without measuring again.
"""

import bisect
import math
import time
from dataclasses import dataclass

import torch

from data import get_batch
from flags import InputError, budget_seconds, by_limit
from runtime import agree
from training import (epoch_batches, evaluate, lr_at, make_step, sample_seq_len, steps_in,
                      train_step, twin)

WARM, TIMED = 5, 20     # training steps: untimed, then timed
MARGIN = 0.03           # of the budget, left for checkpoint writes and the unforeseen
clock = time.perf_counter  # the tests give it a clock of their own


@dataclass
class Measured:
    """What the run measured: seconds per optimizer step, per validation, per test, and
    since main.py began (setting up and measuring)."""
    step: float
    valid: float
    test: float
    elapsed: float = 0.0


def snapshot(model, rng):
    """The weights and random streams, to put back after measuring."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, rng.get_state(),
            torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore(model, rng, state):
    weights, numpy_state, torch_state, cuda_state = state
    model.load_state_dict(weights)
    rng.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(run):
    """Seconds per optimizer step: TIMED training batches after WARM, as the epoch runs them."""
    args, step = run.args, run.step
    step.model.train()
    hidden = mems = pending = None
    i, start = 0, None
    for n in range(WARM + TIMED):
        if n == WARM:
            synchronize(step.device)
            start = clock()
        seq_len = sample_seq_len(run.rng, args.bptt)
        if i + seq_len >= run.train_data.shape[0] - 1:
            i, hidden, mems = 0, None, None
        x, y = get_batch(run.train_data, i, seq_len)
        update = n % args.accumulate == 0
        lr = lr_at(n + 1, n // args.accumulate + 1, args.lr, args.warmup)  # the run's warmup
        _, hidden, mems, pending, _ = train_step(step, x, y, hidden, mems, pending, lr, update)
        i += x.shape[0]
    synchronize(step.device)
    return (clock() - start) / TIMED * args.accumulate


def time_evaluation(run, source, bsz):
    """Seconds for a whole evaluation of `source`, from the time of its second chunk."""
    chunks = len(range(0, source.shape[0] - 1, run.args.bptt))
    evaluate(run.model, source, bsz, run.args.bptt, run.step.autocast(), run.d, max_batches=1)
    synchronize(run.device)
    start = clock()
    evaluate(run.model, source, bsz, run.args.bptt, run.step.autocast(), run.d, max_batches=2)
    synchronize(run.device)
    return (clock() - start) / 2 * chunks  # two chunks timed (the first runs again)


def measure(run, valid_bsz, test_bsz, started):
    """The Measured times of a run's step and evaluations, and the time since `started`,
    agreed by the ranks (each the slowest rank's), so that every rank fixes the same steps;
    with the weights and random streams restored and a fresh optimizer afterwards."""
    state = snapshot(run.model, run.rng)
    times = (time_steps(run), time_evaluation(run, run.val_data, valid_bsz),
             time_evaluation(run, run.test_data, test_bsz))
    restore(run.model, run.rng, state)
    run.step = make_step(run.model, run.args, run.device, net=run.step.net)
    return Measured(*agree(run.d, run.device, *times, clock() - started))


def epoch_ends(rng, rows, bptt, accumulate, steps):
    """The optimizer steps at which the epochs end, up to the first at or past `steps`."""
    rng, ends = twin(rng), [0]
    while ends[-1] < steps:
        ends.append(ends[-1] + steps_in(0, epoch_batches(rng, 0, rows, bptt), accumulate))
    return ends[1:]


def fit(seconds, measured, ends_of):
    """The most optimizer steps N whose training, validations (each epoch end before N, and
    N itself) and test fit in `seconds` (0 when none does); `ends_of(N)` gives the epoch
    ends up to N. The cost grows with N: a binary search."""
    most = int((seconds - measured.test - measured.valid) / measured.step)
    if most < 1:
        return 0
    ends = ends_of(most)

    def cost(n):
        return n * measured.step + (bisect.bisect_left(ends, n) + 1) * measured.valid + measured.test

    low, high = 0, most  # cost(low) fits (or low is 0); cost(high + 1) does not
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= seconds else (low, middle - 1)
    return low


def apply(run, started, valid_bsz, test_bsz, rule, sources):
    """Measure, then set the run's --max-steps, --cooldown and --epochs so that it ends
    within --budget, counted from `started` (the clock when main.py began), by its recipe's
    `rule` (flags.BUDGET_RULES): the cooldown's share of the steps, and the regularisation
    for the epochs they cover (measuring again when it changes the step). Flags given on
    the command line are kept. Returns the line that says so."""
    args = run.args
    measured, steps = settle(run, started, valid_bsz, test_bsz)
    regularise = {k: v for k, v in by_limit(rule.get("regularise", []), epochs_of(run, steps)).items()
                  if sources.get(k) != "given" and getattr(args, k) != v}
    if regularise:
        for key, value in regularise.items():
            setattr(args, key, value)
            sources[key] = f"budget {args.budget}"
        run.model.set_dropouts(args.dropout, args.dropouth, args.dropouti, args.dropoute, args.wdrop)
        measured, steps = settle(run, started, valid_bsz, test_bsz)
    rows = run.train_data.shape[0]
    if steps < 1:
        raise InputError(f"--budget {args.budget} is too short: setting up and measuring took "
                         f"{measured.elapsed:.0f} s, and a validation and the test need "
                         f"{measured.valid + measured.test:.0f} s more; give a longer --budget")
    ends = epoch_ends(run.rng, rows, args.bptt, args.accumulate, steps)
    args.max_steps = steps
    sources["max_steps"] = f"budget {args.budget}"
    if sources.get("cooldown") != "given":
        args.cooldown = round(rule.get("cooldown", 0) * steps) or None
        sources["cooldown"] = f"budget {args.budget}"
    if sources.get("epochs") != "given":
        args.epochs = len(ends)
        sources["epochs"] = f"budget {args.budget}"
    return (f"Budget {args.budget}: {steps:,} optimizer steps of {1000 * measured.step:,.1f} ms "
            f"(measured over {TIMED} steps), over {len(ends)} epoch(s), cooldown "
            f"{args.cooldown or 0:,} steps; {math.ceil(measured.valid):,} s per validation, "
            f"{math.ceil(measured.test):,} s for the test"
            + (f"; for {epochs_of(run, steps):.1f} epochs of data: "
               + ", ".join(f"--{k} {v}" for k, v in regularise.items()) if regularise else ""))


def settle(run, started, valid_bsz, test_bsz):
    """Measure the run as it now is, and the steps that fit what is left of its budget."""
    args = run.args
    measured = measure(run, valid_bsz, test_bsz, started)
    left = budget_seconds(args.budget) * (1 - MARGIN) - measured.elapsed
    rows = run.train_data.shape[0]
    steps = fit(left, measured, lambda n: epoch_ends(run.rng, rows, args.bptt, args.accumulate, n))
    return measured, steps


def epochs_of(run, steps):
    """How many times `steps` optimizer steps go through the training data."""
    return steps * run.args.accumulate * run.args.bptt / run.train_data.shape[0]
