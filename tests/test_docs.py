"""Every Python code block of README.md and docs/ runs, so no example rots.

Each page's ```python blocks run in order in one namespace, as a reader
would paste them, in a fresh working folder. A block preceded by the
comment `<!-- docs-test: only <backend> -->` runs only on that backend (the
other backends have their own block next to it). `mkdocs build --strict`
builds the site: a broken link, a missing page or a docstring that does not
parse fails it.
"""

import os
import pathlib
import re
import subprocess
import sys

import keras
import pytest

import keras_ema

from conftest import BACKEND

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")],
    key=lambda page: str(page.relative_to(ROOT)),
)

_FENCE = re.compile(r"^(?P<indent> *)```(?P<info>\S*)\s*$")
_ONLY = re.compile(r"<!--\s*docs-test:\s*only\s+(\w+)\s*-->")


def python_blocks(text, name="<page>"):
    """The ```python blocks of a Markdown text, as `(line, code, backend)`.

    `line` is the 1-based line of the block's first code line, `backend` the
    one it is restricted to (or `None`). Any other fence whose language
    starts with "py" is refused, so that a block cannot escape the test by
    its spelling, and so is a fence left open.
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, info = opening["indent"], opening["info"]
        if info.lower().startswith("py") and info != "python":
            raise ValueError(
                f"{name}:{i + 1}: a code block fenced ```{info}. Fence Python "
                "code as ```python, so that it runs in the tests."
            )
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"{name}:{i + 1}: a code block that is never closed.")
        if info == "python":
            previous = lines[i - 1] if i else ""
            only = _ONLY.search(previous)
            code = "\n".join(line[len(indent):] for line in lines[i + 1:end])
            blocks.append((i + 2, code, only[1] if only else None))
        i = end + 1
    return blocks


def run_page(path, folder):
    """Runs the page's blocks for this backend in order, in `folder`.

    Returns the number of blocks run. A failing block raises its own
    exception, whose traceback names the page and the line in the page.
    """
    path = pathlib.Path(path)
    namespace = {"__name__": "__docs__"}
    ran = 0
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for line, code, only in python_blocks(path.read_text(), str(path)):
            if only is not None and only != BACKEND:
                continue
            # Padding keeps the traceback's line numbers those of the page.
            source = "\n" * (line - 1) + code
            exec(compile(source, str(path), "exec"), namespace)
            ran += 1
    finally:
        os.chdir(cwd)
        keras.mixed_precision.set_dtype_policy("float32")
    return ran


@pytest.mark.parametrize(
    "page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES]
)
def test_every_code_block_runs(page, tmp_path):
    blocks = python_blocks(page.read_text(), str(page))
    ran = run_page(page, tmp_path)
    assert ran == sum(only in (None, BACKEND) for _, _, only in blocks)


def test_a_broken_block_fails_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\n```python\nx = 1\n```\n\nText.\n\n"
        "```python\ny = x + 1\nassert y == 3, 'the example is wrong'\n```\n"
    )
    with pytest.raises(AssertionError, match="the example is wrong") as error:
        run_page(page, tmp_path)
    frame = error.traceback[-1]
    assert (str(frame.path), frame.lineno + 1) == (str(page), 11)


def test_blocks_share_one_namespace_in_order(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nimport pathlib\npathlib.Path('made').write_text('1')\n```\n"
        "- a list item:\n\n  ```python\n  value = 41\n  ```\n\n"
        "```python\nvalue += 1\nassert value == 42\n```\n"
    )
    assert run_page(page, tmp_path) == 3
    assert (tmp_path / "made").read_text() == "1"


def test_a_block_for_another_backend_does_not_run(tmp_path):
    other = "jax" if BACKEND != "jax" else "torch"
    page = tmp_path / "page.md"
    page.write_text(
        f"<!-- docs-test: only {other} -->\n```python\nraise RuntimeError\n```\n"
        f"<!-- docs-test: only {BACKEND} -->\n```python\nran = True\n```\n"
    )
    assert run_page(page, tmp_path) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("```py\nx = 1\n```\n", "fenced ```py"),
        ("```Python\nx = 1\n```\n", "fenced ```Python"),
        ("text\n```python\nx = 1\n", "never closed"),
    ],
)
def test_a_block_that_would_escape_the_test_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        python_blocks(text)


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="the site is the same on every backend; built once, on TensorFlow",
)
def test_mkdocs_build_strict(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    site = tmp_path / "site"
    pages = {str(p.relative_to(site)) for p in site.rglob("index.html")}
    docs = {str(p.relative_to(ROOT / "docs").with_suffix("")) for p in
            (ROOT / "docs").rglob("*.md")}
    assert pages == {"index.html"} | {
        f"{page}/index.html" for page in docs - {"index"}
    }
    # The reference is generated from every public name's docstring.
    api = (site / "api" / "index.html").read_text()
    for name in keras_ema.__all__:
        assert f'id="keras_ema.{name}"' in api, name
    assert 'id="keras_ema.ExponentialMovingAverage.call_with_averages"' in api
    changelog = (site / "changelog" / "index.html").read_text()
    assert f"{keras_ema.__version__} (" in changelog
