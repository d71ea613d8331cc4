"""The README and its docs pages tell the truth: every flag is documented (docs/flags.md),
their commands parse, every page is linked from the README, and CI runs its setup and test
commands."""

import os
import re
import shlex

import flags
from conftest import ROOT


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def commands(text, script):
    """The `python -u main.py ...` style commands of a Markdown text's code blocks, joined
    across line continuations, without comments."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    found = []
    for line in lines:
        line = line.split("#")[0].strip()
        launcher = r"(\.venv/bin/python|python|torchrun)\b"
        if re.match(rf"{launcher}.*\b{script}\b", line) and "<" not in line:
            found.append(shlex.split(line))
    return found


def docs_pages():
    return sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                  if name.endswith(".md"))


def test_every_flag_of_main_is_in_the_flag_table():
    table = read("docs/flags.md")
    for action in flags.build_parser()._actions:
        if action.option_strings and action.dest != "help":
            flag = max(action.option_strings, key=len)
            assert f"| `{flag}` |" in table, flag


def test_the_readme_links_every_docs_page_and_each_link_resolves():
    readme = read("README.md")
    links = set(re.findall(r"\]\((docs/[^)#]+)", readme))
    assert links == set(docs_pages())
    for page in links:
        assert os.path.isfile(os.path.join(ROOT, page)), page


def test_readme_and_docs_main_commands_parse():
    found = {name: commands(read(name), "main.py") for name in ["README.md", *docs_pages()]}
    assert len(found["README.md"]) >= 4  # own text, cpu-small, the paper's two passes
    assert len(found["docs/variants.md"]) >= 6
    for argv in sum(found.values(), []):
        args = flags.parse_args(argv[argv.index("main.py") + 1:])
        flags.check_args(args)
        flags.check_model_flags(args)


def test_the_paper_commands_are_in_the_readme_unchanged():
    readme = " ".join(read("README.md").replace("\\\n", " ").split())
    assert ("python -u main.py --epochs 32 --dropouth 0.1 --dropouti 0.1 --dropout 0.1 "
            "--data data/enwik8/ --save ENWIK8.pt --log-interval 10 --seed 5512 --optimizer lamb "
            "--bptt 1024 --warmup 800 --lr 2e-3 --emsize 1024 --nhid 4096 --nlayers 4 "
            "--batch_size 16") in readme


def test_ci_runs_the_readme_two_commands():
    readme, ci = read("README.md"), read(".ci/run")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert "make test" in commands and "make demo" in commands
    makefile = read("Makefile")
    assert "--recipe cpu-small --data data/sample" in makefile and "-m pytest -q\n" in makefile
    for command in ("pip install torch==2.13.0", "pip install -r requirements.txt",
                    "pip install -r requirements-dev.txt", "python -m pytest -q"):
        assert command in readme, command  # the setup by hand, below the two commands
