"""docs/backward.md cannot rot silently: every `file::function` it names exists, every code line
it quotes occurs (in order) in that function, its links resolve, and its worked example runs and
fails when the layer it checks is wrong."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "backward.md"

# `path/to/file.py::name` or `path/to/file.py::Class.method`, anywhere in the text
REF = re.compile(r"`([\w./-]+\.py)::([\w.]+)`")
# a quoted block: ```python title="path.py::name"  ...  ```  (or title="worked example...")
FENCE = re.compile(r'^```python title="([^"]+)"\n(.*?)^```\s*$', re.M | re.S)
ANCHOR = re.compile(r"\]\(#([^)]+)\)")
FILE_LINK = re.compile(r"\]\(([^)#:]+)\)")  # relative links to files (no URLs, no anchors)


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
    slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for anchor in ANCHOR.findall(text):
        if anchor not in slugs:
            problems.append(f"link to #{anchor}: no such heading")
    for target in FILE_LINK.findall(text):
        if not (root / "docs" / target).resolve().exists():
            problems.append(f"link to {target}: no such file")
    return problems


def _slug(heading: str) -> str:
    # GitHub's anchors: lower case, punctuation dropped (not - and _), spaces to hyphens
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


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
             "xp.subtract(1.0, dx, out=dx)\n"  # the source line has a trailing comment
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


def test_readme_links_the_document():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How the gradient checks work", 1)[1].split("\n## ", 1)[0]
    assert "(docs/backward.md)" in section
