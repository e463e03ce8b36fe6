"""The README and docs/ say what is true: links resolve, the error table is the
server's, the README stays a front door, and its first session runs as shown."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api.interceptor import STATUS
from server.config import Settings
from tests.conftest import REPO, ServerThread, _ensure_calibrated, server_settings

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    out: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        base, n = slug, 1
        while slug in out:
            slug, n = f"{base}-{n}", n + 1
        out.add(slug)
    return out


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in PAGES:
        for groups in LINK.findall(_prose(page.read_text())):
            target = groups[0] or groups[1]
            if re.match(r"^[a-z]+:", target):
                continue  # another site: not ours to check here
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 400, "move depth into docs/"
    assert "make serve" in readme and "make test" in readme
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's map lacks docs/{page.name}"


def test_prose_lines_are_wrapped() -> None:
    """Prose is wrapped; tables, code, headings and link-only lines may be longer."""
    long = []
    for page in PAGES:
        fence = False
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.startswith("```"):
                fence = not fence
            if fence or line.startswith(("|", "#", "<!--", "    ", "![")) or len(line) <= 100:
                continue
            if re.fullmatch(r"\s*[-*] \[[^\]]*\]\([^)]*\)", line) or line.startswith("`rpc "):
                continue  # a contents entry, a method's signature
            if max(len(word) for word in line.split()) > 60:
                continue  # a link or a path that cannot be broken
            long.append(f"{page.relative_to(REPO)}:{number}: {len(line)} characters")
    assert not long, "\n".join(long)


def test_the_error_table_is_the_servers() -> None:
    """Each row of docs/api.md's error table has the code the server gives its
    reason, and every reason the server gives has a row."""
    text = (REPO / "docs" / "api.md").read_text()
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([A-Z_]+)` \|", text, re.M)
    table = {reason: code for code, reason in rows if reason != "reason"}
    assert table == {reason: code.name for reason, code in STATUS.items()}


FIRST_SESSION = re.compile(r"<!-- first-session[^>]*-->\n```bash\n(.*?)```", re.S)


def first_session() -> list[tuple[list[str], list[str]]]:
    """The README's first session: each `$fv ...` line with the `"key": value`
    fragments its `# ->` comments say its output holds."""
    block = FIRST_SESSION.search((REPO / "README.md").read_text())
    assert block, "the README's first session is marked <!-- first-session ... -->"
    variables: dict[str, str] = {}
    steps: list[tuple[list[str], list[str]]] = []
    for line in block.group(1).splitlines():
        command, _, expected = line.partition("# ->")
        command = command.split(" #")[0].strip() if not command.lstrip().startswith("#") else ""
        if found := re.match(r"^(\w+)=(\S+)$", command):
            variables[found.group(1)] = found.group(2)
        elif command.startswith("$fv "):
            words = shlex.split(command)
            steps.append(([w.replace("$LFW", variables["LFW"]) for w in words[1:]], []))
        fragments = re.findall(r'"\w+": (?:true|false|"[^"]*")', expected)
        if fragments:
            steps[-1][1].extend(fragments)
    assert variables["fv"] == ".venv/bin/faceverify"
    return steps


@pytest.fixture()
def default_server(sface_model_dir: Path, lfw_dir: Path, tmp_path: Path
                   ) -> Iterator[ServerThread]:
    """The server `make serve` runs: the default models and settings, empty data."""
    _ensure_calibrated(sface_model_dir, lfw_dir)
    defaults = Settings()
    with ServerThread(server_settings(sface_model_dir, tmp_path / "data",
                                      dedup_fpir=defaults.dedup_fpir,
                                      workers=defaults.workers)) as server:
        yield server


def test_the_readmes_first_session_runs_as_shown(default_server: ServerThread,
                                                 lfw_dir: Path) -> None:
    steps = first_session()
    assert len(steps) >= 10
    env = {**os.environ, "FACEVERIFY_PLAINTEXT": "1", "FACEVERIFY_TARGET": default_server.target}
    lfw_images = str(lfw_dir / "images")
    for args, fragments in steps:
        args = [a.replace("../shared/datasets/lfw-dev/images", lfw_images) for a in args]
        out = subprocess.run([sys.executable, "-m", "server.tools.cli", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode in (0, 1), f"faceverify {' '.join(args)}: {out.stderr}"
        for fragment in fragments:
            assert fragment in out.stdout, f"faceverify {' '.join(args)}: no {fragment} in\n" \
                                           f"{out.stdout}"
    # `nik example` printed the NIKs the session then enrols.
    made = subprocess.run([sys.executable, "-m", "server.tools.cli", "nik", "example",
                           "--count", "2"], capture_output=True, text=True, timeout=60)
    enrolled = [args[1] for args, _ in steps if args[0] == "enroll"]
    assert made.stdout.split() == enrolled
