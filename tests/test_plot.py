"""plot.py: learning curves from run folders written by main.py."""

import json
import math
import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

import plot  # noqa: E402  (after the skip: plot needs matplotlib to draw)
from conftest import ROOT  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOG2 = math.log(2)
TOKENS_PER_BATCH = 16 * 1024  # batch size 16, bptt 1024
LOG_INTERVAL = 200
BATCHES_PER_EPOCH = 5400


def train_records(epochs, seed, floor, start_time, start_epoch=0, ms_per_batch=400.0):
    """main.py's train and valid records of an enwik8-like run, bpc falling towards `floor`."""
    rng = random.Random(seed)
    records, t, tokens, step = [], start_time, start_epoch * BATCHES_PER_EPOCH * TOKENS_PER_BATCH, 0
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        for batch in range(LOG_INTERVAL, BATCHES_PER_EPOCH + 1, LOG_INTERVAL):
            step += LOG_INTERVAL
            tokens += LOG_INTERVAL * TOKENS_PER_BATCH
            t += LOG_INTERVAL * ms_per_batch / 1000
            bpc = floor + 3.0 * math.exp(-tokens / 4e7) + 0.4 * tokens ** -0.1 + rng.gauss(0, 0.02)
            records.append(dict(type="train", epoch=epoch, step=step, batch=batch, tokens=tokens,
                                lr=2e-3, loss=bpc * LOG2, bpc=bpc, ms_per_batch=ms_per_batch,
                                tokens_per_s=TOKENS_PER_BATCH * 1000 / ms_per_batch, time=t))
        t += 120
        valid_bpc = records[-1]["bpc"] - 0.03
        records.append(dict(type="valid", epoch=epoch, step=step, tokens=tokens,
                            valid_loss=valid_bpc * LOG2, valid_bpc=valid_bpc,
                            epoch_time=BATCHES_PER_EPOCH * ms_per_batch / 1000 + 120, time=t))
    return records


def write_run(folder, records, tail=""):
    """A run folder with metrics.jsonl holding `records` and then the raw text `tail`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)
    return str(folder)


@pytest.fixture
def finished_run(tmp_path):
    """Four epochs and a test record."""
    records = train_records(4, seed=1, floor=1.05, start_time=1.7e9)
    records.append(dict(type="test", test_loss=1.077 * LOG2, test_bpc=1.077, time=1.7e9 + 9500))
    return write_run(tmp_path / "ENWIK8.run", records)


@pytest.fixture
def continued_run(tmp_path):
    """Two epochs, stopped, continued a day later from the end of epoch 1 for two more
    epochs, then killed in the middle of writing a record."""
    first = train_records(2, seed=2, floor=1.15, start_time=1.7e9, ms_per_batch=300.0)
    second = train_records(2, seed=3, floor=1.15, start_time=1.7e9 + 86400, start_epoch=1,
                           ms_per_batch=300.0)
    cut = '{"type": "train", "epoch": 3, "st'
    return write_run(tmp_path / "SMALL.run", first + second, tail=cut)


def read_png(path):
    """The image's pixels, after checking the file is a PNG of a plausible size."""
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 20_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    return pixels


def assert_drawn(path):
    """The PNG is not blank: its pixels vary, and a fair share of them are not white."""
    pixels = read_png(path)[..., :3]
    assert pixels.var() > 1e-3
    assert (pixels.min(axis=-1) < 0.9).mean() > 0.01


def test_two_runs_overlaid(finished_run, continued_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert plot.main([finished_run, continued_run, "--output", str(out), "--title", "enwik8"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert_drawn(out)


def test_subprocess_default_output(finished_run, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), finished_run],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert_drawn(tmp_path / "curves.png")


def test_output_without_extension_gets_png(finished_run, tmp_path, capsys):
    assert plot.main([finished_run, "--output", str(tmp_path / "curves")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'curves.png'}"
    read_png(tmp_path / "curves.png")


def test_an_existing_file_is_replaced_only_with_overwrite(finished_run, tmp_path, capsys):
    out = tmp_path / "thesis.pdf"
    out.write_bytes(b"%PDF-1.7 a thesis")
    assert plot.main([finished_run, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert out.read_bytes() == b"%PDF-1.7 a thesis"
    assert plot.main([finished_run, "--output", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(b"%PDF") and out.stat().st_size > 5000
    assert sorted(os.listdir(tmp_path)) == ["ENWIK8.run", "thesis.pdf"]  # no temporary left


def test_the_file_written_is_the_one_named(finished_run, tmp_path, capsys, monkeypatch):
    """A name whose only dot starts it (.hidden) gets .png, and the format given is used,
    so matplotlib adds no extension of its own."""
    monkeypatch.chdir(tmp_path)
    assert plot.main([finished_run, "--output", ".hidden"]) == 0
    assert capsys.readouterr().out.strip() == "wrote .hidden.png"
    assert sorted(os.listdir(tmp_path)) == [".hidden.png", "ENWIK8.run"]
    read_png(tmp_path / ".hidden.png")


def test_run_without_valid_records(tmp_path):
    records = [r for r in train_records(1, seed=4, floor=1.2, start_time=1.7e9)
               if r["type"] == "train"]
    run = write_run(tmp_path / "EARLY.run", records)
    out = tmp_path / "early.png"
    assert plot.main([run, "--output", str(out)]) == 0
    assert_drawn(out)


def test_load_run(finished_run, continued_run):
    run = plot.load_run(finished_run, "ENWIK8.run")
    assert run.label == "ENWIK8.run (test 1.077)"
    assert len(run.train) == 4 * BATCHES_PER_EPOCH // LOG_INTERVAL and len(run.valid) == 4
    assert run.train[0][1] == 0 and run.train[1][1] == pytest.approx(LOG_INTERVAL * 0.4 / 3600)
    continued = plot.load_run(continued_run, "SMALL.run")
    assert continued.label == "SMALL.run" and len(continued.valid) == 4
    assert [len(s) for s in plot.segments(continued.valid)] == [2, 2]
    assert continued.valid[2][1] > 24


def test_the_clock_leaves_out_the_pause_before_a_continue(continued_run):
    """continues.jsonl says when the continued run started: the day between the first run's
    last record and that start is not training time."""
    with open(os.path.join(continued_run, "continues.jsonl"), "w") as f:
        f.write(json.dumps({"time": 1.7e9 + 86400 - 30}) + "\n")
    run = plot.load_run(continued_run, "SMALL.run")
    first_run_end = run.valid[1][1]  # the first run's last record, end of epoch 2
    first_after = run.train[2 * BATCHES_PER_EPOCH // LOG_INTERVAL][1]  # the continue's first
    assert first_after == pytest.approx(first_run_end + (30 + LOG_INTERVAL * 0.3) / 3600)
    assert run.valid[3][1] < 2  # hours of training, not the day that passed
    hours = [p[1] for p in run.train]
    assert hours == sorted(hours)


def test_default_ymax_keeps_each_runs_last_point(finished_run, tmp_path):
    start = dict(type="train", tokens=3_276_800, time=1.7e9, bpc=3.9)
    early = plot.load_run(write_run(tmp_path / "EARLY.run", [start]), "EARLY.run")
    finished = plot.load_run(finished_run, "ENWIK8.run")
    assert plot.bpc_limits([finished, early], None)[1] > 3.9


def test_run_names_disambiguate_same_folder_name():
    assert plot.run_names(["a/X.run", "b/X.run", "Y.run/"]) == ["a/X.run", "b/X.run", "Y.run"]


def test_ymax_clips_the_first_drop(finished_run):
    run = plot.load_run(finished_run, "ENWIK8.run")
    bottom, top = plot.bpc_limits([run], None)
    assert top < max(p[2] for p in run.train)
    low = min(p[2] for p in run.train + run.valid)
    assert plot.bpc_limits([run], 2.0) == pytest.approx((low - 0.05 * (2.0 - low),
                                                         2.0 + 0.05 * (2.0 - low)))


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing.run"), "no such folder"),
    (lambda tmp: str(tmp), "no metrics.jsonl"),
    (lambda tmp: write_run(tmp / "A.run", []) + "/metrics.jsonl", "not a folder"),
    (lambda tmp: write_run(tmp / "EMPTY.run", [], tail='{"type": "tra'), "no train or valid"),
])
def test_bad_run_dir(tmp_path, capsys, make, message):
    out = tmp_path / "curves.png"
    assert plot.main([make(tmp_path), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("error: ")
    assert not out.exists()


def test_bad_ymax_and_unwritable_output(finished_run, tmp_path, capsys):
    for ymax in ("high", "nan", "-1", "0.5"):
        assert plot.main([finished_run, "--ymax", ymax]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert plot.main([finished_run, "--output", str(tmp_path / "no" / "such" / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err


def test_missing_matplotlib(finished_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert plot.main([finished_run, "--output", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err
