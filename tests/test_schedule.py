"""The schedule (schedule.py) against values worked out by hand: the learning rate's
warmup, --when drops and cooldown, the cooldown re-anchored by a --budget re-plan, the
original's sequence lengths, and the plan of a run against the loop it plans."""

import numpy as np
import pytest

from flags import parse_args
from schedule import Schedule, cooldown_after, plan_run, sample_seq_len, twin

EPOCH = 10**6  # a nominal epoch long enough that the batches below stay in the first


def test_lr_warmup_is_linear_then_flat():
    schedule = Schedule(lr=2e-3, warmup=800, nominal=EPOCH)
    assert schedule.rate(0, 0, 0) == pytest.approx(2e-3 / 800)  # batch 1 of the warmup
    assert schedule.rate(0, 399, 399) == pytest.approx(1e-3)
    assert schedule.rate(0, 799, 799) == pytest.approx(2e-3)
    assert schedule.rate(0, 4999, 4999) == pytest.approx(2e-3)


def test_lr_when_and_cooldown():
    # --when 2: divided by 10 from the third epoch (0-based epoch 2) on.
    assert Schedule(lr=1.0, warmup=10, nominal=100, when=(2,)).rate(1, 0, 900) == 1.0
    assert Schedule(lr=1.0, warmup=10, nominal=100, when=(2,)).rate(2, 0, 900) == pytest.approx(0.1)
    assert Schedule(lr=1.0, warmup=10, nominal=100, when=(2, 4)).rate(5, 0, 900) == pytest.approx(0.01)
    # The cooldown counts optimizer steps (the third argument), whatever the batch count.
    cooling = Schedule(lr=1.0, warmup=10, nominal=EPOCH, cooldown=100, last_step=1000)
    assert cooling.rate(0, 949, 949) == pytest.approx(0.5)  # step 950: 50 of 100 left
    assert cooling.rate(0, 1009, 999) == 0.0  # the last step
    assert cooling.rate(0, 1999, 949) == pytest.approx(0.5)
    # No last step, no cooldown (the --budget measurement's warmup rates).
    assert Schedule(lr=1.0, warmup=10, nominal=EPOCH, cooldown=100).rate(0, 949, 949) == 1.0


def test_warmup_step_counts_batches_across_epochs():
    # the warmup's count = epoch * (len(train) // bptt) + batch + 1 (docs/model.md, Training loop)
    args = parse_args(["--warmup", "800", "--bptt", "8"])
    schedule = Schedule.of(args, rows=5493 * 8 + 5)
    assert schedule.nominal == 5493
    assert schedule.rate(1, 9, 1) == args.lr  # past the warmup in epoch 2
    assert schedule.rate(0, 9, 1) == pytest.approx(args.lr * 10 / 800)


def test_a_cooldown_is_re_anchored_without_a_jump():
    # Not begun: the recipe's share of the new steps (or the given length) when it still fits.
    assert cooldown_after(100, 1000, 200, 600, 0.2) == 120
    assert cooldown_after(100, 1000, 200, 600, None) == 200
    # Not begun, but the new end leaves less room than the cooldown: it starts now, from 1.
    assert cooldown_after(550, 1000, 200, 600, 0.2) == 50
    # Begun: at step 900 of 1000 with 200 to cool, the rate stands at half; the new plan ends
    # at 950, so the rate falls from half to 0 over 50 steps: a cooldown of length 100.
    assert cooldown_after(900, 1000, 200, 950, 0.2) == 100
    length = cooldown_after(900, 1000, 200, 933, 0.2)
    before = Schedule(lr=1.0, warmup=1, nominal=EPOCH, cooldown=200, last_step=1000)
    after = Schedule(lr=1.0, warmup=1, nominal=EPOCH, cooldown=length, last_step=933)
    assert length == pytest.approx(66.0)
    assert after.rate(0, 899, 899) == pytest.approx(before.rate(0, 899, 899)) == pytest.approx(0.5)
    assert cooldown_after(900, 1000, None, 950, 0.2) is None  # no cooldown stays none


def test_sequence_length_sampler_bounds_and_original_stream():
    rng = np.random.RandomState(7)
    lengths = [sample_seq_len(rng, 64) for _ in range(20000)]
    assert min(lengths) >= 5 and max(lengths) <= 64
    half = sum(1 for n in lengths if n < 48) / len(lengths)
    assert 0.04 < half < 0.06  # bptt / 2 with probability 0.05
    assert sum(1 for n in lengths if n == 64) / len(lengths) > 0.4  # clamped at bptt
    short = [sample_seq_len(np.random.RandomState(s), 6) for s in range(200)]
    assert min(short) == 5 and max(short) == 6
    # The same stream as the original's np.random.random() / np.random.normal(bptt, 5).
    np.random.seed(5512)
    expected = []
    for _ in range(50):
        bptt = 1024 if np.random.random() < 0.95 else 1024 / 2.0
        expected.append(min(max(5, int(np.random.normal(bptt, 5))), 1024))
    rng = np.random.RandomState(5512)
    assert [sample_seq_len(rng, 1024) for _ in range(50)] == expected


def simulated_run(rng, epoch, i, batch, steps, rows, bptt, epochs, accumulate, max_steps, limit):
    """The epochs as the training loop runs them, batch by batch: (the batch count at which
    the current epoch ends, the run's last optimizer step)."""
    first_end = None
    while epoch < epochs and not (max_steps and steps >= max_steps):
        while (i < rows - 2 and not (limit and batch >= limit)
               and not (max_steps and steps >= max_steps)):
            i += min(sample_seq_len(rng, bptt), rows - 1 - i)
            steps += batch % accumulate == 0
            batch += 1
        first_end = batch if first_end is None else first_end
        epoch, i, batch = epoch + 1, 0, 0
    return (batch if first_end is None else first_end), steps


def test_the_plan_of_a_run_is_what_the_loop_does_and_draws_nothing():
    cases = np.random.RandomState(0)
    for _ in range(300):
        rows, bptt = int(cases.randint(40, 400)), int(cases.choice([5, 8, 16, 30]))
        epochs, accumulate = int(cases.randint(1, 4)), int(cases.randint(1, 4))
        max_steps = [None, int(cases.randint(1, 60))][cases.randint(2)]
        limit = [None, 3][cases.randint(2)]
        rng = np.random.RandomState(int(cases.randint(1000)))
        for _ in range(int(cases.randint(0, 5))):  # somewhere inside the first epoch
            sample_seq_len(rng, bptt)
        epoch, batch = int(cases.randint(0, epochs + 1)), int(cases.randint(0, 4))
        i, steps = min(batch * bptt, rows - 2), int(cases.randint(0, 4))
        if cases.randint(3) == 0:  # exactly the steps to the end of this epoch
            max_steps = simulated_run(twin(rng), epoch, i, batch, steps, rows, bptt, epoch + 1,
                                      accumulate, None, limit)[1] or None
        state = rng.get_state()
        plan = plan_run(rng, epoch=epoch, i=i, batch=batch, steps=steps, rows=rows, bptt=bptt,
                        epochs=epochs, accumulate=accumulate, max_steps=max_steps,
                        batch_limit=limit)
        assert str(rng.get_state()) == str(state)  # the real stream is untouched
        expected = simulated_run(rng, epoch, i, batch, steps, rows, bptt, epochs, accumulate,
                                 max_steps, limit)
        assert (plan.epoch_batches, plan.last_step) == expected, (rows, bptt, epochs, accumulate,
                                                                  max_steps, limit, epoch, i, batch, steps)
