"""The README and the guides cannot rot silently.

docs/backward.md: every `file::function` it names exists, every code line it quotes occurs (in
order) in that function, and its worked example runs and fails when the layer it checks is wrong.
README.md and every docs/*.md: each relative link resolves to a file (and a heading, for an
anchor), each repository path, `gpt2np COMMAND` and `gpt2np.module.name` it names exists, the
quick start's two commands are the ones CI and the examples run, and none of them speaks of the
machines the project is developed on."""
from __future__ import annotations

import ast
import importlib
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "backward.md"
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))

# `path/to/file.py::name` or `path/to/file.py::Class.method`, anywhere in the text
REF = re.compile(r"`([\w./-]+\.py)::([\w.]+)`")
# a quoted block: ```python title="path.py::name"  ...  ```  (or title="worked example...")
FENCE = re.compile(r'^```python title="([^"]+)"\n(.*?)^```\s*$', re.M | re.S)
# [text](target) and ![alt](target), an optional "title" after the target
LINK = re.compile(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
CODE_BLOCK = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]+`")


def _norm(line: str) -> str:
    return " ".join(line.split())


def _find(path: str, qualname: str, root: Path):
    """(file text, the ast node of qualname) or LookupError naming what is missing."""
    file = root / path
    if not file.is_file():
        raise LookupError(f"{path}: no such file")
    text = file.read_text()
    node = ast.parse(text)
    for part in qualname.split("."):
        body = getattr(node, "body", [])
        found = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.name == part]
        if not found:
            raise LookupError(f"{path}::{qualname}: no {part!r} defined there")
        node = found[-1]  # as Python: the last definition wins
    return text, node


def _code_lines(text: str, node) -> list[set[str]]:
    """Each physical line of node's source, as the forms a quote may take: the whole line, or
    the line without its trailing comment (whitespace-normalised)."""
    comment_at = {}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comment_at[tok.start[0]] = tok.start[1]
    lines = text.splitlines()
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    out = []
    for row in range(first, node.end_lineno + 1):
        line = lines[row - 1]
        forms = {_norm(line)}
        if row in comment_at:
            forms.add(_norm(line[:comment_at[row]]))
        out.append(forms - {""})
    return out


def doc_problems(text: str, root: Path = ROOT) -> list[str]:
    """Everything wrong with the document's references, quotes and anchors (empty: all good)."""
    problems = []
    for path, qualname in sorted(set(REF.findall(text))):
        try:
            _find(path, qualname, root)
        except LookupError as e:
            problems.append(str(e))
    for title, body in FENCE.findall(text):
        if "::" not in title:
            continue
        path, qualname = title.split("::", 1)
        try:
            src, node = _find(path, qualname, root)
        except LookupError as e:
            problems.append(f"quote titled {title}: {e}")
            continue
        code = _code_lines(src, node)
        pos = 0
        for line in body.splitlines():
            q = _norm(line)
            if not q or q == "...":
                continue
            hit = next((i for i in range(pos, len(code)) if q in code[i]), None)
            if hit is None:
                where = "at all" if not any(q in forms for forms in code) else "after the line before it"
                problems.append(f"{title}: quoted line not in the function {where}: {line.strip()!r}")
            else:
                pos = hit + 1
    return problems + link_problems(text, root / "docs")


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped (not - and _), spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is no heading)."""
    return CODE_BLOCK.sub("", text)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text (a repeated one gets -1, -2...)."""
    seen, out = {}, set()
    for heading in re.findall(r"^#+ (.+?)#*\s*$", _prose(text), re.M):
        slug = _slug(heading)
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def link_problems(text: str, base: Path) -> list[str]:
    """Every relative link of a Markdown text (its folder: base) that does not resolve: the file
    must exist and, for a link with #anchor, the Markdown file must have that heading. URLs and
    whatever stands in code are not links."""
    problems = []
    for target in LINK.findall(CODE_SPAN.sub("", _prose(text))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else None
        if file is not None and not file.exists():
            problems.append(f"link to {target}: no such file")
        elif anchor:
            heads = anchors(file.read_text() if file is not None else text)
            if file is not None and file.suffix != ".md":
                problems.append(f"link to {target}: an anchor into a file that is not Markdown")
            elif anchor not in heads:
                problems.append(f"link to {target}: no such heading")
    return problems


def _doc() -> str:
    return DOC.read_text()


def test_every_reference_exists_and_every_quote_is_in_its_function():
    text = _doc()
    assert doc_problems(text) == []
    # and the parser really saw the document's references (not zero matches by a broken regex)
    assert len(set(REF.findall(text))) >= 30
    assert sum("::" in t for t, _ in FENCE.findall(text)) >= 20


def test_every_backward_and_the_optimizer_is_covered():
    refs = set(REF.findall(_doc()))
    wanted = {(f"gpt2np/{f}", n.name) for f in ("layers.py", "model.py")  # layers, compositions
              for n in ast.parse((ROOT / "gpt2np" / f).read_text()).body
              if isinstance(n, ast.FunctionDef) and n.name.endswith("_backward")}
    assert len(wanted) >= 10
    wanted |= {("gpt2np/optim.py", n) for n in ("AdamW._update", "AdamW.step", "clip_grad_norm")}
    assert wanted - refs == set(), "derive these in docs/backward.md"


GOOD = "`gpt2np/layers.py::gelu_backward`\n"


@pytest.mark.parametrize("bad, complaint", [
    ("`gpt2np/nolayers.py::gelu_backward`", "no such file"),
    ("`gpt2np/layers.py::gelu_backwards`", "no 'gelu_backwards'"),
    ("`gpt2np/optim.py::AdamW.update`", "no 'update'"),
    ('```python title="gpt2np/layers.py::gelu_backward"\ndx = t * t * 2\n```\n', "not in the function at all"),
    # a real line of layers.py, but of another function
    ('```python title="gpt2np/layers.py::gelu_backward"\nt *= 0.044715\n```\n', "not in the function at all"),
    ('```python title="gpt2np/layers.py::gelu_backward"\ndx *= dout\ndu = x * x\n```\n', "after the line before"),
    ('```python title="gpt2np/layers.py::no_such"\ndx *= dout\n```\n', "quote titled"),
    ("see [here](#no-such-section)", "no such heading"),
    ("see [the code](../gpt2np/layer.py)", "no such file"),
])
def test_the_checker_rejects_rotten_references(bad, complaint):
    assert doc_problems(GOOD) == []
    problems = doc_problems(GOOD + bad)
    assert len(problems) == 1 and complaint in problems[0], problems


def test_quotes_may_drop_comments_and_indentation():
    quote = ('```python title="gpt2np/layers.py::gelu_backward"\n'
             "dx = xp.subtract(1.0, s, out=out)\n"  # the source line has a trailing comment
             "        dx *= x\n...\ndx *= dout\n```\n")
    assert doc_problems(quote) == []


def _examples() -> list[str]:
    blocks = [body for title, body in FENCE.findall(_doc()) if title.startswith("worked example")]
    assert len(blocks) == 2
    return blocks


def test_worked_example_runs(capsys):
    ns = {}
    for block in _examples():
        exec(compile(block, "docs/backward.md (worked example)", "exec"), ns)
    out = capsys.readouterr().out
    err = float(re.search(r"relative error of dx: (\S+)", out).group(1))
    assert err < 1e-8
    assert float(out.strip().splitlines()[-1]) < 1e-12  # the torch check


def _drop_projection(real):
    def backward(dout, cache):  # the `dx -= norm * proj` line left out
        dx, dw, db = real(dout, cache)
        norm, rstd, weight = cache
        proj = (dout * weight * norm).mean(axis=-1, keepdims=True)
        return dx + norm * proj * rstd, dw, db
    return backward


def _scaled(real):
    def backward(dout, cache):  # right up to 1e-6 relative
        dx, dw, db = real(dout, cache)
        return dx * (1 + 1e-6), dw, db
    return backward


@pytest.mark.parametrize("fault", [_drop_projection, _scaled])
def test_worked_example_fails_on_a_wrong_layernorm_backward(monkeypatch, fault):
    from gpt2np import layers

    monkeypatch.setattr(layers, "layernorm_backward", fault(layers.layernorm_backward))
    with pytest.raises(AssertionError):
        exec(compile(_examples()[0], "docs/backward.md (worked example)", "exec"), {})


def test_math_is_safe_from_githubs_markdown():
    # GitHub applies Markdown's backslash escapes before MathJax sees $...$ or $$...$$: the row
    # break `\\` reaches it as `\`, the thin space `\,` as `,`. So display math goes in ```math
    # blocks, which it leaves alone, and inline math has no backslash before punctuation.
    prose = re.sub(r"```.*?```", "", _doc(), flags=re.S)
    assert "$$" not in prose
    inline = re.findall(r"\$([^$\n]+)\$", prose)
    assert len(inline) > 100
    assert [m for m in inline if re.search(r"\\[!-/:-@\[-`{-~]", m)] == []


def _section(text: str, heading: str) -> str:
    assert f"\n## {heading}\n" in text, f"no section '## {heading}'"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_links_the_document():
    section = _section(README.read_text(), "How the gradients are checked")
    assert "(docs/backward.md)" in section


# ------------------------------------------------------------------ the README and the guides


def _docs():
    return [README] + GUIDES


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text()
    assert link_problems(text, doc.parent) == []


def test_the_readme_and_the_guides_link_each_other():
    # the link checker really sees links: the README links every guide, every guide is linked
    readme_links = {t.partition("#")[0] for t in LINK.findall(README.read_text())}
    assert {f"docs/{g.name}" for g in GUIDES} <= readme_links
    for name in ("training", "reproduce-gpt2", "gpu", "distributed", "performance",
                 "diagnostics", "models", "backward"):
        assert ROOT / "docs" / f"{name}.md" in GUIDES


# (a broken link, what the checker must say of it)
BROKEN_LINKS = [("[x](nowhere.md)", "no such file"), ("![picture](img/missing.png)", "no such file"),
                ("[x](training.md#no-such-heading)", "no such heading"),
                ("[x](#no-such-heading)", "no such heading"),
                ("[x](../gpt2np/layers.py#L10)", "not Markdown")]


@pytest.mark.parametrize("bad, complaint", BROKEN_LINKS)
def test_the_link_checker_rejects_broken_links(bad, complaint):
    good = ("# Title\n\n## A heading: with `code`, and commas\n\n"
            "[a](training.md#the-first-run) [b](#a-heading-with-code-and-commas) [c](#title) "
            "[d](https://example.com/x.md#y) [e](../gpt2np/layers.py) ![f](img/diagnostics.png)\n"
            "`[not a link](nowhere.md)`\n```\n[nor this](nowhere.md)\n# nor a heading\n```\n")
    base = ROOT / "docs"
    assert link_problems(good, base) == []
    assert "nor-a-heading" not in anchors(good)
    problems = link_problems(good + bad, base)
    assert len(problems) == 1 and complaint in problems[0], problems


def _code(text: str) -> str:
    """Everything that stands in code: the fenced blocks and the inline spans."""
    return "\n".join(CODE_BLOCK.findall(text) + CODE_SPAN.findall(_prose(text)))


def name_problems(text: str) -> list[str]:
    """Repository paths, `gpt2np` commands and `gpt2np.x.y` names that do not exist."""
    from gpt2np.cli import COMMANDS

    problems = []
    for path in set(re.findall(r"(?<![\w/.-])((?:gpt2np|examples|tests|docs)/[\w./-]*\w)", text)):
        if not (ROOT / path).exists():
            problems.append(f"{path}: no such file")
    code = _code(text)
    for old in set(re.findall(r"python3? -m (gpt2np\.[\w.]+)", code)):
        problems.append(f"python -m {old}: an old module path; use gpt2np COMMAND")
    for cmd in set(re.findall(r"(?:^|[\s`(])gpt2np ([a-z][\w-]*)", code, re.M)) - {"import"}:
        if cmd not in COMMANDS:
            problems.append(f"gpt2np {cmd}: no such command")
    for dotted in set(re.findall(r"`(gpt2np(?:\.\w+)+)", text)):
        if not _resolves(dotted):
            problems.append(f"{dotted}: no such module or name")
    return problems


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):  # the longest importable module, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_command_and_name_exists(doc):
    assert name_problems(doc.read_text()) == []


@pytest.mark.parametrize("bad, complaint", [
    ("see `examples/no_such_script.py`", "no such file"),
    ("```bash\npython -m gpt2np.train --max-steps 5\n```", "old module path"),
    ("```bash\ngpt2np trian --max-steps 5\n```", "no such command"),
    ("`gpt2np.data.shards.NoSuchLoader`", "no such module or name"),
    ("`gpt2np.no_such_module`", "no such module or name"),
])
def test_the_name_checker_rejects_rotten_names(bad, complaint):
    good = ("`gpt2np/layers.py` `examples/gpu_check.sh` `gpt2np.data.shards.ShardLoader` "
            "`gpt2np.GPT.backward`\n```bash\ngpt2np train --help\npython -m gpt2np eval\n```\n"
            "```python\nfrom gpt2np import GPT\n```\n")
    assert name_problems(good) == []
    problems = name_problems(good + bad)
    assert len(problems) == 1 and complaint in problems[0], problems


def _commands(block: str) -> list[str]:
    """The commands of a bash block, comments dropped."""
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("```")]


def test_the_quick_start_is_the_two_commands_ci_and_the_examples_run():
    from gpt2np.train.settings import DEFAULTS

    section = _section(README.read_text(), "Quick start")
    install, train, tests = _commands(re.search(r"```bash\n.*?```", section, re.S).group(0))
    assert install.startswith("pip install ")
    # the main job: the example script, whose defaults are the run the paragraph describes
    assert train == "python examples/train_shakespeare.py"
    assert f"{DEFAULTS['max_steps']} steps" in section
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # runs from a checkout
    done = subprocess.run([sys.executable, "examples/train_shakespeare.py", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--max-steps" in done.stdout, done.stderr[-2000:]
    # the tests: the command CI runs (.ci/run: python3 -m pytest -q)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_tests = [line.strip() for line in ci.splitlines()
                if re.match(r"\s*python3? -m pytest", line) and "-m gpu" not in line]
    assert [re.sub(r"^python3 ", "python ", c) for c in ci_tests] == [tests]


def test_the_readme_training_step_runs():
    section = _section(README.read_text(), "Using the model")
    block = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "backward()" in b)
    ns = {}
    exec(compile(block, "README.md (Using the model)", "exec"), ns)
    assert set(ns["grads"]) == set(ns["model"].params)


def test_the_readme_is_a_front_door_that_lists_the_public_api():
    import gpt2np

    text = README.read_text()
    assert len(text.splitlines()) <= 250
    api = _section(text, "Public API")
    assert [name for name in gpt2np.__all__ if not re.search(rf"\b{name}\b", api)] == []


# the machines, tools and tickets of the project's own development are no part of its text
DEVELOPMENT = re.compile(r"device\s+tool|run\(command=|carr[y]\s*=|\.\./shared|\blent\b|\bsessions?\b"
                         r"|issue [0-9]+|\bcarr(?:y|ied|ies)\b|brings? back|comes? back",
                         re.I)
OWN_FILES = ["examples/gpu_check.sh", "examples/gpu_prepare.py", "examples/gpu_check_report.py",
             "examples/gradcheck_report.py", "tests/test_gpu_check.py", "tests/test_docs.py",
             ".gitignore"]


@pytest.mark.parametrize("path", [p.relative_to(ROOT) for p in _docs()] + OWN_FILES, ids=str)
def test_nothing_speaks_of_the_development_machines(path):
    text = (ROOT / path).read_text()
    hits = [f"{path}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
            if DEVELOPMENT.search(line)]
    assert hits == []
