"""Plot the learning curves of one or more training runs.

Reads the metrics.jsonl that main.py writes in each run folder and draws train and
valid bpc against tokens seen (left) and against wall-clock hours (right):

    python plot.py ENWIK8.run
    python plot.py ENWIK8.run SMALL.run --output compare.png --title "enwik8"

matplotlib is needed for this script only: pip install matplotlib
"""

import argparse
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field

from flags import InputError, Parser, run_script
from outputs import Output, claim
from utils import atomic_write

CEILING_QUANTILE = 0.95  # default top of the bpc axis, as a quantile of the plotted bpc
TRAIN_WIDTH = 1.0
VALID_WIDTH = 2.2
LEGEND_COLUMNS = 5  # most legend entries side by side below the panels


def bpc_flag(text):
    """--ymax: a finite bpc above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite bpc above 0, got {text}")
    return value


def parse_args(argv):
    """The command line (sys.argv[1:] when argv is None)."""
    p = Parser(description="Plot train and valid bpc of runs written by main.py, against "
                           "tokens seen and against wall-clock hours.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folder holding metrics.jsonl (e.g. ENWIK8.run); several are overlaid")
    p.add_argument("--output", default="curves.png",
                   help="image to write; the format follows the extension, e.g. .png, .pdf, "
                        ".svg, and a name without one gets .png (default: curves.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the file --output names if it exists (without it, an existing "
                        "file is refused)")
    p.add_argument("--title", default=None, help="title above both panels (default: none)")
    p.add_argument("--ymax", type=bpc_flag, default=None, metavar="BPC",
                   help="top of the bpc axis (default: the 95th percentile of the plotted bpc, "
                        "raised to show each curve's last point, so the first steep drop does "
                        "not flatten the rest of the curves)")
    return p.parse_args(argv)


@dataclass
class Run:
    """The curves of one run: (tokens, hours, bpc) points, in file order."""
    name: str
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test_bpc: float = None

    @property
    def label(self):
        """The legend entry: the run's name and, when known, its test bpc."""
        if self.test_bpc is None:
            return self.name
        return f"{self.name} (test {self.test_bpc:.3f})"


def read_records(path):
    """The JSON objects of a .jsonl file; lines that do not parse (e.g. a last line cut
    short by a killed run) are skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def number(record, key):
    """record[key] as a finite float, or None when missing, not a number or not finite."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def curve(records, kind, bpc_key, clock):
    """(tokens, hours on `clock`, bpc) of the records of one type that have all three."""
    points = []
    for r in records:
        if r.get("type") != kind:
            continue
        tokens, t, bpc = number(r, "tokens"), number(r, "time"), number(r, bpc_key)
        if None not in (tokens, t, bpc):
            points.append((tokens, clock(t) / 3600, bpc))
    return points


def running_clock(times, starts):
    """A function from a record's time to the seconds the run had been running by then:
    counted from its first record, leaving out each pause between a stop and a --continue
    (from the last record before the continue's start, `starts`, to that start)."""
    first = min(times, default=0.0)
    pauses = []
    for start in sorted(starts):
        before = [t for t in times if t < start]
        if before:
            pauses.append((start, start - max(before)))

    def clock(t):
        return t - first - sum(pause for start, pause in pauses if start <= t)

    return clock


def load_run(path, name):
    """Reads one run folder into a Run."""
    if not os.path.isdir(path):
        raise InputError(f"{path}: {'not a folder' if os.path.exists(path) else 'no such folder'}")
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise InputError(f"{path}: no metrics.jsonl (not a run folder written by main.py?)")
    try:
        records = read_records(metrics)
    except OSError as e:
        raise InputError(f"{metrics}: {e.strerror}") from None
    times = [t for t in (number(r, "time") for r in records) if t is not None]
    continues = os.path.join(path, "continues.jsonl")
    starts = [number(r, "time") for r in read_records(continues)] if os.path.isfile(continues) else []
    clock = running_clock(times, [s for s in starts if s is not None])
    run = Run(name, curve(records, "train", "bpc", clock), curve(records, "valid", "valid_bpc", clock))
    if not run.train and not run.valid:
        raise InputError(f"{metrics}: no train or valid records yet")
    tests = [b for b in (number(r, "test_bpc") for r in records if r.get("type") == "test")
             if b is not None]
    run.test_bpc = tests[-1] if tests else None
    return run


def run_names(paths):
    """Each run's folder name, or its path as given where two folder names are the same."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [n if names.count(n) == 1 else os.path.normpath(p) for n, p in zip(names, paths)]


def segments(points):
    """Splits a curve where the token count does not increase: a run continued from a
    checkpoint older than its last records starts a new stretch of line."""
    pieces = []
    for point in points:
        if not pieces or point[0] <= pieces[-1][-1][0]:
            pieces.append([])
        pieces[-1].append(point)
    return pieces


def bpc_limits(runs, ymax):
    """(bottom, top) of the bpc axis, or None to let matplotlib choose. By default the top
    leaves out the highest bpc (the first steep drop) but keeps every curve's last point."""
    values = sorted(p[2] for run in runs for p in run.train + run.valid)
    low, high = values[0], values[-1]
    if ymax is None:
        latest = max(c[-1][2] for run in runs for c in (run.train, run.valid) if c)
        ymax = max(latest, values[min(len(values) - 1, int(CEILING_QUANTILE * len(values)))])
    elif ymax <= low:
        raise InputError(f"--ymax {ymax:g} is not above the lowest plotted bpc ({low:.3f})")
    top = min(ymax, high)
    if top <= low:
        return None
    pad = 0.05 * (top - low)
    return low - pad, top + pad


def import_matplotlib():
    """matplotlib's Figure and Agg canvas, or a InputError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("plotting needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def draw_run(axes, run, colour):
    """Draws one run's train and valid curves on both panels."""
    for ax, x in zip(axes, (0, 1)):
        for piece in segments(run.train):
            ax.plot([p[x] for p in piece], [p[2] for p in piece], color=colour,
                    lw=TRAIN_WIDTH, alpha=0.8, marker="." if len(piece) == 1 else None, zorder=2)
        for piece in segments(run.valid):
            ax.plot([p[x] for p in piece], [p[2] for p in piece], color=colour,
                    lw=VALID_WIDTH, marker="o", ms=5, zorder=3)


def legend_handles(runs, colours):
    """One entry per run (its colour) and two for the line styles of train and valid."""
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], color=c, lw=3, label=run.label) for run, c in zip(runs, colours)]
    handles.append(Line2D([], [], color="0.35", lw=TRAIN_WIDTH, label="train"))
    handles.append(Line2D([], [], color="0.35", lw=VALID_WIDTH, marker="o", ms=5, label="valid"))
    return handles


def draw(runs, output, title=None, ymax=None):
    """Writes the two-panel figure of `runs` to `output`."""
    Figure, FigureCanvasAgg = import_matplotlib()
    from matplotlib.ticker import EngFormatter
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for run, colour in zip(runs, colours):
        draw_run(axes, run, colour)
    axes[0].set_xlabel("tokens seen")
    axes[0].xaxis.set_major_formatter(EngFormatter())
    axes[1].set_xlabel("wall-clock hours of training (pauses before a --continue left out)")
    axes[0].set_ylabel("bpc (bits per character)")
    axes[1].tick_params(labelleft=True)
    limits = bpc_limits(runs, ymax)
    if limits:
        axes[0].set_ylim(*limits)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    handles = legend_handles(runs, colours)
    rows = math.ceil(len(handles) / LEGEND_COLUMNS)
    fig.legend(handles=handles, loc="outside lower center", ncol=math.ceil(len(handles) / rows),
               frameon=False)
    image = io.BytesIO()  # drawn whole first, in the format named, then put in place
    try:
        fig.savefig(image, format=image_format(output), dpi=110)
        atomic_write(output, lambda f: f.write(image.getvalue()))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write {output}: {getattr(e, 'strerror', None) or e}") from None


def image_format(path):
    """The image format of a file name: its extension, lower case ("png", "pdf", ...)."""
    return os.path.splitext(path)[1][1:].lower()


def main(argv=None):
    """Runs the command line; returns the exit code (0, or 2 on bad input)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code
    return run_script(plot, args)


def plot(args):
    """Check the paths, draw the runs and say where."""
    if args.output.strip() and not image_format(args.output) and not os.path.isdir(args.output):
        args.output += ".png"
    claim([Output("--output", args.output)],
          [(f"the records of {run}", os.path.join(run, name)) for run in args.runs
           for name in ("metrics.jsonl", "continues.jsonl")] +
          [("a run folder", run) for run in args.runs], args.overwrite)
    runs = [load_run(p, n) for p, n in zip(args.runs, run_names(args.runs))]
    draw(runs, args.output, args.title, args.ymax)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
