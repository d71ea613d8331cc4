"""What several test files share: the flags of a tiny training run (SMALL), main.py run in
this process (run_cli) or in a subprocess (cli, start, wait_for), corpora (write_corpus,
make_corpus, make_text_corpus, the corpus_dir and tokenizer fixtures), the one tiny-model
builder (tiny_model, with perturb) and a trained model (the shifted fixture), and small
helpers (digest, line_of, ids, tweaked, Boom)."""

import hashlib
import os
import random
import subprocess
import sys

import pytest

# The tests use tiny models, for which one thread is fastest; subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # a subprocess's environment: one thread

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare  # noqa: E402
import tokens  # noqa: E402
from data import Corpus  # noqa: E402
from model import SHARNN, model_from_checkpoint  # noqa: E402

# Flags for a tiny, quick training run of main.py on the CPU. SMALL_WITH_PROGRESS leaves the
# progress bars to main.py's default (drawn only when stderr is a terminal); SMALL turns them off.
SMALL_WITH_PROGRESS = ["--emsize", "16", "--nhid", "32", "--nlayers", "2", "--bptt", "16",
                       "--batch_size", "4", "--mem-len", "32", "--warmup", "20",
                       "--log-interval", "50", "--lr", "3e-3", "--device", "cpu"]
SMALL = SMALL_WITH_PROGRESS + ["--no-progress"]


def run_cli(capsys, *argv):
    """main.py's main() in this process; returns (exit code, stdout, stderr)."""
    import main  # here, not at the top: only the tests that train need main.py
    code = main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv, timeout=300):
    """main.py in a subprocess on one thread; its CompletedProcess, output as text."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start(*argv):
    """main.py started in a subprocess on one thread, unbuffered, its output piped as text."""
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "main.py"), *argv], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc, text):
    """Read the process's stdout until a line containing `text`; returns all lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never appeared:\n{''.join(lines)}\n{proc.stderr.read()}")


WORDS = ("the cat sat on a mat and the dog ran to the park while birds sang in old trees "
         "under a grey sky near the river bank").split()


def tiny_model(ntoken=23, ninp=16, nhid=32, nlayers=2, seed=0, **overrides):
    """A small SHARNN, built right after torch.manual_seed(seed) (seed None: from the random
    stream as it stands), without dropout unless `overrides` sets some; `overrides` are
    SHARNN's other arguments (attn_layers, heads, mem_len, cutoffs, sdpa, the dropouts)."""
    if seed is not None:
        torch.manual_seed(seed)
    rates = {"dropout": 0.0, "dropouth": 0.0, "dropouti": 0.0}
    return SHARNN(ntoken, ninp, nhid, nlayers, **{**rates, **overrides})


def perturb(model, scale=0.5):
    """Give the attention gates and LayerNorms non-trivial values (they start at 0 and 1),
    adding `scale` times a normal draw, so that every term of the computation matters;
    returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".qs", ".ks", ".vs")) or ".ln" in name or ".qln" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def sentences(n, seed, words=WORDS):
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + ".")
    return ("\n".join(lines) + "\n").encode()


def write_corpus(folder, train, valid, test):
    """A corpus folder in the byte format from raw bytes per split."""
    os.makedirs(folder, exist_ok=True)
    for name, data in (("train", train), ("valid", valid), ("test", test)):
        with open(os.path.join(folder, f"{name}.txt"), "wb") as f:
            f.write(prepare.byte_format(data))
    return str(folder)


def make_corpus(folder, train, valid="a\n", test="a\n"):
    """A corpus folder (a pathlib.Path) with the given split texts as they are (str, written
    as UTF-8 bytes, or bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        raw = text.encode("utf-8") if isinstance(text, str) else text
        (folder / f"{name}.txt").write_bytes(raw)
    return folder


def ids(tensor):
    """A corpus split's token ids as a list."""
    return tensor.tolist()


TEXT = sentences(900, 5)  # about 37k bytes of English-like text


def make_text_corpus(tmp_path):
    """TEXT as one's own text file, book.txt, made into the byte corpus book/ by prepare.py;
    returns both paths."""
    path = tmp_path / "book.txt"
    path.write_bytes(TEXT)
    out = tmp_path / "book"
    assert prepare.main(["text", str(path), str(out)]) == 0
    return str(path), str(out)


def digest(path):
    """The SHA-256 of a file's content."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def line_of(out, start):
    """The first line of the text `out` that starts with `start`."""
    return next(line for line in out.splitlines() if line.startswith(start))


def tweaked(source, path, change):
    """A copy of checkpoint `source` at `path` (which may be `source`), with change(dict)
    applied."""
    ckpt = torch.load(source, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    return str(path)


class Boom:
    """A pickle that leaves a marker file behind if it is ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture
def corpus_dir(tmp_path):
    """A small English-like byte-level corpus (about 24k training bytes)."""
    return write_corpus(tmp_path / "data", sentences(600, 1), sentences(60, 2), sentences(60, 3))


@pytest.fixture(params=["fast", "python"])
def tokenizer(request, monkeypatch):
    """Run a test through one tokenizer; the other one fails the test if it is used."""
    if request.param == "python":
        monkeypatch.setattr(tokens, "_read_key_chunks", lambda path: None)
    else:
        def unexpected(*args):
            raise AssertionError("the Python tokenizer ran on fast-path text")
        monkeypatch.setattr(tokens, "_vocab_from_text", unexpected)
        monkeypatch.setattr(tokens, "_ids_from_text", unexpected)
    return request.param


@pytest.fixture
def shifted(capsys, tmp_path):
    """A model trained on varied sentences, and a corpus whose valid/test part uses only a
    few of the training words (so adapting to it pays)."""
    from checkpoint import load_checkpoint  # here, as main.py in run_cli
    folder = write_corpus(tmp_path / "shift", sentences(600, 1),
                          sentences(80, 2, words=["cat", "sat", "mat"]),
                          sentences(80, 3, words=["dog", "ran", "park"]))
    save = str(tmp_path / "m.pt")
    code, _, err = run_cli(capsys, "--data", folder, "--save", save, "--epochs", "2", *SMALL)
    assert code == 0, err
    model = model_from_checkpoint(load_checkpoint(save)).eval()
    return model, Corpus(folder)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: the tests that take over about 3.5 s each on a 2-core CPU (torchrun "
                   "launches, setup.sh environments, runs of several scripts or several trainings, "
                   "torch.compile, ONNX export); python -m pytest -q -m 'not slow' leaves them out")
