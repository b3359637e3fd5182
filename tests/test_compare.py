"""`lipnext compare`: runs side by side (table, md, csv) and one CRA-radius overlay plot."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from lipnext.card import SAMPLES_NAME
from lipnext.cli import main
from lipnext.compare import compare_rows, find_runs, format_markdown, write_compare


@pytest.fixture
def study(tiny_run, tmp_path):
    """A study-like folder of two runs: the tiny run, and a copy recorded as trained with
    generated images and without per-image certificates."""
    root = tmp_path / "study"
    a = shutil.copytree(tiny_run, root / "real" / "seed0")
    b = shutil.copytree(tiny_run, root / "gen" / "seed0")
    res = json.loads((b / "results.json").read_text())
    res.update(additional_data={"generator": "npz:g.npz", "images": 1000, "real_to_generated": "1:1"},
               cra={"0.25": 0.5, "0.5": 0.25, "0.75": 0.0}, clean_accuracy=0.75)
    (b / "results.json").write_text(json.dumps(res))
    (b / SAMPLES_NAME).unlink()
    return root, a, b


def test_compare_cli_table_files_and_plot(study, tmp_path, capsys):
    root, a, b = study
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [ln for ln in printed.splitlines() if ln.startswith("|")]
    assert lines[0].startswith("| run | model | params | data track | epochs | wall s | clean % | CRA@0.25 %")
    assert len(lines) == 4                                   # a given run is listed once
    res_a = json.loads((a / "results.json").read_text())
    assert f"| {100 * res_a['clean_accuracy']:.1f} | {100 * res_a['cra']['0.25']:.1f} |" in lines[2]
    assert "| real + generated (1:1) |" in lines[3] and "| 75.0 | 50.0 | 25.0 | 0.0 |" in lines[3]
    with open(out / "compare.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][-1] == "bound L" and len(rows) == 3 and rows[2][3] == "real + generated (1:1)"
    assert (out / "compare.md").read_text() == "".join(ln + "\n" for ln in lines)
    assert (out / "compare.png").stat().st_size > 10_000
    assert f"written: {out / 'compare.md'}" in printed


def test_compare_api(study):
    root, a, b = study
    runs = find_runs([root])
    assert runs == [b, a]                                   # sorted paths below the folder
    rows = compare_rows(runs)
    assert [r["track"] for r in rows] == ["real + generated (1:1)", "real"]
    assert rows[0]["cra"] == {"0.25": 0.5, "0.5": 0.25, "0.75": 0.0} and rows[1]["params"] > 0
    assert format_markdown(rows).count("\n") == 4
    assert set(write_compare(rows, root / "out")) == {"md", "csv", "png"}


def test_compare_usage_errors(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "none")]) == 2
    assert "no run folder at" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "holds no finished run" in capsys.readouterr().err
