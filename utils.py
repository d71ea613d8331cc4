"""Small helpers shared by main.py, data.py and the scripts."""


class InputError(ValueError):
    """Bad user input (flags, files, checkpoints): reported as one line, exit code 2."""
