"""flags.py: parsing (the paper's commands, both spellings of a flag, the recipes in --help,
every flag of one kind), resolving flags against a checkpoint and a recipe (assign, the
second pass, the model's sizes, --budget against --max-steps), the Settings line, and
--budget's durations and rules."""

import re

import pytest

import flags
from flags import parse_args


def test_paper_commands_parse():
    first = ("--epochs 32 --dropouth 0.1 --dropouti 0.1 --dropout 0.1 --data data/enwik8/ "
             "--save ENWIK8.pt --log-interval 10 --seed 5512 --optimizer lamb --bptt 1024 "
             "--warmup 800 --lr 2e-3 --emsize 1024 --nhid 4096 --nlayers 4 --batch_size 16").split()
    args = parse_args(first)
    defaults = parse_args([])
    for key in ("epochs", "dropouth", "dropout", "data", "save", "log_interval", "seed", "optimizer",
                "bptt", "warmup", "lr", "emsize", "nhid", "nlayers", "batch_size", "clip", "wdecay"):
        assert getattr(args, key) == getattr(defaults, key), key  # the defaults are the paper's
    second = parse_args(first + "--epochs 5 --resume ENWIK8.pt --lr 1e-3 --seed 125".split())
    assert (second.epochs, second.resume, second.lr, second.seed) == (5, "ENWIK8.pt", 1e-3, 125)
    # A checkpoint's values stand in for flags not given; given flags win.
    third = parse_args(first + ["--resume", "ENWIK8.pt"])
    sources = {"emsize": "given"}
    flags.assign(third, sources, {"emsize": 512, "heads": 2}, "checkpoint")
    assert (third.emsize, third.heads) == (1024, 2)
    assert sources == {"emsize": "given", "heads": "checkpoint"}
    flags.assign(third, sources, {"emsize": 512}, "budget 5min", over_given=True)
    assert (third.emsize, sources["emsize"]) == (512, "budget 5min")


def test_batch_size_takes_both_spellings():
    assert parse_args(["--batch-size", "7"]).batch_size == parse_args(["--batch_size", "7"]).batch_size == 7


def test_help_lists_every_recipe_with_one_line():
    text = flags.build_parser().format_help()
    for name, (what, _) in flags.RECIPES.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(what)}$", text, re.M), name


def test_every_flag_is_a_model_flag_a_run_setting_the_schedule_or_the_commands_own():
    """--resume and --eval-only take every run setting a checkpoint recorded: a new flag
    must say which kind it is."""
    kinds = [set(flags.MODEL_FLAGS) | {"adaptive_softmax"}, set(flags.RUN_SETTINGS),
             set(flags.SCHEDULE), set(flags.OWN)]
    dests = {a.dest for a in flags.build_parser()._actions if a.dest != "help"}
    assert set().union(*kinds) == dests
    assert sum(map(len, kinds)) == len(dests)  # each flag of one kind only


def test_the_papers_second_pass_runs_as_its_flags_say():
    """The second pass repeats every flag of the first and halves --lr: what it resolves to
    is what its flags alone parse to (the first pass recorded the defaults for the rest)."""
    first = ("--epochs 32 --dropouth 0.1 --dropouti 0.1 --dropout 0.1 --data data/enwik8/ "
             "--save ENWIK8.pt --log-interval 10 --seed 5512 --optimizer lamb --bptt 1024 "
             "--warmup 800 --lr 2e-3 --emsize 1024 --nhid 4096 --nlayers 4 --batch_size 16").split()
    second = [*first, "--resume", "ENWIK8.pt"]
    second[second.index("--epochs") + 1], second[second.index("--seed") + 1] = "5", "125"
    second[second.index("--lr") + 1] = "1e-3"
    config = dict(ntoken=205, ninp=1024, nhid=4096, nlayers=4, attn_layers=[2], heads=1,
                  mem_len=5000, cutoffs=None)
    start = {"kind": "sha-rnn", "config": config, "args": vars(flags.parse_args(first))}
    args, _, sources, _ = flags.resolve_flags(second, lambda args: start)
    assert vars(args) | {"attn_layers": None} == vars(flags.parse_args(second))
    assert args.attn_layers == [2]  # the checkpoint's config: block 2, as the default
    line = flags.settings_line(args, sources)
    assert "--lr 0.001 [given]" in line and "--bptt 1024 [given]" in line


def test_model_flags_are_checked_against_the_recipe_not_the_papers_defaults():
    """--heads 3 divides cpu-small's width 192 (not the paper's 1024); block 3 is beyond its
    2 blocks (not the paper's 4)."""
    args, _, _, _ = flags.resolve_flags(["--recipe", "cpu-small", "--heads", "3"], lambda args: None)
    assert (args.emsize, args.heads) == (192, 3)
    with pytest.raises(flags.InputError, match="--nlayers 2"):
        flags.resolve_flags(["--recipe", "cpu-small", "--attn-layers", "3"], lambda args: None)


def test_budget_and_max_steps_exclude_each_other():
    with pytest.raises(flags.InputError, match="--budget"):
        flags.resolve_flags(["--budget", "5min", "--max-steps", "10"], lambda args: None)
    assert flags.budget_seconds("1.5h") == 5400 and flags.budget_seconds("90s") == 90
    assert flags.budget_seconds("5 min") is None and flags.budget_seconds("abc") is None
    assert flags.budget_seconds("24h") == 86400


def test_settings_line_shows_the_model_seed_and_threads_and_hides_what_is_off():
    args, _, sources, _ = flags.resolve_flags(["--recipe", "cpu-small"], lambda args: None)
    line = flags.settings_line(args, sources)
    for shown in ("--emsize 192 [recipe cpu-small]", "--nhid 384 [recipe cpu-small]",
                  "--nlayers 2 [recipe cpu-small]", "--attn-layers 0 [default]",
                  "--mem-len 256 [recipe cpu-small]", "--seed 5512 [default]",
                  "--threads 1 [recipe cpu-small]", "--dropout 0.0 [recipe cpu-small]"):
        assert shown in line, shown
    assert "None" not in line and "--budget" not in line and "--dropoute" not in line
    args, _, sources, _ = flags.resolve_flags(["--attn-layers", "none", "--adaptive-softmax"],
                                              lambda args: None)
    line = flags.settings_line(args, sources)
    assert "--attn-layers none [given]" in line and "--adaptive-softmax [given]" in line
    assert "--threads" not in line and "--max-steps" not in line  # None: torch's, no limit


def test_cpu_small_regularises_more_the_more_epochs_its_budget_covers():
    rule = flags.BUDGET_RULES["cpu-small"]["regularise"]
    assert flags.by_limit(rule, 4.2) == {}  # about 2 minutes on data/sample
    assert flags.by_limit(rule, 6.5)["dropout"] == 0.1 and flags.by_limit(rule, 6.5)["wdecay"] == 0.1
    assert flags.by_limit(rule, 25)["dropout"] == 0.2 and flags.by_limit(rule, 25)["wdrop"] == 0.3
    sizes = flags.BUDGET_RULES["cpu-small"]["size"]
    assert flags.by_limit(sizes, 120) == {} and flags.by_limit(sizes, 300)["emsize"] == 256
