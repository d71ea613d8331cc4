"""setup.sh (make demo, make test): one clear line when Python is too old, does not run, or
the package index is out of reach; an environment left without pip is repaired; a second
call reuses the environment and says so; a torch that PYTHON already has is reused without a
download, and one line says when an NVIDIA GPU answers but torch cannot use it. (CI's own
`make test` on a clean clone is the first call, for real.)"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT

# A Python without torch: the interpreter this test's virtual environment was made from.
BARE = os.path.join(sys.base_prefix, "bin", "python3")


def clone(tmp_path):
    for name in ("setup.sh", "requirements.txt", "requirements-dev.txt", "Makefile"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def setup(folder, *args, **env):
    return subprocess.run(["sh", "setup.sh", *args], cwd=folder, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_a_python_too_old_is_one_line(tmp_path):
    folder = clone(tmp_path)
    old = tmp_path / "python3.8"
    old.write_text("#!/bin/sh\n"
                   "case \"$1\" in -V) echo 'Python 3.8.10';; -c) echo False;; *) exit 1;; esac\n")
    old.chmod(0o755)
    result = setup(folder, "requirements.txt", PYTHON=str(old))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "Python 3.8.10 is too old" in result.stderr and "3.10" in result.stderr
    assert not (folder / ".venv").exists()


def test_a_python_that_does_not_run_is_not_called_too_old(tmp_path):
    folder = clone(tmp_path)
    broken = tmp_path / "python3"
    broken.write_text("#!/bin/sh\necho 'Fatal Python error: init_fs_encoding: failed to get the "
                      "Python codec' >&2\nexit 1\n")
    broken.chmod(0o755)
    result = setup(folder, "requirements.txt", PYTHON=str(broken))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"{broken} does not run: Fatal Python error: init_fs_encoding" in result.stderr
    assert "too old" not in result.stderr and not (folder / ".venv").exists()


@pytest.mark.slow
def test_an_environment_without_pip_gets_pip_again(tmp_path):
    """An interrupted creation leaves .venv/bin/python without pip: the next call adds pip
    (ensurepip, offline) instead of blaming the network at every call."""
    folder = clone(tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / ".venv")],
                   check=True)
    result = setup(folder, "requirements.txt", PYTHON=sys.executable, PIP_CONFIG_FILE=os.devnull,
                   PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PATH="/usr/bin:/bin")
    assert "setup: .venv has no pip; adding it" in result.stdout
    assert subprocess.run([str(folder / ".venv" / "bin" / "python"), "-m", "pip", "--version"],
                          capture_output=True).returncode == 0
    assert result.returncode == 1 and "could not install torch" in result.stderr  # the index


@pytest.mark.slow
def test_a_package_index_out_of_reach_is_one_line(tmp_path):
    folder = clone(tmp_path)
    result = setup(folder, "requirements.txt", PYTHON=BARE, PIP_CONFIG_FILE=os.devnull,
                   PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PATH="/usr/bin:/bin")  # no nvidia-smi: the CPU build, from its index
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "could not install torch" in result.stderr and "reachable" in result.stderr
    assert os.path.exists(folder / ".venv" / "setup.log")


@pytest.mark.slow
def test_a_second_call_reuses_the_environment(tmp_path):
    folder = clone(tmp_path)
    first = setup(folder, "requirements.txt", PYTHON=BARE, PIP_CONFIG_FILE=os.devnull,
                  PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple", PATH="/usr/bin:/bin")
    assert first.returncode == 1  # no index: nothing is marked ready
    ready = [name for name in os.listdir(folder / ".venv") if name.startswith(".ready-")]
    assert ready == []
    # What a successful first call leaves: the stamp of these requirements and this torch.
    stamp = subprocess.run(["sh", "-c", "cat requirements.txt requirements.txt | cksum | cut -d' ' -f1"],
                           cwd=folder, capture_output=True, text=True).stdout.strip()
    (folder / ".venv" / f".ready-requirements-{stamp}-2.13.0").touch()
    again = setup(folder, "requirements.txt", PYTHON=sys.executable)
    assert again.returncode == 0 and again.stdout.startswith("setup: reusing the environment in .venv")
    (folder / "requirements.txt").write_text("torch>=2.6\nnumpy\n")  # changed: not reused
    changed = setup(folder, "requirements.txt", PYTHON=BARE, PIP_CONFIG_FILE=os.devnull,
                    PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple", PATH="/usr/bin:/bin")
    assert "reusing" not in changed.stdout


def as_another_user():
    """The command prefix that runs as a user without root's power to write anywhere."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder is writable")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("ready", [False, True])
def test_a_read_only_clone_is_one_line(ready):
    """Without the environment, setup.sh says the folder is not writable (not that venv is
    missing); with it, make demo says so instead of mkdir's raw error."""
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    folder = tempfile.mkdtemp(prefix="readonly-clone-")  # not under a folder only root enters
    try:
        clone(pathlib.Path(folder))
        if ready:
            os.mkdir(os.path.join(folder, ".venv"))
            stamp = subprocess.run(["sh", "-c", "cat requirements.txt requirements.txt | cksum | "
                                    "cut -d' ' -f1"], cwd=folder, capture_output=True,
                                   text=True).stdout.strip()
            open(os.path.join(folder, ".venv", f".ready-requirements-{stamp}-2.13.0"), "w").close()
        os.chmod(folder, 0o555)
        command = ["make", "demo", f"PYTHON={python}"] if ready else ["sh", "setup.sh",
                                                                      "requirements.txt"]
        result = subprocess.run(as_another_user() + command, cwd=folder, capture_output=True,
                                text=True, timeout=60, env=dict(os.environ, PYTHON=python))
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "not writable" in result.stderr and "mkdir" not in result.stderr, result.stderr
        assert "demo" not in os.listdir(folder)
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)
@pytest.mark.slow
def test_a_python_with_torch_is_reused_without_network_and_an_unusable_gpu_is_one_line(tmp_path):
    """PYTHON has torch (and the requirements) and the index is out of reach, as on a GPU
    machine without network: .venv reuses them. A GPU answers (a fake nvidia-smi) that this
    CPU build cannot use: one line says so, at the first call and at the next."""
    (tmp_path / "clone").mkdir()
    folder = clone(tmp_path / "clone")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 470.57.02\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(PYTHON=sys.executable, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="",
               PIP_INDEX_URL="http://127.0.0.1:9/simple", PATH=f"{bin_dir}:/usr/bin:/bin")
    import torch
    warning = (f"setup: an NVIDIA GPU answers (driver 470.57.02) but torch {torch.__version__} "
               f"built for CUDA None cannot use it (a driver too old for that CUDA, or a CPU "
               f"build): runs would train on the CPU\n")
    first = setup(folder, "requirements.txt", **env)
    assert first.returncode == 0, first.stderr
    assert f"setup: reusing torch {torch.__version__}" in first.stdout
    assert first.stdout.rstrip().endswith("setup: .venv is ready") and first.stderr == warning
    imports = subprocess.run([str(folder / ".venv" / "bin" / "python"), "-c",
                              "import torch, numpy, tqdm, safetensors"], capture_output=True, text=True)
    assert imports.returncode == 0, imports.stderr
    again = setup(folder, "requirements.txt", **env)
    assert again.returncode == 0 and again.stdout.startswith("setup: reusing the environment")
    assert again.stderr == warning
