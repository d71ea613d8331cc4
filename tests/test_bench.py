"""bench.py: its bare floor computes what the model computes, and the CLI's output shape."""

import copy
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
from training import Carry, Step, WithLoss, build_optimizer, make_step, train_step
from runtime import make_scaler
from conftest import CPU, ROOT, perturb, tiny_model
from lamb import Lamb

TINY = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--bptt", "8", "--batch_size", "2",
        "--mem-len", "20", "--ntoken", "20", "--steps", "2", "--warmup-steps", "1",
        "--device", "cpu", "--threads", "1"]
RESULT = r"[\d,]+\.\d ms/batch, [\d,]+ tokens/s, peak [\d,]+ MB"


def batches(n=4, bptt=6, bsz=3):
    return bench.synthetic_batches(n, bptt, bsz, 23, seed=1, device=CPU)


@pytest.mark.parametrize("sdpa,attn_layers,heads", [(True, (0, 1), 2), (False, (0, 1), 1),
                                                    (True, (0,), 1), (False, (), 1)])
def test_floor_has_the_models_loss_and_gradients_with_carried_state(sdpa, attn_layers, heads):
    # Two blocks, a memory shorter than what the steps produce (so it is cut), non-zero gates
    # and LayerNorm parameters (so every path matters).
    model = perturb(tiny_model(attn_layers=list(attn_layers), heads=heads, mem_len=13, sdpa=sdpa),
                    scale=0.3).train()
    twin = copy.deepcopy(model)
    P, cfg = dict(twin.named_parameters()), bench.floor_config(twin)
    run = Step(model, WithLoss(model), None, make_scaler(CPU, "none"), 0.25, CPU, "none")
    carry, floor_hidden, floor_mems = Carry(), None, None
    for x, y in batches():
        model.zero_grad(set_to_none=True)
        loss, _ = train_step(run, carry, x, y, 0.0, False)
        carry.pending.backward()
        carry.detach()
        output, floor_hidden, floor_mems = bench.floor_forward(P, cfg, x, floor_hidden,
                                                               floor_mems, True)
        floor_loss = bench.floor_loss(P, output, y)
        floor_loss.backward()
        assert floor_loss.item() == pytest.approx(loss.item(), abs=1e-5)
        for (name, p), q in zip(model.named_parameters(), P.values()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=name)
        for a, b in zip(floor_mems, carry.mems):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        floor_hidden = [tuple(t.detach() for t in hc) for hc in floor_hidden]
        floor_mems = [None if m is None else m.detach() for m in floor_mems]


@pytest.mark.parametrize("sdpa", [True, False])
def test_floor_step_matches_the_real_training_step(sdpa):
    model = perturb(tiny_model(attn_layers=[0, 1], heads=2, mem_len=13, sdpa=sdpa),
                    scale=0.3).train()
    twin = copy.deepcopy(model)
    P = dict(twin.named_parameters())
    args = bench.build_parser().parse_args(["--device", "cpu", "--amp", "none"])
    real = bench.model_train_step(make_step(model, args, CPU), args.lr)
    floor = bench.floor_train_step(P, bench.floor_config(twin),
                                   build_optimizer("lamb", list(P.values()), args.lr, args.wdecay),
                                   make_scaler(CPU, "none"), CPU, "none", args.clip)
    start = [p.detach().clone() for p in model.parameters()]
    for n, (x, y) in enumerate(batches(), 1):
        assert floor(x, y).item() == pytest.approx(real(x, y).item(), abs=1e-5)
        if n == 2:  # after two full steps the weights have moved, and moved alike
            for (name, p), q in zip(model.named_parameters(), P.values()):
                torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5, msg=name)
            assert any(not torch.equal(p, s) for p, s in zip(model.parameters(), start))


def test_optimizer_is_the_papers_lamb():
    args = bench.build_parser().parse_args([])
    opt = make_step(torch.nn.Linear(2, 1), args, CPU).optimizer
    assert isinstance(opt, Lamb)
    group = opt.param_groups[0]
    assert group["min_trust"] == 0.25 and group["weight_decay"] == 1.2e-6


def test_warmup_fills_the_attention_memory():
    args = bench.build_parser().parse_args([])
    model = tiny_model(205, 8, 16, 4, mem_len=5000)
    assert bench.warmup_steps(args, model) == 5 + 2  # ceil(5000 / 1024) + 2
    args = bench.build_parser().parse_args(["--warmup-steps", "20"])
    assert bench.warmup_steps(args, model) == 20
    args = bench.build_parser().parse_args(["--attn-layers", "none", "--warmup-steps", "1"])
    assert bench.warmup_steps(args, tiny_model(205, 8, 16, 4, attn_layers=[])) == 1


def test_synthetic_batches_are_seeded_and_shifted():
    (x, y), = bench.synthetic_batches(1, 5, 2, 7, seed=3, device=CPU)
    (x2, _), = bench.synthetic_batches(1, 5, 2, 7, seed=3, device=CPU)
    assert x.shape == y.shape == (5, 2) and torch.equal(x, x2)
    assert torch.equal(x[1:], y[:-1])


def run_bench(*extra):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), *TINY, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_cli_train_prints_the_train_line_last():
    lines = run_bench()
    cpu = [line for line in lines if line.startswith("device: CPU")]
    assert len(cpu) == 1 and cpu[0].endswith(bench.bf16_support(bench.cpu_flags()))
    assert re.fullmatch("train: " + RESULT, lines[-1]), lines[-1]


def test_the_cpu_line_says_whether_bf16_runs_in_hardware():
    assert bench.bf16_support({"sse2", "avx512_bf16"}) == "bf16 in hardware (AVX-512 BF16)"
    assert bench.bf16_support({"amx_bf16", "avx512_bf16"}) == "bf16 in hardware (AVX-512 BF16, AMX-BF16)"
    assert "slower than float32" in bench.bf16_support({"avx2", "avx512f"})


def test_cli_eval_prints_the_eval_line_last():
    lines = run_bench("--eval")
    assert re.fullmatch("eval: " + RESULT, lines[-1]), lines[-1]


def test_cli_floor_prints_floor_and_overhead():
    lines = run_bench("--floor", "--attn-layers", "all", "--heads", "2")
    assert re.fullmatch("train: " + RESULT, lines[-1]), lines[-1]
    assert any(re.fullmatch(r"floor: [\d,]+\.\d ms/batch", line) for line in lines)
    overhead = [line for line in lines if "overhead" in line]
    assert len(overhead) == 1 and re.fullmatch(r"overhead: [+-]\d+\.\d% \(.+\)", overhead[0])


@pytest.mark.slow
def test_cli_also_eval_prints_the_lstm_dtype_warm_up_and_both_lines():
    lines = run_bench("--also-eval", "--amp", "bf16")
    train = [i for i, line in enumerate(lines) if re.fullmatch("train: " + RESULT, line)]
    assert len(train) == 1 and re.fullmatch("eval: " + RESULT, lines[-1])
    assert lines.count("LSTM output: bfloat16") == 2  # the CPU's bf16 LSTM (model.lstm_dtype)
    assert len([line for line in lines if re.fullmatch(r"warm-up: 5 steps in [\d.]+ s", line)]) == 2
    assert run_bench("--amp", "fp16")[:-1].count("LSTM output: float32") == 1


def test_cli_attention_kernels_time_each_kernel_or_say_why_not():
    lines = run_bench("--attention-kernels")
    assert lines[0].startswith("attention product: batch 2, 1 head(s) of width 16, 8 queries over "
                               "20 keys, the model's mask, float32")
    names = [line.split(": ")[0] for line in lines[1:]]
    assert names == ["sdpa, PyTorch's choice", "sdpa flash", "sdpa memory-efficient", "sdpa cuDNN",
                     "sdpa math", "two matmuls"]
    for line in lines[1:]:
        assert re.fullmatch(r".+: ([\d.]+ ms|refused \(.+\))", line), line
    assert re.fullmatch(r"sdpa math: [\d.]+ ms", lines[5]) and "refused" in lines[4]  # no cuDNN here


def test_cli_rejects_bad_flags():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--steps", "0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "--steps must be positive" in proc.stderr


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.slow
def test_cli_runs_mixed_precision_on_the_cpu(amp):
    lines = run_bench("--amp", amp, "--floor")
    assert any(line.startswith("device: CPU") and f"amp {amp}," in line for line in lines)
    assert re.fullmatch("train: " + RESULT, lines[-1]), lines[-1]
    assert any(line.startswith("device: CPU") and "amp none," in line for line in run_bench())
