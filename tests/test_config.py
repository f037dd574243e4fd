"""The CLI contract: every option has help, unknown options fail, YAML is validated like flags."""
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from medtune.config import TrainConfig, parse_config
from medtune.errors import UserError
from dataclasses import fields


def parse(*argv):
    return parse_config(list(argv), "phi3", "train_phi.py", "test")


def test_help_lists_every_option():
    out = subprocess.run([sys.executable, "scripts/train_phi.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert f.metadata["help"], f.name
    assert "--config" in out


def test_defaults_suit_a_t4():
    cfg, given = parse()
    # 8 x 1: measured to fit a T4 at 2048 tokens for both presets (BENCHMARKS.md)
    assert (cfg.batch_size, cfg.grad_accum, cfg.learning_rate, cfg.optim) == (8, 1, 2e-4, "adamw_8bit")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.max_seq_length) == (16, 16, 0.0, 2048)
    assert cfg.load_in_4bit and cfg.dtype == "auto" and cfg.run_name == "phi3-medical" and given == set()


def test_smoke_defaults_yield_to_explicit_flags():
    cfg, given = parse("--smoke", "--max-steps", "3")
    assert cfg.max_steps == 3 and cfg.dataset.endswith("medical_reasoning_sample.jsonl")
    assert cfg.run_name == "phi3-smoke" and given == {"smoke", "max_steps"}


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"lora_r": 8, "target_modules": ["q_proj", "v_proj"], "learning_rate": 1e-4}))
    cfg, _ = parse("--config", str(path), "--lora-r", "32")
    assert (cfg.lora_r, cfg.target_modules, cfg.learning_rate) == (32, ["q_proj", "v_proj"], 1e-4)


@pytest.mark.parametrize("argv, words", [
    (["--bogus", "1"], ["Unknown option", "--bogus", "--help"]),
    (["--lora-r", "x"], ["--lora-r", "whole number"]),
    (["--max-steps", "10", "--epochs", "1"], ["either --max-steps or --epochs"]),
    (["--eval-samples", "5", "--eval-fraction", "0.1"], ["either --eval-samples or --eval-fraction"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--run-name", "a/b"], ["--run-name", "folder name"]),
    (["--batch-size", "0", "--learning-rate", "-1"], ["--batch-size must be at least 1", "--learning-rate must be positive"]),
])
def test_bad_flags(argv, words):
    with pytest.raises(UserError) as e:
        parse(*argv)
    for w in words:
        assert w in str(e.value)


def test_bad_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\nbatch_size: two\n")
    with pytest.raises(UserError) as e:
        parse("--config", str(path))
    assert "unknown option(s) lora_rank" in str(e.value) and "batch_size" in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        parse("--config", str(tmp_path / "missing.yaml"))
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        parse("--config", str(path))


def test_cli_error_is_one_paragraph_without_traceback():
    r = subprocess.run([sys.executable, "scripts/train_mistral.py", "--epochs", "0"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "error: --epochs must be positive" in r.stderr
