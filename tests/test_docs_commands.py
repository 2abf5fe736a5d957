"""Every command of the README and the guides, followed top to bottom on a fresh checkout.

The commands are the lines of the ```bash blocks (a trailing backslash continues a line,
`&&` separates commands, `# ...` is a comment). Each one
  - parses: a `gpt2np` command or an example script gets its own argparse parser, other
    scripts their --help, which must list every flag the command gives; a pip install may
    only name extras that pyproject.toml declares. A renamed flag in a guide fails here.
  - runs, where it can here: in one scratch folder with the repository's files, the README
    first and then the guides in the order the README lists them, so that a command that
    collides with an earlier one ("out/shakespeare/ckpt.safetensors already exists") fails.
    Training runs get a tiny model and 1/100 of the doc's steps (600 -> 6), gradcheck one
    finite-difference entry per tensor; the commands
    that need what a test machine lacks only parse: a GPU (`--backend cupy`, `--device
    cuda`, the GPU check), the network (a Hugging Face hub id, `--dataset`, HellaSwag's
    download, the GPU bundle), several GPUs or machines (torchrun beyond 2 CPU processes),
    the test suite itself, a benchmark, a package install, and placeholders (`...`, `DIR`).
Inline `gpt2np COMMAND ...` spans in the prose must name existing flags too.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testdata import shakespeare_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(?:bash|sh)\n(.*?)^```", re.M | re.S)
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z_]*[A-Z](:[A-Z]+)?)$")  # ..., DIR, FILE, HOST:PORT
TRAIN_SCRIPTS = ("examples/train_shakespeare.py", "examples/train_gpt2.py")
STEP_FLAGS = ("--max-steps", "--stop-after", "--eval-interval", "--save-interval",
              "--warmup-steps")
# a tiny model and short evals for every training command that does not set its own
TINY = {"--n-layer": "1", "--n-head": "2", "--n-embd": "16", "--batch-size": "2",
        "--eval-batches": "1", "--num-samples": "1", "--sample-tokens": "8"}


def guides() -> list[Path]:
    """README.md, then docs/*.md in the order the README's Guides section lists them."""
    section = README.read_text().split("\n## Guides\n", 1)[1].split("\n## ", 1)[0]
    listed = [ROOT / p for p in dict.fromkeys(re.findall(r"\]\((docs/[\w.-]+\.md)\)", section))]
    rest = sorted(set((ROOT / "docs").glob("*.md")) - set(listed))
    return [README] + listed + rest


@dataclass
class Command:
    doc: str
    line: str  # as written (continuations joined)
    argv: list[str]
    env: dict = field(default_factory=dict)

    def __str__(self):
        return f"{self.doc}: {self.line}"


def commands(path: Path) -> list[Command]:
    """The commands of a Markdown file's bash blocks, in order."""
    out = []
    for block in BLOCK.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                cut = tokens.index("&&") if "&&" in tokens else len(tokens)
                argv, tokens = tokens[:cut], tokens[cut + 1:]
                env = {}
                while argv and re.match(r"^[A-Z_]+=", argv[0]):
                    key, value = argv.pop(0).split("=", 1)
                    env[key] = value
                if argv:
                    out.append(Command(path.name, " ".join(line.split("#")[0].split()), argv, env))
    return out


# ------------------------------------------------------------------------ what a command is


def target(argv: list[str]) -> tuple[str, list[str]]:
    """(what runs, its arguments): "gpt2np CMD", "examples/x.py", "bash examples/x.sh",
    "pip", "pytest" or "torchrun"'s script."""
    head = argv[0]
    if head == "gpt2np":
        return f"gpt2np {argv[1]}", argv[2:]
    if head in ("python", "python3"):
        if argv[1:3] == ["-m", "gpt2np"]:
            return f"gpt2np {argv[3]}", argv[4:]
        if argv[1:3] == ["-m", "pytest"]:
            return "pytest", argv[3:]
        return argv[1], argv[2:]
    if head == "torchrun":
        i = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        return argv[i], argv[i + 1:]
    if head == "bash":
        return f"bash {argv[1]}", argv[2:]
    if head == "pip":
        return "pip", argv[1:]
    raise AssertionError(f"unknown command {head!r}: teach tests/test_docs_commands.py about it")


def parser_of(what: str):
    """The argparse parser that reads a command's flags, or None (a script without one)."""
    if what.startswith("gpt2np "):
        from gpt2np.cli import COMMANDS

        name = what.split()[1]
        assert name in COMMANDS, f"no command gpt2np {name}"
        return importlib.import_module(COMMANDS[name][0]).build_parser()
    if what == "examples/train_shakespeare.py":
        from gpt2np.commands.train import build_parser

        return build_parser()
    if what == "examples/generate.py":
        from gpt2np.commands.generate import build_parser

        return build_parser()
    if what == "examples/train_gpt2.py":
        spec = importlib.util.spec_from_file_location("train_gpt2", ROOT / what)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.build_parser(module.engine_defaults())
    return None


def why_not_run(cmd: Command) -> str | None:
    """None if the command runs here, else why it only parses."""
    from gpt2np.io.pretrained import HUB_NAMES

    what, args = target(cmd.argv)
    text = " ".join(args)
    if what == "pip":
        return "installs packages"
    if what == "pytest":
        return "the test suite itself"
    if any(PLACEHOLDER.match(a) for a in args):
        return "a placeholder"
    if "--backend cupy" in text or "--device cuda" in text or "gpu_check" in what:
        return "needs a GPU"
    if what in ("examples/gpu_prepare.py",) or "--dataset" in args:
        return "needs the network"
    if what.startswith("examples/bench"):
        return "a benchmark"
    if cmd.argv[0] == "torchrun":
        procs = re.search(r"--nproc[_-]per[_-]node[= ](\d+)", cmd.line)
        if "--nnodes" in cmd.line or not procs or int(procs.group(1)) > 2:
            return "needs several GPUs or machines"
    model = _value(args, "--model") or _value(args, "--init-from")
    if what == "gpt2np export":
        model = args[0]
    if model is not None and (model in HUB_NAMES or re.match(r"^[\w.-]+/[\w.-]+$", model)
                              and not model.startswith(("out/", "data/"))):
        return "needs the Hugging Face hub"
    if what == "gpt2np eval" and "hellaswag" in args and "--data" not in args:
        return "needs the network (HellaSwag's download)"
    return None


def _value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------ parsing


def parse_problem(cmd: Command) -> str | None:
    what, args = target(cmd.argv)
    args = [a for a in args if a != "..."]
    if what == "pip":
        return _pip_problem(args)
    if what == "pytest":
        return None
    parser = parser_of(what)
    if parser is None:  # a script without an importable parser: its --help lists the flags
        return _help_problem(what, args)
    parser.allow_abbrev = False  # a doc spells every flag out
    try:
        parser.parse_args(args)
    except SystemExit:
        return f"{cmd}: its parser rejects it (see the captured stderr)"
    return None


def _pip_problem(args) -> str | None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    extras = re.findall(r"^([\w-]+) = ", section.split("\n[", 1)[0], re.M)
    for a in args:
        m = re.match(r"^\.\[([\w,-]+)\]$", a)
        if m and set(m.group(1).split(",")) - set(extras):
            return f"pip install {a}: pyproject.toml has no extra {set(m.group(1).split(',')) - set(extras)}"
    return None


def _help_problem(what, args) -> str | None:
    argv = ["bash", what.split()[1]] if what.startswith("bash ") else [sys.executable, what]
    done = subprocess.run(argv + ["--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        return f"{what} --help failed: {done.stderr[-500:]}"
    missing = [f for f in (a.split("=")[0] for a in args if a.startswith("--"))
               if f not in done.stdout + done.stderr]
    return f"{what}: --help lists no {missing}" if missing else None


ALL = [(doc, cmd) for doc in guides() for cmd in commands(doc)]


def test_the_docs_hold_commands():
    docs = {doc.name for doc, _ in ALL}
    assert {"README.md", "training.md", "models.md", "reproduce-gpt2.md"} <= docs
    assert len(ALL) > 30


@pytest.mark.parametrize("cmd", [cmd for _, cmd in ALL], ids=str)
def test_every_documented_command_parses(cmd):
    assert parse_problem(cmd) is None


def test_the_parse_check_rejects_a_renamed_flag():
    bad = commands_of("gpt2np train --max-step 5\npython examples/train_shakespeare.py --steps 5\n"
                      "pip install -e \".[testing]\"\npython examples/bench.py --no-such-flag\n")
    assert [parse_problem(c) is not None for c in bad] == [True] * 4


def commands_of(text: str) -> list[Command]:
    """Commands of a test's own lines, one a line."""
    return [Command("test", line, shlex.split(line, comments=True)) for line in text.splitlines()]


# ------------------------------------------------------------------------ inline spans

SPAN = re.compile(r"(?<!`)`((?:gpt2np [a-z][\w-]*|python3? (?:-m gpt2np [a-z][\w-]*|"
                  r"examples/\w+\.py))(?: [^`]*)?)`")


def span_problems(text: str) -> list[str]:
    """Flags named in inline `gpt2np COMMAND ...` spans that the command does not have."""
    problems = []
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in SPAN.findall(prose):
        tokens = span.split()
        if tokens[0].startswith("python") and tokens[1] == "-m":
            tokens = ["gpt2np"] + tokens[3:]
        what = f"gpt2np {tokens[1]}" if tokens[0] == "gpt2np" else tokens[1]
        try:
            parser = parser_of(what)
        except AssertionError as e:
            problems.append(f"`{span}`: {e}")
            continue
        if parser is None:
            continue
        known = {o for a in parser._actions for o in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span):
            if flag not in known:
                problems.append(f"`{span}`: {what} has no {flag}")
    return problems


@pytest.mark.parametrize("doc", guides(), ids=lambda p: p.name)
def test_inline_commands_name_existing_flags(doc):
    assert span_problems(doc.read_text()) == []


def test_the_span_check_rejects_a_renamed_flag():
    assert span_problems("run `gpt2np train --max-steps 5 --eval-interval 2`") == []
    assert len(span_problems("run `gpt2np train --max-step 5` or `gpt2np eval --modl x`")) == 2


# ------------------------------------------------------------------------ running them


def runnable_argv(cmd: Command, scratch: Path) -> list[str]:
    """The command as this test runs it: this Python, globs expanded, tiny training."""
    what, _ = target(cmd.argv)
    argv = list(cmd.argv)
    if argv[0] == "gpt2np":
        argv = [sys.executable, "-m", "gpt2np"] + argv[1:]
    elif argv[0] in ("python", "python3"):
        argv = [sys.executable] + argv[1:]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    expanded = []
    for a in argv:
        matches = sorted(glob.glob(a, root_dir=scratch)) if "*" in a else []
        expanded += matches or [a]
    argv = expanded
    if what == "gpt2np train" or what in TRAIN_SCRIPTS:
        argv = _tiny(argv)
    if what == "gpt2np gradcheck" and "--fd" in argv:  # one finite-difference entry per tensor
        argv[argv.index("--fd") + 1] = "1"
    return argv


def _tiny(argv: list[str]) -> list[str]:
    """1/100 of the doc's steps (at most 10 left as they are), a tiny model where the doc
    does not size one; a resumed run keeps its checkpoint's settings."""
    from gpt2np.train.settings import DEFAULTS

    argv = list(argv)
    for i, a in enumerate(argv[:-1]):
        if a in STEP_FLAGS and int(argv[i + 1]) > 10:
            argv[i + 1] = str(max(1, int(argv[i + 1]) // 100))
    if "--resume" in argv:
        return argv + ["--no-progress"]
    extra = [] if "--max-steps" in argv else ["--max-steps", str(DEFAULTS["max_steps"] // 100)]
    for flag, value in TINY.items():
        if flag not in argv:
            extra += [flag, value]
    return argv + extra + ["--no-progress"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A fresh checkout's view: the repository's files, nothing that any command wrote."""
    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    root = tmp_path_factory.mktemp("checkout")
    for name in ("README.md", "docs", "examples", "gpt2np"):
        (root / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg",
           "GPT2NP_DATA": str(shakespeare_path()),
           "GPT2NP_CACHE": str(tmp_path_factory.mktemp("cache"))}
    return root, env, {}


def run_doc(doc: Path, scratch) -> list[str]:
    root, env, done = scratch
    if doc.name in done:
        return done[doc.name]
    if doc != README:
        run_doc(README, scratch)  # every guide follows the quick start
    ran = []
    for cmd in commands(doc):
        if why_not_run(cmd):
            continue
        argv = runnable_argv(cmd, root)
        result = subprocess.run(argv, cwd=root, env={**env, **cmd.env}, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, (f"{cmd}\n(run as {' '.join(argv)})\n"
                                        f"{(result.stdout + result.stderr)[-3000:]}")
        ran.append(cmd.line)
    done[doc.name] = ran
    return ran


@pytest.mark.slow
@pytest.mark.parametrize("doc", guides(), ids=lambda p: p.name)
def test_the_commands_run_in_order(doc, scratch):
    ran = run_doc(doc, scratch)
    if doc == README:  # the quick start's run and the commands after it
        assert "python examples/train_shakespeare.py" in ran and len(ran) >= 4


def test_what_runs_here_and_what_only_parses():
    verdicts = {c.line: why_not_run(c) for c in commands_of(
        "python examples/train_shakespeare.py\n"
        "gpt2np generate --model out/shakespeare\n"
        "gpt2np generate --model gpt2\n"
        "gpt2np export gpt2 out/x\n"
        "python examples/train_shakespeare.py --backend cupy\n"
        "torchrun --standalone --nproc_per_node=2 examples/train_shakespeare.py --backend numpy\n"
        "torchrun --standalone --nproc_per_node=8 examples/train_shakespeare.py\n"
        "python examples/train_gpt2.py --data-shards DIR\n"
        "gpt2np eval --model out/x --task hellaswag\n")}
    assert [v is None for v in verdicts.values()] == [True, True, False, False, False, True,
                                                      False, False, False], verdicts
    assert _tiny(["t", "--stop-after", "200"])[:3] == ["t", "--stop-after", "2"]
    assert "--max-steps" in _tiny(["t"]) and _tiny(["t", "--resume"]) == ["t", "--resume",
                                                                         "--no-progress"]
