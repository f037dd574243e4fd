"""scripts/bench_eval.py on a tiny model (CPU): each case measured and compared output by output with
the old path, and the BENCHMARKS.md section written from the results."""
import json
import subprocess
import sys

import pytest

from conftest import REPO
from medtune.families import FAMILIES


def main(argv):
    r = subprocess.run([sys.executable, "scripts/bench_eval.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_bench_eval_measures_compares_and_reports(tmp_path):
    from medtune.train.modeling import tiny_model_dir

    model = tiny_model_dir(FAMILIES["mistral"])
    out = tmp_path / "bench.jsonl"
    main(["--model", str(model), "--family", "mistral", "--case", "old:6:8", "--case", "continuous@4:6:8",
          "--case", "compiled@4:6:8", "--case", "best:6:8", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in rows[:3]] == ["old", "continuous", "compiled"] and rows[3]["rows"] == 4
    assert rows[3]["case"] == max(rows[1:3], key=lambda r: r["tokens_per_s"])["case"]
    for r in rows:
        assert r["tokens"] == 6 * 8 and r["tokens_per_s"] > 0 and r["weights_used"] == "float32"
    assert rows[1]["identical_outputs"] == rows[2]["identical_outputs"] == rows[3]["identical_outputs"] == "6/6"
    assert rows[1]["resolved"]["max_requests_per_batch"] == "4"

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Evaluation: generation throughput\n\nold numbers\n\n## Later\n\nkept\n")
    main(["--report", str(out), "--benchmarks-md", str(md), "--command", "the command"])
    text = md.read_text()
    assert "old numbers" not in text and text.endswith("## Later\n\nkept\n") and "`the command`" in text
    assert "| mistral | continuous (at most 4 rows) | float32 | 6 x 8 | whole card |" in text
