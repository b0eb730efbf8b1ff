"""The documentation: README.md and docs/*.md.

- Every code block marked runnable runs without error. The marker is an HTML comment on the line
  directly before the opening fence: ``<!-- runnable -->``, or ``<!-- runnable: slow -->`` for a
  block that takes more than ~5 s (the case is then ``@pytest.mark.slow``). Only ```` ```python ````
  and ```` ```bash ```` blocks can be marked. Python blocks run as ``sys.executable -c CODE``, shell
  blocks as ``bash -e -o pipefail -c CODE`` with ``sys.executable``'s folder (the ``lorkd`` console
  script) first on PATH; both in a fresh temporary folder holding links to the repository's
  ``configs/`` and ``examples/``, with ``<repo>/src`` first on PYTHONPATH, ``LORKD_DATA`` set to
  ``<repo>/../shared/data`` when unset and that folder exists, and one OpenMP thread unless set.
- README.md has at most 400 lines.
- Every relative link resolves to an existing file, and a ``#fragment`` to a heading of the
  target page (GitHub's anchor rules).
- Every page under docs/ is linked from README.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 400
BLOCK_TIMEOUT_S = 300

MARKER = re.compile(r"^<!--\s*runnable(?::\s*(?P<flag>slow))?\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
RUNNERS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}


def doc_pages() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    slow: bool

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def split_text(text: str) -> tuple[list[str], list[tuple[int, str, list[str]]]]:
    """The lines outside fenced code blocks (fenced lines blanked, so numbers stay) and the
    fenced blocks as ``(line of the opening fence, language, body lines)``."""
    prose, blocks = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        fence, start, body = m["fence"], i, []
        prose.append("")
        i += 1
        while i < len(lines) and not lines[i].startswith(fence[0] * len(fence)):
            body.append(lines[i])
            prose.append("")
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start + 1}: code fence never closed")
        prose.append("")
        i += 1
        blocks.append((start + 1, m["lang"].lower(), body))
    return prose, blocks


def runnable_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The blocks of a page marked runnable; a marker not directly followed by a python or bash
    fence is an error (so that a marker cannot silently mark nothing)."""
    text = path.read_text() if text is None else text
    lines = text.splitlines()
    _, fenced = split_text(text)
    by_line = {line: (lang, body) for line, lang, body in fenced}
    out = []
    for n, line in enumerate(lines, start=1):
        m = MARKER.match(line.strip())
        if not m:
            continue
        if n + 1 not in by_line:
            raise ValueError(f"{rel(path)}:{n}: a runnable marker must be directly followed by a code fence")
        lang, body = by_line[n + 1]
        if lang not in RUNNERS:
            raise ValueError(f"{rel(path)}:{n + 1}: runnable block in {lang or 'no language'}; "
                             f"only {sorted(RUNNERS)} can run")
        out.append(Block(path, n + 1, RUNNERS[lang], "\n".join(body) + "\n", m["flag"] == "slow"))
    return out


def all_runnable() -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.slow else [])
            for page in doc_pages() for b in runnable_blocks(page)]


def run_block(block: Block, workdir: Path, timeout: float = BLOCK_TIMEOUT_S) -> subprocess.CompletedProcess:
    for name in ("configs", "examples"):
        link = workdir / name
        if (REPO / name).exists() and not link.exists():
            link.symlink_to(REPO / name)
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    shared = REPO.parent / "shared" / "data"
    if "LORKD_DATA" not in env and shared.is_dir():
        env["LORKD_DATA"] = str(shared)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    if block.lang == "python":
        cmd = [sys.executable, "-c", block.code]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)


def failure(block: Block, res: subprocess.CompletedProcess) -> str:
    return (f"{block.id}: the {block.lang} block exited with {res.returncode}\n--- code\n{block.code}"
            f"--- stdout (tail)\n{res.stdout[-3000:]}\n--- stderr (tail)\n{res.stderr[-3000:]}")


@pytest.mark.parametrize("block", all_runnable())
def test_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    res = run_block(block, tmp_path)
    assert res.returncode == 0, failure(block, res)


def test_some_blocks_are_runnable() -> None:
    blocks = [b for page in doc_pages() for b in runnable_blocks(page)]
    assert {b.lang for b in blocks} == {"python", "bash"}
    assert any(b.path == README and b.lang == "python" for b in blocks), "README's Python quick start must run"


# --- the runner and the parser can fail ---------------------------------------------------------

@pytest.mark.parametrize("lang, code", [
    ("python", "raise RuntimeError('a documented example that breaks')\n"),
    ("bash", "false\necho not reached\n"),
    ("bash", "lorkd no-such-command\n"),
    ("bash", "true | false\n"),
])
def test_a_failing_block_fails(lang: str, code: str, tmp_path: Path) -> None:
    res = run_block(Block(tmp_path / "x.md", 1, lang, code, False), tmp_path)
    assert res.returncode != 0


def test_a_block_sees_the_repo_and_the_console_script(tmp_path: Path) -> None:
    code = "test -f configs/medmnist.yaml\ncommand -v lorkd\npython -c 'import lorkd'\n"
    res = run_block(Block(tmp_path / "x.md", 1, "bash", code, False), tmp_path)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).parent == Path(sys.executable).parent


def test_markers_are_parsed(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    text = ("# t\n\n<!-- runnable -->\n```python\nprint(1)\n```\n\n```python\nnot marked\n```\n"
            "<!-- runnable: slow -->\n```bash\necho 2\n```\n")
    blocks = runnable_blocks(page, text)
    assert [(b.line, b.lang, b.code, b.slow) for b in blocks] == [
        (4, "python", "print(1)\n", False), (12, "bash", "echo 2\n", True)]
    with pytest.raises(ValueError, match="directly followed"):
        runnable_blocks(page, "<!-- runnable -->\n\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="only"):
        runnable_blocks(page, "<!-- runnable -->\n```yaml\na: 1\n```\n")


# --- size and links ------------------------------------------------------------------------------

def test_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    prose, _ = split_text(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m[1])
        k = seen.get(base, 0)
        seen[base] = k + 1
        out.add(base if k == 0 else f"{base}-{k}")
    return out


def links(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """``(line, target)`` of every inline link outside code (fenced blocks and `inline code`)."""
    prose, _ = split_text(path.read_text() if text is None else text)
    # inline code blanked to spaces (offsets kept); a link's text may run over a line break
    joined = re.sub(r"`[^`\n]*`", lambda m: " " * len(m[0]), "\n".join(prose))
    return [(joined.count("\n", 0, m.start()) + 1, m["target"].strip("<>")) for m in LINK.finditer(joined)]


def broken_links(path: Path, text: str | None = None) -> list[str]:
    bad = []
    for n, target in links(path, text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{rel(path)}:{n}: ({target})"
        if not dest.exists():
            bad.append(f"{where} {rel(dest)} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{where} no heading with anchor #{fragment} in {rel(dest)}")
    return bad


def test_links_resolve() -> None:
    bad = [b for page in doc_pages() for b in broken_links(page)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_link_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Some title: `x` + y\n\n## Some title: `x` + y\n")
    page = tmp_path / "a.md"
    text = ("[ok](b.md) [ok](b.md#some-title-x--y) [ok](b.md#some-title-x--y-1) [ok](https://x.y/z) [two\n"
            "lines](b.md) [`code` in text](b.md)\n"
            "`[not a link](nowhere.md)`\n```\n[in code](nowhere.md)\n```\n"
            "[missing](c.md) [bad anchor](b.md#other) [self](#nothing)\n")
    page.write_text(text)
    bad = broken_links(page)
    assert len(bad) == 3, bad
    assert "c.md does not exist" in bad[0] and "#other" in bad[1] and "#nothing" in bad[2]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in links(README) if t.partition("#")[0]}
    missing = [rel(p) for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"
