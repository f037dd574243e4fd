"""What the commands print, word for word where a newcomer reads it: summaries, tables, --help, errors."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO
from medtune.errors import UserError, report_user_errors


def test_a_short_run_summary_says_why_it_has_no_speed(tmp_path, capsys):
    from medtune.train.cli import print_summary

    print_summary(tmp_path, {"steps": 3, "effective_batch": 4, "world_size": 1, "wall_time_s": 9.0, "resumed_from": None,
                             "train_loss": 10.9, "eval_loss": None, "tokens_per_s": None, "s_per_step": None,
                             "steady_state_steps": None, "peak_gpu_reserved_gib": None})
    said = capsys.readouterr().out
    assert "trained tokens/s n/a (too few steps for a steady state)" in said and "None" not in said


def test_steady_state_leaves_out_the_steps_with_eval_or_checkpoint(tmp_path):
    from medtune.train.reporting import RunLog

    log = RunLog(tmp_path / "metrics.jsonl")
    t = 0.0
    for step in range(1, 13):  # 4.6 s and 1000 tokens a step; the eval and checkpoint after step 8 take 13.4 s more
        t += 4.6 + (13.4 if step == 9 else 0.0)
        log.steps.append((step, t, 1000 * step))
    log.paused = {8}
    speed = log.throughput()
    assert speed["s_per_step"] == pytest.approx(4.6) and speed["tokens_per_s"] == pytest.approx(1000 / 4.6)
    assert speed["steps_measured"] == "7-12 less 1 with eval or checkpoint"


def test_data_line_without_long_rows():
    from medtune.train.reporting import describe_data

    stats = {"kept": 56, "too_long": 0, "mean_tokens": 412.5}
    line = describe_data(stats, {**stats, "kept": 8}, SimpleNamespace(truncate=False, max_seq_length=1024))
    assert line == "Data: 56 training rows, 8 held out; none longer than 1024 tokens; mean 412.5 tokens per row."


def test_check_table_fits_its_content(capsys):
    from medtune.export.cli import print_checks

    checks = [{"file": "phi3-medical-long-run-name-q4_k_m.gguf", "check": "top-1 agreement (3 prompts, 512 positions)",
               "value": "0.998", "limit": ">= 0.98", "ok": True},
              {"file": "merged/", "check": "logits vs adapter-on-base (rel. max)", "value": "1.2e-05", "limit": "1e-02",
               "ok": True}]
    print_checks(checks)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len({len(line.rstrip()) - len(line.rstrip().split()[-1]) for line in lines}) == 1  # "ok" column aligned
    assert all("phi3-medical-long-run-name-q4_k_m.gguf  top-1" in line for line in lines if "q4_k_m" in line)


@pytest.mark.parametrize("script", ["export.py", "demo.py"])
def test_help_describes_the_command_not_the_module(script):
    r = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "The module behind" not in r.stdout, r.stdout


def test_json_error_names_the_column_once(tmp_path):
    from medtune.train.data import read_local

    bad = tmp_path / "ctrl.jsonl"
    bad.write_text('{"Question": "a\tb"}\n')  # a raw tab inside a JSON string
    with pytest.raises(UserError) as e:
        read_local(bad)
    assert "Invalid control character at column 16" in str(e.value) and "at at" not in str(e.value)


def test_error_paragraph_never_breaks_a_flag_name(capsys):
    @report_user_errors
    def fails():
        raise UserError("x" * 86 + " --eval-fraction must be between 0 and 1, got 1.5.")

    with pytest.raises(SystemExit):
        fails()
    assert "--eval-fraction" in capsys.readouterr().err


def test_a_bad_choice_is_one_line_not_the_usage():
    from medtune.config import parse_config

    with pytest.raises(UserError, match=r"^--dtype must be one of auto, float16, bfloat16, float32, got 'fp8'\.$"):
        parse_config(["--dtype", "fp8"], "phi3", "scripts/train_phi.py", "t")


def test_comparison_report_header(tmp_path):
    from medtune.compare.cli import Run, summary_table

    info = {"family": "phi3", "summary": {"tokens_per_s": 1234.0, "wall_time_s": 600.0, "peak_gpu_reserved_gib": 9.5}}
    header = summary_table([Run(tmp_path / "phi3-medical", info, [], None, False)]).splitlines()[0]
    assert header == "| claim | measured as | Phi-3 (phi3-medical) |"


NOISE = ("_pytree", "KernelPreference", "ScaleCalculationMode", "Failed to load", "mtime may not be reliable",
         "falling back to", "llama_model_loader", "To create a public link")


def first_screen_is_ours(out, command):
    log = Path("/nonexistent")
    for line in out.splitlines():
        if line.startswith("Third-party messages: "):
            log = Path(line.split(": ", 1)[1].split(" (--verbose")[0])
    assert log.name == f"{command}.log" and log.is_file(), out[-3000:]
    for noise in NOISE:
        assert noise not in out, f"{noise!r} on the screen:\n{out[-3000:]}"
    return log.read_text()


@pytest.mark.slow  # trains and exports
def test_train_export_and_evaluate_keep_third_party_noise_in_their_logs(tmp_path):
    r = subprocess.run([sys.executable, "scripts/train_phi.py", "--smoke", "--output-dir", tmp_path, "--max-steps", "2",
                        "--eval-samples", "0"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = first_screen_is_ours(r.stdout + r.stderr, "train")
    assert any(noise in logged for noise in NOISE), logged  # which ones depends on the torch/torchao builds

    run = tmp_path / "phi3-smoke"
    r = subprocess.run([sys.executable, "scripts/export.py", run, "--no-verify"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    logged = first_screen_is_ours(r.stdout + r.stderr, "export")
    assert "llama_model_quantize" in logged or "llama_model_loader" in logged, logged[-2000:]
    r = subprocess.run([sys.executable, "scripts/evaluate.py", run, "--offline", "--mode", "loglik", "--limit", "2",
                        "--benchmarks", "medqa"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    first_screen_is_ours(r.stdout + r.stderr, "evaluate")
    verbose = subprocess.run([sys.executable, "scripts/export.py", run, "--no-verify", "--overwrite", "--verbose"],
                             cwd=REPO, capture_output=True, text=True)
    assert verbose.returncode == 0 and "llama_model_loader" in verbose.stdout + verbose.stderr
