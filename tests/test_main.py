"""main.py, the training CLI, end to end on a tiny corpus (an epoch, its checkpoint and test,
--resume, --dry-run, an unseen token, the original's weights), and its end of an epoch
(--optimizer sgd's switch to averaged SGD, --when) called in this process; docs/model.md:
Training loop, Evaluation, Checkpoints."""

import math
import os
import re

import pytest
import torch

import main
from conftest import SMALL, run_cli
from flags import parse_args
from runtime import Dist
from training import Progress, Step, averaged_weights, build_optimizer

LOG_LINE = re.compile(r"^\| epoch +(\d+) \| +(\d+)/ *(\d+) batches \| lr (\d+\.\d{5}) \| "
                      r"ms/batch +\d+\.\d\d \| loss +(\d+\.\d\d) \| ppl +\d+\.\d\d \| "
                      r"bpc +(\d+\.\d{3})$")
END_LINE = re.compile(r"^\| End of training \| test loss +(\d+\.\d\d) \| test ppl +\d+\.\d\d \| "
                      r"test bpc +(\d+\.\d{3})$")


def train_lines(out):
    return [LOG_LINE.match(line) for line in out.splitlines() if LOG_LINE.match(line)]


def test_train_one_epoch_writes_checkpoint_and_reports_test_bpc(capsys, corpus_dir, tmp_path):
    save = str(tmp_path / "model.pt")
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)
    assert code == 0, err
    logs = train_lines(out)
    assert len(logs) >= 5
    assert float(logs[-1].group(6)) < float(logs[0].group(6)) - 0.5  # bpc falls
    assert float(logs[0].group(5)) / math.log(2) == pytest.approx(float(logs[0].group(6)), abs=0.01)
    assert re.search(r"^\| end of epoch +1 \| time: +\d+\.\d\ds \| valid loss +\d+\.\d\d \| "
                     r"valid ppl +\d+\.\d\d \| valid bpc +\d+\.\d{3}$", out, re.M)
    assert "Saving model (new best validation)" in out
    assert [line for line in out.splitlines() if END_LINE.match(line)]
    ckpt = torch.load(save, weights_only=True)
    assert ckpt["format"] == "sha-rnn"
    assert ckpt["config"]["ninp"] == 16 and ckpt["config"]["attn_layers"] == [0]
    assert ckpt["vocab"][0] == "32"  # the space byte is the most frequent token
    assert ckpt["metrics"]["valid_bpc"] == pytest.approx(ckpt["metrics"]["valid_loss"] / math.log(2))
    assert os.path.exists(str(tmp_path / "model.last.pt"))


@pytest.mark.slow
def test_resume_starts_from_trained_weights(capsys, corpus_dir, tmp_path):
    save = str(tmp_path / "model.pt")
    code, fresh, _ = run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "2", *SMALL)
    assert code == 0
    code, resumed, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "b.pt"),
                                 "--epochs", "1", *SMALL, "--resume", save, "--lr", "1e-3",
                                 "--seed", "125")
    assert code == 0, err
    first_fresh = float(train_lines(fresh)[0].group(5))
    first_resumed = float(train_lines(resumed)[0].group(5))
    assert first_resumed < 0.75 * first_fresh
    assert float(train_lines(resumed)[0].group(4)) == pytest.approx(1e-3)  # the new lr


def test_dry_run_writes_nothing(capsys, corpus_dir, tmp_path):
    save = tmp_path / "model.pt"
    before = set(os.listdir(tmp_path))
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(save), "--dry-run", *SMALL)
    assert code == 0, err
    # Dry-run numbers are marked as such, with how much of the split they cover.
    lines = out.splitlines()
    end, mark = lines[-3].split(" | dry run: ")
    assert lines[-1] == "Outputs: none kept (--dry-run writes into a temporary folder it removes)"
    assert "| end of epoch   1 |" in out and END_LINE.search(end)
    assert re.fullmatch(r"2 of \d+ chunks", mark)
    assert set(os.listdir(tmp_path)) - {"data"} == before - {"data"}


# --- units -------------------------------------------------------------------------------


def test_unseen_token_is_a_one_line_error(capsys, corpus_dir):
    with open(os.path.join(corpus_dir, "test.txt"), "a") as f:
        f.write(" 7")  # a byte that never occurs in train
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--dry-run", *SMALL)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "'7'" in err and "test.txt" in err


@pytest.mark.slow
def test_resume_from_an_original_state_dict(capsys, corpus_dir, tmp_path):
    """Weights saved by the original code (a bare state_dict with its unused keys) resume
    and evaluate exactly like the checkpoint they came from."""
    save = str(tmp_path / "model.pt")
    assert run_cli(capsys, "--data", corpus_dir, "--save", save, "--epochs", "1", *SMALL)[0] == 0
    state = dict(torch.load(save, weights_only=True)["model"])
    for i in range(2):
        state[f"blocks.{i}.lnout.weight"], state[f"blocks.{i}.lnout.bias"] = torch.ones(16), torch.zeros(16)
    state["blocks.0.attn.qkvs"], state["blocks.0.attn.r_gate"] = torch.zeros(1, 3, 16), torch.ones(1, 1, 16)
    state["blocks.1.lnmid.weight"], state["blocks.1.lnmid.bias"] = torch.ones(16), torch.zeros(16)
    state["blocks.1.lnmem.weight"], state["blocks.1.lnmem.bias"] = torch.ones(16), torch.zeros(16)
    original = str(tmp_path / "ENWIK8.state_dict.pt")
    torch.save(state, original)
    outs = []
    for path in (save, original):
        code, out, err = run_cli(capsys, "--data", corpus_dir, "--eval-only", "--resume", path, *SMALL)
        assert code == 0, err
        outs.append([line for line in out.splitlines() if "| eval only |" in line])
    assert outs[0] == outs[1] and len(outs[0]) == 2
    code, out, err = run_cli(capsys, "--data", corpus_dir, "--save", str(tmp_path / "b.pt"),
                             "--epochs", "1", *SMALL, "--resume", original, "--lr", "1e-3")
    assert code == 0, err


def test_sgd_switches_to_averaged_sgd_and_evaluates_with_the_average(tmp_path):
    """--optimizer sgd: after --nonmono epochs without improvement, averaged SGD, whose
    averaged weights are the ones evaluated; --when divides the learning rate."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    args = parse_args(["--optimizer", "sgd", "--nonmono", "2", "--when", "3", "--lr", "0.5",
                            "--save", str(tmp_path / "m.pt")])
    logged = []
    optimizer = build_optimizer("sgd", model.parameters(), args.lr, args.wdecay)
    step = Step(model, model, optimizer, None, args.clip, torch.device("cpu"), "none")
    run = main.Run(args=args, step=step, config={}, vocab=[], train_data=None, val_data=None,
                   test_data=None, d=Dist(), log=logged.append, rng=None, stop=None,
                   paths={"save": str(tmp_path / "m.pt")}, fingerprint=None)
    progress = Progress(optimizer_name="sgd", val_history=[1.0, 2.0])
    main.end_of_epoch(run, progress, 1.5)  # 1.5 > min(history[:-2]) = 1.0: switch
    assert "Switching to ASGD" in logged and isinstance(run.step.optimizer, torch.optim.ASGD)
    assert progress.optimizer_name == "asgd" and progress.epoch == 1
    before = model.weight.detach().clone()
    for _ in range(3):
        run.step.optimizer.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        run.step.optimizer.step()
    average = run.step.optimizer.state[model.weight]["ax"].clone()
    with averaged_weights(model, run.step.optimizer):
        assert torch.equal(model.weight, average)
    assert not torch.equal(model.weight, average) and not torch.equal(model.weight, before)
    progress.epoch = 2
    main.end_of_epoch(run, progress, 1.4)  # the third epoch ends: --when 3
    assert "Dividing learning rate by 10" in logged
    assert os.path.exists(str(tmp_path / "m.pt.e3"))
