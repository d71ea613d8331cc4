"""runtime.py: the device choice (pick_device turns TF32 on for CUDA unless told not to)."""

import torch

import runtime
from conftest import CPU


def test_cuda_runs_float32_matrix_products_in_tf32_unless_no_tf32(monkeypatch):
    """pick_device turns TF32 on for CUDA (off with tf32=False) and leaves the CPU as it is."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for setting in ((True, False), (False, True)):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = setting
            assert runtime.pick_device("cpu", not setting[0]) == CPU
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == setting
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for tf32 in (True, False):
            assert runtime.pick_device("auto", tf32).type == "cuda"
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
