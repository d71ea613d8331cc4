"""prepare.py: the byte format against the original's one-liner, the downloaded archives
(enwik8, text8, WikiText, PTB) and their errors, and own text: one file or three named
splits, many files in sorted order, the word format, and no half-written folder left on a
full disk."""

import errno
import io
import os
import random
import subprocess
import sys
import tarfile
import zipfile

import pytest

import data
import prepare
import utils
from conftest import ROOT, TEXT, line_of, make_text_corpus, sentences
from flags import InputError


def one_liner(raw):
    """The original prep script's byte format, the reference for the vectorised writer."""
    return " ".join(str(c) if c != 10 else "\n" for c in raw).encode()


# --- the byte format ---------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b"\n", b"A", b"\nA\n\nB\n", b"\n\n\x00\xff 9\n",
                                 bytes(range(256)) * 3])
def test_byte_format_matches_the_one_liner(raw):
    assert prepare.byte_format(raw) == one_liner(raw)


def test_byte_format_writer_across_chunks(tmp_path, monkeypatch):
    rng = random.Random(5)
    raw = bytes(rng.choice([10, 10, 32, 65, 0, 255, 7]) for _ in range(1000)) + b"\n"
    monkeypatch.setattr(prepare, "WRITE_CHUNK", 7)
    with open(tmp_path / "out.txt", "wb") as f:
        prepare._write_byte_format(raw, f)
    assert (tmp_path / "out.txt").read_bytes() == one_liner(raw)


# --- downloaded archives -----------------------------------------------------------------

def zip_with(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def sample_bytes(n, seed):
    """Bytes from a small alphabet with line breaks at the start, the end and in runs."""
    rng = random.Random(seed)
    body = bytes(rng.choice(b"ab c\n\x00\xe9") for _ in range(n - 4))
    return b"\n" + body[: n // 2] + b"\n\n" + body[n // 2:] + b"\n"


def test_prepare_enwik8_splits_off_the_last_bytes(tmp_path, capsys):
    raw = sample_bytes(3500, 1)
    archive = zip_with(tmp_path / "enwik8.zip", {"enwik8": raw})
    out = tmp_path / "enwik8"
    prepare.prepare_enwik8(archive, out, split=1000)
    parts = {"train": raw[:1500], "valid": raw[1500:2500], "test": raw[2500:]}
    for split, part in parts.items():
        assert (out / f"{split}.txt.raw").read_bytes() == part
        assert (out / f"{split}.txt").read_bytes() == one_liner(part)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[2].startswith("train: 1,500 bytes")
    corpus = data.Corpus(out, cache=False)
    assert corpus.byte_level
    decoded = data.decode_tokens(corpus.train, corpus.dictionary.idx2word, True)
    assert decoded == parts["train"] + (b"" if parts["train"].endswith(b"\n") else b"\n")


def test_prepare_text8_uses_the_usual_split(tmp_path):
    rng = random.Random(2)
    raw = bytes(rng.choice(b"abcdefgh ") for _ in range(5000))
    archive = zip_with(tmp_path / "text8.zip", {"text8": raw})
    prepare.prepare_text8(archive, tmp_path / "text8", split=1000)
    for split, part in (("train", raw[:3000]), ("valid", raw[3000:4000]), ("test", raw[4000:])):
        assert (tmp_path / "text8" / f"{split}.txt.raw").read_bytes() == part
        assert (tmp_path / "text8" / f"{split}.txt").read_bytes() == one_liner(part)
    corpus = data.Corpus(tmp_path / "text8", cache=False)
    assert corpus.train.shape[0] == 3001  # one token per byte, plus the <eos> of the one line


def test_prepare_byte_corpus_errors(tmp_path):
    with pytest.raises(InputError, match="missing.zip: archive not found"):
        prepare.prepare_enwik8(tmp_path / "missing.zip", tmp_path / "out")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a zip archive"):
        prepare.prepare_enwik8(tmp_path / "bad.zip", tmp_path / "out")
    archive = zip_with(tmp_path / "other.zip", {"enwik9": b"x"})
    with pytest.raises(InputError, match="no member named enwik8"):
        prepare.prepare_enwik8(archive, tmp_path / "out")
    archive = zip_with(tmp_path / "small.zip", {"text8": b"abc"})
    with pytest.raises(InputError, match="too few"):
        prepare.prepare_text8(archive, tmp_path / "out", split=2)
    assert not (tmp_path / "out" / "train.txt").exists()


@pytest.mark.parametrize("raw", [False, True])
def test_prepare_wikitext(tmp_path, raw):
    """Token archives are copied (word level); raw ones go to the byte format, with .raw."""
    folder, suffix = ("wikitext-103-raw", "raw") if raw else ("wikitext-2", "tokens")
    texts = {split: f" = Café = \n the {split} text @-@ \n".encode() for split in data.SPLITS}
    archive = zip_with(tmp_path / "wikitext.zip",
                       {f"{folder}/wiki.{split}.{suffix}": text for split, text in texts.items()})
    prepare.prepare_wikitext(archive, tmp_path / "out")
    for split, text in texts.items():
        written = (tmp_path / "out" / f"{split}.txt").read_bytes()
        assert written == (one_liner(text) if raw else text)
        raw_file = tmp_path / "out" / f"{split}.txt.raw"
        assert raw_file.read_bytes() == text if raw else not raw_file.exists()


def test_prepare_wikitext_needs_all_three_splits(tmp_path):
    archive = zip_with(tmp_path / "partial.zip", {"wikitext-2/wiki.train.tokens": b"a\n"})
    with pytest.raises(InputError, match="no member named wiki.valid.tokens"):
        prepare.prepare_wikitext(archive, tmp_path / "partial")


def make_ptb_archive(path):
    files = {}
    for split in data.SPLITS:
        files[f"ptb.{split}.txt"] = f" the {split} <unk> N \n".encode()
        files[f"ptb.char.{split}.txt"] = f"t h e _ {split[0]} \n".encode()
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./simple-examples/data/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return path, files


@pytest.mark.parametrize("char", [False, True])
def test_prepare_ptb(tmp_path, char):
    archive, files = make_ptb_archive(tmp_path / "simple-examples.tgz")
    out = tmp_path / ("pennchar" if char else "penn")
    prepare.prepare_ptb(archive, out, char=char)
    for split in data.SPLITS:
        name = f"ptb.char.{split}.txt" if char else f"ptb.{split}.txt"
        assert (out / f"{split}.txt").read_bytes() == files[name]


def test_prepare_ptb_rejects_a_file_that_is_not_a_tar_archive(tmp_path):
    (tmp_path / "simple-examples.tgz").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable tar archive"):
        prepare.prepare_ptb(tmp_path / "simple-examples.tgz", tmp_path / "penn")


def test_cli_reports_a_missing_archive_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "prepare.py", "enwik8", str(tmp_path / "enwik8.zip"),
         str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'enwik8.zip'}: archive not found"]


def test_cli_prepares_text8(tmp_path):
    zip_with(tmp_path / "text8.zip", {"text8": b"abc de" * 10})
    result = subprocess.run(
        [sys.executable, "prepare.py", "text8", str(tmp_path / "text8.zip"),
         str(tmp_path / "text8"), "--split", "20"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert (tmp_path / "text8" / "test.txt.raw").read_bytes() == (b"abc de" * 10)[-20:]


# --- own text ----------------------------------------------------------------------------

def test_own_text_file_becomes_a_byte_corpus_split_in_order(tmp_path):
    _, out = make_text_corpus(tmp_path)
    raw = {split: open(os.path.join(out, f"{split}.txt.raw"), "rb").read() for split in data.SPLITS}
    held = int(len(TEXT) * 0.05)
    assert len(raw["valid"]) == len(raw["test"]) == held
    assert raw["train"] + raw["valid"] + raw["test"] == TEXT  # in order, nothing lost
    with open(os.path.join(out, "train.txt"), "rb") as f:
        assert f.read() == prepare.byte_format(raw["train"])
    corpus = data.Corpus(out, cache=False)
    assert corpus.byte_level
    assert data.decode_tokens(corpus.test, corpus.dictionary.idx2word, True) == raw["test"]


def test_three_named_splits_are_used_as_they_are_and_nothing_is_overwritten(tmp_path, capsys):
    files = []
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        (tmp_path / name).write_bytes(sentences(50, seed))
        files.append(str(tmp_path / name))
    out = str(tmp_path / "three")
    assert prepare.main(["text", "--train", files[0], "--valid", files[1], "--test", files[2],
                         out]) == 0
    for split, path in zip(data.SPLITS, files):
        assert open(os.path.join(out, f"{split}.txt.raw"), "rb").read() == open(path, "rb").read()
    before = open(os.path.join(out, "train.txt"), "rb").read()
    capsys.readouterr()
    assert prepare.main(["text", files[0], out]) == 2  # the folder holds a corpus already
    assert "exists" in capsys.readouterr().err
    assert open(os.path.join(out, "train.txt"), "rb").read() == before
    assert prepare.main(["text", "--train", files[0], "--valid", files[1], out + "2"]) == 2
    assert "--test" in capsys.readouterr().err


def test_many_files_and_folders_are_read_in_sorted_order(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"alpha\n" * 50)
    (src / "b" / "c.txt").write_bytes(b"gamma\n" * 50)
    (src / "b" / "a.txt").write_bytes(b"beta\n" * 50)
    (src / ".hidden").write_bytes(b"never\n")
    (src / "link.txt").symlink_to(src / "a.txt")  # the same file again: read once
    (tmp_path / "z.txt").write_bytes(b"zeta\n" * 50)
    out = tmp_path / "corpus"
    assert prepare.main(["text", str(tmp_path / "z.txt"), str(src), str(out)]) == 0
    raw = b"".join(open(out / f"{split}.txt.raw", "rb").read() for split in data.SPLITS)
    assert raw == b"alpha\n" * 50 + b"beta\n" * 50 + b"gamma\n" * 50 + b"zeta\n" * 50
    held = int(len(raw) * 0.05)
    assert open(out / "test.txt.raw", "rb").read() == raw[-held:]  # the last 5%: zeta's end
    capsys.readouterr()


def test_word_mode_counts_words_train_lacks_and_refuses_what_is_not_text(tmp_path, capsys):
    for name, words in (("a", ["red", "fox"]), ("b", ["red", "owl"]), ("c", ["fox", "emu"])):
        (tmp_path / name).write_bytes(sentences(30, 1, words=words))
    assert prepare.main(["text", "--words", "--train", str(tmp_path / "a"), "--valid",
                         str(tmp_path / "b"), "--test", str(tmp_path / "c"),
                         str(tmp_path / "w")]) == 0
    printed = capsys.readouterr().out
    train = set((tmp_path / "a").read_text().split())  # "red", "fox", "red." and "fox."
    held = (tmp_path / "b").read_text().split() + (tmp_path / "c").read_text().split()
    unseen = sum(word not in train for word in held)
    assert unseen == sum(word.strip(".") in ("owl", "emu") for word in held) > 0
    assert f"valid and test hold {unseen:,} tokens that train never has" in printed
    assert line_of(printed, "Next: ").endswith("--unk")
    (tmp_path / "bin").write_bytes(b"\xff\xfe" * 500)
    assert prepare.main(["text", "--words", str(tmp_path / "bin"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err and not (tmp_path / "x").exists()


def test_prepare_leaves_no_half_written_folder(tmp_path, monkeypatch):
    def full_disk(path):
        if str(path).endswith("test.txt.raw"):
            raise OSError(errno.ENOSPC, "No space left on device")

    book = tmp_path / "book.txt"
    book.write_bytes(sentences(200, 4))
    monkeypatch.setattr(utils, "WRITE_HOOKS", [full_disk])
    assert prepare.main(["text", str(book), str(tmp_path / "out" / "corpus")]) == 2
    assert sorted(os.listdir(tmp_path)) == ["book.txt", "out"]  # the folder it made is gone
    assert os.listdir(tmp_path / "out") == []
