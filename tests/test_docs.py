"""Every ```python block of README.md and docs/*.md runs as written, in a fresh interpreter,
from an empty folder, so that a documentation example cannot silently break.

A block that genuinely cannot run here (it needs a GPU, say) is marked on the line just
before its fence with ``<!-- docs-test: skip (the reason) -->``; the test reports it as
skipped with that reason. Keep such blocks rare.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^(?P<marker><!-- docs-test: skip \((?P<reason>[^)]+)\) -->\n)?```python\n(?P<code>.*?)^```",
                   re.M | re.S)


def python_blocks() -> list[tuple[str, str, str | None]]:
    """(id 'FILE:LINE', code, skip reason or None) of every python block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start("code"))
            out.append((f"{path.relative_to(REPO)}:{line}", m.group("code"), m.group("reason")))
    return out


BLOCKS = python_blocks()


def test_the_blocks_are_found():
    ids = [b[0] for b in BLOCKS]
    assert any(i.startswith("README.md:") for i in ids), ids
    fences = sum(p.read_text().count("```python") for p in DOCS)
    assert len(BLOCKS) == fences                 # a fence the pattern misses would go untested


@pytest.mark.slow
@pytest.mark.parametrize("code,reason", [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_python_block_runs_as_written(code, reason, tmp_path):
    if reason:
        pytest.skip(f"marked in the docs: {reason}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{p.stderr[-4000:]}"
