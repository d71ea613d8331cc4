"""Run records: the run folder's files and fields, progress bars only on a terminal, and
plot.py on a real run."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import ROOT, SMALL_WITH_PROGRESS, cli, sentences, write_corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    data = write_corpus(tmp / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    result = cli("--data", data, "--save", str(tmp / "m.pt"), "--epochs", "2", *SMALL_WITH_PROGRESS)
    assert result.returncode == 0, result.stderr
    return tmp, data, result


def test_run_folder_holds_args_env_log_and_metrics(run):
    tmp, data, result = run
    folder = tmp / "m.run"
    assert sorted(os.listdir(folder)) == ["args.json", "env.json", "log.txt", "metrics.jsonl"]
    args = json.loads((folder / "args.json").read_text())
    assert args["data"] == data and args["epochs"] == 2 and args["emsize"] == 16
    assert args["model"] == {"ntoken": 24, "ninp": 16, "nhid": 32, "nlayers": 2, "attn_layers": [0],
                             "heads": 1, "mem_len": 32, "cutoffs": None}
    env = json.loads((folder / "env.json").read_text())
    assert {"python", "torch", "cuda", "cudnn", "gpu", "git_commit", "platform"} <= set(env)
    assert env["torch"].startswith("2.") and env["gpu"] is None
    assert (folder / "log.txt").read_text() == result.stdout  # a copy of stdout
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    valid = [r for r in records if r["type"] == "valid"]
    assert len(train) == result.stdout.count("| epoch ") and len(valid) == 2
    for r in train:
        assert {"epoch", "step", "tokens", "lr", "loss", "bpc", "ms_per_batch", "tokens_per_s",
                "time"} <= set(r)
        assert r["bpc"] == pytest.approx(r["loss"] / 0.6931471805599453)
    assert [r["tokens"] for r in train] == sorted(r["tokens"] for r in train)
    for r in valid:
        assert {"epoch", "step", "tokens", "valid_loss", "valid_bpc", "epoch_time"} <= set(r)
    assert records[-1]["type"] == "test" and records[-1]["test_bpc"] > 0


def test_progress_bars_stay_off_without_a_terminal(run):
    _, _, result = run
    assert "tok/s" not in result.stderr and "\r" not in result.stderr


def run_on_terminal(*argv):
    """Run main.py with stderr on a pseudo-terminal; returns what the terminal showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 24 x 120
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *argv],
                            stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    proc.wait(timeout=120)
    os.close(controller)
    assert proc.returncode == 0, shown
    return shown.decode(errors="replace")


@pytest.mark.slow
def test_progress_bars_on_a_terminal_unless_no_progress(run, tmp_path):
    _, data, _ = run
    flags = ["--data", data, "--save", str(tmp_path / "t.pt"), "--epochs", "1",
             *SMALL_WITH_PROGRESS]
    shown = run_on_terminal(*flags)
    assert "epoch 1" in shown and "tok/s" in shown and "valid" in shown
    assert "tok/s" not in run_on_terminal(*flags, "--no-progress", "--overwrite")


def test_plot_draws_a_real_run(run, tmp_path):
    pytest.importorskip("matplotlib")
    tmp, _, _ = run
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(tmp / "m.run"),
                             "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
