"""Language-model corpora: tokenising, vocabulary, cache, batching and dataset preparation.

A corpus is a folder with train.txt, valid.txt and test.txt (docs/model.md, Corpus and vocabulary). Each line
of a split gives its whitespace-separated tokens followed by ``<eos>``. The enwik8 "byte
format" writes every byte as its decimal value, values separated by single spaces, and a
newline byte as a real line break; its vocabulary is the decimal byte values plus ``<eos>``.

Command line: ``python data.py prepare NAME ARCHIVE OUTDIR`` turns a downloaded archive
(enwik8, text8, WikiText, Penn Treebank) into such a folder, and ``python data.py text FILE
OUTDIR`` does the same for any file of your own (byte level, split 90/5/5).
"""

import argparse
import contextlib
import hashlib
import os
import sys
import tarfile
import zipfile
from array import array
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from checkpoint import atomic_save
from flags import TEST_BATCH_SIZE, InputError, eval_batch_size

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
WRITE_ORDER = ("valid", "test", "train")  # train.txt last: its presence marks a finished folder
CACHE_NAME = "corpus.cache.pt"
CACHE_VERSION = 2
BYTE_TOKENS = frozenset(str(b) for b in range(256))
NEWLINE = 10
MAX_KEY_BYTES = 8  # longest token the fast tokenizer packs into one uint64 key
WRITE_CHUNK = 1 << 22  # bytes converted per step by the byte-format writer
TOKENIZE_CHUNK = 1 << 22  # bytes of text tokenised per step by the fast tokenizer
DATASETS = ("enwik8", "text8", "wikitext", "ptb", "ptbchar")


def _frozen(values):
    """A numpy array made read-only, for module constants."""
    values = np.asarray(values)
    values.flags.writeable = False
    return values


# str.split() whitespace among the ASCII characters: \t \n \v \f \r, \x1c-\x1f and space.
_ASCII_SPACE = _frozen([chr(c).isspace() for c in range(128)])
# _KEY_MASK[n] keeps the low n bytes of a uint64.
_KEY_MASK = _frozen(np.array([(1 << (8 * n)) - 1 for n in range(MAX_KEY_BYTES + 1)], np.uint64))
_KEY_ONES = np.uint64(0x0101010101010101)


def _byte_piece_table():
    """[256, 4] uint8 rows holding each byte's text in the byte format plus its separator,
    and [256] row lengths: "65 " for 65, "\\n " for a newline byte."""
    pieces = [(b"\n" if c == NEWLINE else str(c).encode()) + b" " for c in range(256)]
    table = np.zeros((256, 4), np.uint8)
    for c, piece in enumerate(pieces):
        table[c, : len(piece)] = list(piece)
    return _frozen(table), _frozen([len(piece) for piece in pieces])


_BYTE_PIECES, _BYTE_PIECE_LEN = _byte_piece_table()


# --- vocabulary ----------------------------------------------------------------------------

class Dictionary:
    """Token <-> id maps; a token's id is its position in ``idx2word``."""

    def __init__(self, words=()):
        self.idx2word = []
        self.word2idx = {}
        for word in words:
            self.add_word(word)

    def add_word(self, word):
        """The id of ``word``, appending it at the end if it is new."""
        if word not in self.word2idx:
            self.word2idx[word] = len(self.idx2word)
            self.idx2word.append(word)
        return self.word2idx[word]

    def __len__(self):
        return len(self.idx2word)


def is_byte_vocabulary(words):
    """True when every entry but <eos>/<unk> is a decimal byte value "0".."255"."""
    return all(word in BYTE_TOKENS or word in (EOS, UNK) for word in words)


def compact_dtype(ntokens):
    """The smallest of uint8, int16, int32, int64 that holds every id below ``ntokens``."""
    for dtype, limit in ((torch.uint8, 1 << 8), (torch.int16, 1 << 15), (torch.int32, 1 << 31)):
        if ntokens <= limit:
            return dtype
    return torch.int64


def _numpy_dtype(dtype):
    """The numpy equivalent of a torch dtype."""
    return torch.empty(0, dtype=dtype).numpy().dtype


# --- fast tokenizer: pure-ASCII files whose tokens have at most 8 bytes ------------------
#
# Each token becomes a uint64 key: byte k of the key (little-endian) is byte k of the token
# plus one, so padding zeros cannot be confused with a NUL inside a token and no token's
# key is 0. Key 0 stands for <eos>: every line break, and the word "<eos>" written out.

def _pack(data):
    return int.from_bytes(bytes(b + 1 for b in data), "little")


EOS_KEY = 0
_EOS_WORD_KEY = _pack(EOS.encode())
_NO_KEY = (1 << 64) - 1  # above every key (each key byte is at most 0x80): a sentinel
SMALL_KEYS = 1 << 24  # keys of tokens of up to 3 bytes, looked up in a direct table


def _word_key(word):
    """The key of a token, or None for a token the fast tokenizer never produces."""
    if word == EOS:
        return EOS_KEY
    data = word.encode("utf-8")
    if not data.isascii() or not 0 < len(data) <= MAX_KEY_BYTES:
        return None
    return _pack(data)


def _key_word(key):
    """The token of a key (inverse of _word_key)."""
    if key == EOS_KEY:
        return EOS
    return bytes(b - 1 for b in int(key).to_bytes(8, "little") if b).decode("ascii")


def _universal_newlines(raw):
    """Bytes with \\r\\n and lone \\r turned into \\n, as Python's text mode reads them."""
    if b"\r" not in raw:
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _read_key_chunks(path):
    """The tokens of a file as a list of uint64 key arrays, one per TOKENIZE_CHUNK bytes of
    text; None when the file is not pure ASCII or has a token longer than 8 bytes (the
    caller then uses the line-by-line Python tokenizer).

    Same tokens as ``line.split() + ['<eos>']`` for each line of the file in text mode: a
    token is a maximal run of non-whitespace bytes, and every line break is an <eos>."""
    raw = path.read_bytes()
    if not raw.isascii():
        return None
    raw = _universal_newlines(raw)
    if raw and not raw.endswith(b"\n"):
        raw += b"\n"
    text = np.frombuffer(raw, np.uint8)
    buffer = np.zeros(TOKENIZE_CHUNK + MAX_KEY_BYTES, np.uint8)  # zero tail pads the windows
    chunks = []
    start = 0
    while start < text.size:
        stop = _chunk_end(text, start)
        keys = None if stop is None else _chunk_keys(text[start:stop], buffer)
        if keys is None:
            return None
        chunks.append(keys)
        start = stop
    return chunks


def _chunk_end(text, start):
    """Where the chunk from ``start`` ends: just after its last whitespace byte. None when
    its last 9 bytes are all non-whitespace, i.e. it ends inside a token of over 8 bytes."""
    stop = start + TOKENIZE_CHUNK
    if stop >= text.size:
        return text.size  # the text ends with a line break
    tail = np.flatnonzero(_ASCII_SPACE[text[stop - MAX_KEY_BYTES - 1: stop]])
    if tail.size == 0:
        return None
    return stop - MAX_KEY_BYTES - 1 + int(tail[-1]) + 1


def _chunk_keys(chars, buffer):
    """Keys [T] uint64 of the tokens of ``chars`` ([n] ASCII bytes that begin at a token
    boundary and end with whitespace), or None when a token is longer than 8 bytes."""
    n = chars.size
    buffer[:n] = chars
    buffer[n: n + MAX_KEY_BYTES] = 0
    space = _ASCII_SPACE[chars]  # [n] bool, line breaks included
    word = ~space
    starts = word.copy()
    starts[1:] &= space[:-1]  # first byte of each word
    word_starts = np.flatnonzero(starts)
    word_lengths = np.flatnonzero(word[:-1] & space[1:]) + 1 - word_starts
    if word_lengths.size and word_lengths.max() > MAX_KEY_BYTES:
        return None
    positions = np.flatnonzero(starts | (chars == NEWLINE))  # [T] first byte of each token
    eos = chars[positions] == NEWLINE
    lengths = np.zeros(positions.size, np.intp)
    lengths[~eos] = word_lengths
    windows = np.ndarray((n,), dtype="<u8", buffer=buffer, strides=(1,))  # 8 bytes from each offset
    # Every byte is below 128, so adding one to each byte never carries into the next.
    keys = (windows[positions] + _KEY_ONES) & _KEY_MASK[lengths]
    keys[eos] = EOS_KEY
    keys[keys == _EOS_WORD_KEY] = EOS_KEY
    return keys


class _KeyIndex:
    """Token key -> id: a direct table for keys below SMALL_KEYS (tokens of up to 3 bytes,
    as in the byte format, looked up in one gather), binary search for the others."""

    def __init__(self):
        # id + 1 by key, 0 where absent; zero pages cost nothing until they are written
        self._table = np.zeros(SMALL_KEYS, np.int32)
        self._keys = np.array([_NO_KEY], np.uint64)  # sorted; the sentinel stays last
        self._ids = np.array([-1], np.int32)

    def add(self, keys, ids):
        """Add keys [K] uint64 (not yet in the index) with their ids [K]."""
        small = keys < SMALL_KEYS
        self._table[keys[small]] = ids[small] + 1
        all_keys = np.concatenate([self._keys, keys])
        order = np.argsort(all_keys)
        self._keys = all_keys[order]
        self._ids = np.concatenate([self._ids, ids.astype(np.int32)])[order]

    def lookup(self, keys):
        """Ids [N] int32 of keys [N] uint64; -1 for keys not in the index."""
        if keys.size and keys.max() < SMALL_KEYS:
            return self._table[keys] - 1
        slot = np.searchsorted(self._keys, keys)  # < len(self._keys): every key < _NO_KEY
        ids = self._ids[slot]
        ids[self._keys[slot] != keys] = -1
        return ids


def _in_order_of_appearance(keys):
    """The distinct values of ``keys`` in order of first appearance."""
    distinct, first = np.unique(keys, return_index=True)
    return distinct[np.argsort(first)]


def _vocab_from_chunks(chunks):
    """Vocabulary of a keyed token stream and the stream's ids.

    Returns (words, ids): words by descending count, ties in order of first appearance;
    ids [N] in the compact dtype of the vocabulary. Keys get codes in order of first
    appearance as the chunks are read, so a stable sort by count gives the tie order."""
    index = _KeyIndex()
    seen = []  # keys by code
    codes = []  # per chunk: [T] int32
    counts = np.zeros(0, np.int64)
    for keys in chunks:
        ids = index.lookup(keys)
        unknown = ids < 0
        if unknown.any():
            new = _in_order_of_appearance(keys[unknown])
            index.add(new, np.arange(len(seen), len(seen) + new.size))
            seen.extend(new.tolist())
            ids = index.lookup(keys)
        counts = np.pad(counts, (0, len(seen) - counts.size))  # room for the new codes
        counts += np.bincount(ids, minlength=len(seen))
        codes.append(ids)
    order = np.argsort(-counts, kind="stable")  # vocabulary id -> code
    rank = np.empty(len(seen), _numpy_dtype(compact_dtype(len(seen))))
    rank[order] = np.arange(len(seen))
    ids = np.concatenate([rank[chunk] for chunk in codes] or [rank[:0]])
    return [_key_word(seen[code]) for code in order], ids


def _ids_from_chunks(chunks, word2idx, unk_id):
    """Ids [N] int32 of a keyed token stream under an existing vocabulary. None when a
    token is not in it and there is no ``unk_id`` (the caller reports the token's line)."""
    index = _KeyIndex()
    known = [(key, idx) for word, idx in word2idx.items() if (key := _word_key(word)) is not None]
    if known:
        index.add(np.array([key for key, _ in known], np.uint64),
                  np.array([idx for _, idx in known], np.int32))
    ids = np.concatenate([index.lookup(keys) for keys in chunks] or [np.zeros(0, np.int32)])
    missing = ids < 0
    if missing.any():
        if unk_id is None:
            return None
        ids[missing] = unk_id
    return ids


# --- Python tokenizer: any UTF-8 text ----------------------------------------------------

def _lines(path):
    """The tokens of each line of a UTF-8 text file, each list ending with <eos>."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield line.split() + [EOS]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def _vocab_from_text(path):
    """Words of a file by descending count, ties in order of first appearance."""
    counts = Counter()
    for tokens in _lines(path):
        counts.update(tokens)
    return [word for word, _ in counts.most_common()]  # most_common keeps first-seen order on ties


def _ids_from_text(path, word2idx, unk_id):
    """[N] int64 ids of a file under an existing vocabulary, read line by line."""
    ids = array("q")
    for number, tokens in enumerate(_lines(path), 1):
        try:
            ids.extend([word2idx[token] for token in tokens])
        except KeyError as missing:
            if unk_id is None:
                raise _unseen_token_error(missing.args[0], path, number) from None
            ids.extend([word2idx.get(token, unk_id) for token in tokens])
    return np.frombuffer(ids, np.int64)


def _unseen_token_error(token, path, line):
    return InputError(f"{path}, line {line}: token {token!r} never occurs in train.txt; "
                      f"--unk maps such tokens to {UNK}")


# --- building a corpus -------------------------------------------------------------------

def _split_files(folder):
    """{split: path} of a corpus folder; InputError when the folder or a file is missing."""
    if not folder.is_dir():
        raise InputError(f"{folder}: data folder not found")
    files = {split: folder / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        if not path.is_file():
            raise InputError(f"{path}: split file not found (a corpus folder needs "
                             f"train.txt, valid.txt and test.txt)")
    return files


def _check_not_empty(ids, path):
    if ids.size == 0:
        raise InputError(f"{path}: empty split (no tokens)")
    return ids


def _train_vocab_and_ids(path):
    """(words, ids) of the training split: the vocabulary in id order and its [N] ids
    (an integer numpy array)."""
    chunks = _read_key_chunks(path)
    if chunks is not None:
        return _vocab_from_chunks(chunks)
    words = _vocab_from_text(path)
    return words, _ids_from_text(path, {word: i for i, word in enumerate(words)}, None)


def _split_ids(path, word2idx, unk_id):
    """[N] ids (an integer numpy array) of a held-out split, by the fast tokenizer when it
    applies."""
    chunks = _read_key_chunks(path)
    ids = None if chunks is None else _ids_from_chunks(chunks, word2idx, unk_id)
    if ids is None:  # not fast-path text, or an unseen token whose line the Python path reports
        ids = _ids_from_text(path, word2idx, unk_id)
    return ids


def _build(files, unk):
    """Tokenise the three splits: {"idx2word": [...], split: compact id tensor, ...}."""
    words, train = _train_vocab_and_ids(files["train"])
    _check_not_empty(train, files["train"])
    dictionary = Dictionary(words)
    unk_id = dictionary.add_word(UNK) if unk else None
    ids = {"train": train}
    for split in ("valid", "test"):
        ids[split] = _check_not_empty(_split_ids(files[split], dictionary.word2idx, unk_id),
                                      files[split])
    dtype = compact_dtype(len(dictionary))
    state = {split: torch.from_numpy(values).to(dtype) for split, values in ids.items()}
    state["idx2word"] = dictionary.idx2word
    return state


def fingerprint(path):
    """SHA-256 of a file's content (about 1 GB/s: a third of a second for enwik8's train)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(files, unk):
    """What the cache depends on: the content of each split and --unk."""
    return {"version": CACHE_VERSION, "unk": bool(unk),
            "files": {split: fingerprint(files[split]) for split in SPLITS}}


def _load_cache(path, key):
    """The cached corpus when the file exists, loads, and was built for ``key``; else None."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is rebuilt, whatever torch raises for it
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    if not isinstance(state.get("idx2word"), list):
        return None
    if not all(isinstance(state.get(split), torch.Tensor) for split in SPLITS):
        return None
    ntokens = len(state["idx2word"])
    if any(len(state[split]) and not 0 <= int(state[split].min()) <= int(state[split].max()) < ntokens
           for split in SPLITS):
        return None  # ids outside the vocabulary: a damaged cache is rebuilt
    return state


def _save_cache(path, state):
    """Write the cache atomically; an unwritable folder or a full disk just skips it."""
    with contextlib.suppress(OSError):
        atomic_save(state, str(path))


class Corpus:
    """The three splits of a corpus folder as 1-D int64 id tensors, and their vocabulary.

    The vocabulary comes from train.txt alone (docs/model.md). A valid/test token that
    never occurs in train is an InputError, unless ``unk``: then <unk> is added to the
    vocabulary (at the end, if train lacks it) and such tokens map to it. With ``cache``
    the processed corpus is kept in corpus.cache.pt beside the data."""

    def __init__(self, path, unk=False, cache=True, write_later=False):
        folder = Path(path)
        files = _split_files(folder)
        key = _cache_key(files, unk)
        cache_path = folder / CACHE_NAME
        state = _load_cache(cache_path, key) if cache else None
        self._unsaved = None
        if state is None:
            state = _build(files, unk)
            state["key"] = key
            if cache:
                self._unsaved = (cache_path, state)
                if not write_later:
                    self.write_cache()
        self.fingerprint = key["files"]  # {split: SHA-256 of the file}
        self.dictionary = Dictionary(state["idx2word"])
        self.train, self.valid, self.test = (state[split].long() for split in SPLITS)
        self.byte_level = is_byte_vocabulary(self.dictionary.idx2word)

    def write_cache(self):
        """Write the cache built by this load (with ``write_later``, once the caller's checks
        have passed, so that a refused run leaves nothing behind)."""
        if self._unsaved:
            _save_cache(*self._unsaved)
            self._unsaved = None


# --- batching (docs/model.md, Batching) ----------------------------------------------------

def batchify(data, bsz):
    """[N] ids -> [N // bsz, bsz], same dtype: column j is the j-th contiguous slice of the
    stream, and the tail that does not fill a whole row is dropped."""
    if bsz < 1:
        raise InputError(f"batch size must be at least 1, got {bsz}")
    nrows = data.shape[0] // bsz
    if nrows < 2:
        raise InputError(f"batch size {bsz} is too large for {data.shape[0]} tokens: each of "
                         f"the {bsz} columns needs at least 2 tokens (one input/target pair)")
    return data[: nrows * bsz].reshape(bsz, nrows).t().contiguous()


def get_batch(source, i, seq_len):
    """Inputs source[i:i+L] and targets source[i+1:i+1+L], both int64 [L, B], with L cut so
    that the targets stay inside ``source``."""
    seq_len = min(seq_len, len(source) - 1 - i)
    x = source[i: i + seq_len].long()
    y = source[i + 1: i + 1 + seq_len].long()
    return x, y


def split_columns(data, bsz, d, device):
    """Batchify a split with the global batch size and keep this rank's columns on device."""
    return batchify(data, bsz)[:, d.share(bsz)].contiguous().to(device)


def device_data(corpus, args, d, device):
    """The three splits batchified, this rank's columns, in a compact dtype on the device."""
    dtype = compact_dtype(len(corpus.dictionary))
    train = split_columns(corpus.train.to(dtype), args.batch_size, d, device)
    valid = split_columns(corpus.valid.to(dtype), eval_batch_size(args), d, device)
    test = split_columns(corpus.test.to(dtype), TEST_BATCH_SIZE, d, device)
    if args.bptt >= train.shape[0] - 1:
        raise InputError(f"--bptt {args.bptt} is longer than the training stream "
                         f"({train.shape[0]} tokens per column at batch size {args.batch_size})")
    return train, valid, test


def decode_tokens(ids, idx2word, byte_level):
    """Text of a sequence of ids. Byte level: the bytes themselves (<eos> -> b"\\n").
    Word level: a str of the words joined by spaces, with a line break for each <eos>."""
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    words = [idx2word[i] for i in ids]
    if byte_level:
        return b"".join(_token_bytes(word) for word in words)
    lines, line = [], []
    for word in words:
        if word == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(word)
    return "\n".join(lines + [" ".join(line)])


def _token_bytes(word):
    """The bytes a byte-level token stands for; other tokens (<unk>) as their text."""
    if word == EOS:
        return b"\n"
    if word in BYTE_TOKENS:
        return bytes([int(word)])
    return word.encode()


# --- dataset preparation -------------------------------------------------------------------

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


@contextlib.contextmanager
def _atomic_writer(path):
    """A binary file whose content replaces ``path`` only once the block has completed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_splits(out_dir, parts, byte_level):
    """Write {split: bytes} as train.txt/valid.txt/test.txt: copied as they are, or in the
    byte format with the raw bytes beside them in .raw files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in WRITE_ORDER:
        data = parts[split]
        target = out_dir / f"{split}.txt"
        if byte_level:
            with _atomic_writer(out_dir / f"{split}.txt.raw") as f:
                f.write(data)
            with _atomic_writer(target) as f:
                _write_byte_format(data, f)
            print(f"{split}: {len(data):,} bytes -> {target} (byte format) and {target.name}.raw")
        else:
            with _atomic_writer(target) as f:
                f.write(data)
            print(f"{split}: {len(data):,} bytes -> {target}")


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
    with _open_zip(zip_path) as archive:
        names = archive.namelist()
        suffix = "tokens" if _find_member(names, "wiki.train.tokens") else "raw"
        parts = {split: archive.read(_member(names, f"wiki.{split}.{suffix}", zip_path))
                 for split in SPLITS}
    _write_splits(out_dir, parts, byte_level=suffix == "raw")


def prepare_ptb(tgz_path, out_dir, char=False):
    """simple-examples.tgz -> Penn Treebank splits: ptb.{split}.txt (word level) or
    ptb.char.{split}.txt (character level), copied as they are."""
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


def prepare_text(files, out_dir, fraction=0.05):
    """Any text or binary files -> a byte-level corpus folder. Three files are train, valid
    and test as they are; one file is split in order: test = its last ``fraction``, valid
    = the ``fraction`` before, train = the rest. Refuses a folder that already holds a
    split, so that nothing is overwritten."""
    if len(files) not in (1, 3):
        raise InputError(f"give one file (split into train/valid/test) or three (train, valid, "
                         f"test), got {len(files)}")
    if not 0 < fraction < 0.5:
        raise InputError(f"--fraction must be between 0 and 0.5, got {fraction}")
    out = Path(out_dir)
    taken = [split for split in SPLITS if (out / f"{split}.txt").exists()]
    if taken:
        raise InputError(f"{out / (taken[0] + '.txt')} exists; choose a new folder")
    for path in files:
        if not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    data = [Path(path).read_bytes() for path in files]
    if len(files) == 3:
        parts = dict(zip(SPLITS, data))
    else:
        held = int(len(data[0]) * fraction)
        parts = _held_out_parts(data[0], held, files[0])
    for split, part in parts.items():
        if not len(part):
            raise InputError(f"the {split} split would be empty; give a larger file")
    _write_splits(out_dir, parts, byte_level=True)


def prepare(name, archive, out_dir, split=5_000_000):
    """Prepare dataset ``name`` (one of DATASETS) from its downloaded archive."""
    if name == "enwik8":
        prepare_enwik8(archive, out_dir, split)
    elif name == "text8":
        prepare_text8(archive, out_dir, split)
    elif name == "wikitext":
        prepare_wikitext(archive, out_dir)
    elif name in ("ptb", "ptbchar"):
        prepare_ptb(archive, out_dir, char=name == "ptbchar")
    else:
        raise InputError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="data.py", description="Corpus tools for the SHA-RNN language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser(
        "prepare", help="turn a downloaded archive into a corpus folder",
        description="Write OUTDIR/train.txt, valid.txt and test.txt from a downloaded ARCHIVE. "
                    "enwik8, text8 and the raw WikiText archives are written in the byte format "
                    "(one decimal value per byte, plus the raw bytes in .raw files); WikiText "
                    "tokens and Penn Treebank are copied as they are.")
    prep.add_argument("name", metavar="NAME", choices=DATASETS,
                      help="enwik8 (enwik8.zip), text8 (text8.zip), wikitext (a wikitext-2 or "
                           "wikitext-103 zip, tokens or raw), ptb or ptbchar "
                           "(simple-examples.tgz, word or character level)")
    prep.add_argument("archive", metavar="ARCHIVE", help="the downloaded archive")
    prep.add_argument("outdir", metavar="OUTDIR", help="folder to write (created if needed)")
    prep.add_argument("--split", type=int, default=5_000_000,
                      help="enwik8 and text8: bytes in each of valid and test (default 5000000)")
    text = commands.add_parser(
        "text", help="turn your own text (or any) files into a byte-level corpus folder",
        description="Write OUTDIR/train.txt, valid.txt and test.txt in the byte format (one "
                    "decimal value per byte) from FILE: one file is split in order, its last "
                    "FRACTION the test split and the FRACTION before it the valid split; three "
                    "files are train, valid and test as given. Then: python main.py --data OUTDIR")
    text.add_argument("files", metavar="FILE", nargs="+", help="one file, or three: train valid test")
    text.add_argument("outdir", metavar="OUTDIR", help="new folder to write (created if needed)")
    text.add_argument("--fraction", type=float, default=0.05,
                      help="one file: the share of its bytes in each of valid and test (default 0.05)")
    args = parser.parse_args(argv)
    try:
        if args.command == "text":
            prepare_text(args.files, args.outdir, args.fraction)
            return 0
        prepare(args.name, args.archive, args.outdir, args.split)
    except (InputError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
