"""The files a training run writes (--save, --last and the run folder), checked before
anything is written, and the lock that keeps two runs off the same files."""

import fcntl
import os

from checkpoint import check_writable
from utils import remove_stale_temporaries
from data import CACHE_NAME, SPLITS
from flags import InputError

RUN_FILES = ("args.json", "env.json", "log.txt", "metrics.jsonl", "continues.jsonl")
RECORDS = ("log.txt", "metrics.jsonl")  # a run folder holding these holds a run


def has_records(folder):
    return any(os.path.exists(os.path.join(folder, name)) for name in RECORDS)


def plan(args, tmp):
    """{"save", "last", "run_dir"}: the paths of the flags, or of the temporary folder of a
    dry run. A new run (not --continue) whose default run folder (SAVE.run) holds another
    run's records gets the first free SAVE.run.N instead, so that records never mix."""
    if tmp:
        return {"save": os.path.join(tmp, "model.pt"), "last": os.path.join(tmp, "last.pt"),
                "run_dir": os.path.join(tmp, "run")}
    stem = os.path.splitext(args.save)[0]
    run_dir = args.run_dir or stem + ".run"
    if not args.run_dir and not args.continue_from:
        n = 2
        while has_records(run_dir):
            run_dir, n = f"{stem}.run.{n}", n + 1
    return {"save": args.save, "last": args.last or stem + ".last.pt", "run_dir": run_dir}


def data_files(folder):
    names = [f"{split}.txt" for split in SPLITS] + [f"{split}.txt.raw" for split in SPLITS]
    return {os.path.realpath(os.path.join(folder, name)) for name in names + [CACHE_NAME]}


def check(paths, args):
    """InputError unless every output can be written as a file, none is a file of the
    corpus, and no two outputs are the same file."""
    flag = {"save": "--save", "last": "--last", "run_dir": "--run-dir"}
    for key in ("save", "last"):
        check_writable(paths[key])
    run_dir = paths["run_dir"]
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise InputError(f"--run-dir {run_dir} is a file; the run folder must be a folder")
    if args.run_dir and not args.continue_from and has_records(run_dir):
        raise InputError(f"--run-dir {run_dir} holds another run's records; choose a new folder "
                         f"or continue that run with --continue")
    outputs = {flag[key]: paths[key] for key in ("save", "last")}
    outputs.update({f"{run_dir}/{name}": os.path.join(run_dir, name) for name in RUN_FILES})
    for name, path in outputs.items():
        if os.path.isdir(path):
            raise InputError(f"cannot write {path}: it is a folder")
    corpus = data_files(args.data)
    seen = {}
    for name, path in outputs.items():
        real = os.path.realpath(path)
        if real in corpus:
            raise InputError(f"{name} {path} is a file of the corpus {args.data}; refusing to "
                             f"overwrite it")
        if real in seen:
            raise InputError(f"{seen[real]} and {name} name the same file {path}; give each "
                             f"its own")
        seen[real] = name


class RunLock:
    """An exclusive lock on SAVE.lock for as long as the run lives: a second run with the same
    --save is refused. The kernel releases it when the process dies, so a kill -9 leaves no
    stale lock."""

    def __init__(self, save):
        self.path = save + ".lock"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise InputError(f"another run is writing {save} (it holds {self.path}); wait for "
                                 f"it to end or choose another --save") from None
            try:  # the file may have been removed by the run that held it: lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)

    def release(self):
        os.remove(self.path)
        os.close(self.fd)


def claim(args, paths, tmp):
    """Before anything is written: check every output path (a dry run checks the real ones
    too), then lock --save and clear what an earlier crash left of its temporary files.
    Returns the lock (None for a dry run)."""
    check(paths, args)
    if tmp:
        check(plan(args, None), args)
        return None
    lock = RunLock(paths["save"])
    for key in ("save", "last"):
        remove_stale_temporaries(paths[key])
    args.last, args.run_dir = paths["last"], paths["run_dir"]  # saved: --continue finds them
    return lock
