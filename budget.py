"""--budget: the run ends when its time is up, whatever else the machine does meanwhile.

Planning (choose). The run times its own training step over its first steps (after a few
that warm the allocator and caches) and one chunk of validation and of test, then chooses
--max-steps, the steps that fit in what is left of the budget once every validation (one per
epoch end, one at the last step, and --eval-interval's) and the final test are paid for;
--cooldown, its recipe's share of them; --epochs, those the steps reach; and by the
recipe's rule (flags.BUDGET_RULES) --eval-interval and the regularisation for the epochs
of data the steps cover (--dropout, --dropouti, --dropoute, --wdrop, --wdecay), measuring
again when that changes the step. The model's width by budget is the recipe's budget tier,
set with the other flags before the model is built (flags.resolve_flags). A flag given on
the command line is never chosen. main.py sets the choices (flags.assign). The budget counts
from the process's start (imports included). The weights and random streams are then put
back as they were, so that on a steady machine the run is exactly the run of
`--max-steps N --cooldown M`.

Pace. At each log interval the run forecasts its end from its recent step time (over the
last 5% of the budget): training, the validations and the test still to come. When the
forecast passes the deadline by more than TOLERANCE (1%) of the budget, it re-plans: fewer
steps, fitted to end MARGIN before the deadline at the recent speed (evaluations slowed
alike), the cooldown re-anchored so that the rate still reaches 0 at the new last step, the
epochs recomputed. Since plans aim MARGIN (3%) early, a machine whose steps run up to about
4% slower than measured (the first steps of a run here measure a few percent fast) never
re-plans, and ends at most 1% late. A re-plan only
removes steps: a machine that gets faster ends early. Each re-plan is logged and recorded
(metrics, args.json, checkpoints), and a --continue follows the plan in force without
keeping pace (its deadline was the first start's), ending at the same step.
"""

import argparse
import bisect
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

import training
from flags import InputError, budget_seconds, by_limit
from runtime import agree
from schedule import MAX_PLANNED_BATCHES, Schedule, cooldown_after, epoch_ends, sample_seq_len
from training import Progress, make_step, train_batch

WARM, TIMED = 5, 20     # training steps: untimed, then timed
MARGIN = 0.03           # of the budget: plans end this much before the deadline
TOLERANCE = 0.01        # of the budget: how far past the deadline a forecast may end unplanned
WINDOW = 0.05           # of the budget: the recent past whose step time a forecast uses
MIN_SAMPLES = 3         # log intervals in the window before a forecast is made
clock = time.perf_counter  # the tests give it a clock of their own


def process_age():
    """Seconds since this process started (the interpreter's start-up and imports), from
    /proc; 0 where there is none."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start, in ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def process_start():
    """The clock reading at which this process started: where a budget counts from."""
    return clock() - process_age()


@dataclass
class Measured:
    """What the run measured: seconds per optimizer step, per validation, per test, and
    since the process began (setting up and measuring)."""
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


def time_steps(run, args, step):
    """Seconds per optimizer step: TIMED training batches after WARM, trained as the epoch
    trains them (training.train_batch, at the run's warmup rates) with the flags `args`."""
    step.model.train()
    rows = run.train_data.shape[0]
    progress, schedule, start = Progress(), Schedule.of(args, rows), None
    for n in range(WARM + TIMED):
        if n == WARM:
            synchronize(step.device)
            start = clock()
        seq_len = sample_seq_len(run.rng, args.bptt)
        if progress.i + seq_len >= rows - 1:  # a short stream: start it again
            progress.next_epoch()
        train_batch(step, progress, schedule, run.train_data, seq_len=seq_len,
                    accumulate=args.accumulate, batch_size=args.batch_size)
    synchronize(step.device)
    return (clock() - start) / TIMED * args.accumulate


def time_evaluation(run, source, bsz):
    """Seconds for a whole evaluation of `source`, from the time of its second chunk."""
    chunks = len(range(0, source.shape[0] - 1, run.args.bptt))
    training.evaluate(run.model, source, bsz, run.args.bptt, run.step.autocast(), run.d,
                      max_batches=1)
    synchronize(run.device)
    start = clock()
    training.evaluate(run.model, source, bsz, run.args.bptt, run.step.autocast(), run.d,
                      max_batches=2)
    synchronize(run.device)
    return (clock() - start) / 2 * chunks  # two chunks timed (the first runs again)


def measure(run, args, valid_bsz, test_bsz, started):
    """The Measured times of a run's step (with the flags `args`, by an optimizer of its
    own) and evaluations, and the time since `started`, agreed by the ranks (each the
    slowest rank's), so that every rank fixes the same steps; the weights and random
    streams are put back afterwards."""
    state = snapshot(run.model, run.rng)
    run.model.set_dropouts(args.dropout, args.dropouth, args.dropouti, args.dropoute, args.wdrop)
    step = make_step(run.model, args, run.device, net=run.step.net)
    times = (time_steps(run, args, step), time_evaluation(run, run.val_data, valid_bsz),
             time_evaluation(run, run.test_data, test_bsz))
    restore(run.model, run.rng, state)
    return Measured(*agree(run.d, run.device, *times, clock() - started))


def cost(n, measured, ends, interval=None, steps=0):
    """Seconds for n more optimizer steps after `steps`, a validation at each epoch end in
    `ends` (steps from now) before the n-th, at each multiple of --eval-interval `interval`
    before it, and at it, and the test."""
    points = (steps + n - 1) // interval - steps // interval if interval else 0
    return (n * measured.step + (bisect.bisect_left(ends, n) + points + 1) * measured.valid
            + measured.test)


def fit(seconds, measured, ends, most=None, interval=None, steps=0):
    """The most optimizer steps n (at most `most`) whose training, validations and test
    (cost) fit in `seconds` (0 when none does). The cost grows with n: a binary search."""
    top = int((seconds - measured.test - measured.valid) / measured.step)
    if most is not None:
        top = min(top, most)
    if top < 1:
        return 0
    low, high = 0, top  # cost(low) fits (or low is 0); cost(high + 1) does not
    while low < high:
        middle = (low + high + 1) // 2
        fits = cost(middle, measured, ends, interval, steps) <= seconds
        low, high = (middle, high) if fits else (low, middle - 1)
    return low


@dataclass
class Pace:
    """Keeps a --budget run to its deadline: `seconds` from `started` (clock readings), with
    the Measured evaluations, the epoch ends of the plan (steps from the run's start), the
    cooldown's share (None: --cooldown was given) and whether --epochs was given."""
    seconds: float
    started: float
    measured: Measured
    ends: list
    share: float = None
    epochs_given: bool = False
    interval: int = None  # --eval-interval: its validations are paid for too
    samples: deque = field(default_factory=deque)  # (clock, steps) at recent log intervals
    paused: float = None  # the clock when work besides training began (pause)

    def restart(self):
        """After a re-plan: the window starts anew from the latest sample."""
        latest = self.samples[-1]
        self.samples.clear()
        self.samples.append(latest)

    def pause(self):
        """Work besides training begins (a validation, a checkpoint write)."""
        self.paused = clock()

    def resume(self):
        """Training goes on: the time since pause() is left out of the window's step time."""
        gap, self.paused = clock() - self.paused, None
        self.samples = deque((t + gap, steps) for t, steps in self.samples)

    def sample(self, steps):
        """The clock at a log interval; the recent step time (None until the window holds
        MIN_SAMPLES) and the seconds since the start."""
        now = clock()
        self.samples.append((now, steps))
        while len(self.samples) > MIN_SAMPLES and now - self.samples[1][0] >= WINDOW * self.seconds:
            self.samples.popleft()
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        recent = (t1 - t0) / (s1 - s0) if len(self.samples) >= MIN_SAMPLES and s1 > s0 else None
        return recent, now - self.started

    def replan(self, args, steps, recent, elapsed):
        """The plan after `steps` steps, `elapsed` seconds into the budget, at `recent`
        seconds a step: None when the run still ends within TOLERANCE of the deadline, else
        {max_steps, cooldown, epochs (None: --epochs was given), ...} fitted to end MARGIN
        before it."""
        slower = max(1.0, recent / self.measured.step)
        now = Measured(recent, self.measured.valid * slower, self.measured.test * slower)
        ahead = [e - steps for e in self.ends if e >= steps]
        left = args.max_steps - steps
        forecast = elapsed + cost(left, now, ahead, self.interval, steps)
        if forecast <= self.seconds * (1 + TOLERANCE):
            return None
        n = max(1, fit(self.seconds * (1 - MARGIN) - elapsed, now, ahead, most=left - 1,
                       interval=self.interval, steps=steps))
        if n >= left:
            return None
        new_last = steps + n
        epochs = None if self.epochs_given else bisect.bisect_left(self.ends, new_last) + 1
        return dict(step=steps, old_last=args.max_steps, max_steps=new_last,
                    cooldown=cooldown_after(steps, args.max_steps, args.cooldown, new_last,
                                            self.share),
                    step_time=recent, measured_step=self.measured.step,
                    forecast=forecast, epochs=epochs)


def choose(run, started, valid_bsz, test_bsz, rule, given):
    """Measure, then choose the run's --max-steps, --cooldown and --epochs so that it ends
    within --budget, counted from `started` (the clock when the process began), by its
    recipe's `rule` (flags.BUDGET_RULES): the cooldown's share of the steps, --eval-interval
    (eval_points), and the regularisation for the epochs the steps cover (measuring again
    when it changes the step). Flags in `given` (typed on the command line) are not chosen;
    a given --epochs caps the steps. The run's flags are left as they are (the measurement
    trains with a copy that holds the choices so far). Returns ({flag: value} chosen, which
    flags.assign sets; the line that says so; the run's Pace)."""
    args, chosen = argparse.Namespace(**vars(run.args)), {}

    def take(values):
        chosen.update(values)
        vars(args).update(values)

    measured = measure(run, args, valid_bsz, test_bsz, started)
    steps, capped = steps_for(run, args, measured, given)
    if "eval_points" in rule and "eval_interval" not in given:
        steps, capped = eval_points(run, args, measured, steps, rule["eval_points"], given, take)
    regularise = {k: v for k, v in by_limit(rule.get("regularise", []),
                                            epochs_of(run, args, steps)).items()
                  if k not in given and getattr(args, k) != v}
    if regularise:
        take(regularise)
        measured = measure(run, args, valid_bsz, test_bsz, started)
        steps, capped = steps_for(run, args, measured, given)
        if "eval_points" in rule and "eval_interval" not in given:
            steps, capped = eval_points(run, args, measured, steps, rule["eval_points"], given,
                                        take)
    if steps < 1:
        raise InputError(f"--budget {args.budget} is too short: setting up and measuring took "
                         f"{measured.elapsed:.0f} s, and a validation and the test need "
                         f"{measured.valid + measured.test:.0f} s more; give a longer --budget")
    ends = ends_of(run, args, steps, given)[0]
    take({"max_steps": steps})
    share = None if "cooldown" in given else rule.get("cooldown", 0)
    if share is not None:
        take({"cooldown": round(share * steps) or None})
    epochs = bisect.bisect_left(ends, steps) + 1
    if "epochs" not in given:
        take({"epochs": epochs})
    pace = Pace(budget_seconds(args.budget), started, measured, ends, share,
                epochs_given="epochs" in given, interval=args.eval_interval)
    line = (f"Budget {args.budget}: {steps:,} optimizer steps of {1000 * measured.step:,.1f} ms "
            f"(measured over {TIMED} steps), over {epochs} epoch(s), cooldown "
            f"{args.cooldown or 0:,} steps; {math.ceil(measured.valid):,} s per validation, "
            f"{math.ceil(measured.test):,} s for the test"
            + (f"; a validation every {args.eval_interval:,} steps" if args.eval_interval else "")
            + (f"; --epochs {args.epochs} ends it sooner" if capped == "epochs" else "")
            + (f"; planning stops at {MAX_PLANNED_BATCHES:,} batches" if capped == "draws" else "")
            + (f"; for {epochs_of(run, args, steps):.1f} epochs of data: "
               + ", ".join(f"--{k} {v}" for k, v in regularise.items()) if regularise else ""))
    return chosen, line, pace


def ends_of(run, args, upto, given):
    """epoch_ends of the run up to step `upto`, at most --epochs of them when given."""
    epochs = args.epochs if "epochs" in given else None
    return epoch_ends(run.rng, run.train_data.shape[0], args.bptt, args.accumulate, upto, epochs)


def steps_for(run, args, measured, given):
    """The steps that fit what is left of the budget, as Measured, with --eval-interval's
    validations: (steps, what capped them: "epochs", "draws" or None)."""
    left = budget_seconds(args.budget) * (1 - MARGIN) - measured.elapsed
    most = max(0, int((left - measured.test - measured.valid) / measured.step))
    ends, cut = ends_of(run, args, most, given)
    capped = "draws" if cut else None
    if ends and ends[-1] < most and not cut:
        capped = "epochs"  # a given --epochs ends before the time does
    limit = ends[-1] if capped else None
    steps = fit(left, measured, ends, most=limit, interval=args.eval_interval)
    return steps, capped if steps == limit else None


def eval_points(run, args, measured, steps, rule, given, take):
    """The recipe's `rule` (points, share): --eval-interval chosen (`take`) so that about
    `points` validations fall within the steps, fewer when they would take more than
    `share` of the budget; then the steps that fit with them. Returns (steps, capped)."""
    points, share = rule
    points = min(points, int(share * budget_seconds(args.budget) / max(measured.valid, 1e-9)))
    if points < 2 or steps < points:
        return steps_for(run, args, measured, given)
    capped = None
    for _ in range(3):  # the interval from the steps, the steps that fit with its validations
        take({"eval_interval": max(1, steps // points)})
        steps, capped = steps_for(run, args, measured, given)
    return steps, capped


def epochs_of(run, args, steps):
    """How many times `steps` optimizer steps go through the training data."""
    return steps * args.accumulate * args.bptt / run.train_data.shape[0]
