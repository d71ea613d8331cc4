"""Mixed precision end to end on the CPU, through main.py's CLI: bf16 and fp16 runs track
float32's losses, an fp16 run stopped and continued restores its loss scale, a carried
state in half precision continues in float32; and --no-tf32 reaches the device choice of
main.py, bench.py and generate.py. The units (the fp16 step, the float32 paths, the TF32
switch) are in test_training.py, test_model.py and test_runtime.py."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import runtime
from conftest import ROOT, SMALL, cli, run_cli
from flags import InputError

def train_losses(capsys, corpus_dir, tmp_path, amp):
    save = str(tmp_path / f"{amp}.pt")
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, *SMALL, "--epochs", "1",
                             "--amp", amp, "--log-interval", "1", "--warmup", "40",
                             "--dropout", "0", "--dropouth", "0", "--dropouti", "0")
    assert code == 0, err
    assert f"amp {amp}" in out
    with open(str(tmp_path / f"{amp}.run" / "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r["loss"] for r in records if r["type"] == "train"], records[-1]["test_loss"]


@pytest.mark.slow
def test_bf16_and_fp16_track_the_float32_losses(capsys, corpus_dir, tmp_path):
    """Per-batch training losses of a whole epoch (about 390 batches, the warmup's 40
    included; the loss falls from 3.2 to 0.8 nats) under bf16 and fp16 autocast stay close
    to float32's. Measured on this model: mean gaps of about 0.001 nats and largest gaps of
    0.007 (bf16) and 0.035 (fp16, whose scaler skips the first overflowing steps, which puts
    the run a step behind for a while). Tolerances: 0.005 nats on the mean gap (rounding to
    8 or 11 mantissa bits perturbs each loss by about 0.1%, 0.003 nats at 3 nats), 0.1 nats
    on the largest gap and 0.01 nats on the test loss."""
    ref, ref_test = train_losses(capsys, corpus_dir, tmp_path, "none")
    assert len(ref) > 300 and ref[-1] < ref[0] - 0.5  # it learns
    for amp in ("bf16", "fp16"):
        losses, test_loss = train_losses(capsys, corpus_dir, tmp_path, amp)
        assert len(losses) == len(ref)
        gaps = [abs(a - b) for a, b in zip(losses, ref)]
        assert max(gaps) < 0.1, (amp, max(gaps))
        assert sum(gaps) / len(gaps) < 0.005, amp
        assert test_loss == pytest.approx(ref_test, abs=0.01)
        assert losses != ref  # autocast really ran in the lower precision


@pytest.mark.slow
def test_continue_under_fp16_restores_the_loss_scale(corpus_dir, tmp_path):
    """An fp16 run stopped by SIGTERM after its first epoch, once overflows have lowered
    the loss scale, and continued, ends with the weights and the scaler state (scale and
    growth tracker) of an uninterrupted fp16 run."""
    flags = ["--data", corpus_dir, "--epochs", "2", *SMALL, "--amp", "fp16", "--lr", "3e-2"]

    ref = cli(*flags, "--save", str(tmp_path / "ref.pt"))
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "main.py"), *flags,
                             "--save", str(tmp_path / "run.pt")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "end of epoch   1" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Stopped by SIGTERM" in out, err
    stopped = torch.load(str(tmp_path / "run.last.pt"), weights_only=True)
    cont = cli("--continue", str(tmp_path / "run.last.pt"))
    assert cont.returncode == 0, cont.stderr
    a = torch.load(str(tmp_path / "ref.last.pt"), weights_only=True)
    b = torch.load(str(tmp_path / "run.last.pt"), weights_only=True)
    assert stopped["scaler"]["scale"] < 65536.0  # overflows have lowered it: a state to restore
    assert a["scaler"] == b["scaler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_a_carried_state_in_half_precision_continues_in_float32(capsys, corpus_dir, tmp_path):
    """A last checkpoint whose carried LSTM states and memories are in float16 or bfloat16
    (what a CUDA fp16 or a CPU bf16 run writes) continues under --amp none, and takes the
    steps of the same state cast to float32."""
    code, _, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "m.pt"), *SMALL,
                           "--epochs", "1")
    assert code == 0, err
    last = torch.load(str(tmp_path / "m.last.pt"), weights_only=True)
    steps = last["progress"]["steps"]
    torch.manual_seed(0)
    hidden = [[0.5 * torch.randn(1, 4, 16) for _ in "hc"] for _ in range(2)]
    mems = [0.5 * torch.randn(20, 4, 16), None]  # attention in block 0 of 2

    def continued(name, *dtypes):
        """The weights after 5 steps continued from the carry cast to each of `dtypes`."""
        def cast(t):
            for dtype in dtypes:
                t = t.to(dtype)
            return t
        path = str(tmp_path / f"{name}.last.pt")
        carry = {"hidden": [[cast(x) for x in h] for h in hidden],
                 "mems": [m if m is None else cast(m) for m in mems]}
        save = str(tmp_path / f"{name}.pt")  # each its own best (--continue keeps the run's)
        torch.save(dict(last, carry=carry, args=dict(last["args"], save=save)), path)
        code, _, err = run_cli(capsys, "--continue", path, "--last", path, "--amp", "none",
                               "--epochs", "2", "--max-steps", str(steps + 5))
        assert code == 0, err
        return torch.load(path, weights_only=True)["model"]

    for dtype in (torch.float16, torch.bfloat16):
        weights = continued(str(dtype), dtype)
        cast = continued(f"{dtype}-float32", dtype, torch.float32)
        assert all(torch.equal(weights[k], cast[k]) for k in weights), dtype
        assert not all(torch.equal(weights[k], last["model"][k]) for k in weights)  # it trained


@pytest.mark.parametrize("script,argv", [
    ("main", ["--data", "data/sample", "--dry-run"]),
    ("bench", []),
    ("generate", ["--checkpoint", "none.pt"])])
def test_no_tf32_reaches_the_device_choice(monkeypatch, script, argv):
    module = __import__(script)
    seen = []

    def pick(flag, tf32=True):
        seen.append(tf32)
        raise InputError("stop here")

    monkeypatch.setattr(runtime, "pick_device", pick)
    entry = getattr(module, "main_cli", None) or module.main
    assert entry(argv) == 2 and entry(argv + ["--no-tf32"]) == 2
    assert seen == [True, False]
