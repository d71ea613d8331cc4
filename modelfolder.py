"""Model folders: a checkpoint's weights as `model.safetensors` (tensors only, no pickle)
and its description as `config.json`, the layout model hubs use.

    python export.py --checkpoint ENWIK8.pt --format safetensors --output ENWIK8-model/

config.json holds {"format": "sha-rnn", "format_version": 1, "config": the model's
arguments, "vocab": id -> token, "args": the flags the run was trained with (less the
paths of its own files, PRIVATE), "tied": {"decoder.weight": "encoder.weight"} when the
decoder is tied to the embedding (else {}), "summary": {"corpus": SHA-256 of each split,
"epoch", "steps", "valid_bpc", "test_bpc"}}. The tied decoder weight is stored once (as
encoder.weight). Every script that takes a checkpoint takes such a folder too
(checkpoint.load_checkpoint), and reading one never unpickles.
"""

import json
import os

from flags import InputError
from utils import atomic_write

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FIELDS = ("format", "format_version", "config", "vocab", "args", "summary")  # of config.json
OPTIONAL = ("tied",)  # absent from the folders of older versions
FORMAT_VERSION = 1
# Flags naming the files of the run on its own machine: left out of a folder meant to be
# published (they would tell the user's paths and mean nothing elsewhere). --data stays:
# --resume and --eval-only of the folder read the corpus it names.
PRIVATE = ("save", "last", "run_dir", "tensorboard", "resume", "continue_from")
TIED = {"decoder.weight": "encoder.weight"}


def files(folder):
    return os.path.join(folder, WEIGHTS), os.path.join(folder, CONFIG)


def summary(ckpt):
    """What config.json says of how the weights were trained."""
    metrics = ckpt["metrics"]
    return {"corpus": ckpt.get("corpus"), "epoch": metrics.get("epoch"),
            "steps": metrics.get("steps"), "valid_bpc": metrics.get("valid_bpc"),
            "test_bpc": metrics.get("test_bpc")}


def write(ckpt, folder):
    """Write checkpoint `ckpt` (a dict of this project's format) as a model folder."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt["model"].items()}
    tied = ckpt["config"]["cutoffs"] is None
    if tied:
        tensors.pop("decoder.weight")  # the same tensor as encoder.weight
    args = {k: v for k, v in ckpt["args"].items() if k not in PRIVATE}
    description = {"format": ckpt["format"], "format_version": FORMAT_VERSION,
                   "config": ckpt["config"], "vocab": ckpt["vocab"], "args": args,
                   "tied": TIED if tied else {}, "summary": summary(ckpt)}
    weights, config = files(folder)
    os.makedirs(folder, exist_ok=True)
    atomic_write(weights, lambda f: f.write(save(tensors, metadata={"format": ckpt["format"]})))
    text = json.dumps(description, indent=2, sort_keys=True) + "\n"
    atomic_write(config, lambda f: f.write(text.encode()))


def read(folder):
    """The checkpoint dict of a model folder (format, version, model, config, vocab, metrics,
    args, corpus), for checkpoint.load_checkpoint to check; InputError naming what is
    missing or unreadable."""
    weights, config = files(folder)
    for path in (config, weights):
        if not os.path.isfile(path):
            raise InputError(f"{folder} is a folder without {os.path.basename(path)}; a model "
                             f"folder holds {WEIGHTS} and {CONFIG} (export.py --format safetensors)")
    try:
        with open(config, encoding="utf-8") as f:
            description = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{config} is not JSON ({e})") from None
    if not isinstance(description, dict) or "format" not in description:
        raise InputError(f"{config} does not describe a model of this project (no \"format\")")
    missing = [k for k in FIELDS if k not in description]
    if missing:
        raise InputError(f"{config}: {missing[0]} is missing")
    unknown = [k for k in description if k not in FIELDS + OPTIONAL]
    if unknown:
        raise InputError(f"{config}: unknown field {unknown[0]}")
    if description["format_version"] != FORMAT_VERSION:
        raise InputError(f"{config}: format_version {description['format_version']} is not "
                         f"{FORMAT_VERSION}, the one this code reads")
    tensors = load_tensors(weights)
    if "encoder.weight" in tensors and "decoder.weight" not in tensors and \
            isinstance(description["config"], dict) and description["config"].get("cutoffs") is None:
        tensors["decoder.weight"] = tensors["encoder.weight"]  # tied
    info = description["summary"] if isinstance(description["summary"], dict) else {}
    metrics = {k: v for k, v in info.items() if k != "corpus" and v is not None}
    return {"format": description["format"], "version": 1, "model": tensors,
            "config": description["config"], "vocab": description["vocab"],
            "metrics": metrics, "args": description["args"], "corpus": info.get("corpus")}


def load_tensors(path):
    """The tensors of a safetensors file (its header and raw data: no code runs)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise InputError("model folders need the safetensors package: pip install safetensors") from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # the library's own error types: a damaged or foreign file
        raise InputError(f"{path} is not a readable safetensors file "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0][:100]})") from None
