"""torchrun with two CPU ranks (gloo) against one process with the same global batch."""

import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT, SMALL, cli, sentences, write_corpus

pytestmark = pytest.mark.slow  # torchrun launches

# Without dropout: the ranks draw their own dropout masks, one process other ones.
SMALL_NODROP = [*SMALL, "--dropout", "0", "--dropouth", "0", "--dropouti", "0"]


def torchrun(*argv, nproc=2):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", os.path.join(ROOT, "main.py"), *argv],
                          env=ENV, capture_output=True, text=True, timeout=600)


def bpcs(out, name):
    return [float(v) for v in re.findall(rf"{name} bpc +(\d+\.\d+)", out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_corpus(tmp / "data", sentences(400, 1), sentences(40, 2), sentences(40, 3))
    one = cli("--data", data, "--save", str(tmp / "one.pt"), "--epochs", "2", *SMALL_NODROP,
              timeout=600)
    two = torchrun("--data", data, "--save", str(tmp / "two.pt"), "--epochs", "2", *SMALL_NODROP)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    return tmp, data, one, two


def test_two_ranks_end_with_the_weights_and_bpc_of_one_process(runs):
    tmp, _, one, two = runs
    a = torch.load(str(tmp / "one.last.pt"), weights_only=True)
    b = torch.load(str(tmp / "two.last.pt"), weights_only=True)
    assert a["progress"]["steps"] == b["progress"]["steps"]
    assert a["progress"]["tokens"] == b["progress"]["tokens"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5)
    assert bpcs(two.stdout, "valid") == pytest.approx(bpcs(one.stdout, "valid"), abs=2e-3)
    assert b["progress"]["best_val"] == pytest.approx(a["progress"]["best_val"], rel=1e-4)
    # The last checkpoint is written after the final epoch ended, which resets the carried
    # LSTM states and memories: there is nothing to carry, in either run.
    assert a["carry"] is None and b["carry"] is None
    # Rank 0 alone logs.
    assert two.stdout.count("| end of epoch") == 2
    assert two.stdout.count("| End of training") == 1


def test_evaluation_covers_each_split_once_across_ranks(runs):
    tmp, data, _, _ = runs
    one = cli("--data", data, "--eval-only", "--resume", str(tmp / "two.pt"), *SMALL_NODROP,
              timeout=600)
    two = torchrun("--data", data, "--eval-only", "--resume", str(tmp / "two.pt"), *SMALL_NODROP)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert len(bpcs(one.stdout, "valid")) == 1 and len(bpcs(one.stdout, "test")) == 1
    assert bpcs(two.stdout, "valid") == pytest.approx(bpcs(one.stdout, "valid"), abs=1e-3)
    assert bpcs(two.stdout, "test") == pytest.approx(bpcs(one.stdout, "test"), abs=1e-3)


def test_two_rank_checkpoints_resume_and_continue_in_one_process(runs):
    tmp, data, _, two = runs
    resumed = cli("--data", data, "--save", str(tmp / "r.pt"), "--epochs", "1", *SMALL_NODROP,
                  "--resume", str(tmp / "two.pt"), "--lr", "1e-3", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    first = float(re.search(r"loss +(\d+\.\d+)", resumed.stdout).group(1))
    assert first < float(re.search(r"loss +(\d+\.\d+)", two.stdout).group(1))
    extended = cli("--continue", str(tmp / "two.last.pt"), "--epochs", "3", timeout=600)
    assert extended.returncode == 0, extended.stderr
    assert "| end of epoch   3 |" in extended.stdout


def test_batch_must_divide_over_ranks(runs):
    _, data, _, _ = runs
    result = torchrun("--data", data, "--dry-run", *SMALL_NODROP, "--batch_size", "3")
    assert result.returncode != 0
    assert "--batch_size 3 does not divide over 2 ranks" in result.stderr


RANK_CLOCK = """
import itertools, os, sys
sys.path.insert(0, {root!r})
import budget, main
ticks, rank = itertools.count(), int(os.environ["RANK"])
budget.clock = lambda: next(ticks) * 0.01 * (1 + rank)  # rank 1 measures everything as 2x slower
budget.process_age = lambda: 0.0  # the budget counts from the first reading
sys.exit(main.main(sys.argv[1:]))
"""


def test_the_ranks_agree_on_the_steps_a_budget_buys(tmp_path):
    """Each rank measures its own step; they take the slowest's, so both stop at one step
    (a disagreement would leave one rank waiting for the other's gradients)."""
    script = tmp_path / "rank_clock.py"
    script.write_text(RANK_CLOCK.format(root=ROOT))
    data = write_corpus(tmp_path / "data", sentences(400, 1), sentences(40, 2), sentences(40, 3))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), "--data", data, "--save",
                             str(tmp_path / "b.pt"), *SMALL_NODROP, "--budget", "0.5s"],
                            env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    chosen = int(re.search(r"Budget 0.5s: ([\d,]+) optimizer steps of 1.0 ms", result.stdout)
                 .group(1).replace(",", ""))  # rank 1's 2x slower step, agreed by both
    last = torch.load(str(tmp_path / "b.last.pt"), weights_only=True)
    assert last["progress"]["steps"] == last["args"]["max_steps"] == chosen


SLOWING_CLOCK = """
import itertools, os, sys
sys.path.insert(0, {root!r})
import budget, main
ticks, rank = itertools.count(), int(os.environ["RANK"])

def clock():  # 10 ms a reading; rank 1's machine gets slow after its measurement (10 readings)
    n = next(ticks)
    return n * 0.01 + (0.05 * (n - 10) if rank == 1 and n > 10 else 0.0)

budget.clock = clock
budget.process_age = lambda: 0.0
sys.exit(main.main(sys.argv[1:]))
"""


def test_the_ranks_agree_on_a_re_plan(tmp_path):
    """One rank's machine slows down: both re-plan alike and end at one step (a disagreement
    would leave one rank waiting for the other's gradients until the launcher's timeout)."""
    script = tmp_path / "slowing_clock.py"
    script.write_text(SLOWING_CLOCK.format(root=ROOT))
    data = write_corpus(tmp_path / "data", sentences(400, 1), sentences(40, 2), sentences(40, 3))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", str(script), "--data", data, "--save",
                             str(tmp_path / "b.pt"), *SMALL_NODROP, "--log-interval", "10",
                             "--budget", "3s"], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("re-planned at step") >= 1
    last = torch.load(str(tmp_path / "b.last.pt"), weights_only=True)
    planned = int(re.search(r"Budget 3s: ([\d,]+) optimizer steps", result.stdout).group(1)
                  .replace(",", ""))
    assert last["progress"]["replans"] and last["progress"]["steps"] == last["args"]["max_steps"]
    assert last["progress"]["steps"] < planned


def test_a_refused_output_ends_every_rank_at_once(runs):
    tmp, data, _, _ = runs
    refused = torchrun("--data", data, "--save", str(tmp / "two.pt"), *SMALL_NODROP)
    assert refused.returncode != 0
    assert refused.stderr.count("error: --save") == 1  # rank 0 says why, once
    # Each worker exits with code 2 itself: none is left waiting for rank 0 until the
    # launcher kills it.
    assert refused.stderr.count("exitcode  : 2") == 2 and "SIGKILL" not in refused.stderr


def test_two_ranks_train_and_test_with_the_adaptive_softmax(tmp_path):
    """A word corpus with the adaptive softmax under torchrun: its loss is computed inside
    the forward DDP wraps, so that its unused-parameter search sees the softmax's clusters."""
    folder = tmp_path / "words"
    folder.mkdir()
    for name, n in (("train", 600), ("valid", 60), ("test", 60)):
        words = sentences(n, len(name)).decode().replace(".", " .")
        (folder / f"{name}.txt").write_text(words)
    result = torchrun("--data", str(folder), "--save", str(tmp_path / "a.pt"), "--epochs", "1",
                      *SMALL_NODROP, "--adaptive-softmax", "--cutoffs", "4", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| End of training | test loss" in result.stdout
    assert "adaptive.head.weight" in torch.load(str(tmp_path / "a.pt"), weights_only=True)["model"]
