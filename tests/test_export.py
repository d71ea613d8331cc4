"""export.py: the ONNX chunk step against the torch model, over chunks with carried state;
the command's one line, its vocabulary and ports, its one-line errors, and an existing
output replaced only with --overwrite."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import export  # noqa: E402
from conftest import ROOT, perturb, tiny_model  # noqa: E402

pytestmark = pytest.mark.slow  # ONNX export

CONFIG = dict(ntoken=20, ninp=16, nhid=32, nlayers=3, attn_layers=[0, 2], heads=1, mem_len=12,
              cutoffs=None)
TOL = 1e-4


def tiny_checkpoint(path, **overrides):
    """A checkpoint like checkpoint.base_checkpoint() of a small model with non-trivial gates
    and LayerNorms, so every term of the computation matters."""
    config = dict(CONFIG, **overrides)
    model = perturb(tiny_model(**config))
    torch.save({"format": "sha-rnn", "version": 1, "model": model.state_dict(), "config": config,
                "vocab": [f"t{i}" for i in range(config["ntoken"])], "metrics": {},
                "args": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny checkpoint exported through main(argv): (checkpoint, onnx path, stdout)."""
    folder = tmp_path_factory.mktemp("export")
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    out = str(folder / "tiny.onnx")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert export.main(["--checkpoint", ckpt, "--output", out]) == 0
    return ckpt, out, stdout.getvalue()


def run_stream(ckpt, onnx_path, chunks, batch, seed):
    """Feed consecutive chunks of the given lengths to the torch model (carrying hidden and
    mems) and to the ONNX graph (feeding its state outputs back in); return the largest
    difference of any output and the memory lengths after each chunk."""
    model, config, _ = export.load_model(ckpt)
    inputs, outputs = export.io_spec(config)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    state = {p.name: np.zeros([0 if d == "M" else batch if d == "B" else d for d in p.shape],
                              np.float32) for p in inputs[1:]}  # fresh start: zeros, no memory
    g = torch.Generator().manual_seed(seed)
    hidden = mems = None
    worst, mem_lengths = 0.0, []
    for T in chunks:
        x = torch.randint(0, config["ntoken"], (T, batch), generator=g)
        with torch.no_grad():
            out, hidden, mems = model(x, hidden, mems)  # out: [T, B, E]
            head = (model.log_probs(out.reshape(T * batch, -1)).reshape(T, batch, -1)
                    if model.adaptive is not None else model.decoder(out))
        expected = export.flat(head, hidden, [mems[i] for i in model.attn_layers])
        got = session.run(None, dict(state, tokens=x.numpy()))
        for port, want, have in zip(outputs, expected, got):
            assert have.shape == tuple(want.shape), port.name
            worst = max(worst, float(np.abs(have - want.numpy()).max()))
        state = {p.name: have for p, have in zip(inputs[1:], got[1:])}
        mem_lengths.append(got[-1].shape[0])
    return worst, mem_lengths


def test_main_prints_one_line_naming_the_file_and_ports(exported):
    _, out, stdout = exported
    lines = stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {out} ")
    for name in ("tokens", "h0", "c2", "mem0", "mem2", "logits", "new_h1", "new_c0", "new_mem2"):
        assert f"{name} " in lines[0]


def test_the_onnx_file_carries_its_vocabulary(exported):
    ckpt, out, _ = exported
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    vocab = json.loads(session.get_modelmeta().custom_metadata_map["vocab"])
    assert vocab == torch.load(ckpt, weights_only=True)["vocab"] == [f"t{i}" for i in range(CONFIG["ntoken"])]


def test_graph_interface(exported):
    _, out, _ = exported
    graph = onnx.load(out)
    onnx.checker.check_model(graph, full_check=True)
    assert graph.opset_import[0].version == export.DEFAULT_OPSET
    inputs, outputs = export.io_spec(CONFIG)
    assert [v.name for v in graph.graph.input] == [p.name for p in inputs]
    assert [v.name for v in graph.graph.output] == [p.name for p in outputs]
    assert [p.name for p in inputs] == ["tokens", "h0", "c0", "h1", "c1", "h2", "c2",
                                        "mem0", "mem2"]
    for value, port in zip(list(graph.graph.input) + list(graph.graph.output), inputs + outputs):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == list(port.shape), port.name


def test_chunks_with_carried_state_match_torch(exported):
    ckpt, out, _ = exported
    # Batch 2, lengths 4, 9, 6 (the export traced 5 x 3): the memory grows 4 -> 13 -> 19
    # positions and is cut to mem_len 12 after the second chunk.
    worst, mem_lengths = run_stream(ckpt, out, [4, 9, 6], batch=2, seed=1)
    assert mem_lengths == [4, 12, 12]
    assert worst < TOL
    # Batch 1, a single token, then a chunk longer than mem_len (no old memory is visible).
    worst, mem_lengths = run_stream(ckpt, out, [1, 13, 3], batch=1, seed=2)
    assert mem_lengths == [1, 12, 12]
    assert worst < TOL


def test_command_line_exports_adaptive_softmax_log_probs(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "adaptive.pt", cutoffs=[5, 10], nlayers=2, attn_layers=[1])
    out = str(tmp_path / "adaptive.onnx")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--checkpoint", ckpt,
                           "--output", out, "--opset", "18"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "log_probs [T, B, 20] float32" in proc.stdout
    assert [v.name for v in onnx.load(out).graph.output][0] == "log_probs"
    worst, mem_lengths = run_stream(ckpt, out, [7, 8], batch=2, seed=3)
    assert mem_lengths == [7, 12]
    assert worst < TOL


def test_describe_io_lists_every_port():
    text = export.describe_io(dict(CONFIG, mem_len=0))
    names = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert names == ["tokens", "h0", "c0", "h1", "c1", "h2", "c2",
                     "logits", "new_h0", "new_c0", "new_h1", "new_c1", "new_h2", "new_c2"]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{tmp}/missing.pt"], "does not exist"),
    (["--checkpoint", "{tmp}/garbage.pt"], "corrupt"),
    (["--checkpoint", "{tmp}/garbage.pt", "--opset", "12"], "--opset must be between"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--output", str(tmp_path / "m.onnx")]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_packages_say_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    assert export.main(["--checkpoint", ckpt, "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "pip install onnx onnxruntime onnxscript" in err


def test_export_replaces_an_existing_file_only_with_overwrite(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "tiny.onnx"
    out.write_text("an older export")
    assert export.main(["--checkpoint", ckpt, "--output", str(out)]) == 2
    assert out.read_text() == "an older export"
    assert export.main(["--checkpoint", ckpt, "--output", str(out), "--overwrite"]) == 0
    assert out.stat().st_size > 1000
    capsys.readouterr()
