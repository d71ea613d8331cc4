"""Tests of data.py: the vocabulary a corpus assembles (<unk>, byte level), the errors of a
corpus folder, the cache, batching and decoding, and the shipped sample corpus. The
tokenizer's own tests are in test_tokens.py, the preparation of corpora in test_prepare.py."""

import os
from pathlib import Path

import pytest
import torch

import data
import utils
from conftest import ROOT, ids, make_corpus
from flags import InputError


# --- vocabulary --------------------------------------------------------------------------

def test_unk_is_appended_and_takes_unseen_tokens(tmp_path, tokenizer):
    folder = make_corpus(tmp_path, "a b\n", "zz a longword\n", "b\n")
    corpus = data.Corpus(folder, unk=True, cache=False)
    assert corpus.dictionary.idx2word == ["a", "b", "<eos>", "<unk>"]
    assert ids(corpus.valid) == [3, 0, 3, 2]
    assert ids(corpus.test) == [1, 2]


def test_unk_already_in_train_keeps_its_id(tmp_path, tokenizer):
    corpus = data.Corpus(make_corpus(tmp_path, "<unk> a <unk>\n", "q\n", "a\n"), unk=True,
                         cache=False)
    assert corpus.dictionary.idx2word == ["<unk>", "a", "<eos>"]
    assert ids(corpus.valid) == [0, 2]


def test_byte_format_corpus_is_byte_level(tmp_path, tokenizer):
    corpus = data.Corpus(make_corpus(tmp_path, "104 105 \n 104", "105\n", "104\n"),
                         cache=False)
    assert corpus.byte_level
    assert corpus.dictionary.idx2word == ["104", "<eos>", "105"]
    assert data.decode_tokens(corpus.train, corpus.dictionary.idx2word, True) == b"hi\nh\n"


@pytest.mark.parametrize("name", ["train", "valid", "test"])
def test_empty_split_is_an_error(tmp_path, name):
    texts = {"train": "a\n", "valid": "a\n", "test": "a\n", name: ""}
    folder = make_corpus(tmp_path, **texts)
    with pytest.raises(InputError, match=f"{name}.txt: empty split"):
        data.Corpus(folder, cache=False)


def test_missing_folder_and_missing_split_file(tmp_path):
    with pytest.raises(InputError, match="nowhere: data folder not found"):
        data.Corpus(tmp_path / "nowhere")
    folder = make_corpus(tmp_path / "c", "a\n")
    (folder / "test.txt").unlink()
    with pytest.raises(InputError, match=r"test\.txt: split file not found"):
        data.Corpus(folder)


def test_dictionary_add_word_keeps_existing_ids():
    dictionary = data.Dictionary(["x", "y"])
    assert dictionary.add_word("y") == 1
    assert dictionary.add_word("z") == 2
    assert len(dictionary) == 3 and dictionary.idx2word == ["x", "y", "z"]


# --- cache -------------------------------------------------------------------------------

def test_cache_is_used_on_the_second_load(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b a\n", "b\n", "a\n")
    first = data.Corpus(folder)
    assert (folder / data.CACHE_NAME).is_file()
    monkeypatch.setattr(data, "_build", lambda *args: pytest.fail("the corpus was rebuilt"))
    second = data.Corpus(folder)
    assert second.dictionary.idx2word == first.dictionary.idx2word == ["a", "b", "<eos>"]
    assert ids(second.train) == ids(first.train) == [0, 1, 0, 2]
    assert second.train.dtype == torch.int64


def test_cache_stores_compact_ids(tmp_path):
    folder = make_corpus(tmp_path, "a b a\n", "b\n", "a\n")
    data.Corpus(folder)
    state = torch.load(folder / data.CACHE_NAME, weights_only=True)
    assert state["train"].dtype == torch.uint8
    assert state["idx2word"] == ["a", "b", "<eos>"]


def count_builds(monkeypatch):
    calls = []
    build = data._build

    def counting(*args):
        calls.append(args)
        return build(*args)
    monkeypatch.setattr(data, "_build", counting)
    return calls


def test_cache_is_rebuilt_when_a_file_changes_size(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    data.Corpus(folder)
    calls = count_builds(monkeypatch)
    (folder / "valid.txt").write_text("b b a\n")
    corpus = data.Corpus(folder)
    assert len(calls) == 1
    assert ids(corpus.valid) == [1, 1, 0, 2]
    data.Corpus(folder)
    assert len(calls) == 1  # the rebuilt cache was written back


def test_cache_follows_the_content_not_the_mtime(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    data.Corpus(folder)
    calls = count_builds(monkeypatch)
    info = (folder / "test.txt").stat()
    os.utime(folder / "test.txt", ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000))
    data.Corpus(folder)
    assert len(calls) == 0  # same bytes: the cache holds
    (folder / "test.txt").write_text("a\n")  # same size, other bytes, mtime put back
    os.utime(folder / "test.txt", ns=(info.st_atime_ns, info.st_mtime_ns))
    assert ids(data.Corpus(folder).test) == [0, 2]
    assert len(calls) == 1


def test_cache_with_an_id_outside_the_vocabulary_is_rebuilt(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    data.Corpus(folder)
    state = torch.load(folder / data.CACHE_NAME, weights_only=True)
    state["valid"][0] = 250  # no such token
    torch.save(state, folder / data.CACHE_NAME)
    calls = count_builds(monkeypatch)
    assert ids(data.Corpus(folder).valid) == [0, 2]
    assert len(calls) == 1


def test_cache_depends_on_unk(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    data.Corpus(folder)
    calls = count_builds(monkeypatch)
    assert data.Corpus(folder, unk=True).dictionary.idx2word[-1] == "<unk>"
    assert len(calls) == 1


def test_corrupt_cache_is_rebuilt_and_replaced(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    (folder / data.CACHE_NAME).write_bytes(b"not a torch file")
    calls = count_builds(monkeypatch)
    corpus = data.Corpus(folder)
    assert len(calls) == 1
    assert corpus.dictionary.idx2word == ["a", "b", "<eos>"]
    state = torch.load(folder / data.CACHE_NAME, weights_only=True)
    assert state["idx2word"] == ["a", "b", "<eos>"]
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_cache_false_neither_reads_nor_writes(tmp_path, monkeypatch):
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    data.Corpus(folder, cache=False)
    assert not (folder / data.CACHE_NAME).exists()
    data.Corpus(folder)
    monkeypatch.setattr(data, "_load_cache", lambda *args: pytest.fail("the cache was read"))
    assert data.Corpus(folder, cache=False).dictionary.idx2word == ["a", "b", "<eos>"]


def test_unwritable_folder_skips_the_cache(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(utils, "atomic_save", refuse)
    folder = make_corpus(tmp_path, "a b\n", "a\n", "b\n")
    assert ids(data.Corpus(folder).train) == [0, 1, 2]
    assert not (folder / data.CACHE_NAME).exists()


# --- batching ----------------------------------------------------------------------------

def test_batchify_makes_contiguous_columns_and_drops_the_tail():
    stream = torch.arange(23, dtype=torch.uint8)
    batched = data.batchify(stream, 4)  # 5 rows; tokens 20, 21, 22 are dropped
    assert batched.dtype == torch.uint8
    assert batched.is_contiguous()
    assert batched.tolist() == [[0, 5, 10, 15], [1, 6, 11, 16], [2, 7, 12, 17],
                                [3, 8, 13, 18], [4, 9, 14, 19]]


def test_batchify_needs_two_rows():
    with pytest.raises(InputError, match="batch size 4 is too large for 7 tokens"):
        data.batchify(torch.arange(7), 4)
    assert data.batchify(torch.arange(8), 4).shape == (2, 4)


def test_get_batch_shifts_targets_and_cuts_the_last_batch():
    source = data.batchify(torch.arange(20, dtype=torch.int16), 4)  # [5, 4]
    x, y = data.get_batch(source, 0, 3)
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [[0, 5, 10, 15], [1, 6, 11, 16], [2, 7, 12, 17]]
    assert y.tolist() == [[1, 6, 11, 16], [2, 7, 12, 17], [3, 8, 13, 18]]
    x, y = data.get_batch(source, 3, 3)  # only 5 - 1 - 3 = 1 step left
    assert x.tolist() == [[3, 8, 13, 18]]
    assert y.tolist() == [[4, 9, 14, 19]]


def test_decode_tokens():
    bytes_vocab = ["<eos>", "104", "105", "<unk>"]
    assert data.decode_tokens(torch.tensor([[1], [2], [0], [1]]), bytes_vocab, True) == b"hi\nh"
    assert data.decode_tokens([3, 2], bytes_vocab, True) == b"<unk>i"
    words = ["<eos>", "the", "cat"]
    assert data.decode_tokens([1, 2, 0, 2, 0], words, False) == "the cat\ncat\n"
    assert data.decode_tokens(torch.tensor([2, 0, 1]), words, False) == "cat\nthe"


# --- the shipped sample corpus -----------------------------------------------------------

def test_sample_corpus_loads_and_stays_small():
    folder = Path(ROOT) / "data" / "sample"
    corpus = data.Corpus(folder, cache=False)
    assert corpus.byte_level
    assert corpus.train.shape[0] > 10 * corpus.valid.shape[0] > 0
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name != data.CACHE_NAME)
    assert size < 2_000_000
