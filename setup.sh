#!/bin/sh
# Set up this clone's virtual environment, .venv, with PyTorch and REQUIREMENTS, once:
#   sh setup.sh requirements.txt        (make demo runs this)
#   sh setup.sh requirements-dev.txt    (make test runs this)
# A second call with unchanged requirements reuses .venv and says so. PyTorch: the one
# PYTHON already has, whatever its version (.venv then sees PYTHON's packages: no download,
# none at all when they meet the requirements, as on a GPU machine without network), else a
# wheel already on this machine when pip finds one, else the CUDA build where an NVIDIA GPU
# answers (nvidia-smi), else the CPU build. When an NVIDIA GPU answers but torch cannot use
# it (a driver older than its CUDA build needs, or a CPU build), one line says so: runs
# would train on the CPU. Settings: PYTHON (default python3), TORCH (the torch version,
# default 2.13.0). Failures are one line; pip's own output goes to .venv/setup.log.
set -eu

requirements=${1:?usage: sh setup.sh REQUIREMENTS_FILE}
python=${PYTHON:-python3}
torch_version=${TORCH:-2.13.0}
venv=.venv
cpu_index=https://download.pytorch.org/whl/cpu

fail() {
    echo "setup: $*" >&2
    exit 1
}

command -v "$python" >/dev/null 2>&1 || fail "$python not found: install Python 3.10 or newer (or set PYTHON)"
recent=$("$python" -c 'import sys; print(sys.version_info >= (3, 10))' 2>&1) ||
    fail "$python does not run: $(echo "$recent" | head -n 1) (set PYTHON to another interpreter)"
[ "$recent" = True ] ||
    fail "$("$python" -V 2>&1) is too old: Python 3.10 or newer is needed (set PYTHON, e.g. PYTHON=python3.11)"
[ -f "$requirements" ] || fail "$requirements not found: run this from the clone's folder"

stamp_of() {  # what marks a requirements file as installed, with this torch
    echo "$venv/.ready-$(basename "$1" .txt)-$(cat requirements.txt "$1" | cksum | cut -d' ' -f1)-$torch_version"
}
gpu_unused() {  # one line when an NVIDIA GPU answers but .venv's torch cannot use it
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 &&
        ! "$venv/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
        build=$("$venv/bin/python" -c 'import torch; print(torch.__version__, "built for CUDA", torch.version.cuda)' 2>/dev/null)
        echo "setup: an NVIDIA GPU answers (driver ${driver:-unknown}) but torch $build cannot use it (a driver too old for that CUDA, or a CPU build): runs would train on the CPU" >&2
    fi
}

stamp=$(stamp_of "$requirements")
if [ -f "$stamp" ]; then
    echo "setup: reusing the environment in $venv ($requirements installed; delete $venv to set it up again)"
    gpu_unused
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    [ -w . ] || fail "cannot create $venv: $(pwd) is not writable (clone the project where you can write)"
    echo "setup: creating $venv with $("$python" -V 2>&1)"
    if torch_site=$("$python" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))' 2>/dev/null); then
        # .venv sees the packages beside PYTHON's torch, pip among them: a pip of its own
        # (and, before Python 3.12, its setuptools) would hide theirs
        "$python" -m venv --without-pip "$venv" || fail "could not create $venv (on Debian or Ubuntu: apt install python3-venv)"
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo "$torch_site" >"$site/reuse-torch.pth"
        echo "setup: reusing torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') and the packages beside it in $torch_site"
        "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip >/dev/null 2>&1 ||
            fail "no pip for $venv: $torch_site has none, and ensurepip failed"
    else
        "$python" -m venv "$venv" || fail "could not create $venv (on Debian or Ubuntu: apt install python3-venv)"
    fi
fi
log=$venv/setup.log
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then  # e.g. its creation was interrupted
    echo "setup: $venv has no pip; adding it (python -m ensurepip)"
    "$venv/bin/python" -m ensurepip >>"$log" 2>&1 ||
        fail "$venv has no pip and ensurepip could not add it: delete $venv and run this again (on Debian or Ubuntu: apt install python3-venv)"
fi
pip() {
    "$venv/bin/python" -m pip install --disable-pip-version-check --timeout 30 --retries 2 "$@" >>"$log" 2>&1
}
unreachable() {
    fail "could not install $1: is the package index reachable (network, proxy, PIP_INDEX_URL)? pip's messages are in $log"
}

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    if pip --no-index --no-deps "torch==$torch_version"; then
        echo "setup: installed torch $torch_version from a wheel already on this machine"
        pip "torch==$torch_version" || unreachable "the packages torch needs"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        echo "setup: installing torch $torch_version, the CUDA build (an NVIDIA GPU answers)"
        pip "torch==$torch_version" || unreachable "torch $torch_version"
    else
        echo "setup: installing torch $torch_version, the CPU build (no NVIDIA GPU answers)"
        pip --index-url "$cpu_index" "torch==$torch_version" || unreachable "torch $torch_version from $cpu_index"
    fi
fi
echo "setup: installing $requirements into $venv"
pip -r "$requirements" || unreachable "$requirements"
touch "$stamp"
if grep -qx -- "-r requirements.txt" "$requirements"; then
    touch "$(stamp_of requirements.txt)"  # installed with it
fi
echo "setup: $venv is ready"
gpu_unused
