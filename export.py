"""Export a trained SHA-RNN to ONNX as one chunk step with its state carried explicitly.

    python export.py --checkpoint ENWIK8.pt --output sharnn.onnx [--opset 20]

The graph runs one chunk of T tokens for B streams. The model's state goes in and comes
out as plain tensors: feed each call's state outputs to the next call's state inputs.
E is the embedding size (ninp), "i" a block index.

Inputs:
    tokens              int64   [T, B]          token ids (indices into the checkpoint's vocab)
    h{i}, c{i}          float32 [1, B, E]       LSTM state of every block (zeros: fresh start)
    mem{i}              float32 [M, B, E]       attention memory of every attention block
                                                (M = 0 at the start)
Outputs:
    logits              float32 [T, B, ntoken]  next-token logits (tied decoder); a checkpoint
                                                with an adaptive softmax outputs `log_probs`,
                                                log-probabilities, instead
    new_h{i}, new_c{i}  float32 [1, B, E]       LSTM state after the chunk
    new_mem{i}          float32 [N, B, E]       memory after the chunk, N = min(M + T, mem_len)

T, B and M are dynamic; all mem{i} of one call have the same length M. As in the torch
model, the incoming memory is cut to its last mem_len - T positions and the new memory is
the last mem_len positions of memory + chunk. A checkpoint with mem_len 0 carries no memory
and has no mem inputs or outputs.

onnx, onnxscript and onnxruntime are optional dependencies, needed only here.
"""

import contextlib
import json
import logging
import os
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

import modelfolder
from checkpoint import first_line, load_checkpoint
from model import model_from_checkpoint
from flags import InputError, Parser, run_script
from outputs import Output, checkpoint_inputs, claim
from utils import atomic_path, say

DEFAULT_OPSET = 20
MIN_OPSET = 18  # the exporter's own operator set; lower versions need a lossy conversion
MAX_OPSET = 23
EXAMPLE = dict(T=5, B=3, M=7)  # tracing sizes: distinct and above 1 so none is specialised
CHECK = dict(T=2, B=1, M=1)  # the onnxruntime self-check: sizes unlike the tracing example
CHECK_TOL = 1e-3


class Port(NamedTuple):
    """One graph input or output: its name, element type, shape and meaning."""
    name: str
    dtype: str
    shape: tuple
    meaning: str


class ExportFailed(RuntimeError):
    """The exporter produced no model, or one that disagrees with the torch model."""


def build_parser():
    p = Parser(description="Export a SHA-RNN checkpoint to ONNX (one chunk step with the LSTM "
                           "states and attention memories as explicit inputs and outputs), or as "
                           "a model folder of model.safetensors and config.json.")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint written by main.py (with its config and vocabulary), or a "
                        "model folder")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx",
                   help="onnx: one file; safetensors: a folder with model.safetensors (the "
                        "weights, no pickle) and config.json (default onnx)")
    p.add_argument("--output", required=True,
                   help="ONNX file to write, or the folder for --format safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace what --output holds")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX operator set version, {MIN_OPSET} to {MAX_OPSET} "
                        f"(default {DEFAULT_OPSET})")
    return p


# --- the interface -----------------------------------------------------------------------

def memory_blocks(attn_layers, mem_len):
    """The block indices that carry an attention memory (none when mem_len is 0)."""
    return sorted(attn_layers) if mem_len > 0 else []


def io_spec(config):
    """The graph's (inputs, outputs) as lists of Port, in order, for a checkpoint config."""
    E, n = config["ninp"], config["nlayers"]
    blocks = memory_blocks(config["attn_layers"], config["mem_len"])
    head = ("log_probs", "next-token log-probabilities (adaptive softmax)") if config["cutoffs"] \
        else ("logits", "next-token logits")
    inputs = [Port("tokens", "int64", ("T", "B"), "token ids")]
    outputs = [Port(head[0], "float32", ("T", "B", config["ntoken"]), head[1])]
    for i in range(n):
        for s, what in (("h", "LSTM hidden state"), ("c", "LSTM cell state")):
            inputs.append(Port(f"{s}{i}", "float32", (1, "B", E), f"{what} of block {i}"))
            outputs.append(Port(f"new_{s}{i}", "float32", (1, "B", E),
                                f"{what} of block {i} after the chunk"))
    for i in blocks:
        inputs.append(Port(f"mem{i}", "float32", ("M", "B", E),
                           f"attention memory of block {i} (M may be 0)"))
        outputs.append(Port(f"new_mem{i}", "float32", ("N", "B", E),
                            f"memory of block {i} after the chunk, N = min(M + T, "
                            f"{config['mem_len']})"))
    return inputs, outputs


def format_ports(ports):
    """Ports grouped by shape and type: 'h0 c0 h1 c1 [1, B, 16] float32, ...'."""
    groups = []
    for p in ports:
        kind = f"[{', '.join(map(str, p.shape))}] {p.dtype}"
        if groups and groups[-1][1] == kind:
            groups[-1][0].append(p.name)
        else:
            groups.append(([p.name], kind))
    return ", ".join(f"{' '.join(names)} {kind}" for names, kind in groups)


def describe_io(config):
    """A readable table of the interface, one port per line (docs/variants.md)."""
    inputs, outputs = io_spec(config)
    shape = {p.name: f"[{', '.join(map(str, p.shape))}]" for p in inputs + outputs}
    width = max(map(len, shape.values()))
    lines = []
    for title, ports in (("inputs:", inputs), ("outputs:", outputs)):
        lines.append(title)
        lines += [f"  {p.name:10} {p.dtype:7} {shape[p.name]:{width}}  {p.meaning}" for p in ports]
    return "\n".join(lines)


# --- the graph ---------------------------------------------------------------------------

class ChunkStep(nn.Module):
    """One chunk of the SHA-RNN with its state as arguments and results: hidden is a list of
    (h, c) per block, mems a list of memories of the blocks in `memory_blocks`."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.mem_blocks = memory_blocks(model.attn_layers, model.mem_len)

    def forward(self, tokens, hidden, mems):
        # tokens: [T, B]; hidden: per block ([1, B, E], [1, B, E]); mems: [M, B, E] each
        full = [None] * self.model.nlayers
        for i, mem in zip(self.mem_blocks, mems):
            full[i] = mem
        out, new_hidden, new_mems = self.model(tokens, hidden, full)  # out: [T, B, E]
        T, B, E = out.shape
        if self.model.adaptive is not None:
            head = self.model.log_probs(out.reshape(T * B, E)).reshape(T, B, -1)
        else:
            head = self.model.decoder(out)  # [T, B, ntoken]
        return head, list(new_hidden), [new_mems[i] for i in self.mem_blocks]


def example_inputs(config, T, B, M, generator=None):
    """Inputs for one chunk: random tokens, states and memories, every tensor distinct (the
    exporter would tie inputs that share one tensor)."""
    E, g = config["ninp"], generator
    tokens = torch.randint(0, config["ntoken"], (T, B), generator=g)
    hidden = [(torch.randn(1, B, E, generator=g), torch.randn(1, B, E, generator=g))
              for _ in range(config["nlayers"])]
    mems = [torch.randn(M, B, E, generator=g)
            for _ in memory_blocks(config["attn_layers"], config["mem_len"])]
    return tokens, hidden, mems


def dynamic_shapes(config):
    """torch.export dynamic dimensions: T and B everywhere, one memory length M shared by
    all memories (it may be 0)."""
    T, B = torch.export.Dim("T", min=1), torch.export.Dim("B", min=1)
    M = torch.export.Dim("M", min=0)
    hidden = [({1: B}, {1: B}) for _ in range(config["nlayers"])]
    mems = [{0: M, 1: B} for _ in memory_blocks(config["attn_layers"], config["mem_len"])]
    return {0: T, 1: B}, hidden, mems


def flat(tokens, hidden, mems):
    """The chunk's tensors in graph order: tokens, h0, c0, h1, c1, ..., memories."""
    return [tokens] + [t for pair in hidden for t in pair] + list(mems)


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's progress warnings and log lines (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export",
                                                    "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def lstm_loop_decomposition():
    """While the whole export runs, trace nn.LSTM as a loop over a symbolic T. The exporter
    installs this only while it captures the graph; its later decomposition pass would
    otherwise unroll the LSTM's reference kernel and fix T to the example's length."""
    try:
        from torch.export._patches import register_lstm_while_loop_decomposition
    except ImportError:
        return contextlib.nullcontext()
    return register_lstm_while_loop_decomposition()


def export_onnx(model, config, path, opset, vocab=None):
    """Export `model` (eval, float32, CPU) as a ChunkStep graph to `path`, with its
    vocabulary (id -> token, as JSON) in the model's metadata under "vocab"."""
    step = ChunkStep(model).eval()
    inputs, outputs = io_spec(config)
    with torch.no_grad(), quiet_exporter(), lstm_loop_decomposition():
        program = torch.onnx.export(
            step, example_inputs(config, **EXAMPLE), dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes(config), input_names=[p.name for p in inputs],
            output_names=[p.name for p in outputs], optimize=True, verbose=False)
    if program is None:
        raise ExportFailed("the exporter returned no model")
    name_dims(program.model, inputs + outputs)
    if vocab is not None:
        program.model.metadata_props["vocab"] = json.dumps(list(vocab))
    program.save(path)


def name_dims(model, ports):
    """Replace the exporter's symbolic dimension names (for the new memories an expression
    in T, M and mem_len) by the interface's short names."""
    import onnx_ir as ir

    values = {v.name: v for v in list(model.graph.inputs) + list(model.graph.outputs)}
    for p in ports:
        value = values[p.name]
        value.shape = ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in p.shape])


# --- checks ------------------------------------------------------------------------------

def check_model(path, model, config):
    """onnx.checker on the file, then one chunk of other sizes than the tracing example run
    in onnxruntime and in torch: returns the largest absolute difference over all outputs,
    raises ExportFailed beyond CHECK_TOL (e.g. a dimension the exporter fixed)."""
    import numpy as np
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportFailed(f"onnx.checker rejects {path}: {first_line(e)}") from None
    chunk = example_inputs(config, **CHECK, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head, hidden, mems = ChunkStep(model).eval()(*chunk)
    expected = flat(head, hidden, mems)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [p.name for p in io_spec(config)[0]]
    try:
        got = session.run(None, {n: t.numpy() for n, t in zip(names, flat(*chunk))})
    except Exception as e:  # onnxruntime raises its own exception types
        raise ExportFailed(f"onnxruntime cannot run the exported model: {first_line(e)}") from None
    worst = 0.0
    for port, want, have in zip(io_spec(config)[1], expected, got):
        if tuple(want.shape) != have.shape:
            raise ExportFailed(f"{port.name} has shape {have.shape} in onnxruntime, "
                               f"{tuple(want.shape)} in torch")
        worst = max(worst, float(np.abs(want.numpy() - have).max(initial=0.0)))
    if worst > CHECK_TOL:
        raise ExportFailed(f"onnxruntime and torch outputs differ by {worst:.2e}")
    return worst


# --- command line ------------------------------------------------------------------------

def require_onnx():
    """Import the optional ONNX packages, or raise InputError saying how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise InputError(f"export needs the ONNX packages ({e.name} is missing): "
                         f"pip install onnx onnxruntime onnxscript") from None


def check_args(args):
    """Bad flag values and paths, as InputError, before anything is loaded."""
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise InputError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {args.opset}")
    outs = [Output("--output", args.output, folder=args.format == "safetensors")]
    if args.format == "safetensors":
        outs += [Output("--output", path) for path in modelfolder.files(args.output)]
    claim(outs, checkpoint_inputs(args.checkpoint), args.overwrite)


def load_model(path):
    """The checkpoint's model (eval mode, float32, CPU), its config, with the attention
    blocks as the model resolved them, and its vocabulary."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    return model.float().eval(), dict(ckpt["config"], attn_layers=model.attn_layers), ckpt["vocab"]


def run(args):
    """Export, check, and print the one-line summary; the file is removed if a check fails."""
    check_args(args)
    if args.format == "safetensors":
        try:
            modelfolder.write(load_checkpoint(args.checkpoint), args.output)
        except OSError as e:  # a full disk: the files written before are whole (atomic_write)
            raise InputError(f"cannot write {args.output}: {e.strerror or e}") from None
        weights, config = modelfolder.files(args.output)
        say(f"wrote {weights} ({os.path.getsize(weights) / 2**20:.1f} MiB) and {config}")
        return
    require_onnx()
    model, config, vocab = load_model(args.checkpoint)
    with atomic_path(args.output) as tmp:  # exported and checked beside the output
        export_onnx(model, config, tmp, args.opset, vocab)
        worst = check_model(tmp, model, config)
    inputs, outputs = io_spec(config)
    size = os.path.getsize(args.output) / 2**20
    say(f"wrote {args.output} ({size:.1f} MiB, opset {args.opset}; onnxruntime matches torch "
          f"within {worst:.1e}): inputs {format_ports(inputs)}; outputs {format_ports(outputs)}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run_script(run, args)
    except ExportFailed as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
