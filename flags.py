"""Command-line flags of main.py (shared with bench.py and generate.py), their checks, and the
error type for bad input. No torch here, so that light scripts (plot.py) can use it too.

The paper's enwik8 first pass is the default of every flag: `PAPER` below is the one place
where those numbers live. docs/model.md describes what they control.

How a flag gets its value, highest first (each value with its source, shown on the run's
Settings line); `assign` is the one function that sets a value other than the one typed or
the default:
  1. given: typed on the command line (a --dry-run's log interval alone overrides it);
  2. budget: what --budget measured and chose (budget.choose: --max-steps, --cooldown,
     --epochs, and a recipe's --eval-interval and regularisation), set once the model is
     built and its step timed; a re-plan while training then moves --max-steps, --cooldown
     and --epochs, given or not (the deadline wins);
  3. recipe: --recipe's flags, with its budget tier (BUDGET_RULES "size") under --budget;
     never the model's size when a checkpoint gives it, and nothing on --continue;
  4. checkpoint: the start checkpoint's (flags_from): every flag on --continue; the model,
     RUN_SETTINGS and (unless one of them is given) SCHEDULE on --resume and --eval-only;
  5. default: the paper's (PAPER) or the flag's own.
resolve_flags applies 1, 3, 4 and 5 before anything is loaded; main.py applies 2.
"""

import argparse
import math
import os
import re
import sys

# The paper's enwik8 first pass, every hyper-parameter in one place.
PAPER = dict(
    data="data/enwik8/", save="ENWIK8.pt",
    emsize=1024, nhid=4096, nlayers=4, heads=1, mem_len=5000,  # attention in block nlayers-2
    dropout=0.1, dropouth=0.1, dropouti=0.1, dropoute=0.0, wdrop=0.0,
    optimizer="lamb", lr=2e-3, warmup=800, wdecay=1.2e-6, clip=0.25,
    epochs=32, batch_size=16, bptt=1024, accumulate=1, seed=5512, log_interval=10,
)
# Named flag sets (--recipe): each changes these defaults; flags given still win.
RECIPES = {
    "paper": ("the paper's enwik8 first pass: the defaults above", {}),
    "paper-all-heads": ("the paper's model with attention in every block, at batch 8 for a "
                        "12 GB GPU", dict(attn_layers="all", batch_size=8)),
    "cpu-small": ("0.87M parameters for a CPU: 2 blocks of 192, bptt 64, no dropout, LAMB "
                  "4e-3, 1,400 steps with a cooldown over the last 700, one thread",
                  dict(emsize=192, nhid=384, nlayers=2, mem_len=256, bptt=64, batch_size=16,
                       dropout=0.0, dropouth=0.0, dropouti=0.0, lr=4e-3, warmup=100, epochs=4,
                       max_steps=1400, cooldown=700, log_interval=50, threads=1)),
}
# What a --budget changes in a recipe (docs/small-models.md measures cpu-small's rule):
# "size": the model by budget, [(up to SECONDS, flags), ...]; "regularise": by the epochs
# the budget's steps cover (known once the step is measured), [(up to EPOCHS, flags), ...];
# "cooldown": the share of the steps the cooldown takes; "eval_points": (points, share) sets
# --eval-interval to give about that many validations, within that share of the budget.
CHEAP_DROPOUT = dict(dropout=0.1, dropouti=0.1, dropoute=0.1, wdrop=0.2, wdecay=0.1)
MORE_DROPOUT = dict(dropout=0.2, dropouti=0.2, dropoute=0.1, wdrop=0.3, wdecay=0.1)
BUDGET_RULES = {
    "paper": dict(cooldown=0.2),
    "paper-all-heads": dict(cooldown=0.2),
    "cpu-small": dict(size=[(200, {}), (math.inf, dict(emsize=256, nhid=512))],
                      regularise=[(5, {}), (12, CHEAP_DROPOUT), (math.inf, MORE_DROPOUT)],
                      cooldown=0.5, eval_points=(10, 0.1)),
}
MIN_TRUST = 0.25         # LAMB's trust-ratio floor in the paper's runs
EVAL_BATCH_SIZE = 100    # validation uses min(this, --batch_size) columns
TEST_BATCH_SIZE = 8      # the test split is always scored with 8 columns
OPTIMIZERS = ("lamb", "sgd", "adam", "adamw", "adagrad")
DRY_RUN = dict(epochs=1, train_batches=3, eval_batches=2, log_interval=1)  # what --dry-run runs


# Model flags and the config keys they set (the checkpoint's config).
MODEL_FLAGS = {"emsize": "ninp", "nhid": "nhid", "nlayers": "nlayers", "heads": "heads",
               "mem_len": "mem_len", "attn_layers": "attn_layers", "cutoffs": "cutoffs"}
NOT_CARRIED = ("continue_from", "resume", "dry_run", "allow_changed_data", "overwrite")  # flags --continue never takes over


# --- the model's configuration: checked here, before anything is built, and by SHARNN ---

def check_config(ntoken, ninp, nhid, nlayers, attn_layers, heads, mem_len, dropouts, names=None):
    """Raise ValueError on an impossible model configuration. `names` gives the word each
    message uses for an argument (main.py's flag names; default: the argument's own);
    `ntoken` None leaves the vocabulary unchecked (flags are checked before it is known)."""
    def name(key):
        return (names or {}).get(key, key)

    sizes = dict(ninp=ninp, nhid=nhid, nlayers=nlayers, heads=heads)
    if ntoken is not None:
        sizes = dict(ntoken=ntoken, **sizes)
    for key, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name(key)} must be a positive integer, got {value!r}")
    if mem_len < 0:
        raise ValueError(f"{name('mem_len')} must be >= 0, got {mem_len}")
    if nhid % ninp:
        raise ValueError(f"{name('nhid')} {nhid} must be a multiple of {name('ninp')} {ninp}: "
                         f"the Boom layer sums chunks of that width")
    if ninp % heads:
        raise ValueError(f"{name('ninp')} {ninp} must be divisible by {name('heads')} {heads}")
    bad = [i for i in attn_layers if not 0 <= i < nlayers]
    if bad:
        raise ValueError(f"attention block {bad[0]} ({name('attn_layers')}) is out of range for "
                         f"{name('nlayers')} {nlayers} (0 to {nlayers - 1})")
    for key, p in dropouts.items():
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name(key)} must be in [0, 1), got {p}")


def attention_blocks(attn_layers, nlayers):
    """The sorted block indices with attention: "all", "none", a list of indices, or None
    for the paper's single attention in block nlayers - 2."""
    if attn_layers == "all":
        return list(range(nlayers))
    if attn_layers == "none":
        return []
    return sorted({nlayers - 2} if attn_layers is None else set(attn_layers))


def launched_rank():
    """This process's torchrun rank, from its environment (0 when not under torchrun): read
    before the process group exists, so that only rank 0 reports bad input."""
    return int(os.environ.get("RANK", "0"))


class InputError(ValueError):
    """Bad user input (flags, files, checkpoints): reported as one line, exit code 2."""


def run_script(body, *args, errors=InputError):
    """A script's main(): runs body(*args) and returns the exit code, 0; an error of
    `errors` (an InputError unless told) is one line on stderr, "error: ...", and 2."""
    try:
        body(*args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of the usage dump; under torchrun
    only rank 0 prints it, so the line appears once. A flag must be spelled in full: an
    abbreviation (--epoch for --epochs) is an error, not a guess."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if launched_rank() == 0 else None)


def attn_layers_flag(text):
    """--attn-layers: 'all', 'none' or a comma list of block indices."""
    if text in ("all", "none"):
        return text
    try:
        return sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, none or a comma list of block "
                                         f"indices, got {text!r}") from None


LONGEST_BUDGET = ("8760h", 8760 * 3600)  # a year: any longer is a typo


def budget_seconds(text):
    """Seconds of a duration such as 90s, 5min, 2h or 1.5h; None when it is not one."""
    found = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(s|min|h)", text.strip())
    return float(found.group(1)) * {"s": 1, "min": 60, "h": 3600}[found.group(2)] if found else None


def budget_flag(text):
    """--budget: a positive duration (kept as written)."""
    seconds = budget_seconds(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90s, 5min or 2h, got {text!r}")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the budget must be positive, got {text!r}")
    if seconds > LONGEST_BUDGET[1]:
        raise argparse.ArgumentTypeError(f"the budget must be at most {LONGEST_BUDGET[0]} (a "
                                         f"year), got {text if len(text) < 40 else text[:37] + '...'}")
    return text.strip()


def by_limit(tiers, value):
    """The flags of the first (limit, flags) tier whose limit is at least `value`."""
    return next((flags for limit, flags in tiers if value <= limit), {})


def budget_recipe(name, budget):
    """The model flags --budget sets in recipe `name` (BUDGET_RULES "size") for a budget."""
    return by_limit(BUDGET_RULES[name].get("size", []), budget_seconds(budget))


def interval_flag(text):
    """--save-interval: N optimizer steps, or N followed by 'min' for minutes."""
    try:
        if text.endswith("min"):
            value, unit = float(text[:-3]), "min"
        else:
            value, unit = int(text), "steps"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N (steps) or Nmin (minutes), got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the interval must be positive, got {text!r}")
    return value, unit


def add_model_flags(g):
    """The architecture flags (main.py and bench.py)."""
    g.add_argument("--emsize", type=int, default=PAPER["emsize"], help="embedding and LSTM size (ninp)")
    g.add_argument("--nhid", type=int, default=PAPER["nhid"],
                   help="Boom feed-forward width, a multiple of --emsize")
    g.add_argument("--nlayers", type=int, default=PAPER["nlayers"], help="number of blocks")
    g.add_argument("--attn-layers", type=attn_layers_flag, default=None,
                   help="blocks with attention: all, none, or a comma list of indices; "
                        "None means block nlayers-2, the paper's single attention")
    g.add_argument("--heads", type=int, default=PAPER["heads"],
                   help="split the attention into this many heads")
    g.add_argument("--mem-len", type=int, default=PAPER["mem_len"],
                   help="total attention window (memory + current positions); 0 carries no memory")


def threads_flag(text):
    """--threads: a positive number of CPU threads."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_threads_flag(g):
    """--threads (main.py, generate.py, bench.py)."""
    g.add_argument("--threads", type=threads_flag, default=None,
                   help="CPU threads for torch; None keeps torch's choice (one per core). "
                        "Lower it when other processes share the CPU: each busy core torch "
                        "counts on but cannot get can slow every step many times over")


def add_tf32_flag(g):
    """--no-tf32 (main.py, bench.py, generate.py)."""
    g.add_argument("--no-tf32", action="store_true",
                   help="on CUDA, compute float32 matrix products and cuDNN's LSTMs in full "
                        "float32 instead of TF32 (float32's range with a 10-bit mantissa, "
                        "several times faster on Ampere and later GPUs; on by default); no "
                        "effect on the CPU")


def add_device_flags(g):
    """Where and how the step runs (main.py and bench.py)."""
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks CUDA when present")
    add_threads_flag(g)
    add_tf32_flag(g)
    g.add_argument("--amp", choices=("auto", "fp16", "bf16", "none"), default="auto",
                   help="mixed precision: fp16 with dynamic loss scaling (like the original's "
                        "apex O1), bf16, or none (float32); auto is fp16 on CUDA and none on "
                        "the CPU. The LSTMs run in float32 under fp16 on the CPU (no CPU "
                        "kernel) and under bf16 on CUDA (whose autocast would run them in "
                        "float16)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the attention and feed-forward parts (LSTMs stay eager)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute attention and feed-forward activations in backward to save memory")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help; the recipe list as written."""


def build_parser():
    """main.py's flags; every default is the paper's (PAPER)."""
    recipes = "\n".join(f"  {name:16} {what}" for name, (what, _) in RECIPES.items())
    p = Parser(prog="main.py",
               description="Train and evaluate the SHA-RNN (Merity 2019) language model. "
                           "Defaults reproduce the paper's enwik8 first pass.",
               epilog=f"recipes (--recipe NAME):\n{recipes}", formatter_class=HelpFormatter)
    a = p.add_argument
    a("--recipe", choices=list(RECIPES), default="paper", metavar="NAME",
      help=f"a named set of flags ({', '.join(RECIPES)}; listed below); flags given "
           f"override it")
    a("--data", default=PAPER["data"], help="corpus folder with train.txt, valid.txt, test.txt")
    a("--unk", action="store_true", help="map valid/test tokens unseen in train to <unk> "
      "instead of stopping with an error")
    g = p.add_argument_group("model (stored in the checkpoint; a value that contradicts a "
                             "resumed checkpoint is an error)")
    add_model_flags(g)
    g.add_argument("--adaptive-softmax", action="store_true",
                   help="adaptive softmax output for large word vocabularies (untied)")
    g.add_argument("--cutoffs", type=int, nargs="+", default=None,
                   help="adaptive softmax cluster boundaries; None picks them by vocabulary size")
    g = p.add_argument_group("regularisation")
    g.add_argument("--dropout", type=float, default=PAPER["dropout"], help="dropout on the final output")
    g.add_argument("--dropouth", type=float, default=PAPER["dropouth"],
                   help="dropout inside blocks (LSTM output, attention, feed-forward)")
    g.add_argument("--dropouti", type=float, default=PAPER["dropouti"],
                   help="dropout on the embedding output")
    g.add_argument("--dropoute", type=float, default=PAPER["dropoute"],
                   help="embedding dropout: drop whole token rows (AWD-LSTM); off in the paper")
    g.add_argument("--wdrop", type=float, default=PAPER["wdrop"],
                   help="DropConnect on each LSTM's hidden-to-hidden weights (AWD-LSTM); off in the paper")
    g.add_argument("--wdecay", type=float, default=PAPER["wdecay"], help="weight decay on all parameters")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=PAPER["optimizer"],
                   help=f"lamb (min trust {MIN_TRUST}), sgd (switches to averaged SGD after --nonmono "
                        "epochs without improvement), adam, adamw, adagrad")
    g.add_argument("--lr", type=float, default=PAPER["lr"], help="peak learning rate")
    g.add_argument("--warmup", type=int, default=PAPER["warmup"],
                   help="linear warmup over this many batches (counted over the whole run)")
    g.add_argument("--cooldown", type=int, default=None,
                   help="decay the learning rate linearly to 0 over the last N optimizer steps, "
                        "reaching 0 at the run's last step (--max-steps, or the end of --epochs "
                        "counted in real batches); None: no cooldown")
    g.add_argument("--when", type=int, nargs="+", default=[],
                   help="epochs after which the learning rate is divided by 10")
    g.add_argument("--nonmono", type=int, default=5,
                   help="sgd: non-improving epochs before switching to averaged SGD")
    g.add_argument("--clip", type=float, default=PAPER["clip"], help="gradient norm clipping (0: off)")
    g.add_argument("--epochs", type=int, default=PAPER["epochs"], help="number of epochs")
    g.add_argument("--max-steps", type=int, default=None,
                   help="end training after this many optimizer steps (validating then, as at "
                        "an epoch end), and end --cooldown there; None: run --epochs in full")
    g.add_argument("--budget", type=budget_flag, default=None, metavar="TIME",
                   help="end the whole run (validations and test included) within TIME from "
                        "the process's start (e.g. 5min, 2h, 24h; at most 8760h): the steps "
                        "are planned from the step measured at the start and cut when the "
                        "machine slows down; sets --max-steps, --epochs and --cooldown (the "
                        "recipe's share of the steps) unless given, and with a recipe its "
                        "rules (flags.BUDGET_RULES): cpu-small's width (--emsize, --nhid), "
                        "regularisation (--dropout, --dropouti, --dropoute, --wdrop, "
                        "--wdecay) and --eval-interval; a given --epochs caps the steps")
    g.add_argument("--batch_size", "--batch-size", type=int, default=PAPER["batch_size"], metavar="N",
                   help="training batch size (global, split across torchrun ranks)")
    g.add_argument("--bptt", type=int, default=PAPER["bptt"], help="sequence length")
    g.add_argument("--accumulate", type=int, default=PAPER["accumulate"],
                   help="sum the losses of N consecutive batches (gradients flow through the "
                        "state carried between them) and step once, as the original: the "
                        "optimizer steps after batches 0, N, 2N, ... of each epoch")
    g.add_argument("--seed", type=int, default=PAPER["seed"], help="random seed")
    g = p.add_argument_group("run")
    add_device_flags(g)
    g.add_argument("--save", default=PAPER["save"], help="best-validation checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing --save or --last that is not this run's own (the "
                        "file it continues, or resumes from as its --save); without it such a "
                        "file is refused")
    g.add_argument("--last", default=None,
                   help="checkpoint to continue from after a stop; None: SAVE with .last.pt")
    g.add_argument("--save-interval", type=interval_flag, default="30min",
                   help="also write the last checkpoint every N optimizer steps, or every N "
                        "minutes as Nmin (under torchrun checked at log intervals only)")
    g.add_argument("--resume", default="",
                   help="start from these weights (this project's checkpoint or an original "
                        "state_dict) with a fresh optimizer and warmup: the paper's second pass")
    g.add_argument("--continue", dest="continue_from", default="", metavar="PATH",
                   help="continue an interrupted run exactly from its last checkpoint")
    g.add_argument("--allow-changed-data", action="store_true",
                   help="--continue even though a split's content differs from the one the run "
                        "started on (otherwise an error); given anew at each continue")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --resume on valid and test; train nothing, write nothing")
    g.add_argument("--dynamic-eval", action="store_true",
                   help="also report dynamic evaluation (Krause et al. 2018) on test "
                        "(and valid with --eval-only)")
    g.add_argument("--dyn-lr", type=float, default=5e-5, help="dynamic evaluation learning rate (eta)")
    g.add_argument("--dyn-decay", type=float, default=2e-3,
                   help="dynamic evaluation decay toward the trained weights (lambda)")
    g.add_argument("--dyn-eps", type=float, default=2e-5, help="dynamic evaluation epsilon")
    g.add_argument("--dyn-stat-batches", type=int, default=100,
                   help="training batches for dynamic evaluation's gradient statistics")
    g.add_argument("--log-interval", type=int, default=PAPER["log_interval"], metavar="N",
                   help="log every N batches")
    g.add_argument("--eval-interval", type=int, default=None, metavar="N",
                   help="also validate every N optimizer steps, each a point of the learning "
                        "curve and a chance for the best checkpoint (the training is the same); "
                        "None: at epoch ends only, as the original; with --budget and --recipe "
                        "cpu-small the budget sets it, unless given, to about 10 points within "
                        "10%% of its time")
    g.add_argument("--max-nonfinite", type=int, default=100,
                   help="stop after this many consecutive non-finite losses")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write the training, validation and test scalars as TensorBoard "
                        "events into DIR, by optimizer step (needs: pip install tensorboard); "
                        "view them with tensorboard --logdir DIR")
    g.add_argument("--run-dir", default=None,
                   help="folder for args.json, env.json, log.txt, metrics.jsonl; None: SAVE with .run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    g.add_argument("--dry-run", action="store_true",
                   help=f"smoke test: {DRY_RUN['train_batches']} training batches (each "
                        f"logged) and {DRY_RUN['eval_batches']} evaluation batches per split, "
                        f"checkpoints in a temporary folder")
    return p


def eval_batch_size(args):
    """Validation columns: min(EVAL_BATCH_SIZE, --batch_size)."""
    return min(EVAL_BATCH_SIZE, args.batch_size)


def parse_args(argv=None):
    """The flags of `argv`; flags not given take their defaults."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    for flag, value in zip(argv, [*argv[1:], None]):
        if flag == "--budget" and (value is None or value.startswith("-")):  # argparse: an option
            parser.error("argument --budget: expected a positive duration such as 90s, 5min or "
                         "2h" + (f", got {value!r}" if value else ""))
    return parser.parse_args(argv)


SEED_RANGE = (0, 2**32 - 1)  # numpy's RandomState takes 32-bit seeds


def check_seed(seed):
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise InputError(f"--seed must be between {low} and 2**32 - 1, got {seed}")


def check_model_flags(args):
    """The model's own checks (check_config) on the model the flags describe, as an
    InputError in the flags' names."""
    names = {key: "--" + flag.replace("_", "-") for flag, key in MODEL_FLAGS.items()}
    dropouts = {flag: getattr(args, flag, 0.0)
                for flag in ("dropout", "dropouth", "dropouti", "dropoute", "wdrop")}
    names.update({flag: "--" + flag for flag in dropouts})
    try:
        check_config(None, args.emsize, args.nhid, args.nlayers,
                     attention_blocks(args.attn_layers, args.nlayers), args.heads, args.mem_len,
                     dropouts, names)
    except ValueError as error:
        raise InputError(str(error)) from None


def check_checkpoint_name(flag, path):
    """A torch checkpoint may not be named NAME.safetensors: torch.load reads a file of that
    name as safetensors, so the checkpoint could not be loaded again."""
    if path and path.lower().endswith(".safetensors"):
        raise InputError(f"{flag} {path}: a checkpoint is a torch file, and torch.load reads a "
                         f"file named .safetensors as safetensors, so it could not be loaded "
                         f"again; give a .pt name (python export.py --format safetensors then "
                         f"writes the weights as safetensors, in a model folder)")


def check_args(args):
    """Impossible flag values and combinations, as InputError (before anything is loaded;
    the model flags are checked once a recipe and a checkpoint have set them:
    check_model_flags)."""
    if args.bptt < 5:
        raise InputError(f"--bptt must be at least 5 (the shortest sampled sequence), got {args.bptt}")
    minimum = {"--batch_size": 1, "--accumulate": 1, "--log-interval": 1, "--max-nonfinite": 1,
               "--warmup": 1, "--dyn-stat-batches": 1, "--epochs": 0, "--nonmono": 0,
               "--cooldown": 0, "--max-steps": 1, "--eval-interval": 1}
    for flag, least in minimum.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < least:
            raise InputError(f"{flag} must be at least {least}, got {value}")
    positive = ("--lr", "--dyn-lr", "--dyn-eps")
    not_negative = ("--wdecay", "--clip", "--dyn-decay")
    for flag in positive + not_negative:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not math.isfinite(value) or value < 0 or (value == 0 and flag in positive):
            kind = "a positive finite number" if flag in positive else "a finite number >= 0"
            raise InputError(f"{flag} must be {kind}, got {value}")
    check_seed(args.seed)
    if any(epoch < 1 for epoch in args.when):
        raise InputError(f"--when takes epochs counted from 1, got {min(args.when)}")
    for flag in ("--save", "--last", "--run-dir", "--tensorboard"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not value.strip():
            raise InputError(f"{flag} is empty; give a file path")
    for flag in ("--save", "--last"):
        check_checkpoint_name(flag, getattr(args, flag[2:]))
    if args.eval_only and not args.resume:
        raise InputError("--eval-only needs --resume CHECKPOINT")
    if args.resume and args.continue_from:
        raise InputError("--resume (new run from weights) and --continue (same run) exclude each other")
    if args.cutoffs and not args.adaptive_softmax:
        raise InputError("--cutoffs needs --adaptive-softmax")


# --- flags from the checkpoint a run starts from -----------------------------------------

# What a run was trained with besides its model: --resume and --eval-only take these from
# the checkpoint when they are not given (the model flags always come from it).
RUN_SETTINGS = ("recipe", "data", "unk", "bptt", "batch_size", "dropout", "dropouth",
                "dropouti", "dropoute", "wdrop", "wdecay", "optimizer", "lr", "warmup", "clip",
                "when", "nonmono", "accumulate", "seed", "threads", "amp", "compile",
                "checkpoint_activations", "log_interval", "max_nonfinite", "save_interval",
                "dyn_lr", "dyn_decay", "dyn_eps", "dyn_stat_batches")
# How long it trains: taken from the checkpoint only together, when none of them is given.
SCHEDULE = ("epochs", "max_steps", "cooldown", "budget", "eval_interval")
# What a command says about itself rather than about the run: its files, what it does, the
# machine and the display. --resume and --eval-only never take these from the checkpoint.
OWN = ("save", "last", "run_dir", "tensorboard", "resume", "continue_from", "eval_only",
       "dry_run", "overwrite", "allow_changed_data", "dynamic_eval", "device", "no_tf32",
       "no_progress")
# The start-up's Settings line: the model, then the run; a flag that is off is left out.
SHOWN = ("recipe", "emsize", "nhid", "nlayers", "attn_layers", "heads", "mem_len",
         "adaptive_softmax", "data", "bptt", "batch_size", "lr", "warmup", "dropout", "dropouth",
         "dropouti", "dropoute", "wdrop", "epochs", "max_steps", "cooldown", "budget", "seed",
         "threads")


def flags_from(start, args, given=()):
    """The flag values a start checkpoint supplies for flags not given on the command line
    (`given`, their destinations): all of them for --continue (the same run goes on); for
    --resume and --eval-only the model (its config), the RUN_SETTINGS it recorded, and its
    SCHEDULE unless one of those flags is given."""
    if start is None:
        return {}
    if start["kind"] == "sha-rnn":
        missing = [k for k in RUN_SETTINGS if k not in start["args"]]
        if missing:
            raise InputError(f"checkpoint {start['path']}: args.{missing[0]} is missing (a run "
                             f"takes its settings from the checkpoint's args)")
    if args.continue_from:
        saved = {k: v for k, v in start["args"].items() if k not in NOT_CARRIED}
        saved["save_interval"] = tuple(saved["save_interval"])
        return saved
    if start["kind"] == "state_dict":
        return {"attn_layers": start["attn_layers"]}
    config = start["config"]
    saved = {flag: config[key] for flag, key in MODEL_FLAGS.items()}
    saved["adaptive_softmax"] = config["cutoffs"] is not None
    recorded = start.get("args", {})
    carried = RUN_SETTINGS + (SCHEDULE if not set(SCHEDULE) & set(given) else ())
    saved.update({k: recorded[k] for k in carried if k in recorded})
    if "save_interval" in saved:
        saved["save_interval"] = tuple(saved["save_interval"])
    return saved


def check_recorded(recorded, path):
    """InputError naming the first field of a checkpoint's args (the flags its run was
    trained with, `recorded`) that no command line gives: an unknown flag, a value of the
    wrong type, or one check_args refuses."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    for key, value in recorded.items():
        if key not in actions:
            raise InputError(f"checkpoint {path}: unknown field args.{key}")
        problem = value_problem(actions[key], value)
        if problem is not None:
            raise InputError(f"checkpoint {path}: args.{key} is {value!r}, not a value "
                             f"{actions[key].option_strings[0]} takes" +
                             (f" ({problem})" if problem else ""))
    defaults = vars(parser.parse_args([]))
    try:
        check_args(argparse.Namespace(**dict(defaults, **recorded)))
    except InputError as e:  # named by the field refused alone, where one is
        alone = next((k for k in recorded if refused(dict(defaults, **{k: recorded[k]}))), None)
        raise InputError(f"checkpoint {path}: args{'.' + alone if alone else ''}: {e}") from None


def refused(values):
    """True when check_args refuses the flag values of dict `values`."""
    try:
        check_args(argparse.Namespace(**values))
    except InputError:
        return True
    return False


def value_problem(action, value):
    """None when `value` is one the parsing of `action`'s flag gives, else why not ("" when
    the type alone says it)."""
    if action.nargs == 0:  # store_true
        return None if isinstance(value, bool) else ""
    if value is None:
        return None if action.default is None else ""
    if action.nargs in ("+", "*"):
        if not isinstance(value, (list, tuple)):
            return ""
        return next((p for p in (item_problem(action, v) for v in value) if p is not None), None)
    return item_problem(action, value)


RECORDED_TYPES = {"cooldown": float}  # a --budget re-plan may make it fractional (budget.py)


def item_problem(action, value):
    """value_problem of one value: a finite number for a number flag, else it must come back
    unchanged from the flag's type applied to its text; and one of the choices."""
    kind = RECORDED_TYPES.get(action.dest, action.type)
    if isinstance(value, bool):
        good = False
    elif kind in (None, int, float):
        good = (isinstance(value, str) if kind is None else
                isinstance(value, {int: int, float: (int, float)}[kind]) and math.isfinite(value))
    else:
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], str):
            text = f"{value[0]}{'min' if value[1] == 'min' else ''}"  # --save-interval
        elif isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))  # --attn-layers
        else:
            text = str(value)
        try:
            parsed = action.type(text)
        except (argparse.ArgumentTypeError, ValueError) as e:
            return str(e)
        good = (list(parsed) == list(value) if isinstance(parsed, (list, tuple))
                and isinstance(value, (list, tuple)) else parsed == value)
    if good and action.choices is not None and value not in action.choices:
        return f"choose from {', '.join(map(str, action.choices))}"
    return None if good else ""


UNSET = object()


def given_flags(argv):
    """The destinations of the flags given on the command line."""
    parser = build_parser()
    parser.set_defaults(**{a.dest: UNSET for a in parser._actions if a.dest != "help"})
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not UNSET}


def settings_line(args, sources):
    """The start-up line of the settings in effect, each with where it came from. A flag that
    is off is left out: None, False, and a 0 that is its default; the attention blocks are
    shown as resolved (block nlayers-2 for the default)."""
    shown = []
    for k in SHOWN:
        value, source = getattr(args, k), sources.get(k, "default")
        if k == "attn_layers":
            blocks = attention_blocks(value, args.nlayers)
            value = ",".join(map(str, blocks)) if blocks else "none"
        if value is None or value is False or (value == 0 and source == "default"):
            continue
        shown.append(f"--{k.replace('_', '-') if k != 'batch_size' else k}"
                     + ("" if value is True else f" {value}") + f" [{source}]")
    return "Settings: " + ", ".join(shown)


FIXED_ON_CONTINUE = ("optimizer", "seed", "batch_size", "unk", "adaptive_softmax", "recipe")


def check_continue_flags(args, saved):
    """Flags whose change --continue cannot honour (the optimizer state, the random streams,
    the carried state's batch, the vocabulary, the best checkpoint the test reads, the steps
    a budget fixed): an error instead of a silent no-op."""
    for key in FIXED_ON_CONTINUE:
        if key in saved and getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-") if key != "batch_size" else "--batch_size"
            raise InputError(f"{flag} cannot change on --continue (the run has "
                             f"{saved[key]}); start a new run from its weights with --resume")
    if "save" in saved and os.path.realpath(args.save) != os.path.realpath(saved["save"]):
        raise InputError(f"--save cannot change on --continue: the run's best checkpoint is "
                         f"{saved['save']}, which its final test reads; drop --save, or start "
                         f"a new run from its weights with --resume")
    if args.budget and not saved.get("budget"):
        raise InputError("--budget cannot be added on --continue: the run was planned without "
                         "one; give --max-steps to end it sooner or later")
    if saved.get("budget") and args.budget != saved["budget"]:
        raise InputError(f"--budget cannot change on --continue: the run's budget "
                         f"({saved['budget']}) fixed --max-steps {saved['max_steps']}; give a "
                         f"higher --max-steps to train further")


def changed_flags(args, saved):
    """'flag old -> new' for each flag of a continued run given anew with another value."""
    return [f"{k} {v} -> {getattr(args, k)}" for k, v in saved.items()
            if hasattr(args, k) and getattr(args, k) != v]


def assign(args, sources, values, source, over_given=False):
    """Set each flag of `values` (destinations) with its source (e.g. "checkpoint"), except
    those given on the command line unless `over_given`: the one place where a flag takes a
    value other than the one typed or its default (the order of calls is the precedence at
    the top of this file: a later call wins)."""
    for key, value in values.items():
        if over_given or sources.get(key) != "given":
            setattr(args, key, value)
            sources[key] = source


def resolve_flags(argv, load_start):
    """The flags, then the checkpoint to start from (`load_start(args)`, checkpoint.py);
    flags not given take, in this order, a --recipe's values (with --budget, its budget's;
    never the model's size when a checkpoint gives it, and nothing on --continue), the
    checkpoint's (flags_from) and the defaults. Returns (args, start checkpoint or None,
    {flag: where its value came from}, notes to log once the run starts)."""
    args = parse_args(argv)  # first: --help and bad values are answered by the real parser
    given = given_flags(argv)
    check_args(args)
    start = load_start(args)
    saved = flags_from(start, args, given)
    if {"budget", "max_steps"} <= given:
        raise InputError("--budget chooses --max-steps itself; give one of them")
    recipe = RECIPES[args.recipe][1] if "recipe" in given and not args.continue_from else {}
    if recipe and args.budget:
        recipe = {**recipe, **budget_recipe(args.recipe, args.budget)}
    recipe = {k: v for k, v in recipe.items() if not (k in MODEL_FLAGS and k in saved)}  # a
    # checkpoint's model is its own: a recipe sets how it trains
    sources = {k: "given" for k in given}
    assign(args, sources, saved, "checkpoint")
    assign(args, sources, recipe, f"recipe {args.recipe}")
    if saved or recipe:
        check_args(args)
    check_model_flags(args)
    if args.dry_run:
        args.log_interval = DRY_RUN["log_interval"]
        sources["log_interval"] = "dry run"
    notes = []
    if args.continue_from:
        check_continue_flags(args, saved)
        changed = changed_flags(args, saved)
        if changed:
            notes.append("Continuing with changed flags: " + ", ".join(changed))
    return args, start, sources, notes
