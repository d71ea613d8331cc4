# Two commands from a fresh clone (each sets up .venv first, once: setup.sh):
#   make demo   train the cpu-small recipe on data/sample (about 2 minutes on a laptop CPU),
#               then sample from it; the outputs go to demo/, replaced at each call
#   make test   the whole test suite (make quick-test: without the slowest tests)
# Settings: PYTHON (the interpreter for .venv, default python3), TORCH (default 2.13.0).

PY := .venv/bin/python

.PHONY: demo test quick-test setup setup-dev

demo: setup
	$(if $(shell [ -w . ] || echo no),$(error make demo writes demo/ into $(CURDIR), which is not writable: clone the project where you can write))
	rm -rf demo && mkdir demo
	$(PY) -u main.py --recipe cpu-small --data data/sample --save demo/sample.pt
	$(PY) generate.py --checkpoint demo/sample.pt --prime "ROMEO:" --length 300

test: setup-dev
	$(PY) -m pytest -q

quick-test: setup-dev
	$(PY) -m pytest -q -m "not slow"

setup:
	@sh setup.sh requirements.txt

setup-dev:
	@sh setup.sh requirements-dev.txt
