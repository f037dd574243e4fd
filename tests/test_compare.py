"""compare.py on the two evaluated quickstart runs (Phi-3 and Mistral): report.md, its charts, bad input."""
import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from medtune.errors import UserError
pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


def compare(*argv):
    from medtune.compare.cli import compare as run_compare, parse_args

    return run_compare(parse_args([str(a) for a in argv]))


def test_report_and_charts_from_two_quickstart_runs(evaluated, tmp_path, capsys):
    phi, mistral = evaluated("phi3"), evaluated("mistral")
    out = compare(phi, mistral, "--out", tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "loss_curves.png", "report.md", "speed_memory.png"]
    report = (out / "report.md").read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # relative links that resolve, as on GitHub
        assert (out / image).read_bytes()[:8] == PNG
    assert report.startswith("# Phi-3 (phi3-smoke) vs Mistral-7B (mistral-smoke): measured")
    assert "quickstart (`--smoke`) runs" in report
    for row in ("trained tokens/s", "training wall time", "peak GPU memory", "MedQA (USMLE, 4 options) accuracy",
                "MedMCQA accuracy", "PubMedQA (labelled) accuracy", "format adherence", "unparseable final answers",
                "verbosity: median response length", "## Held-out loss", "## Published reference numbers"):
        assert row in report, row
    for run in (phi, mistral):  # measured values, from each run's own files
        info = json.loads((run / "run_info.json").read_text())
        summary = json.loads((run / "eval" / "summary.json").read_text())
        assert f"{info['summary']['tokens_per_s']:,.0f}" in report
        for key in ("medqa-loglik", "pubmedqa-generate"):
            for role in ("finetuned", "base"):
                e = summary["results"][role][key]
                assert f"{100 * e['accuracy']:.1f}% [{100 * e['ci95'][0]:.1f}, {100 * e['ci95'][1]:.1f}]" in report
        heldout = summary["results"]["base"]["heldout"]
        assert f"{heldout['loss']:.4f} / {heldout['perplexity']:,.1f}" in report
    assert "| 69.0 | 57.9 | 77.7 |" in report
    assert f"Wrote {out}/:" in capsys.readouterr().out

    # a second report replaces the first in place
    assert compare(phi, mistral, "--out", out) == out and (out / "report.md").read_text().startswith("# Phi-3")


def test_runs_not_yet_evaluated_are_reported_as_such(smoke_runs, tmp_path, capsys):
    out = compare(smoke_runs("phi3"), smoke_runs("mistral"), "--out", tmp_path / "report")
    report = (out / "report.md").read_text()
    assert "Not evaluated yet" in report and "not evaluated" in report and not (out / "accuracy.png").exists()
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG
    assert "has no eval/summary.json" in capsys.readouterr().err


def test_bad_input(smoke_runs, tmp_path):
    with pytest.raises(UserError, match="no run folder at .*missing.*the folder does not exist"):
        compare(tmp_path / "missing", smoke_runs("mistral"), "--out", tmp_path / "report")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds more than an earlier report"):
        compare(smoke_runs("phi3"), smoke_runs("mistral"), "--out", busy)
    assert [p.name for p in busy.iterdir()] == ["notes.txt"] and not (tmp_path / "report").exists()


def test_cli(smoke_runs, tmp_path):
    ok = subprocess.run([sys.executable, "scripts/compare.py", str(smoke_runs("phi3")), str(smoke_runs("mistral")),
                         "--out", str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"Wrote {tmp_path / 'report'}/:" in ok.stdout and "report.md" in ok.stdout
    bad = subprocess.run([sys.executable, "scripts/compare.py", str(tmp_path / "nowhere"), str(smoke_runs("phi3"))],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "no run folder at" in bad.stderr
