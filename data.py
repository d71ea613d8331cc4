"""Language-model corpora: the vocabulary, the three splits as token ids (cached), batching
and decoding.

A corpus is a folder with train.txt, valid.txt and test.txt (docs/model.md, Corpus and
vocabulary); prepare.py writes one from a downloaded archive or from your own files. Each
line of a split gives its whitespace-separated tokens followed by ``<eos>`` (tokens.py).
"""

import contextlib
import hashlib
from pathlib import Path

import torch

import utils
from flags import InputError
from tokens import EOS, UNK, compact_dtype, split_ids, train_vocab_and_ids
from utils import remove_stale_temporaries

SPLITS = ("train", "valid", "test")
CACHE_NAME = "corpus.cache.pt"
CACHE_VERSION = 2
BYTE_TOKENS = frozenset(str(b) for b in range(256))


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


# --- building a corpus -------------------------------------------------------------------

def _split_files(folder):
    """{split: path} of a corpus folder; InputError when the folder or a file is missing."""
    if not folder.is_dir():
        raise InputError(f"{folder}: data folder not found")
    files = {split: folder / f"{split}.txt" for split in SPLITS}
    for path in files.values():
        try:
            path.stat()  # follows links: a loop or a dangling link fails here
        except FileNotFoundError:
            raise InputError(f"{path}: split file not found (a corpus folder needs "
                             f"train.txt, valid.txt and test.txt)") from None
        except OSError as e:
            raise InputError(f"{path}: {e.strerror} (a split must be a readable file)") from None
        if path.is_dir():
            raise InputError(f"{path} is a folder; a split must be a file")
        if not path.is_file():
            raise InputError(f"{path} is not a regular file; a split must be a file")
    return files


def _check_not_empty(ids, path):
    if ids.size == 0:
        raise InputError(f"{path}: empty split (no tokens)")
    return ids


def _build(files, unk):
    """Tokenise the three splits: {"idx2word": [...], split: compact id tensor, ...}."""
    words, train = train_vocab_and_ids(files["train"])
    _check_not_empty(train, files["train"])
    dictionary = Dictionary(words)
    unk_id = dictionary.add_word(UNK) if unk else None
    ids = {"train": train}
    for split in ("valid", "test"):
        ids[split] = _check_not_empty(split_ids(files[split], dictionary.word2idx, unk_id),
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
        utils.atomic_save(state, str(path))


def split_files(folder):
    """The files prepare.py writes into a corpus folder: the splits and their raw bytes."""
    return [str(Path(folder) / f"{split}.txt{raw}") for split in SPLITS for raw in ("", ".raw")]


def corpus_files(folder):
    """The files a corpus folder holds: the splits, their raw bytes and the cache."""
    return split_files(folder) + [str(Path(folder) / CACHE_NAME)]


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
        self._cache_path = cache_path if cache else None
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
        have passed, so that a refused run leaves nothing behind), and remove the temporary
        files of cache writers killed mid-write (a live writer's, another run building the
        same cache, is left alone)."""
        if self._cache_path:
            with contextlib.suppress(OSError):
                remove_stale_temporaries(str(self._cache_path))
        if self._unsaved:
            _save_cache(*self._unsaved)
            self._unsaved = None


# --- batching (docs/model.md, Batching) ----------------------------------------------------

def batchify(data, bsz, name="the data"):
    """[N] ids -> [N // bsz, bsz], same dtype: column j is the j-th contiguous slice of the
    stream, and the tail that does not fill a whole row is dropped. `name` says which
    split, in the error for one too short."""
    if bsz < 1:
        raise InputError(f"batch size must be at least 1, got {bsz}")
    nrows = data.shape[0] // bsz
    if nrows < 2:
        raise InputError(f"batch size {bsz} is too large for {data.shape[0]} tokens of {name}: "
                         f"each of the {bsz} columns needs at least 2 tokens (one input/target "
                         f"pair)")
    return data[: nrows * bsz].reshape(bsz, nrows).t().contiguous()


def get_batch(source, i, seq_len):
    """Inputs source[i:i+L] and targets source[i+1:i+1+L], both int64 [L, B], with L cut so
    that the targets stay inside ``source``."""
    seq_len = min(seq_len, len(source) - 1 - i)
    x = source[i: i + seq_len].long()
    y = source[i + 1: i + 1 + seq_len].long()
    return x, y



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
