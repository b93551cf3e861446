"""The README is a front door (short, its commands the ones CI runs, its links alive) and the
documentation site builds in strict mode: a broken reference or docstring fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


def test_the_readmes_second_command_is_what_ci_runs():
    commands = re.findall(r"```bash\n(python3 -m venv[^\n]*)\n```", README)
    assert len(commands) == 2 and commands[0].endswith("python scripts/fit.py")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1].replace("python3 -m venv .venv && . .venv/bin/activate && ", "") in ci


def test_every_file_the_readme_links_exists():
    links = re.findall(r"\]\(((?!https?:)[^)#]+)\)", README)
    assert links, "the README links its documentation"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_the_readme_and_docs_tell_no_history():
    """What is true now, for a user: no dates of measurements or fixes, no "no longer"."""
    pages = [README] + [p.read_text() for p in (ROOT / "docs").glob("*.md")]
    for text in pages:
        assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text)
        assert "no longer" not in text and "this session" not in text


def test_the_documentation_site_builds_in_strict_mode(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                             str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "annealed_evidence" in api and "check_fraction" in api
