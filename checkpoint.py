"""Checkpoints: the format, safe writing and loading (every field checked), a run's start
from a checkpoint (its progress, optimizer, random and carried state), and a converter for
the original's pickled files. The model a checkpoint describes is built in model.py, where
a run stands (Progress) is kept in training.py.

A checkpoint is a dict of state_dicts plus the config, read with torch.load(weights_only=True):

    format    "sha-rnn" (marks this project's checkpoints)       version   1
    model     the model's state_dict (original parameter names; the tied decoder.weight too)
    config    SHARNN's arguments: ntoken, ninp, nhid, nlayers, attn_layers (block indices),
              heads, mem_len, cutoffs (None: the tied softmax; a list: the adaptive one)
    vocab     the id -> token list
    metrics   best: valid_loss, valid_bpc, epoch, steps, tokens, and after the final test
              test_loss, test_bpc;  last: best_valid_loss;  --when copies: epoch
    args      every flag of the run, as resolved (flags.py)
    corpus    {split: SHA-256 of its file} (absent from checkpoints of older versions)
and the last checkpoint (--last, SAVE.last.pt), from which --continue goes on exactly, also
    optimizer the optimizer's state_dict       scaler   the loss scaler's state_dict
    carry     None, or {"hidden": per block None or [h, c], "mems": per block None or a
              memory}: the whole batch's carried state, [1, B, E] and [m, B, E]
    rng       numpy_key [624] int64, numpy_pos, numpy_has_gauss, numpy_gauss (the sequence
              lengths' numpy stream), torch, cuda (None without CUDA), and under torchrun
              ranks: every rank's {torch, cuda}
    progress  where training stands: the fields of training.Progress but its carried state
              (epoch, stream position, steps, best_val, --budget's replans, ...)
check_fields lists the types; a model folder (modelfolder.py) holds the same fields of a
best checkpoint as model.safetensors and config.json.
"""

import os
import pickle
import re
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

import modelfolder
import utils
from flags import InputError, Parser, check_checkpoint_name, check_recorded, run_script
from outputs import Output, claim, script_command
from model import SHARNN, attn_layers_in
from runtime import agree, gather_columns
from training import Carry, Progress
from utils import LOG2, say

FORMAT = "sha-rnn"  # marks checkpoints written by this project
VERSION = 1         # of the format: a checkpoint of a newer version is refused on load



# --- files -------------------------------------------------------------------------------

def convert_hint(path):
    return (f"only if the file comes from a source you trust, convert it once with "
            f"{script_command('checkpoint.py', 'convert-pickle', path, '--trust-this-file')} "
            f"(unpickling runs any code the file holds) and pass the state_dict it writes")


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path):
    """Load a checkpoint safely (`weights_only=True`: no code runs) and say what it is.

    Returns a dict with "kind": "sha-rnn" (a checkpoint of this project: model, config,
    vocab, ...) or "state_dict" (bare weights, e.g. written by the original code, under
    "model"). Raises InputError for a missing, truncated, corrupt, pickled-object or
    unrecognised file. A model folder (modelfolder.py) loads as a checkpoint of this
    project."""
    if os.path.isdir(path):
        obj = modelfolder.read(path)
        if obj["format"] != FORMAT:
            raise InputError(f"{path}/config.json describes a model of format {obj['format']!r}, "
                             f"not one of this project")
        check_fields(obj, path)
        return dict(obj, kind="sha-rnn", path=path)
    if not os.path.isfile(path):
        raise InputError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) files
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise InputError(f"{path} holds pickled Python objects ({found.group(1)}), like the "
                             f"original code's [model, criterion, optimizer] files; they are not "
                             f"loaded because unpickling can run code; {convert_hint(path)}") from None
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise InputError(f"checkpoint {path} is corrupt or not a torch checkpoint "
                         f"({detail[0] if detail else type(e).__name__})") from None
    except Exception as e:  # weights_only runs no code: whatever else fails is a bad file
        raise InputError(f"checkpoint {path} is truncated, corrupt or not a torch checkpoint: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        check_fields(obj, path)
        return dict(obj, kind="sha-rnn", path=path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if "encoder.weight" not in obj:
            raise InputError(f"{path} is a state_dict but not of a SHA-RNN (no encoder.weight)")
        return {"kind": "state_dict", "model": obj, "attn_layers": attn_layers_in(obj)}
    raise InputError(f"{path} is not a SHA-RNN checkpoint or state_dict")


# --- what a checkpoint of this project holds ---------------------------------------------

NUMBER = (int, float)
BEST = {"format": str, "version": int, "model": dict, "config": dict, "vocab": list,
        "metrics": dict, "args": dict}
LAST = {"optimizer": dict, "carry": (dict, type(None)), "rng": dict, "progress": dict}
OPTIONAL = {"corpus": (dict, type(None)), "scaler": dict}  # absent from older checkpoints
CONFIG = {"ntoken": int, "ninp": int, "nhid": int, "nlayers": int, "attn_layers": list,
          "heads": int, "mem_len": int, "cutoffs": (list, type(None))}


def field_types(types):
    """{name: type} as check_dict takes them: a float field takes an int too."""
    return {name: NUMBER if kind is float else kind for name, kind in types.items()}


PROGRESS = field_types(Progress.saved_fields(newer=False))  # training.Progress's fields
PROGRESS_OPTIONAL = field_types(Progress.saved_fields(newer=True))  # absent from older ones
RNG = {"numpy_key": torch.Tensor, "numpy_pos": int, "numpy_has_gauss": int,
       "numpy_gauss": NUMBER, "torch": torch.Tensor, "cuda": (torch.Tensor, type(None))}
METRICS = {key: NUMBER for key in ("valid_loss", "valid_bpc", "epoch", "steps", "tokens",
                                   "test_loss", "test_bpc", "best_valid_loss")}  # each optional
RNG_OPTIONAL = {"ranks": list}  # every rank's torch states, from a torchrun run


def check_dict(value, fields, name, path, optional=None):
    """InputError naming the first field of dict `value` that is missing, unknown, or not of
    its type in `fields` ({key: type}); `optional` fields may be absent."""
    optional = optional or {}
    for key, kind in fields.items():
        if key not in value:
            raise InputError(f"checkpoint {path}: {name}{key} is missing")
    for key, item in value.items():
        kind = fields.get(key, optional.get(key))
        if kind is None:
            raise InputError(f"checkpoint {path}: unknown field {name}{key}")
        if not isinstance(item, kind) or (kind is not bool and isinstance(item, bool)):
            raise InputError(f"checkpoint {path}: {name}{key} is a {type(item).__name__}, not "
                             f"the expected {getattr(kind, '__name__', kind)}")


def check_fields(ckpt, path):
    """InputError naming the first thing wrong with a checkpoint of this project: a field
    missing, unknown or of the wrong type, a config the model refuses, weights of the wrong
    shapes or not finite, a vocabulary that does not fit, and in a last checkpoint (which has
    the LAST fields too) its progress, random state, carried state and optimizer state."""
    last = any(key in ckpt for key in LAST)
    check_dict(ckpt, dict(BEST, **LAST) if last else BEST, "", path, OPTIONAL)
    if ckpt["version"] > VERSION:
        raise InputError(f"checkpoint {path}: version {ckpt['version']} was written by a newer "
                         f"sha-rnn than this one (which reads version {VERSION}); update it")
    if ckpt["version"] != VERSION:
        raise InputError(f"checkpoint {path}: version {ckpt['version']} is not {VERSION}, the "
                         f"one this code reads")
    check_dict(ckpt["config"], CONFIG, "config.", path)
    config = ckpt["config"]
    try:
        with torch.device("meta"):  # the model's own checks, without allocating it
            model = SHARNN(**config)
        model.check_weights(ckpt["model"])
    except (ValueError, TypeError) as e:
        raise InputError(f"checkpoint {path}: {first_line(e)}") from None
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in ckpt["model"].values()):
        raise InputError(f"checkpoint {path}: model holds entries that are not float tensors")
    if not all(bool(t.isfinite().all()) for t in ckpt["model"].values()):
        raise InputError(f"checkpoint {path}: the weights are not finite (nan or inf); use an "
                         f"earlier checkpoint")
    vocab = ckpt["vocab"]
    if len(vocab) != config["ntoken"] or not all(isinstance(w, str) for w in vocab):
        raise InputError(f"checkpoint {path}: vocab is not a list of {config['ntoken']} tokens")
    if len(set(vocab)) != len(vocab):
        twice = next(w for i, w in enumerate(vocab) if w in vocab[:i])
        raise InputError(f"checkpoint {path}: vocab holds {twice!r} twice")
    check_dict(ckpt["metrics"], {}, "metrics.", path, METRICS)
    for key, value in ckpt["metrics"].items():
        if value != value:
            raise InputError(f"checkpoint {path}: metrics.{key} is nan")
    check_recorded(ckpt["args"], path)
    if last:
        check_last(ckpt, model, path)


def check_last(ckpt, model, path):
    """The fields only a last checkpoint has (check_fields)."""
    check_dict(ckpt["progress"], PROGRESS, "progress.", path, PROGRESS_OPTIONAL)
    progress = ckpt["progress"]
    for key in ("epoch", "i", "batch", "tokens", "steps"):
        if progress[key] < 0:
            raise InputError(f"checkpoint {path}: progress.{key} is negative ({progress[key]})")
    if progress["epoch"] > progress["steps"]:
        raise InputError(f"checkpoint {path}: progress.epoch ({progress['epoch']}) is more than "
                         f"progress.steps ({progress['steps']}); each epoch takes an optimizer step")
    if progress["best_val"] != progress["best_val"]:
        raise InputError(f"checkpoint {path}: progress.best_val is nan")
    if not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in progress["val_history"]):
        raise InputError(f"checkpoint {path}: progress.val_history is not a list of numbers")
    name, trained = progress["optimizer_name"], ckpt["args"]["optimizer"]
    if name not in (trained, "asgd" if trained == "sgd" else trained):
        raise InputError(f"checkpoint {path}: progress.optimizer_name {name!r} is not the run's "
                         f"args.optimizer {trained!r}" + (" or asgd" if trained == "sgd" else ""))
    check_dict(ckpt["rng"], RNG, "rng.", path, RNG_OPTIONAL)
    if tuple(ckpt["rng"]["numpy_key"].shape) != (624,):
        raise InputError(f"checkpoint {path}: rng.numpy_key is not the 624 words of a numpy state")
    carry, E = ckpt["carry"], ckpt["config"]["ninp"]
    if carry is not None:
        check_dict(carry, {"hidden": list, "mems": list}, "carry.", path)
        n = ckpt["config"]["nlayers"]
        shapes = [x.shape for h in carry["hidden"] if h is not None for x in h]
        shapes += [m.shape for m in carry["mems"] if m is not None]
        if (len(carry["hidden"]) != n or len(carry["mems"]) != n
                or any(len(s) != 3 or s[-1] != E for s in shapes)
                or len({s[1] for s in shapes}) > 1):
            raise InputError(f"checkpoint {path}: carry does not hold the states of {n} blocks of "
                             f"width {E}")
    params = [tuple(p.shape) for p in model.parameters()]
    optimizer = ckpt["optimizer"]
    try:
        groups = [i for g in optimizer["param_groups"] for i in g["params"]]
        states = optimizer["state"].items()
        good = sorted(groups) == list(range(len(params))) and all(
            t.dim() == 0 or tuple(t.shape) == params[i]
            for i, state in states for t in state.values() if isinstance(t, torch.Tensor))
    except (KeyError, TypeError, AttributeError, IndexError):
        good = False
    if not good:
        raise InputError(f"checkpoint {path}: optimizer does not hold the state of this model's "
                         f"{len(params)} parameters")


def all_finite(module):
    """True when every parameter is finite (one host synchronisation)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


# --- flags from a checkpoint ------------------------------------------------------------

def load_start(args):
    """The checkpoint a run starts from (--continue or --resume), or None."""
    if args.continue_from:
        ckpt = load_checkpoint(args.continue_from)
        if ckpt.get("kind") != "sha-rnn" or "progress" not in ckpt:
            raise InputError(f"{args.continue_from} is not a last checkpoint (SAVE.last.pt or "
                             f"--last); use --resume to start a new run from weights")
        return ckpt
    if args.resume:
        return load_checkpoint(args.resume)
    return None


# --- where a run stands ------------------------------------------------------------------

def best_to_beat(start, args, save, fingerprint):
    """The validation loss a new run's first best checkpoint must beat: that of the
    checkpoint it resumes from when that is its own --save (the paper's second pass,
    `--resume X --save X`), so that a worse epoch never replaces X, provided X's validation
    was measured on the same valid split (`fingerprint`, the corpus's SHA-256 per split);
    else +inf, as in the original."""
    if (start is None or start["kind"] != "sha-rnn" or not args.resume
            or os.path.realpath(args.resume) != os.path.realpath(save)):
        return float("inf")
    recorded, corpus = start["metrics"].get("valid_loss"), start.get("corpus") or {}
    if recorded is None or corpus.get("valid") != fingerprint["valid"]:
        return float("inf")
    return float(recorded)


def carried_state(progress, d):
    """The carried LSTM states and memories of the whole batch (gathered across ranks)."""
    carry = progress.carry
    if carry.hidden is None:
        return None
    return {"hidden": [None if h is None else [gather_columns(x, d).cpu() for x in h]
                       for h in carry.hidden],
            "mems": [None if m is None else gather_columns(m, d).cpu() for m in carry.mems]}


def progress_from(start, args, d, device, rows):
    """A fresh Progress, or the one of the last checkpoint with this rank's carried state;
    `rows` is the length of the training stream it must lie in."""
    if not args.continue_from:
        return Progress(optimizer_name=args.optimizer)
    progress = Progress(**start["progress"])
    if progress.i > rows - 1:
        raise InputError(f"checkpoint {args.continue_from}: progress.i ({progress.i}) lies beyond "
                         f"the training stream ({rows} rows)")
    carry = start["carry"]
    columns = {x.shape[1] for h in (carry or {}).get("hidden", []) if h is not None for x in h}
    if columns - {args.batch_size}:
        raise InputError(f"checkpoint {args.continue_from}: carry holds {columns.pop()} columns, "
                         f"the run {args.batch_size}")
    if carry is not None:
        cols = d.share(args.batch_size)
        progress.carry = Carry(
            hidden=[None if h is None else tuple(x[:, cols].to(device) for x in h)
                    for h in carry["hidden"]],
            mems=[None if m is None else m[:, cols].to(device) for m in carry["mems"]])
    return progress


def rng_state(rng, d):
    """The numpy stream (sequence lengths, shared by the ranks) and each rank's torch state."""
    mt = rng.get_state(legacy=False)
    state = {"numpy_key": torch.from_numpy(mt["state"]["key"].astype(np.int64)),
             "numpy_pos": int(mt["state"]["pos"]), "numpy_has_gauss": int(mt["has_gauss"]),
             "numpy_gauss": float(mt["gauss"]), "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if d.world > 1:
        per_rank = [None] * d.world
        dist.all_gather_object(per_rank, {"torch": state["torch"], "cuda": state["cuda"]})
        state["ranks"] = per_rank
    return state


def restore_training(step, rng, start, d):
    """--continue: the optimizer and loss scaler of the last checkpoint `start`, and its
    random streams."""
    for name, restore in (("optimizer", lambda: step.optimizer.load_state_dict(start["optimizer"])),
                          ("scaler", lambda: start.get("scaler") and step.scaler.load_state_dict(
                              start["scaler"])),
                          ("rng", lambda: restore_rng(rng, start["rng"], d))):
        try:
            restore()
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise InputError(f"checkpoint {start['path']}: {name} cannot be restored "
                             f"({first_line(e)})") from None


def restore_rng(rng, state, d):
    rng.set_state({"bit_generator": "MT19937",
                   "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                             "pos": state["numpy_pos"]},
                   "has_gauss": state["numpy_has_gauss"], "gauss": state["numpy_gauss"]})
    own = state
    if "ranks" in state and d.world == len(state["ranks"]):
        own = state["ranks"][d.rank]
    torch.set_rng_state(own["torch"])
    if own["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])


# --- writing -----------------------------------------------------------------------------

def base_checkpoint(run, metrics):
    return {"format": FORMAT, "version": VERSION, "model": run.model.state_dict(), "config": run.config,
            "vocab": list(run.vocab), "metrics": metrics, "args": vars(run.args).copy(),
            "corpus": run.fingerprint}


def check_same_corpus(start, fingerprint, args):
    """--continue on a corpus whose content changed is an error unless --allow-changed-data."""
    saved = start.get("corpus")
    changed = [f"{split}.txt" for split in fingerprint if saved and saved.get(split) != fingerprint[split]]
    if changed and not args.allow_changed_data:
        raise InputError(f"{', '.join(changed)} of {args.data} changed since the run started; "
                         f"continuing would train on other data at the old position (pass "
                         f"--allow-changed-data to do it anyway)")


class WriteFailed(InputError):
    """A checkpoint could not be written (a full disk, a vanished folder): one line, exit 2."""


def write_collectively(run, make, path):
    """Rank 0 writes make() to `path` atomically while the other ranks wait; every rank
    learns the outcome alike (so none waits forever or goes another way): WriteFailed when
    the write failed, False when nothing was written because the weights are not finite."""
    error = None
    skipped = False
    if run.d.main:
        skipped = not all_finite(run.model)
        if not skipped:
            try:
                utils.atomic_save(make(), path)
            except OSError as e:
                error = f"cannot write {path}: {e.strerror or e}; the files written before are intact"
    failed, skipped = agree(run.d, run.device, float(error is not None), float(skipped))
    if failed:
        raise WriteFailed(error or "rank 0 could not write a checkpoint")
    return not skipped


def save_best(run, progress, val_loss):
    """The best-validation checkpoint; True when written."""
    written = write_collectively(run, lambda: base_checkpoint(
        run, {"valid_loss": val_loss, "valid_bpc": val_loss / LOG2, "epoch": progress.epoch + 1,
              "steps": progress.steps, "tokens": progress.tokens}),
        run.paths["save"])
    run.log("Saving model (new best validation)" if written else
            "Not saving: the weights are not finite")
    return written


def record_test(run, best, test_loss):
    """Add the test result to the metrics of the best checkpoint, `best` as load_checkpoint
    read it for the test."""
    def make():
        ckpt = {k: v for k, v in best.items() if k not in ("kind", "path")}  # the file's fields
        ckpt["metrics"] = dict(best["metrics"], test_loss=test_loss, test_bpc=test_loss / LOG2)
        return ckpt

    write_collectively(run, make, run.paths["save"])


def save_last(run, progress):
    """Everything needed to continue exactly: written at save intervals, epoch ends and exits."""
    carry = carried_state(progress, run.d)
    rng = rng_state(run.rng, run.d)

    def make():
        ckpt = base_checkpoint(run, {"best_valid_loss": progress.best_val})
        ckpt.update(optimizer=run.step.optimizer.state_dict(), scaler=run.step.scaler.state_dict(),
                    carry=carry, rng=rng, progress=progress.saved())
        return ckpt

    if not write_collectively(run, make, run.paths["last"]):
        run.log("Not saving the last checkpoint: the weights are not finite")


# --- command line: converting a pickled model file --------------------------------------

def convert_pickle(path, out):
    """Unpickle `path` (runs its code: only for trusted files), take the model (the first item
    of the original's [model, criterion, optimizer] list) and write its state_dict to `out`."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder; give the pickled model file")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist")
    check_checkpoint_name("--out", out)
    claim([Output("--out", out)], [("the pickled file", path)], overwrite=None)  # no --overwrite
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise InputError(f"{path} needs the original code's classes: run this where that code is "
                         f"importable (e.g. PYTHONPATH=path/to/original) ({first_line(e)})") from None
    except Exception as e:  # a truncated or corrupt file, whatever the unpickler raises
        raise InputError(f"cannot unpickle {path}: {type(e).__name__}: {first_line(e)}") from None
    model = obj[0] if isinstance(obj, (list, tuple)) and obj else obj
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{path} holds no model (found {type(model).__name__})")
    utils.atomic_save(model.state_dict(), out)
    say(f"wrote the state_dict of {path} to {out}; pass it to --resume")


def main(argv=None):
    parser = Parser(prog="checkpoint.py", description="Checkpoint tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser(
        "convert-pickle", help="turn a pickled model file into a state_dict (trusted files only)",
        description="Load a pickled [model, criterion, optimizer] file of the original code and "
                    "write the model's state_dict, which main.py --resume loads safely. Loading a "
                    "pickle runs any code the file holds: use this only on files from a source "
                    "you trust, and say so with --trust-this-file.")
    conv.add_argument("path", metavar="FILE")
    conv.add_argument("--out", default=None, help="output path (default: FILE.state_dict.pt)")
    conv.add_argument("--trust-this-file", action="store_true",
                      help="confirm that FILE comes from a trusted source (required)")
    args = parser.parse_args(argv)
    return run_script(convert_trusted, args)


def convert_trusted(args):
    """convert-pickle, only with --trust-this-file."""
    if not args.trust_this_file:
        raise InputError("refusing to unpickle without --trust-this-file: loading a pickle "
                         "runs any code the file holds")
    convert_pickle(args.path, args.out or args.path + ".state_dict.pt")


if __name__ == "__main__":
    sys.exit(main())
