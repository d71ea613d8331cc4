"""tokens.py: the vocabulary (by count, ties in order of first appearance, <eos> an ordinary
token), lines and whitespace as Python's text mode splits them, the fast tokenizer against
the Python one, a token train never has named by file and line, text that is not UTF-8, and
the compact dtype of the ids. Each runs through data.Corpus, most with both tokenizers."""

import random

import pytest
import torch

import data
import tokens
from conftest import ids, make_corpus
from flags import InputError


def test_vocabulary_by_frequency_then_first_appearance(tmp_path, tokenizer):
    # stream: b a c <eos> a b <eos> d <eos>; counts <eos> 3, b 2, a 2, c 1, d 1
    corpus = data.Corpus(make_corpus(tmp_path, "b a c\na b\nd\n", "a d\n", "c\n"), cache=False)
    assert corpus.dictionary.idx2word == ["<eos>", "b", "a", "c", "d"]
    assert corpus.dictionary.word2idx == {"<eos>": 0, "b": 1, "a": 2, "c": 3, "d": 4}
    assert ids(corpus.train) == [1, 2, 3, 0, 2, 1, 0, 4, 0]
    assert ids(corpus.valid) == [2, 4, 0]
    assert ids(corpus.test) == [3, 0]
    assert corpus.train.dtype == torch.int64
    assert not corpus.byte_level


def test_eos_is_an_ordinary_token_in_the_tie_order(tmp_path, tokenizer):
    # x, y and <eos> each occur twice: first appearances x (0), <eos> (1), y (2)
    corpus = data.Corpus(make_corpus(tmp_path, "x\ny x y\n", "y\n", "x\n"), cache=False)
    assert corpus.dictionary.idx2word == ["x", "<eos>", "y"]


def test_many_ties_keep_the_order_of_first_appearance(tmp_path, tokenizer):
    # 40 words of 3 to 8 bytes (both lookup routes), shuffled, seen 1, 2 or 3 times: more
    # ties than a small or uniform sort keeps in order by accident
    words = [f"t{i:02d}" + "x" * (i % 6) for i in range(40)]
    random.Random(3).shuffle(words)
    count = {word: 1 + i % 3 for i, word in enumerate(words)}
    lines = [words, [w for w in words if count[w] >= 2], [w for w in words if count[w] == 3]]
    train = "".join(" ".join(line) + "\n" for line in lines)
    folder = make_corpus(tmp_path, train, words[7] + "\n", words[0] + "\n")
    corpus = data.Corpus(folder, cache=False)
    count["<eos>"] = 3  # three lines; first seen after every word
    assert corpus.dictionary.idx2word == sorted(words + ["<eos>"], key=lambda w: -count[w])
    assert corpus.dictionary.idx2word[:2] == [words[2], words[5]]
    assert corpus.dictionary.idx2word[13:15] == ["<eos>", words[1]]


def test_every_line_ends_with_eos_including_empty_and_unterminated_ones(tmp_path, tokenizer):
    corpus = data.Corpus(make_corpus(tmp_path, "p q\n\n\nq", "q\n", "p"), cache=False)
    # p q <eos> <eos> <eos> q <eos>: the last line has no line break but still ends in <eos>
    assert corpus.dictionary.idx2word == ["<eos>", "q", "p"]
    assert ids(corpus.train) == [2, 1, 0, 0, 0, 1, 0]
    assert ids(corpus.test) == [2, 0]


def test_line_breaks_and_whitespace_follow_python_text_mode(tmp_path, tokenizer):
    # \r\n and a lone \r end lines; \t \v \f and \x1c-\x1f separate tokens within a line
    text = "a\r\nb\rc\td\x0be\x0cf\x1cg\x1dh\x1ei\x1fj k\r\r\n"
    corpus = data.Corpus(make_corpus(tmp_path, text, "a\n", "a\n"), cache=False)
    words = [corpus.dictionary.idx2word[i] for i in ids(corpus.train)]
    assert words == ["a", "<eos>", "b", "<eos>", "c", "d", "e", "f", "g", "h", "i", "j", "k",
                     "<eos>", "<eos>"]


def test_eos_written_out_is_the_same_token_as_a_line_break(tmp_path, tokenizer):
    corpus = data.Corpus(make_corpus(tmp_path, "a <eos> a\n"), cache=False)
    assert corpus.dictionary.idx2word == ["a", "<eos>"]
    assert ids(corpus.train) == [0, 1, 0, 1]


def tricky_text(rng, n):
    tokens = ["a", "b", "ab", "abc", "12", "255", "xxxxxxxx", "z\x00", "\x01", "<eos>", "<unk>",
              "~"]
    gaps = [" ", "  ", "\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\r\n", "\r",
            "\n", "\n\n", "\r\r\n", " \n "]
    return "".join(rng.choice(tokens) + rng.choice(gaps) for _ in range(n)) + "last"


@pytest.mark.parametrize("chunk", [1 << 22, 37])
def test_fast_tokenizer_equals_python_tokenizer(tmp_path, monkeypatch, chunk):
    """Ties, <eos> written out, NUL bytes, every whitespace kind, no final line break; with
    a tiny chunk size too, so that tokens meet chunk boundaries."""
    rng = random.Random(chunk)
    folder = make_corpus(tmp_path, tricky_text(rng, 4000), tricky_text(rng, 500),
                         tricky_text(rng, 500))
    monkeypatch.setattr(tokens, "TOKENIZE_CHUNK", chunk)
    assert tokens._read_key_chunks(folder / "train.txt") is not None  # the fast path applies
    fast = data.Corpus(folder, cache=False)
    monkeypatch.setattr(tokens, "_read_key_chunks", lambda path: None)
    slow = data.Corpus(folder, cache=False)
    assert fast.dictionary.idx2word == slow.dictionary.idx2word
    for split in data.SPLITS:
        assert torch.equal(getattr(fast, split), getattr(slow, split))
    assert len(fast.dictionary) == 13  # 11 words, "last" and <eos>
    assert fast.train.shape[0] > 4000


def test_non_ascii_text_uses_python_whitespace(tmp_path):
    # \xa0 (no-break space) and \u3000 split words; \u2028 splits but does not end the line
    corpus = data.Corpus(make_corpus(tmp_path, "é\xa0b\u3000c\u2028d\n", "b\n", "c\n"),
                         cache=False)
    assert corpus.dictionary.idx2word == ["é", "b", "c", "d", "<eos>"]
    assert ids(corpus.train) == [0, 1, 2, 3, 4]


def test_tokens_longer_than_eight_bytes(tmp_path):
    corpus = data.Corpus(make_corpus(tmp_path, "abcdefghij k abcdefghij\n", "k\n", "k\n"),
                         cache=False)
    assert corpus.dictionary.idx2word == ["abcdefghij", "k", "<eos>"]
    assert ids(corpus.valid) == [1, 2]


@pytest.mark.parametrize("fast", [True, False])
def test_unseen_token_names_token_file_and_line(tmp_path, monkeypatch, fast):
    if not fast:
        monkeypatch.setattr(tokens, "_read_key_chunks", lambda path: None)
    folder = make_corpus(tmp_path, "a b\n", "a\nb a\nb zz a\n", "a\n")
    with pytest.raises(InputError) as error:
        data.Corpus(folder, cache=False)
    message = str(error.value)
    assert "'zz'" in message
    assert str(folder / "valid.txt") in message
    assert "line 3" in message
    assert "--unk" in message and "<unk>" in message


def test_text_that_is_not_utf8_is_an_error(tmp_path):
    folder = make_corpus(tmp_path, b"caf\xe9\n")
    with pytest.raises(InputError, match=r"train\.txt: not UTF-8 text"):
        data.Corpus(folder, cache=False)


@pytest.mark.parametrize("ntokens, dtype", [
    (1, torch.uint8), (256, torch.uint8), (257, torch.int16), (32768, torch.int16),
    (32769, torch.int32), (2 ** 31, torch.int32), (2 ** 31 + 1, torch.int64)])
def test_compact_dtype(ntokens, dtype):
    assert tokens.compact_dtype(ntokens) == dtype
