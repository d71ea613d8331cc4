"""generate.py: prime tokenising, chunked feeding with carried state, sampling, streamed text."""

import os
import subprocess
import sys

import pytest
import torch

import generate
from data import EOS
from conftest import ROOT, perturb, tiny_model
from model import SHARNN
from checkpoint import FORMAT

ASCII = [EOS] + [str(b) for b in b" etaoinshrdlucmfwypvbgk.,"]
BYTES = ASCII + ["195", "169", "255"]  # 0xC3 0xA9 is "é"; 0xFF is never valid UTF-8
WORDS = [EOS, "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "<unk>"]
CONFIG = dict(ninp=16, nhid=32, nlayers=2, attn_layers=[0], heads=1, mem_len=20, cutoffs=None)
TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models step fastest on one thread; more only wait on each other on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vocab_model(vocab, **overrides):
    """conftest's tiny model over `vocab` with non-trivial attention gates and LayerNorms,
    so that every term of the computation matters, in eval mode, and its config."""
    config = dict(CONFIG, ntoken=len(vocab), **overrides)
    return perturb(tiny_model(**config)).eval(), config


def save_checkpoint(path, vocab, force=None, **overrides):
    """A checkpoint like checkpoint.base_checkpoint() of vocab_model(vocab). `force` names a
    token the model then (almost) always predicts, through a large decoder bias."""
    model, config = vocab_model(vocab, **overrides)
    if force is not None:
        with torch.no_grad():
            model.decoder.bias[vocab.index(force)] = 100.0
    torch.save({"format": FORMAT, "version": 1, "model": model.state_dict(), "config": config,
                "vocab": list(vocab), "metrics": {}, "args": {}}, path)
    return str(path)


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "bytes.pt", BYTES)


@pytest.fixture(scope="module")
def ascii_ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "ascii.pt", ASCII)


@pytest.fixture(scope="module")
def word_ckpt(tmp_path_factory):
    """Word level, with an adaptive softmax as main.py builds for word corpora."""
    return save_checkpoint(tmp_path_factory.mktemp("gen") / "words.pt", WORDS, cutoffs=[4])


def run_cli(capsys, ckpt, *argv):
    code = generate.main(["--checkpoint", ckpt, "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_script(*argv, stdin):
    """generate.py in a subprocess, standard input from bytes `stdin` (None: /dev/null)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # see one_thread()
    return subprocess.run([sys.executable, "generate.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, timeout=300)


def ids_of(tokens, vocab):
    return [vocab.index(t) for t in tokens]


def sampled(model, vocab, prime_ids, length, temperature=1.0, top_k=0, seed=0, chunk=1024):
    g = torch.Generator().manual_seed(seed)
    return list(generate.generate(model, vocab, prime_ids, length, temperature, top_k, g,
                                  torch.device("cpu"), chunk=chunk))


def greedy_carried(model, prime_ids, length):
    """Argmax continuation, feeding the prime at once and then one token at a time with
    the model's hidden state and memory carried by hand."""
    out = []
    with torch.no_grad():
        x = torch.tensor(prime_ids).unsqueeze(1)  # [N, 1]
        output, hidden, mems = model(x)  # [N, 1, E]
        for _ in range(length):
            token = model.log_probs(output[-1]).argmax(dim=-1)  # [1]
            out.append(token.item())
            output, hidden, mems = model(token.view(1, 1), hidden, mems)
    return out


# --- the prime as tokens -----------------------------------------------------------------

def test_byte_prime_is_utf8_bytes_with_newline_as_eos():
    assert generate.tokenize("a\né", BYTES) == ids_of(["97", EOS, "195", "169"], BYTES)
    assert generate.tokenize("", BYTES) == []


def test_word_prime_gets_eos_per_line_break_only():
    assert generate.tokenize("the cat\nsat  on", WORDS) == ids_of(
        ["the", "cat", EOS, "sat", "on"], WORDS)
    assert generate.tokenize("the cat\n", WORDS) == ids_of(["the", "cat", EOS], WORDS)
    assert generate.tokenize("\n\na", WORDS) == ids_of([EOS, EOS, "a"], WORDS)
    assert generate.tokenize("  ", WORDS) == []


# --- feeding the prime with carried state --------------------------------------------------

def test_prime_fed_in_chunks_matches_one_forward_pass():
    model, _ = vocab_model(BYTES, mem_len=200)
    ids = torch.randint(0, len(BYTES), (150,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, _ = model(ids.unsqueeze(1))  # [150, 1, E]
        want = model.log_probs(full[-1])
        for chunk in (1, 7, 64, 150, 1024):
            last, _, _ = generate.feed(model, ids, chunk=chunk)
            assert torch.allclose(model.log_probs(last), want, atol=TOL, rtol=0), chunk


def test_memory_carries_across_prime_and_generation(monkeypatch):
    """With the window covering everything, the distribution at every generation step
    equals that of one forward pass over the prime and all the tokens sampled before:
    the hidden states and memories are carried from the prime into generation."""
    model, _ = vocab_model(BYTES, mem_len=200)
    prime = generate.tokenize("the cat sat on the mat.\nthe dog ran", BYTES)
    seen = []
    log_probs = model.log_probs
    monkeypatch.setattr(model, "log_probs",
                        lambda output: seen.append(log_probs(output)) or seen[-1])
    for chunk in (5, 1024):
        seen.clear()
        ids = sampled(model, BYTES, prime, 40, seed=chunk, chunk=chunk)
        with torch.no_grad():
            full, _, _ = model(torch.tensor(prime + ids).unsqueeze(1))  # [N + 40, 1, E]
            want = log_probs(full[len(prime) - 1:-1, 0])  # [40, ntoken]
        assert torch.allclose(torch.cat(seen), want, atol=TOL, rtol=0), chunk

    with torch.no_grad():  # the memory matters: dropping it changes the next distribution
        output, hidden, mems = model(torch.tensor(prime).unsqueeze(1))
        token = torch.tensor([[ids[0]]])
        with_mem, _, _ = model(token, hidden, mems)
        without, _, _ = model(token, hidden, None)
    assert (log_probs(with_mem[-1]) - log_probs(without[-1])).abs().max() > 1e-3


def test_top_k_1_is_the_greedy_sequence_with_a_short_window():
    model, _ = vocab_model(BYTES)  # mem_len 20: the memory is cut during the run
    prime = generate.tokenize("a cat sat on the mat", BYTES)
    want = greedy_carried(model, prime, 60)
    assert sampled(model, BYTES, prime, 60, top_k=1, seed=0) == want
    assert sampled(model, BYTES, prime, 60, top_k=1, seed=7) == want


def test_temperature_near_zero_is_greedy():
    model, _ = vocab_model(BYTES)
    prime = generate.tokenize("the dog ", BYTES)
    assert sampled(model, BYTES, prime, 40, temperature=1e-6, seed=3) == greedy_carried(
        model, prime, 40)


def test_top_k_samples_only_among_the_k_most_likely():
    model, _ = vocab_model(BYTES)
    last, _, _ = generate.feed(model, torch.tensor(generate.tokenize("the ", BYTES)))
    top3 = set(model.log_probs(last)[0].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    drawn = {generate.sample(model, last, 1.0, 3, g).item() for _ in range(200)}
    assert drawn == top3


def test_empty_prime_starts_from_eos():
    model, _ = vocab_model(BYTES)
    assert sampled(model, BYTES, [], 30, seed=2) == sampled(model, BYTES, ids_of([EOS], BYTES),
                                                            30, seed=2)


def test_generate_yields_exactly_length_ids():
    model, _ = vocab_model(BYTES)
    for length in (0, 1, 13):
        ids = sampled(model, BYTES, ids_of(["97"], BYTES), length)
        assert len(ids) == length and all(0 <= i < len(BYTES) for i in ids)


# --- text out ------------------------------------------------------------------------------

def test_byte_text_keeps_a_character_split_over_two_tokens_whole():
    tokens = ["195", "169", "255", EOS, "97", "195"]  # é, an invalid byte, \n, a, cut-off é
    pieces = list(generate.byte_text("ok ", ids_of(tokens, BYTES), BYTES))
    assert pieces[:3] == ["ok ", "", "é"]  # nothing is printed for half a character
    assert "".join(pieces) == "ok é\ufffd\na\ufffd"


def test_word_text_joins_words_and_breaks_lines_at_eos():
    ids = ids_of(["cat", EOS, "sat", "on", EOS, EOS, "a"], WORDS)
    assert "".join(generate.word_text("the", ids, WORDS)) == "the cat\nsat on\n\na"
    assert "".join(generate.word_text("the\n", ids, WORDS)) == "the\ncat\nsat on\n\na"
    assert "".join(generate.word_text("", ids, WORDS)) == "cat\nsat on\n\na"


# --- the command ---------------------------------------------------------------------------

def test_same_seed_same_text_other_seed_other_text(capsys, byte_ckpt):
    runs = {}
    for seed in ("0", "0", "1"):
        code, out, err = run_cli(capsys, byte_ckpt, "--prime", "the cat ", "--length", "80",
                                 "--seed", seed)
        assert code == 0, err
        assert out.startswith("the cat ")
        runs.setdefault(seed, []).append(out)
    assert runs["0"][0] == runs["0"][1]
    assert runs["0"][0] != runs["1"][0]


def test_length_is_the_exact_number_of_generated_tokens(capsys, ascii_ckpt, word_ckpt):
    for length in (0, 1, 57):  # ASCII bytes: one character per token (<eos> as "\n")
        code, out, err = run_cli(capsys, ascii_ckpt, "--prime", "a cat", "--length", str(length))
        assert code == 0, err
        assert out.startswith("a cat") and len(out) == len("a cat") + length + 1
        assert out.endswith("\n")  # the output ends with a line break
    code, out, err = run_cli(capsys, word_ckpt, "--prime", "the cat\n", "--length", "40",
                             "--top-k", "5", "--temperature", "0.7")
    assert code == 0, err
    generated = out[len("the cat\n"):-1]  # without the final line break
    assert out.startswith("the cat\n")
    assert len(generated.split()) + generated.count("\n") == 40
    assert set(generated.split()) <= set(WORDS) - {EOS}


def test_cli_prints_invalid_bytes_as_replacement_characters(capsys, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ff.pt", BYTES, force="255")
    code, out, err = run_cli(capsys, ckpt, "--prime", "é", "--length", "3")
    assert code == 0, err
    assert out == "é\ufffd\ufffd\ufffd\n"


def test_out_of_vocabulary_prime_is_a_one_line_error(capsys, byte_ckpt, word_ckpt):
    code, out, err = run_cli(capsys, byte_ckpt, "--prime", "the Z")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "prime byte 90" in err and "'Z'" in err
    code, out, err = run_cli(capsys, byte_ckpt, "--prime", "the ü")  # ü is 0xC3 0xBC
    assert code == 2 and "prime byte 188" in err and "'ü'" in err
    code, out, err = run_cli(capsys, word_ckpt, "--prime", "the zebra sat")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "'zebra'" in err and "<unk>" in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--length", "-1"], "--length"),
])
def test_bad_flags_are_one_line_errors(capsys, byte_ckpt, flags, message):
    code, out, err = run_cli(capsys, byte_ckpt, "--prime", "a", *flags)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_missing_checkpoint_and_unparsable_flag(capsys, tmp_path):
    code, _, err = run_cli(capsys, str(tmp_path / "none.pt"), "--prime", "a")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--checkpoint", "x.pt", "--length", "many"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_prime_from_stdin_completes_a_character_across_the_boundary(tmp_path):
    """The prime's last byte starts "é"; the model always continues with its second byte."""
    ckpt = save_checkpoint(tmp_path / "e9.pt", BYTES, force="169")
    result = run_script("--checkpoint", ckpt, "--device", "cpu", "--length", "1", "--prime", "-",
                        stdin="the caf".encode() + b"\xc3")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode("utf-8") == "the café\n"


@pytest.mark.slow
def test_stdin_prime_matches_flag_prime_and_no_input_starts_from_eos(capsys, byte_ckpt):
    args = ["--checkpoint", byte_ckpt, "--device", "cpu", "--length", "30", "--seed", "4"]
    piped = run_script(*args, "--prime", "-", stdin=b"the dog\n")
    assert piped.returncode == 0, piped.stderr.decode()
    assert generate.main([*args, "--prime", "the dog\n"]) == 0
    assert piped.stdout.decode("utf-8") == capsys.readouterr().out
    # Without --prime -, standard input is not read: it stays the caller's.
    unread = run_script(*args, stdin=b"the dog\n")
    assert unread.returncode == 0, unread.stderr.decode()
    empty = run_script(*args, stdin=None)
    assert empty.returncode == 0, empty.stderr.decode()
    assert unread.stdout == empty.stdout
    assert generate.main([*args, "--prime", "\n"]) == 0
    assert "\n" + empty.stdout.decode("utf-8") == capsys.readouterr().out


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_model_under_cpu_autocast(capsys, byte_ckpt, monkeypatch, amp, dtype):
    seen = []
    forward = SHARNN.forward

    def recording(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SHARNN, "forward", recording)
    code, out, err = run_cli(capsys, byte_ckpt, "--prime", "the cat ", "--length", "30",
                             "--top-k", "1", "--amp", amp)
    assert code == 0, err
    assert out.startswith("the cat ") and len(out.encode()) >= len("the cat ") + 1
    assert seen and set(seen) == {dtype}
    seen.clear()
    code, _, err = run_cli(capsys, byte_ckpt, "--prime", "the cat ", "--length", "30")
    assert code == 0, err
    assert set(seen) == {None}  # float32 by default
