"""The files a script writes, claimed before any work. Every script that writes (main.py,
export.py, plot.py, prepare.py, checkpoint.py convert-pickle) lists its outputs and inputs
and calls `claim`: an output that is an input, that another output also names, that is a
lock file, a folder where a file goes (or the reverse), or that would replace an existing
file the script does not own, is refused with one line before anything is read or written.
A training run then locks each of its outputs (PATH.lock), so that no second run writes
any of them while it lives. No torch here: light scripts (plot.py) claim their outputs too.
"""

import fcntl
import importlib.util
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass

import modelfolder
from flags import InputError
from utils import remove_stale_temporaries

RUN_FILES = ("args.json", "env.json", "log.txt", "metrics.jsonl", "continues.jsonl")
RECORDS = ("log.txt", "metrics.jsonl")  # a run folder holding these holds a run


@dataclass(frozen=True)
class Output:
    """One path a script writes."""
    flag: str              # how the command line names it, for messages: "--save", "OUTDIR"
    path: str
    folder: bool = False   # a folder the script makes (and writes into), else a file
    replaces: bool = False  # may replace an existing file: one the script itself owns

    @property
    def lock(self):
        return os.path.normpath(self.path) + ".lock"


def real(path):
    return os.path.realpath(path)


def claim(outputs, inputs=(), overwrite=False, locks=False):
    """InputError unless every output can be written: see the module doc. `inputs` are
    (description, path) pairs: files and folders the script reads. With `overwrite` an
    existing file may be replaced; None: the command has no --overwrite. With `locks`, each
    output's lock file (PATH.lock) is an output of its own that no other output may name."""
    made = [real(out.path) for out in outputs if out.folder]
    for out in outputs:
        check_path(out, made)
        for what, path in inputs:
            if real(out.path) == real(path):
                raise InputError(f"{out.flag} {out.path} is {what}, which this command reads; "
                                 f"choose another path")
            if locks and real(out.lock) == real(path):
                raise InputError(f"the lock file of {out.flag} {out.path}, {out.lock}, is {what}, "
                                 f"which this command reads; choose another path")
        if not out.folder and os.path.exists(out.path) and not out.replaces and not overwrite:
            raise InputError(f"{out.flag} {out.path} exists; choose a new path" +
                             (", or pass --overwrite to replace it" if overwrite is not None else ""))
    named = {}
    for out in outputs:
        for key in [real(out.path)] + ([real(out.lock)] if locks else []):
            if key in named:
                first, second = named[key], out
                raise InputError(f"{first.flag} {first.path} and {second.flag} {second.path} "
                                 f"name the same file (a lock file is PATH.lock); give each "
                                 f"its own")
            named[key] = out


def checkpoint_inputs(path, what="the checkpoint"):
    """The (description, path) inputs of a checkpoint argument: the file, or a model folder
    (modelfolder.py) with the two files it holds."""
    if not os.path.isdir(path):
        return [(what, path)]
    weights, config = modelfolder.files(path)
    return [(f"the model folder {path}", path), (f"the weights of the model folder {path}", weights),
            (f"the description of the model folder {path}", config)]


def check_path(out, made=()):
    """InputError unless `out` can be created: a non-empty path, no folder where a file goes
    (or the reverse), and a writable folder to put it in (or one of the folders `made`, the
    resolved folder outputs, which are checked themselves)."""
    if not out.path.strip():
        raise InputError(f"{out.flag} is empty; give a path")
    if os.path.normpath(out.path).endswith(".lock"):
        raise InputError(f"{out.flag} {out.path}: a name ending in .lock is a lock file (a run "
                         f"locks each output PATH as PATH.lock); choose another name")
    if out.folder:
        if os.path.exists(out.path) and not os.path.isdir(out.path):
            raise InputError(f"{out.flag} {out.path} is a file; it must be a folder")
        parent = os.path.abspath(out.path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise InputError(f"cannot make {out.flag} {out.path}: {parent} is a file")
    else:
        if os.path.isdir(out.path):
            raise InputError(f"cannot write {out.flag} {out.path}: it is a folder")
        parent = os.path.dirname(os.path.abspath(out.path))
        if not os.path.isdir(parent):
            if any(real(parent) == m or real(parent).startswith(m + os.sep) for m in made):
                return  # inside a folder output, made before it is written
            raise InputError(f"cannot write {out.flag} {out.path}: folder {parent} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write {out.flag} {out.path}: {e.strerror}") from None


class Locks:
    """Exclusive locks on PATH.lock for each output, held as long as the run lives: a second
    run that would write any of them is refused. The kernel releases them when the process
    dies, so a kill -9 leaves no stale lock."""

    def __init__(self, outputs):
        self.held = []
        try:
            for out in outputs:
                self.held.append((self.take(out), out.lock))
        except BaseException:
            self.release()
            raise

    @staticmethod
    def take(out):
        while True:
            fd = os.open(out.lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(f"another run is writing {out.flag} {out.path} (it holds "
                                 f"{out.lock}); wait for it to end or choose another "
                                 f"{out.flag}") from None
            try:  # the file may have been removed by the run that held it: lock the new one
                same = os.stat(out.lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self):
        for fd, path in reversed(self.held):
            os.remove(path)
            os.close(fd)
        self.held = []


# --- the outputs of a training run -------------------------------------------------------

def has_records(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in RECORDS)


def plan(args, tmp):
    """{"save", "last", "run_dir", "moved", "kept"}: the paths of the flags, or of the
    temporary folder of a dry run ("kept" False). A new run (not --continue) whose default
    run folder (SAVE.run) holds another run's records gets the first free SAVE.run.N
    instead, so that records never mix; "moved" then names the folder it avoided."""
    if tmp:
        return {"save": os.path.join(tmp, "model.pt"), "last": os.path.join(tmp, "last.pt"),
                "run_dir": os.path.join(tmp, "run"), "moved": None, "kept": False,
                "tensorboard": args.tensorboard and os.path.join(tmp, "tensorboard")}
    stem = os.path.splitext(args.save)[0]
    run_dir, moved = args.run_dir or stem + ".run", None
    if not args.run_dir and not args.continue_from:
        n = 2
        while has_records(run_dir):
            run_dir, moved, n = f"{stem}.run.{n}", stem + ".run", n + 1
    return {"save": args.save, "last": args.last or stem + ".last.pt", "run_dir": run_dir,
            "moved": moved, "kept": True, "tensorboard": args.tensorboard}


def run_outputs(args, paths, start):
    """The Outputs of a training run: the best and last checkpoints, the --when snapshots
    and the run folder with its files. A run may replace its own files: those of the run it
    continues, the weights it resumes from and, when it resumes from its own --save (the
    paper's second pass), that run's last checkpoint."""
    own = set()
    if args.continue_from:
        own = {real(args.continue_from)}
        if real(paths["save"]) == real(start["args"]["save"]):
            own.add(real(paths["save"]))
    elif args.resume and real(args.resume) == real(paths["save"]):
        own = {real(paths["save"]), real(paths["last"])}

    def file(flag, path):
        return Output(flag, path, replaces=real(path) in own)

    run_dir = paths["run_dir"]
    outs = [file("--save", paths["save"]), file("--last", paths["last"]),
            Output("--run-dir", run_dir, folder=True)]
    outs += [file(f"--save (the --when {e} copy)", f"{paths['save']}.e{e}") for e in args.when]
    outs += [Output(f"--run-dir's {name}", os.path.join(run_dir, name), replaces=True)
             for name in RUN_FILES]
    if paths["tensorboard"]:
        outs.append(Output("--tensorboard", paths["tensorboard"], folder=True))
    return outs


def start_inputs(args, paths):
    """The checkpoint a run starts from, as inputs (checkpoint_inputs), unless it is the one
    file the run may replace: the last checkpoint it continues, or the --save it resumes
    from (the paper's second pass)."""
    flag, source = ("--continue", args.continue_from) if args.continue_from else ("--resume", args.resume)
    own = paths["last"] if args.continue_from else paths["save"]
    if not source or real(source) == real(own):
        return []
    return checkpoint_inputs(source, f"the checkpoint {flag} reads")


def claim_run(args, paths, start, corpus_files, tmp):
    """Before anything is written: check every output of the run (a dry run checks the
    real ones too, then writes into its temporary folder), then lock them and clear what an
    earlier crash left of their temporary files. Returns the Locks (None for a dry run)."""
    real_paths = plan(args, None) if tmp else paths
    inputs = [("the corpus folder", args.data)] + [("a corpus file", f) for f in corpus_files]
    inputs += start_inputs(args, real_paths)
    outs = run_outputs(args, real_paths, start)
    if args.run_dir and not args.continue_from and has_records(real_paths["run_dir"]):
        raise InputError(f"--run-dir {real_paths['run_dir']} holds another run's records; choose "
                         f"a new folder or continue that run with --continue")
    if args.tensorboard:
        check_tensorboard(args.tensorboard, new=not args.continue_from)
    claim(outs, inputs, args.overwrite, locks=True)
    if tmp:
        return None
    locks = Locks(outs[:3])  # --save, --last, --run-dir
    for key in ("save", "last"):
        remove_stale_temporaries(paths[key])
    args.last, args.run_dir = paths["last"], paths["run_dir"]  # saved: --continue finds them
    return locks


def check_tensorboard(folder, new):
    """--tensorboard: the optional package is installed and imports (a protobuf of another
    version breaks it), and a new run's folder holds no other run's events (their curves
    would mix)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (what the run uses)
    except Exception as e:  # whatever a broken installation raises
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise InputError(f"--tensorboard: the tensorboard package is installed but does not "
                         f"import ({type(e).__name__}: {detail}); repair it, e.g. pip install "
                         f"--upgrade tensorboard protobuf") from None
    events = os.path.isdir(folder) and any(name.startswith("events.out.tfevents")
                                           for name in os.listdir(folder))
    if new and events:
        raise InputError(f"--tensorboard {folder} holds another run's events; choose a new "
                         f"folder (tensorboard --logdir on their parent shows both)")


# --- what a run tells about its outputs --------------------------------------------------

def outputs_line(paths, best=True):
    """Where a run's outputs go (or went); `best` False: the run wrote no best checkpoint."""
    if not paths["kept"]:
        return "Outputs: none kept (--dry-run writes into a temporary folder it removes)"
    saved = (f"best checkpoint {paths['save']}" if best else
             "no best checkpoint (no validation finished)")
    return (f"Outputs: {saved}, last checkpoint {paths['last']} (to continue), run records "
            f"{paths['run_dir']}/")


CLONE = os.path.dirname(os.path.abspath(__file__))  # the folder of the scripts


def interpreter():
    """The Python that runs this process, as a command names it: relative when it lies in
    the clone (.venv/bin/python), else its full path; "python" when Python cannot say."""
    python = os.path.abspath(sys.executable) if sys.executable else ""
    if not python:
        return "python"
    if os.path.commonpath([python, CLONE]) == CLONE:
        python = os.path.relpath(python)
        python = python if os.sep in python else os.path.join(".", python)
    return shlex.quote(python)


def script_command(script, *flags, launcher=()):
    """The command line that runs `script` of the clone with this interpreter (and the
    interpreter's `launcher` options)."""
    path = os.path.relpath(os.path.join(CLONE, script))
    return " ".join([interpreter(), *launcher, shlex.quote(path),
                     *map(shlex.quote, map(str, flags))])


def command(world, *flags):
    """The command line of main.py with `flags`, launched as a run of `world` processes
    (through torch.distributed.run, the module behind torchrun, when more than one)."""
    launcher = (["-u"] if world == 1 else
                ["-m", "torch.distributed.run", f"--nproc_per_node={world}"])
    return script_command("main.py", *flags, launcher=launcher)


def sample_command(paths):
    """How to sample from the best checkpoint."""
    return script_command("generate.py", "--checkpoint", paths["save"], "--length", 500)
