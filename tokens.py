"""Turning a split file into token ids, and the training split into a vocabulary.

Each line of a file gives its whitespace-separated tokens followed by ``<eos>``, as
``line.split() + ['<eos>']`` in text mode (docs/model.md, Corpus and vocabulary). Two
tokenizers compute exactly that: a vectorised one for pure-ASCII files whose tokens have at
most 8 bytes (the enwik8 byte format among them: 90M tokens in seconds), and a line-by-line
one for any UTF-8 text, used when the first does not apply.
"""

from array import array
from collections import Counter

import numpy as np
import torch

from flags import InputError

EOS = "<eos>"
UNK = "<unk>"
NEWLINE = 10  # the newline byte: a line break, <eos>
MAX_KEY_BYTES = 8  # longest token the fast tokenizer packs into one uint64 key
TOKENIZE_CHUNK = 1 << 22  # bytes of text tokenised per step by the fast tokenizer

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


# --- a split's ids, by whichever tokenizer applies -----------------------------------------

def train_vocab_and_ids(path):
    """(words, ids) of the training split: the vocabulary in id order and its [N] ids
    (an integer numpy array)."""
    chunks = _read_key_chunks(path)
    if chunks is not None:
        return _vocab_from_chunks(chunks)
    words = _vocab_from_text(path)
    return words, _ids_from_text(path, {word: i for i, word in enumerate(words)}, None)


def split_ids(path, word2idx, unk_id):
    """[N] ids (an integer numpy array) of a held-out split, by the fast tokenizer when it
    applies."""
    chunks = _read_key_chunks(path)
    ids = None if chunks is None else _ids_from_chunks(chunks, word2idx, unk_id)
    if ids is None:  # not fast-path text, or an unseen token whose line the Python path reports
        ids = _ids_from_text(path, word2idx, unk_id)
    return ids
