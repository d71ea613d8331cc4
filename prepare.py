"""Dataset preparation: downloaded archives and your own files into corpus folders.

    python prepare.py text mybook.txt data/mybook            # your own text, byte level
    python prepare.py text --words mybook.txt data/mybook-w  # your own text, word level
    python prepare.py enwik8 enwik8.zip data/enwik8          # what getdata.sh runs

A corpus folder holds train.txt, valid.txt and test.txt. The byte format (enwik8, text8,
raw WikiText, your own text) writes every byte as its decimal value, values separated by
single spaces, and a newline byte as a real line break; the raw bytes are kept beside each
file as X.txt.raw (read by nothing here: the bytes the corpus holds, to compare or reuse).
Word-level corpora (tokenised WikiText, Penn Treebank, your own text with --words) are
copied as they are: UTF-8 text whose whitespace-separated tokens are the words, each line
ending in an end-of-line token when read. docs/model.md (Corpus and vocabulary) gives the
splits of each dataset.
"""

import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from data import SPLITS, split_files
from flags import InputError, Parser, run_script
from outputs import Output, claim, script_command
from tokens import NEWLINE
from utils import atomic_write, say

WRITE_ORDER = ("valid", "test", "train")  # train.txt last: its presence marks a finished folder
WRITE_CHUNK = 1 << 22  # bytes converted per step by the byte-format writer


def _frozen(values):
    """A numpy array made read-only, for module constants."""
    values = np.asarray(values)
    values.flags.writeable = False
    return values


def _byte_piece_table():
    """[256, 4] uint8 rows holding each byte's text in the byte format plus its separator,
    and [256] row lengths: "65 " for 65, "\\n " for a newline byte."""
    pieces = [(b"\n" if c == NEWLINE else str(c).encode()) + b" " for c in range(256)]
    table = np.zeros((256, 4), np.uint8)
    for c, piece in enumerate(pieces):
        table[c, : len(piece)] = list(piece)
    return _frozen(table), _frozen([len(piece) for piece in pieces])


_BYTE_PIECES, _BYTE_PIECE_LEN = _byte_piece_table()


def _byte_pieces(data):
    """Byte format of ``data`` with a separator after every value, the last one included."""
    codes = np.frombuffer(data, np.uint8)
    rows = _BYTE_PIECES[codes]  # [n, 4]
    keep = np.arange(4) < _BYTE_PIECE_LEN[codes][:, None]  # [n, 4]
    return rows[keep].tobytes()


def byte_format(data):
    """The byte format of ``data`` (bytes): exactly
    ``' '.join(str(c) if c != 10 else '\\n' for c in data)``, encoded as ASCII."""
    return _byte_pieces(data)[:-1]


def _write_byte_format(data, f):
    """Stream the byte format of ``data`` into a binary file, WRITE_CHUNK bytes at a time."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_CHUNK):
        pieces = _byte_pieces(view[start: start + WRITE_CHUNK])
        f.write(pieces if start + WRITE_CHUNK < len(view) else pieces[:-1])


def _write_splits(out_dir, parts, byte_level):
    """Write {split: bytes} as train.txt/valid.txt/test.txt: copied as they are, or in the
    byte format with the raw bytes beside them in .raw files. A failure (a full disk, a
    signal) removes what was written, and the folder if this call made it; the lines saying
    what was written come once all of it is."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written, lines = [], []
    try:
        for split in WRITE_ORDER:
            data = parts[split]
            target = out_dir / f"{split}.txt"
            if byte_level:
                written.append(out_dir / f"{split}.txt.raw")
                atomic_write(written[-1], lambda f: f.write(data))
                written.append(target)
                atomic_write(target, lambda f: _write_byte_format(data, f))
                lines.append(f"{split}: {len(data):,} bytes -> {target} (byte format) and "
                             f"{target.name}.raw")
            else:
                written.append(target)
                atomic_write(target, lambda f: f.write(data))
                lines.append(f"{split}: {len(data):,} bytes -> {target}")
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    try:
        for line in lines:
            say(line)
    except InputError as e:
        raise InputError(f"{e}; the corpus in {out_dir} is written") from None


def _existing_archive(path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: archive not found")
    return path


def _open_zip(path):
    path = _existing_archive(path)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path}: not a zip archive") from None


def _find_member(names, basename):
    """The archive member whose file name is ``basename``, in whatever folder, or None."""
    for name in names:
        if not name.endswith("/") and name.rsplit("/", 1)[-1] == basename:
            return name
    return None


def _member(names, basename, archive):
    """Like _find_member, but a missing member is an InputError naming the archive."""
    name = _find_member(names, basename)
    if name is None:
        raise InputError(f"{archive}: no member named {basename}")
    return name


def _held_out_parts(data, split, source):
    """{split: memoryview}: test = the last ``split`` bytes, valid = the ``split`` before."""
    if split < 1 or len(data) <= 2 * split:
        raise InputError(f"{source}: {len(data):,} bytes is too few for a training split plus "
                         f"valid and test splits of {split:,} bytes each")
    view = memoryview(data)
    return {"train": view[: -2 * split], "valid": view[-2 * split: -split], "test": view[-split:]}


def _prepare_byte_corpus(zip_path, member, out_dir, split):
    claim_corpus(out_dir, [zip_path])
    with _open_zip(zip_path) as archive:
        data = archive.read(_member(archive.namelist(), member, zip_path))
    _write_splits(out_dir, _held_out_parts(data, split, f"{zip_path}:{member}"), byte_level=True)


def prepare_enwik8(zip_path, out_dir, split=5_000_000):
    """enwik8.zip -> byte-format splits: test = the last ``split`` bytes, valid = the
    ``split`` before them, train = the rest (90M bytes with the default)."""
    _prepare_byte_corpus(zip_path, "enwik8", out_dir, split)


def prepare_text8(zip_path, out_dir, split=5_000_000):
    """text8.zip -> byte-format splits, the usual 90M/5M/5M characters."""
    _prepare_byte_corpus(zip_path, "text8", out_dir, split)


def prepare_wikitext(zip_path, out_dir):
    """WikiText-2/103 zip -> splits. The tokenised archives (wiki.*.tokens) are copied for
    word level; the raw ones (wiki.*.raw) are written in the byte format (character level)."""
    claim_corpus(out_dir, [zip_path])
    with _open_zip(zip_path) as archive:
        names = archive.namelist()
        suffix = "tokens" if _find_member(names, "wiki.train.tokens") else "raw"
        parts = {split: archive.read(_member(names, f"wiki.{split}.{suffix}", zip_path))
                 for split in SPLITS}
    _write_splits(out_dir, parts, byte_level=suffix == "raw")


def prepare_ptb(tgz_path, out_dir, char=False):
    """simple-examples.tgz -> Penn Treebank splits: ptb.{split}.txt (word level) or
    ptb.char.{split}.txt (character level), copied as they are."""
    claim_corpus(out_dir, [tgz_path])
    path = _existing_archive(tgz_path)
    pattern = "ptb.char.{}.txt" if char else "ptb.{}.txt"
    try:
        with tarfile.open(path, "r:*") as archive:
            files = {member.name: member for member in archive.getmembers() if member.isfile()}
            parts = {}
            for split in SPLITS:
                member = files[_member(files, pattern.format(split), path)]
                parts[split] = archive.extractfile(member).read()
    except (tarfile.ReadError, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable tar archive ({error})") from None
    _write_splits(out_dir, parts, byte_level=False)


def text_files(paths):
    """The files of `paths` (files, and folders walked recursively), in sorted order of
    their paths, each once (a file reached twice, e.g. through a symbolic link, is read
    once); inside folders, names starting with "." are skipped."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".")
                                                       for part in p.relative_to(path).parts))
            if not inside:
                raise InputError(f"{path}: the folder holds no files")
            found += inside
        else:
            raise InputError(f"{path}: no such file or folder")
    unique = {}
    for path in sorted(found):
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_text(paths):
    """The bytes of the files of `paths` (text_files), concatenated."""
    return b"".join(path.read_bytes() for path in text_files(paths))


def claim_corpus(out_dir, inputs):
    """Before any work: OUTDIR can become a corpus folder. Its split files (and their .raw
    bytes) are the outputs, `inputs` the files and folders read: see outputs.claim. A
    folder whose train.txt exists holds a finished corpus (train.txt is written last) and
    is refused; the files of an unfinished one (an interrupted run) are written anew."""
    out = Path(out_dir)
    if (out / "train.txt").exists():
        raise InputError(f"{out / 'train.txt'} exists: {out} holds a corpus; choose a new folder")
    for path in map(Path, inputs):
        if path.is_dir() and out.resolve().is_relative_to(path.resolve()):
            raise InputError(f"{out} is inside the input folder {path}; write the corpus elsewhere")
    files = [Output("OUTDIR", path, replaces=True) for path in split_files(out)]
    claim([Output("OUTDIR", str(out), folder=True)] + files,
          [("an input", str(path)) for path in inputs])


def prepare_text(paths, out_dir, fraction=0.05, words=False):
    """Any text or binary files -> a byte-level corpus folder (with `words`, UTF-8 text ->
    a word-level one): the files of `paths` (text_files) concatenated, then split in order:
    test = the last ``fraction`` of the bytes, valid = the ``fraction`` before, train = the
    rest; a word-level corpus is cut at the starts of the lines holding those bytes.
    Returns {split: bytes}."""
    if not 0 < fraction < 0.5:
        raise InputError(f"--fraction must be between 0 and 0.5, got {fraction}")
    claim_corpus(out_dir, paths)
    data = read_text(paths)
    if data and int(len(data) * fraction) < 1:
        raise InputError(f"--fraction {fraction:g} of {len(data):,} bytes is less than one byte "
                         f"per held-out split; give --fraction {1 / len(data):.2g} or more")
    source = " ".join(map(str, paths))
    if words:
        check_utf8(data, source)
        parts = _held_out_lines(data, int(len(data) * fraction))
    else:
        parts = _held_out_parts(data, int(len(data) * fraction), source)
    return _write_nonempty(out_dir, parts, words)


def prepare_splits(train, valid, test, out_dir, words=False):
    """A byte-level corpus folder (with `words`, a word-level one) from three explicit
    sources (each a file or a folder, read as text_files does), used as they are. Returns
    {split: bytes}."""
    claim_corpus(out_dir, [train, valid, test])
    named = {split: {p.resolve() for p in text_files([path])}
             for split, path in zip(SPLITS, (train, valid, test))}
    for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
        shared = sorted(named[first] & named[second])
        if shared:
            raise InputError(f"--{first} and --{second} both hold {shared[0]}: the {second} split "
                             f"would score text of the {first} split; give each split its own "
                             f"text (or one text to split: prepare.py text PATH OUTDIR)")
    parts = {split: read_text([path]) for split, path in zip(SPLITS, (train, valid, test))}
    if words:
        for split, path in zip(SPLITS, (train, valid, test)):
            check_utf8(parts[split], path)
    return _write_nonempty(out_dir, parts, words)


def check_utf8(data, source):
    """InputError unless `data` is UTF-8 text, as a word-level corpus must be."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{source}: not UTF-8 text (byte {e.start:,}); --words needs text, "
                         f"or leave it out for a byte-level corpus") from None


def _held_out_lines(data, held):
    """{split: memoryview} cut at line starts: test from the start of the line holding the
    last ``held`` bytes, valid from that of the line ``held`` bytes before it."""
    def line_start(pos):
        return data.rfind(b"\n", 0, max(pos, 0)) + 1

    test = line_start(len(data) - held)
    valid = line_start(test - held)
    view = memoryview(data)
    return {"train": view[:valid], "valid": view[valid:test], "test": view[test:]}


def _write_nonempty(out_dir, parts, words=False):
    for split, part in parts.items():
        if not (bytes(part).strip() if words else len(part)):
            raise InputError(f"the {split} split would be "
                             f"{'without words' if words else 'empty'}; give more text")
    _write_splits(out_dir, parts, byte_level=not words)
    return parts


def unseen_words(parts):
    """How many tokens of valid and test never occur in train (each line's whitespace-
    separated tokens, as data.py reads them)."""
    vocabulary = set(bytes(parts["train"]).decode("utf-8").split())
    return sum(token not in vocabulary for split in ("valid", "test")
               for token in bytes(parts[split]).decode("utf-8").split())


ARCHIVES = {
    "enwik8": ("enwik8.zip: the first 10^8 bytes of a Wikipedia dump, in the byte format",
               lambda a: prepare_enwik8(a.archive, a.outdir, a.split)),
    "text8": ("text8.zip, in the byte format", lambda a: prepare_text8(a.archive, a.outdir, a.split)),
    "wikitext": ("a wikitext-2 or wikitext-103 zip: tokens copied (word level), raw in the byte "
                 "format (character level)", lambda a: prepare_wikitext(a.archive, a.outdir)),
    "ptb": ("simple-examples.tgz: Penn Treebank words, copied",
            lambda a: prepare_ptb(a.archive, a.outdir)),
    "ptbchar": ("simple-examples.tgz: Penn Treebank characters, copied",
                lambda a: prepare_ptb(a.archive, a.outdir, char=True)),
}


def build_parser():
    parser = Parser(
        prog="prepare.py", description="Write a corpus folder (train.txt, valid.txt, test.txt) "
                                       "from your own files or a downloaded archive.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    text = commands.add_parser(
        "text", help="your own files (text or any bytes) -> a byte-level corpus (or, with "
                     "--words, a word-level one)",
        description="Write OUTDIR/train.txt, valid.txt and test.txt in the byte format (one "
                    "decimal value per byte) from PATHs: files, and folders read recursively, "
                    "all concatenated in sorted order of their paths, then split in order: the "
                    "last FRACTION of the bytes is the test split, the FRACTION before it the "
                    "valid split. Or give the three splits by name with --train, --valid and "
                    "--test. With --words the text is copied as it is, a word-level corpus "
                    "(cut at line starts). Then: "
                    + script_command("main.py", "--data", "OUTDIR", launcher=["-u"]))
    text.add_argument("paths", metavar="PATH", nargs="*", help="files or folders")
    text.add_argument("outdir", metavar="OUTDIR", help="new folder to write (created if needed)")
    text.add_argument("--fraction", type=float, default=0.05,
                      help="the share of the bytes in each of valid and test (default 0.05)")
    text.add_argument("--words", action="store_true",
                      help="a word-level corpus: UTF-8 text copied as it is, its whitespace-"
                           "separated tokens the words and each line ending in an end-of-line "
                           "token <eos> (the WikiText and Penn Treebank format); the splits are "
                           "cut at line starts")
    for split in SPLITS:
        text.add_argument(f"--{split}", metavar="PATH", default=None,
                          help=f"the {split} split as it is (a file or a folder), with the other two")
    for name, (what, _) in ARCHIVES.items():
        sub = commands.add_parser(name, help=what, description=f"Write OUTDIR from {what}.")
        sub.add_argument("archive", metavar="ARCHIVE", help="the downloaded archive")
        sub.add_argument("outdir", metavar="OUTDIR", help="folder to write (created if needed)")
        if name in ("enwik8", "text8"):
            sub.add_argument("--split", type=int, default=5_000_000,
                             help="bytes in each of valid and test (default 5000000)")
    return parser


def run_text(args):
    named = [getattr(args, split) for split in SPLITS]
    if any(named):
        if not all(named) or args.paths:
            raise InputError("give the three splits by name (--train, --valid and --test) and "
                             "no other PATH, or PATHs to split")
        parts = prepare_splits(*named, args.outdir, words=args.words)
    elif not args.paths:
        raise InputError("give the files or folders to read (PATH ... OUTDIR)")
    else:
        parts = prepare_text(args.paths, args.outdir, args.fraction, words=args.words)
    unseen = unseen_words(parts) if args.words else 0
    if unseen:
        print(f"valid and test hold {unseen:,} tokens that train never has: main.py needs "
              f"--unk, which reads them as <unk>")
    save = Path(args.outdir).name + ".pt"
    print("Next: " + script_command("main.py", "--recipe", "cpu-small", "--data", args.outdir,
                                    "--save", save, *(["--unk"] if unseen else []),
                                    launcher=["-u"]))


def main(argv=None):
    args = build_parser().parse_args(argv)
    run = run_text if args.command == "text" else ARCHIVES[args.command][1]
    return run_script(run, args, errors=(InputError, OSError))


if __name__ == "__main__":
    sys.exit(main())
