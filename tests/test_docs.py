"""The documentation stays true to the repository it ships in.

- Nothing in the repository points to a file outside it.
- Every ``docs/spec.md section N`` cited anywhere exists in docs/spec.md, and the
  names csrc/mada_math.h computes are the ones the spec's equations define.
- README's layout section names every module of ``mada_fused/`` and every
  top-level folder.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
HEADER = ROOT / "csrc" / "mada_math.h"

# Build outputs and tool caches: not part of the repository.
_SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks"}

# A relative path to the old out-of-tree contract, or an absolute path into the
# workspace this project was developed in (written so this file does not match itself).
_OUTSIDE = re.compile(r"\.\.[/]shared|shared[/]SPEC|/work[/]")


def _skipped(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return any(p in _SKIP_DIRS or p.endswith(".egg-info") for p in parts) or parts[:2] == ("bench", "out")


def _text_files() -> list[Path]:
    out = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not _skipped(Path(top) / d))  # prune .venv, build, ...
        for name in sorted(files):
            path = Path(top) / name
            if _skipped(path) or path.suffix in (".so", ".pyc", ".png", ".pdf"):  # .git is a file in a worktree
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # binary
            if "\0" not in text:
                out.append(path)
    return out


def _sections(markdown: str) -> dict[str, str]:
    """``{"1": text, "1.2": text, ...}`` for the numbered headings of docs/spec.md."""
    heads = list(re.finditer(r"^#{2,4} (\d+(?:\.\d+)*)\.? .*$", markdown, re.M))
    return {
        m.group(1): markdown[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(markdown)]
        for i, m in enumerate(heads)
    }


@pytest.fixture(scope="module")
def spec_sections() -> dict[str, str]:
    assert SPEC.is_file(), "docs/spec.md is missing: the numerical contract ships with the code"
    return _sections(SPEC.read_text(encoding="utf-8"))


def test_nothing_points_outside_the_repository():
    bad = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in _text_files()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert not bad, "references to files outside the repository (use docs/spec.md):\n" + "\n".join(bad)


# "docs/spec.md section 2.3", "docs/spec.md sections 3 and 4", "docs/spec.md (sections 1, 3, 4, 5)";
# inside docs/spec.md itself, plain "section 2.2".
_NUMS = r"sections? (\d+(?:\.\d+)*(?:(?:,? and |, )\d+(?:\.\d+)*)*)"
_CITE_ELSEWHERE = re.compile(r"docs/spec\.md\s+\(?" + _NUMS)
_CITE_IN_SPEC = re.compile(r"\b" + _NUMS)


def test_cited_spec_sections_exist(spec_sections):
    missing, cited = [], 0
    for path in _text_files():
        cite = _CITE_IN_SPEC if path == SPEC else _CITE_ELSEWHERE
        for m in cite.finditer(path.read_text(encoding="utf-8")):
            for num in re.split(r",? and |, ", m.group(1)):
                cited += 1
                if num not in spec_sections:
                    missing.append(f"{path.relative_to(ROOT)}: section {num}")
    assert cited, "no file cites a section of docs/spec.md: the pattern above is stale"
    assert not missing, "cited sections that docs/spec.md does not have:\n" + "\n".join(missing)


def _header_fields(struct: str) -> list[str]:
    body = re.search(r"struct " + struct + r" \{\s*T ([^;]*);", HEADER.read_text()).group(1)
    return [f.strip() for f in body.split(",")]


# How the header spells names the spec writes differently.
_SPELLED = {"gh2": "gh^2", "m0": "m'", "v0": "v'", "n0": "n'", "g_prev": "g'"}


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][\w]*(?:\^2|')?", text))


def test_header_terms_are_the_spec_equations(spec_sections):
    step = _names_in(spec_sections["1.2"])
    missing = [f for f in _header_fields("MadaMid") if _SPELLED.get(f, f) not in step]
    assert not missing, f"csrc/mada_math.h's MadaMid computes {missing}, which docs/spec.md section 1.2 never defines"

    state = spec_sections["1.4"]
    missing = [f for f in _header_fields("MadaState") if f"`{f}`" not in state]
    assert not missing, f"state {missing} of csrc/mada_math.h is not in docs/spec.md section 1.4's allocation rule"

    coefs = re.search(r"enum Coef : int \{([^}]*)\}", HEADER.read_text()).group(1)
    names = [c.split("=")[0].strip()[1:].lower() for c in coefs.split(",") if "kNumCoef" not in c]
    missing = [n for n in names if f"du/d{n} " not in spec_sections["2.2"]]
    assert names and not missing, f"docs/spec.md section 2.2 has no closed form for du/d{missing}"


def _top_level_folders() -> list[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        return sorted(p.name for p in ROOT.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and not _skipped(p))
    return sorted({f.split("/")[0] for f in files if "/" in f})


def _readme_layout() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    assert m, "README.md has no '## Layout' section"
    return m.group(1)


def test_readme_layout_names_every_module_and_folder():
    layout = _readme_layout()
    pkg = ROOT / "mada_fused"
    modules = sorted(p.relative_to(pkg).as_posix() for p in pkg.rglob("*.py") if not _skipped(p))
    assert modules
    missing = [m for m in modules if f"`{m}`" not in layout]
    assert not missing, f"README.md's Layout section does not name mada_fused module(s) {missing}"
    missing = [d for d in _top_level_folders() if f"`{d}/`" not in layout]
    assert not missing, f"README.md's Layout section does not name top-level folder(s) {missing}"


def test_readme_links_the_spec():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/spec.md)" in readme and SPEC.is_file(), "README.md must link docs/spec.md"
