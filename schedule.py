"""The schedule of a run: how many batches and optimizer steps it takes, and the learning
rate of each. Change the schedule here: nothing else computes a rate or a run's length.

- The sequence lengths: the original's random bptt (sample_seq_len), from which the batches
  of an epoch follow (epoch_batches) and its optimizer steps (steps_in).
- The plan: where the epoch in progress ends and the run's last optimizer step (plan_run),
  and the epoch ends a --budget plans with (epoch_ends).
- The rate: Schedule answers the learning rate of the next batch: the warmup, the --when
  drops, and the --cooldown that reaches 0 at the run's last step; cooldown_after re-anchors
  the cooldown when a --budget re-plan moves the last step.
docs/model.md (Training loop) describes them in words.
"""

from dataclasses import dataclass

import numpy as np

MAX_PLANNED_BATCHES = 2_000_000  # sequence lengths a --budget plan may draw (about 2.5 s)


# --- the learning rate -------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """The learning rate of every batch of a run, built from its flags and its plan's last
    step. The warmup counts the original's global batch number (epoch * nominal batches per
    epoch + batch in epoch + 1, `nominal` being rows // bptt): linear over `warmup` batches.
    The rate is divided by 10 after each epoch in `when` (1-based, as printed). The cooldown
    counts optimizer steps: the rate falls linearly to 0 over the last `cooldown` steps,
    reaching 0 at `last_step`, the run's last optimizer step (no cooldown without one)."""
    lr: float                # --lr, the peak
    warmup: int              # --warmup, in batches
    nominal: int             # the original's batches per epoch: the training rows // bptt
    when: tuple = ()         # --when
    cooldown: float = None   # --cooldown, in optimizer steps (fractional after a re-plan)
    last_step: int = None    # the step at which the cooldown reaches 0

    @classmethod
    def of(cls, args, rows, last_step=None):
        """The Schedule of the flags for a training stream of `rows` rows."""
        return cls(lr=args.lr, warmup=args.warmup, nominal=rows // args.bptt,
                   when=tuple(args.when), cooldown=args.cooldown, last_step=last_step)

    def rate(self, epoch, batch, steps):
        """The learning rate of the next batch: batch `batch` (0-based) of 0-based `epoch`,
        after `steps` optimizer steps (it belongs to step steps + 1)."""
        lr = self.lr * min(epoch * self.nominal + batch + 1, self.warmup) / self.warmup
        lr *= 0.1 ** sum(1 for w in self.when if w <= epoch)
        if self.cooldown and self.last_step is not None:
            lr *= min(1.0, max(0.0, (self.last_step - (steps + 1)) / self.cooldown))
        return lr


def cooldown_after(steps, last, cooldown, new_last, share):
    """The --cooldown of a plan whose last step moves from `last` to `new_last` after
    `steps` steps: the recipe's `share` of the new steps (or the given `cooldown`, `share`
    None) when the cooldown has not begun and still fits; else the length over which the
    rate goes on from where it stands to 0 at `new_last` (possibly fractional: no jump)."""
    if not cooldown:
        return cooldown
    factor = min(1.0, (last - steps) / cooldown)  # of the rate, at the last step taken
    if factor >= 1.0:
        planned = cooldown if share is None else round(share * new_last)
        if new_last - steps >= planned:
            return planned
    length = (new_last - steps) / factor
    return int(length) if length == int(length) else length


# --- sequence lengths --------------------------------------------------------------------

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


# --- the plan of a run -------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Where the run goes from here: the batch count of the epoch in progress (the N of
    `b/N batches`, where it ends) and the run's last optimizer step (where --cooldown
    reaches 0)."""
    epoch_batches: int
    last_step: int


def plan_run(rng, *, epoch, i, batch, steps, rows, bptt, epochs, accumulate, max_steps=None,
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


def epoch_ends(rng, rows, bptt, accumulate, upto, epochs=None):
    """The optimizer steps at which the run's epochs end, from its start, up to the first
    end at or past step `upto` (at most `epochs` of them), drawing the sequence lengths from
    a twin of `rng`, and at most MAX_PLANNED_BATCHES of them: (ends, True when the draws ran
    out first). Each epoch's length depends on its draws, so the walk is the only exact way;
    the cap bounds it whatever the budget."""
    rng, ends, drawn = twin(rng), [], 0
    while (not ends or ends[-1] < upto) and (epochs is None or len(ends) < epochs):
        if drawn > MAX_PLANNED_BATCHES:
            return ends, True
        batches = epoch_batches(rng, 0, rows, bptt)
        drawn += batches
        ends.append((ends[-1] if ends else 0) + steps_in(0, batches, accumulate))
    return ends, False
