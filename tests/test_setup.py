"""setup.sh (make demo, make test): one clear line when Python is too old or the package
index is out of reach, a second call that reuses the environment and says so, a torch that
PYTHON already has reused without a download, and one line when an NVIDIA GPU answers but
torch cannot use it. (CI's own `make test` on a clean clone is the first call, for real.)"""

import os
import shutil
import subprocess
import sys

from conftest import ROOT

# A Python without torch: the interpreter this test's virtual environment was made from.
BARE = os.path.join(sys.base_prefix, "bin", "python3")


def clone(tmp_path):
    for name in ("setup.sh", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def setup(folder, *args, **env):
    return subprocess.run(["sh", "setup.sh", *args], cwd=folder, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))


def test_a_python_too_old_is_one_line(tmp_path):
    folder = clone(tmp_path)
    old = tmp_path / "python3.8"
    old.write_text("#!/bin/sh\n"
                   "case \"$1\" in -V) echo 'Python 3.8.10';; *) exit 1;; esac\n")
    old.chmod(0o755)
    result = setup(folder, "requirements.txt", PYTHON=str(old))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "Python 3.8.10 is too old" in result.stderr and "3.10" in result.stderr
    assert not (folder / ".venv").exists()


def test_a_package_index_out_of_reach_is_one_line(tmp_path):
    folder = clone(tmp_path)
    result = setup(folder, "requirements.txt", PYTHON=BARE, PIP_CONFIG_FILE=os.devnull,
                   PIP_FIND_LINKS="", PIP_INDEX_URL="http://127.0.0.1:9/simple",
                   PATH="/usr/bin:/bin")  # no nvidia-smi: the CPU build, from its index
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "could not install torch" in result.stderr and "reachable" in result.stderr
    assert os.path.exists(folder / ".venv" / "setup.log")


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
