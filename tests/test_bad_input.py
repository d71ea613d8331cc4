"""Bad input to every script that takes input: one line on stderr, exit code 2, no
traceback, and every file around unchanged (their checksums), for main.py, generate.py,
export.py, plot.py, bench.py, prepare.py and checkpoint.py convert-pickle. The cases run
in this process, through each script's main(argv), on files built once for the module."""

import collections
import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
from types import SimpleNamespace

import pytest
import torch

import bench
import checkpoint
import export
import generate
import main
import plot
import prepare
from conftest import SMALL, Boom, sentences, tweaked, write_corpus


def quietly(fn, *args):
    """fn(*args) with its stdout and stderr swallowed (module fixtures cannot use capsys)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases read: corpora, a trained run (best and last checkpoints, run
    folder), checkpoints broken in each way, and odd files."""
    root = tmp_path_factory.mktemp("bad")
    w = SimpleNamespace(root=root, p=lambda *names: str(root.joinpath(*names)))
    w.data = write_corpus(root / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))
    w.good, w.last = w.p("good.pt"), w.p("good.last.pt")
    assert quietly(main.main, ["--data", w.data, "--save", w.good, "--epochs", "1", *SMALL]) == 0
    w.run = w.p("good.run")
    w.other = write_corpus(root / "other", sentences(50, 1, words=["zebra", "quokka"]),
                           sentences(5, 2, words=["zebra"]), sentences(5, 3, words=["quokka"]))
    w.empty = write_corpus(root / "empty", sentences(50, 1), b"", sentences(5, 3))
    w.unseen = write_corpus(root / "unseen", sentences(50, 1), sentences(5, 2), b"~~~\n")
    w.notest = write_corpus(root / "notest", sentences(50, 1), sentences(5, 2), sentences(5, 3))
    os.remove(os.path.join(w.notest, "test.txt"))
    w.tiny = write_corpus(root / "tiny", sentences(50, 1), b"a", sentences(5, 3))
    w.folder_split = write_corpus(root / "dirsplit", sentences(50, 1), sentences(5, 2), b"x\n")
    os.remove(os.path.join(w.folder_split, "test.txt"))
    os.mkdir(os.path.join(w.folder_split, "test.txt"))
    w.loop = write_corpus(root / "loop", sentences(50, 1), sentences(5, 2), b"x\n")
    os.remove(os.path.join(w.loop, "test.txt"))
    os.symlink("test.txt", os.path.join(w.loop, "test.txt"))
    with open(w.good, "rb") as f:
        data = f.read()
    with open(w.p("truncated.pt"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(w.p("corrupt.pt"), "wb") as f:
        f.write(b"\x00garbage" * 100)
    root.joinpath("notes.txt").write_text("hello, this is not a checkpoint\n")
    root.joinpath("noise.bin").write_bytes(bytes(range(256)) * 7)
    root.joinpath("afile").write_text("x")
    root.joinpath("afolder").mkdir()
    root.joinpath("records").mkdir()
    root.joinpath("records", "log.txt").write_text("another run\n")
    root.joinpath("rd").mkdir()
    root.joinpath("exists.pt").write_text("another run's weights\n")
    root.joinpath("thesis.pdf").write_bytes(b"%PDF-1.7 a thesis\n")
    torch.save([torch.nn.Linear(2, 2), None, None], w.p("model.pt"))
    shutil.copy(w.good, w.p("held.pt.lock"))  # a checkpoint named as a lock file
    with open(w.p("evil.pkl"), "wb") as f:
        pickle.dump(Boom(w.p("pwned")), f)
    w.readonly = root / "readonly"
    w.readonly.mkdir()
    w.readonly.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere but in sysfs
        w.readonly = "/sys"
    root.joinpath("book.txt").write_bytes(sentences(200, 4))
    root.joinpath("nothing").mkdir()
    root.joinpath("half").mkdir()
    root.joinpath("half", "valid.txt.raw").write_bytes(b"partial")
    root.joinpath("tb-other").mkdir()
    root.joinpath("tb-other", "events.out.tfevents.1.host").write_bytes(b"events")
    broken_checkpoints(w)
    broken_folders(w)
    return w


def broken_folders(w):
    """Model folders (export.py --format safetensors) broken in one way each."""
    from safetensors.torch import load_file, save_file
    good = w.model = w.p("good-model")
    assert quietly(export.main, ["--checkpoint", w.good, "--format", "safetensors",
                                 "--output", good]) == 0
    w.folders = {}

    def variant(name, change):
        path = w.p(f"model {name}")
        shutil.copytree(good, path)
        change(path)
        w.folders[name] = path

    def shapes(path):
        tensors = load_file(os.path.join(path, "model.safetensors"))
        tensors["encoder.weight"] = torch.zeros(3, 16)
        save_file(tensors, os.path.join(path, "model.safetensors"))

    def rewrite(change):
        def apply(path):
            with open(os.path.join(path, "config.json")) as f:
                description = json.load(f)
            change(description)
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(description, f)
        return apply

    variant("without weights", lambda p: os.remove(os.path.join(p, "model.safetensors")))
    variant("config not json", lambda p: open(os.path.join(p, "config.json"), "w").write("{oops"))
    variant("config of another model", lambda p: open(os.path.join(p, "config.json"), "w").write(
        json.dumps({"model_type": "gpt2", "n_layer": 12})))
    variant("format version 2", rewrite(lambda d: d.update(format_version=2)))
    variant("wrong shapes", shapes)
    variant("unknown field", rewrite(lambda d: d.update(surprise=1)))
    variant("a token twice", rewrite(lambda d: d["vocab"].__setitem__(1, d["vocab"][0])))
    variant("garbage weights", lambda p: open(os.path.join(p, "model.safetensors"), "wb").write(
        b"\xff" * 64))


def broken_checkpoints(w):
    """Best and last checkpoints broken in one field each (checkpoint.check_fields)."""
    def first_exp_avg(c):
        state = c["optimizer"]["state"][0]
        key = next(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
        state[key] = torch.zeros(3, 3)

    best = {
        "no config": lambda c: c.pop("config"),
        "unknown field": lambda c: c.update(surprise=1),
        "string ninp": lambda c: c["config"].update(ninp="16"),
        "no layers": lambda c: c["config"].update(nlayers=0),
        "negative memory": lambda c: c["config"].update(mem_len=-5),
        "wrong shape": lambda c: c["model"].update({"encoder.weight": torch.zeros(3, 3)}),
        "short vocabulary": lambda c: c.update(vocab=c["vocab"][:-1]),
        "nan weights": lambda c: c["model"]["decoder.bias"].fill_(float("nan")),
        "metrics a list": lambda c: c.update(metrics=[]),
        "version 99": lambda c: c.update(version=99),
        "a token twice": lambda c: c["vocab"].__setitem__(1, c["vocab"][0]),
        "valid loss nan": lambda c: c["metrics"].update(valid_loss=float("nan")),
        "bptt abc": lambda c: c["args"].update(bptt="abc"),
        "lr nan": lambda c: c["args"].update(lr=float("nan")),
        "when abc": lambda c: c["args"].update(when="abc"),
        "cooldown inf": lambda c: c["args"].update(cooldown=float("inf")),
        "bptt 1e9": lambda c: c["args"].update(bptt=1e9),
        "bptt 3": lambda c: c["args"].update(bptt=3),
        "interval of 0 minutes": lambda c: c["args"].update(save_interval=[0, "min"]),
        "unknown flag": lambda c: c["args"].update(surprise=1),
        "no bptt": lambda c: c["args"].pop("bptt"),
    }
    last = {
        "no steps": lambda c: c["progress"].pop("steps"),
        "position beyond the data": lambda c: c["progress"].update(i=10**9),
        "string epoch": lambda c: c["progress"].update(epoch="1"),
        "optimizer of another model": first_exp_avg,
        "short random state": lambda c: c["rng"].update(numpy_key=torch.zeros(5, dtype=torch.int64)),
        "no random state": lambda c: c.pop("rng"),
        "carry of another width": lambda c: c.update(carry={
            "hidden": [(torch.zeros(1, 4, 7), torch.zeros(1, 4, 7))] * 2, "mems": [None] * 2}),
        "optimizer without progress": lambda c: c.pop("progress"),
        "sgd named on a LAMB state": lambda c: c["progress"].update(optimizer_name="sgd"),
        "epoch beyond the steps": lambda c: c["progress"].update(epoch=10**6),
        "best nan": lambda c: c["progress"].update(best_val=float("nan")),
        "history of text": lambda c: c["progress"].update(val_history=["a"]),
    }
    w.broken = {name: tweaked(w.good, w.p(f"best {name}.pt"), change) for name, change in best.items()}
    w.broken.update({name: tweaked(w.last, w.p(f"last {name}.pt"), change)
                     for name, change in last.items()})


def main_cases(w):
    new = ["--save", w.p("new.pt")]
    last = ["--last", w.p("new.last.pt")]
    b = w.broken
    return {
        "missing data folder": (["--data", w.p("nope")], "nope"),
        "missing split file": (["--data", w.notest], "test.txt"),
        "split is a folder": (["--data", w.folder_split], "is a folder"),
        "split is a symlink loop": (["--data", w.loop], "symbolic links"),
        "empty split": (["--data", w.empty], "valid.txt"),
        "one-byte split": (["--data", w.tiny], "valid split"),
        "unseen token": (["--data", w.unseen], "'126'"),
        "bptt below 5": (["--bptt", "4"], "--bptt"),
        "bptt larger than the data": (["--bptt", "100000"], "--bptt"),
        "batch larger than the data": (["--batch_size", "10000000"], "batch"),
        "unknown optimizer": (["--optimizer", "rmsprop"], "--optimizer"),
        "resume path missing": (["--resume", w.p("x.pt")], "x.pt"),
        "truncated checkpoint": (["--resume", w.p("truncated.pt")], "truncated"),
        "corrupt checkpoint": (["--resume", w.p("corrupt.pt")], "corrupt"),
        "vocabulary mismatch": (["--data", w.other, "--resume", w.good], "vocabulary"),
        "sizes contradict the checkpoint": (["--resume", w.good, "--emsize", "32"], "--emsize 32"),
        "unwritable save location": (["--save", os.path.join(w.readonly, "m.pt")], "cannot write"),
        "save is a split file": (["--save", os.path.join(w.data, "train.txt")], "corpus file"),
        "last is a split file": ([*new, "--last", os.path.join(w.data, "valid.txt")], "corpus file"),
        "last is the save file": ([*new, "--last", new[1]], "same file"),
        "last is the save's lock file": ([*new, "--last", new[1] + ".lock"], "lock file"),
        "save is a folder": (["--save", w.p("afolder")], "folder"),
        "save is empty": (["--save", ""], "--save"),
        "save exists": (["--save", w.p("exists.pt")], "exists"),
        "last exists": ([*new, "--last", w.p("exists.pt")], "exists"),
        "another run's last": ([*new, "--last", w.last], "exists"),
        "run dir is a file": ([*new, "--run-dir", w.p("afile")], "--run-dir"),
        "run dir is the corpus folder": ([*new, "--run-dir", w.data], "corpus folder"),
        "run dir is a lock file": (["--save", w.p("o9.pt"), "--run-dir", w.p("o9.pt.lock")],
                                   "lock file"),
        "last is the run folder": (["--save", w.p("o5"), "--last", w.p("o5.run")], "same file"),
        "last and run dir are one path": ([*new, "--last", w.p("x.pt"), "--run-dir", w.p("x.pt")],
                                          "same file"),
        "save named .safetensors": (["--save", w.p("m.safetensors")], "export.py --format safetensors"),
        "save is the resumed folder's weights": (["--resume", w.model, "--save",
                                                  os.path.join(w.model, "model.safetensors"),
                                                  "--overwrite"], ".safetensors"),
        "last named .safetensors": ([*new, "--last", w.p("m.last.SafeTensors")], "--last"),
        "save is the resumed folder's description": (["--resume", w.model, "--save",
                                                      os.path.join(w.model, "config.json"),
                                                      "--overwrite"], "model folder"),
        "run dir is the resumed folder": ([*new, "--resume", w.model, "--run-dir", w.model,
                                           "--overwrite"], "model folder"),
        "tensorboard is the resumed folder": ([*new, "--resume", w.model, "--tensorboard",
                                               w.model], "model folder"),
        "last is the resumed checkpoint": ([*new, "--resume", w.good, "--last", w.good,
                                            "--overwrite"], "--resume reads"),
        "save's lock file is the resumed checkpoint": (["--save", w.p("held.pt"), "--resume",
                                                        w.p("held.pt.lock")], "lock file"),
        "run dir holds another run": ([*new, "--run-dir", w.p("records")], "another run"),
        "run dir file is the last": ([*new, "--run-dir", w.p("rd"), "--last",
                                      w.p("rd", "log.txt")], "same file"),
        "resume a text file": ([*new, "--resume", w.p("notes.txt")], "not a torch"),
        "resume random bytes": ([*new, "--resume", w.p("noise.bin")], "not a torch"),
        "resume a pickle": ([*new, "--resume", w.p("model.pt")], "trust"),
        "lr nan": ([*new, "--lr", "nan"], "--lr"),
        "lr inf": ([*new, "--lr", "inf"], "--lr"),
        "negative wdecay": ([*new, "--wdecay", "-1"], "--wdecay"),
        "negative seed": ([*new, "--seed", "-1"], "--seed"),
        "seed beyond 32 bits": ([*new, "--seed", "8589934592"], "--seed"),
        "negative clip": ([*new, "--clip", "-0.5"], "--clip"),
        "negative cooldown": ([*new, "--cooldown", "-3"], "--cooldown"),
        "negative nonmono": ([*new, "--nonmono", "-1"], "--nonmono"),
        "when 0": ([*new, "--when", "0"], "--when"),
        "when -1": ([*new, "--when", "2", "-1"], "--when"),
        "no dynamic statistics": ([*new, "--dyn-stat-batches", "0"], "--dyn-stat-batches"),
        "zero threads": ([*new, "--threads", "0"], "--threads"),
        "zero max steps": ([*new, "--max-steps", "0"], "--max-steps"),
        "nhid not a multiple of emsize": ([*new, "--emsize", "256", "--nhid", "600"],
                                          "--nhid 600 must be a multiple of --emsize 256"),
        "heads do not divide emsize": ([*new, "--heads", "3"], "--heads 3"),
        "attention block beyond nlayers": ([*new, "--attn-layers", "5"], "--nlayers 2"),
        "dropout of 1": ([*new, "--dropouth", "1"], "--dropouth"),
        "model beyond memory": ([*new, *last, "--emsize", "200000", "--nhid", "200000"],
                                "does not fit in memory"),
        **{f"resume: {name}": ([*new, "--resume", b[name]], needle) for name, needle in (
            ("no config", "config is missing"), ("unknown field", "unknown field surprise"),
            ("string ninp", "config.ninp is a str"), ("no layers", "nlayers"),
            ("negative memory", "mem_len"), ("wrong shape", "encoder.weight"),
            ("short vocabulary", "vocab"), ("nan weights", "not finite"),
            ("metrics a list", "metrics is a list"), ("version 99", "version 99"),
            ("a token twice", "twice"), ("valid loss nan", "metrics.valid_loss is nan"),
            ("bptt abc", "args.bptt is 'abc'"), ("lr nan", "args.lr is nan"),
            ("when abc", "args.when is 'abc'"), ("cooldown inf", "args.cooldown is inf"),
            ("bptt 1e9", "args.bptt is 1000000000.0"),
            ("bptt 3", "args.bptt: --bptt must be at least 5"),
            ("interval of 0 minutes", "args.save_interval is [0, 'min']"),
            ("unknown flag", "unknown field args.surprise"), ("no bptt", "args.bptt is missing"))},
        "eval-only: wrong shape": (["--eval-only", "--resume", b["wrong shape"]], "encoder.weight"),
        "tensorboard folder of another run": ([*new, "--tensorboard", w.p("tb-other")], "another run"),
        "tensorboard is a file": ([*new, "--tensorboard", w.p("afile")], "--tensorboard"),
        "tensorboard is empty": ([*new, "--tensorboard", ""], "--tensorboard"),
        "unknown recipe": ([*new, "--recipe", "gpu-huge"], "cpu-small"),
        "abbreviated flag": ([*new, "--epoch", "3"], "--epoch"),
        "budget 0": ([*new, "--budget", "0"], "--budget"),
        "budget 0 minutes": ([*new, "--budget", "0min"], "--budget"),
        "negative budget": ([*new, "--budget=-1min"], "--budget"),
        "budget abc": ([*new, "--budget", "abc"], "--budget"),
        "budget and max steps": ([*new, "--budget", "5min", "--max-steps", "10"], "--budget"),
        "budget shorter than the measurement": ([*new, "--budget", "0.001s"], "too short"),
        "budget negative, as its own word": ([*new, "--budget", "-5min"], "--budget"),
        "eval interval 0": ([*new, "--eval-interval", "0"], "--eval-interval"),
        "budget without a value": ([*new, "--budget"], "--budget"),
        "budget beyond a year": ([*new, "--budget", "9" * 60 + "h"], "at most 8760h"),
        "budget overflowing a float": ([*new, "--budget", "9" * 400 + "h"], "at most 8760h"),
        "budget added on continue": (["--continue", w.last, "--budget", "20s"], "--budget"),
        "recipe changed on continue": (["--continue", w.last, "--recipe", "cpu-small"],
                                       "--recipe"),
        **{f"resume a model folder {name}": ([*new, "--resume", w.folders[name]], needle)
           for name, needle in (("without weights", "model.safetensors"),
                                ("config not json", "not JSON"),
                                ("config of another model", "format"),
                                ("format version 2", "format_version"),
                                ("wrong shapes", "encoder.weight"),
                                ("garbage weights", "safetensors"),
                                ("unknown field", "unknown field surprise"),
                                ("a token twice", "twice"))},
        "continue with a new save": (["--continue", w.last, "--save", w.p("cc_new.pt")],
                                     "--save cannot change on --continue"),
        **{f"continue: {name}": (["--continue", b[name], *last], needle) for name, needle in (
            ("no steps", "progress.steps is missing"), ("position beyond the data", "progress.i"),
            ("string epoch", "progress.epoch is a str"),
            ("optimizer of another model", "optimizer"), ("short random state", "rng.numpy_key"),
            ("no random state", "rng is missing"), ("carry of another width", "carry"),
            ("optimizer without progress", "progress is missing"),
            ("sgd named on a LAMB state", "optimizer_name 'sgd'"),
            ("epoch beyond the steps", "progress.epoch (1000000)"),
            ("best nan", "progress.best_val is nan"),
            ("history of text", "progress.val_history"))},
    }


def script_cases(w):
    """(script, argv, needle) of the other scripts' cases."""
    gen = ["--checkpoint", w.good, "--prime", "a"]
    bench_flags = ["--device", "cpu", "--emsize", "16", "--nhid", "32", "--nlayers", "2",
                   "--bptt", "8", "--batch_size", "2", "--steps", "1", "--warmup-steps", "0"]
    b = w.broken
    return {
        "generate: seed beyond 32 bits": ("generate", [*gen, "--seed", "99999999999999999999"], "--seed"),
        "generate: negative seed": ("generate", [*gen, "--seed", "-1"], "--seed"),
        "generate: nan weights": ("generate", ["--checkpoint", b["nan weights"]], "not finite"),
        "generate: no layers": ("generate", ["--checkpoint", b["no layers"]], "nlayers"),
        "generate: string ninp": ("generate", ["--checkpoint", b["string ninp"]], "config.ninp"),
        "generate: folder without weights": ("generate", ["--checkpoint",
                                                          w.folders["without weights"]],
                                             "model.safetensors"),
        "generate: a token twice": ("generate", ["--checkpoint", b["a token twice"]], "twice"),
        "generate: folder with a token twice": ("generate", ["--checkpoint",
                                                             w.folders["a token twice"]], "twice"),
        "export: folder with a token twice": ("export", ["--checkpoint", w.folders["a token twice"],
                                                         "--format", "safetensors", "--output",
                                                         w.p("x-model")], "twice"),
        "export: folder of another model": ("export", ["--checkpoint",
                                                      w.folders["config of another model"],
                                                      "--output", w.p("x.onnx")], "format"),
        "export: folder output exists": ("export", ["--checkpoint", w.good, "--format",
                                                    "safetensors", "--output", w.p("good-model")],
                                         "--overwrite"),
        "export: folder output is a file": ("export", ["--checkpoint", w.good, "--format",
                                                       "safetensors", "--output", w.p("afile")],
                                            "is a file"),
        "export: output is the checkpoint": ("export", ["--checkpoint", w.good, "--output", w.good],
                                             "the checkpoint"),
        "export: output is the folder's weights": ("export", [
            "--checkpoint", w.model, "--output", os.path.join(w.model, "model.safetensors"),
            "--overwrite"], "model folder"),
        "export: folder over itself": ("export", ["--checkpoint", w.model, "--format",
                                                  "safetensors", "--output", w.model,
                                                  "--overwrite"], "model folder"),
        "export: output exists": ("export", ["--checkpoint", w.good, "--output", w.p("exists.pt")],
                                  "--overwrite"),
        "export: output is a folder": ("export", ["--checkpoint", w.good, "--output",
                                                  w.p("afolder")], "folder"),
        "export: broken checkpoint": ("export", ["--checkpoint", b["short vocabulary"], "--output",
                                                 w.p("x.onnx")], "vocab"),
        "plot: output is a folder": ("plot", [w.run, "--output", w.p("afolder")], "folder"),
        "plot: output is the records": ("plot", [w.run, "--output",
                                                 os.path.join(w.run, "metrics.jsonl")], "records"),
        "plot: output exists": ("plot", [w.run, "--output", w.p("thesis.pdf")], "--overwrite"),
        "plot: output is empty": ("plot", [w.run, "--output", ""], "--output is empty"),
        "bench: seed beyond 32 bits": ("bench", [*bench_flags, "--seed", "99999999999999999999"],
                                       "--seed"),
        "bench: steps beyond any run": ("bench", [*bench_flags, "--steps", "99999999999999999999"],
                                        "--steps"),
        "bench: batch beyond memory": ("bench", [*bench_flags, "--batch_size", "1000000000"],
                                       "does not fit in memory"),
        "bench: bptt beyond memory": ("bench", [*bench_flags, "--bptt", "100000000"],
                                      "does not fit in memory"),
        "bench: nhid not a multiple": ("bench", [*bench_flags, "--nhid", "20"], "--nhid 20"),
        "prepare: missing input": ("prepare", ["text", w.p("nope.txt"), w.p("out")], "no such"),
        "prepare: empty folder": ("prepare", ["text", w.p("nothing"), w.p("out")], "no files"),
        "prepare: outdir is a file": ("prepare", ["text", w.p("book.txt"), w.p("afile")], "afile"),
        "prepare: outdir holds a corpus": ("prepare", ["text", w.p("book.txt"), w.data], "train.txt"),
        "prepare: outdir inside the input": ("prepare", ["text", w.p("nothing"),
                                                         w.p("nothing", "c")], "inside"),
        "prepare: input is an output": ("prepare", ["text", w.p("half", "valid.txt.raw"),
                                                    w.p("half")], "input"),
        "prepare: two named splits": ("prepare", ["text", "--train", w.p("book.txt"), "--valid",
                                                  w.p("book.txt"), w.p("out")], "--test"),
        "prepare: fraction of a half": ("prepare", ["text", w.p("book.txt"), w.p("out"),
                                                    "--fraction", "0.5"], "--fraction"),
        "prepare: fraction below a byte": ("prepare", ["text", w.p("book.txt"), w.p("out"),
                                                       "--fraction", "1e-9"], "less than one byte"),
        "prepare: train is the test": ("prepare", ["text", "--train", w.p("book.txt"), "--valid",
                                                   w.p("notes.txt"), "--test", w.p("book.txt"),
                                                   w.p("out")], "--train and --test both hold"),
        "prepare: test inside the train folder": ("prepare", [
            "text", "--train", w.p("half"), "--valid", w.p("notes.txt"), "--test",
            w.p("half", "valid.txt.raw"), w.p("out")], "--train and --test both hold"),
        "prepare: archive missing": ("prepare", ["enwik8", w.p("enwik8.zip"), w.p("out")],
                                     "archive not found"),
        "convert: a folder": ("checkpoint", ["convert-pickle", w.p("afolder"), "--trust-this-file"],
                              "folder"),
        "convert: missing file": ("checkpoint", ["convert-pickle", w.p("nope.pkl"),
                                                 "--trust-this-file"], "does not exist"),
        "convert: out exists": ("checkpoint", ["convert-pickle", w.p("evil.pkl"), "--out",
                                               w.p("exists.pt"), "--trust-this-file"], "exists"),
        "convert: out into a missing folder": ("checkpoint", ["convert-pickle", w.p("evil.pkl"),
                                                              "--out", w.p("no", "x.pt"),
                                                              "--trust-this-file"], "does not exist"),
        "convert: out is the file": ("checkpoint", ["convert-pickle", w.p("model.pt"), "--out",
                                                    w.p("model.pt"), "--trust-this-file"],
                                     "the pickled file"),
        "convert: out named .safetensors": ("checkpoint", ["convert-pickle", w.p("evil.pkl"),
                                                          "--out", w.p("w.safetensors"),
                                                          "--trust-this-file"], ".safetensors"),
        "convert: out is a lock file": ("checkpoint", ["convert-pickle", w.p("evil.pkl"), "--out",
                                                       w.p("good.pt.lock"), "--trust-this-file"],
                                        "lock file"),
        "generate: abbreviated flag": ("generate", [*gen, "--len", "5"], "--len"),
        "export: abbreviated flag": ("export", ["--check", w.good, "--output", w.p("x.onnx")],
                                     "--check"),
        "plot: abbreviated flag": ("plot", [w.run, "--out", w.p("x.png")], "--out"),
        "bench: abbreviated flag": ("bench", [*bench_flags, "--step", "3"], "--step"),
        "prepare: abbreviated flag": ("prepare", ["text", w.p("book.txt"), w.p("out"),
                                                  "--frac", "0.1"], "--frac"),
        "convert: abbreviated flag": ("checkpoint", ["convert-pickle", w.p("evil.pkl"),
                                                     "--trust"], "--trust"),
        "convert: truncated": ("checkpoint", ["convert-pickle", w.p("truncated.pt"), "--out",
                                              w.p("t.pt"), "--trust-this-file"], "cannot unpickle"),
    }


SCRIPTS = {"main": main.main, "generate": generate.main, "export": export.main,
           "plot": plot.main, "bench": bench.main_cli, "prepare": prepare.main,
           "checkpoint": checkpoint.main}


class Names:
    """A stand-in world whose every path is "": lists the case names at collection time."""
    broken = collections.defaultdict(str)
    folders = collections.defaultdict(str)

    def __getattr__(self, name):
        return ""

    @staticmethod
    def p(*names):
        return ""


MAIN_CASES = list(main_cases(Names()))
SCRIPT_CASES = list(script_cases(Names()))


def checksums(folder):
    """{path: sha256} of every file (and link) under the folder."""
    sums = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    sums[path] = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:  # a link in a loop: its target, as text
                sums[path] = f"{e.strerror}: {os.readlink(path)}"
    return sums


def call(fn, argv, capsys):
    try:
        code = fn(argv)
    except SystemExit as e:  # argparse's one-line errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def check_refused(world, capsys, script, argv, needle):
    before = checksums(world.root)
    code, out, err = call(SCRIPTS[script], argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert checksums(world.root) == before
    assert not os.path.exists(world.p("pwned"))  # no pickle ran


@pytest.mark.parametrize("case", MAIN_CASES)
def test_main_bad_input_is_one_line_exit_2_and_changes_nothing(case, world, capsys):
    argv, needle = main_cases(world)[case]
    if "--save" not in argv and "--continue" not in argv:
        argv = ["--save", world.p("fresh.pt"), *argv]
    if "--data" not in argv and "--continue" not in argv:
        argv = ["--data", world.data, *argv]
    check_refused(world, capsys, "main", [*SMALL, *argv], needle)


@pytest.mark.parametrize("case", SCRIPT_CASES)
def test_script_bad_input_is_one_line_exit_2_and_changes_nothing(case, world, capsys):
    script, argv, needle = script_cases(world)[case]
    check_refused(world, capsys, script, argv, needle)
