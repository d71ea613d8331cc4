"""utils.py: the atomic writer keeps the previous file, and leaves no temporary, when a
write fails, and reports every failed write as an OSError, whatever the writer raised."""

import errno
import os

import pytest
import torch

import utils
from conftest import digest


def test_atomic_save_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    utils.atomic_save({"a": torch.ones(3)}, path)
    before = digest(path)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        utils.atomic_save({"a": torch.zeros(3)}, path)
    assert digest(path) == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_a_failed_write_is_an_oserror_whatever_the_writer_raises(tmp_path):
    """torch.save reports some failed writes as a RuntimeError ("unexpected pos"); the
    atomic writer reports every failed write as an OSError, the old file intact."""
    path = str(tmp_path / "ck.pt")
    utils.atomic_save({"a": torch.ones(3)}, path)
    before = digest(path)

    def torch_failing(f):
        f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(OSError) as failed:
        utils.atomic_write(path, torch_failing)
    assert failed.value.errno == errno.EIO and "unexpected pos" in str(failed.value)
    assert digest(path) == before and os.listdir(tmp_path) == ["ck.pt"]
