"""The run folder's one check, on folders built as training writes them: what each stage needs, and a
missing, damaged or cut-short file named with what the folder does hold. No model is loaded."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from medtune import runfolder
from medtune.errors import UserError


@pytest.fixture
def run_dir(tmp_path):
    """A finished run folder's files, written through runfolder as training writes them (a small adapter)."""
    run = tmp_path / "phi3-smoke"
    run.mkdir()
    runfolder.write_start(run, {"smoke": False, "seed": 3407}, "Think first.", "{{ messages }}",
                          [{"Question": "Q", "Complex_CoT": "C", "Response": "R"}])
    save_file({"base_model.model.layers.0.lora_A.weight": np.ones((4, 8), np.float32),
               "base_model.model.layers.0.lora_B.weight": np.zeros((8, 4), np.float32)}, run / runfolder.ADAPTER)
    for name in (runfolder.ADAPTER_CONFIG, runfolder.TOKENIZER, runfolder.TOKENIZER_CONFIG):
        (run / name).write_text("{}")
    (run / runfolder.TOKENIZER_MODEL).write_bytes(b"\x0a\x03abc")
    runfolder.write_run_info(run, {"family": "phi3", "base_model": "some/base"})
    return run


def error(path, needs):
    with pytest.raises(UserError) as e:
        runfolder.check(path, needs)
    return str(e.value)


def test_a_complete_folder_serves_every_stage(run_dir):
    for needs in (runfolder.FOR_EXPORT, runfolder.FOR_MODEL, runfolder.FOR_PROMPT, runfolder.FOR_REPORT):
        assert runfolder.check(run_dir, needs) == run_dir
    run = runfolder.open_run(run_dir, runfolder.FOR_EXPORT)
    assert run.family.name == "phi3" and not run.smoke and run.config["seed"] == 3407
    assert run.system_prompt() == "Think first." and run.chat_template() == "{{ messages }}"
    assert run.heldout() == [{"Question": "Q", "Complex_CoT": "C", "Response": "R"}] and run.metrics() == []
    assert run.base_source() == "some/base" and run.adapter == run_dir / "adapter_model.safetensors"
    assert not any(p.name.startswith(".") for p in run_dir.iterdir())  # no temporary files left behind


def test_missing_tokenizer_model_stops_export_and_lists_the_folder(run_dir):
    (run_dir / "tokenizer.model").unlink()
    msg = error(run_dir, runfolder.FOR_EXPORT)
    assert "not a finished run folder: tokenizer.model missing" in msg
    assert "found: adapter_config.json, adapter_model.safetensors, chat_template.jinja, config.yaml" in msg
    assert "Copy the base model's tokenizer.model" in msg
    assert runfolder.check(run_dir, runfolder.FOR_MODEL) == run_dir  # evaluation and the demo do not need it


@pytest.mark.parametrize("keep", [0, 5, 100, -1])
def test_a_cut_short_adapter_is_named_with_its_size(run_dir, keep):
    adapter = run_dir / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    msg = error(run_dir, runfolder.FOR_MODEL)
    assert "adapter_model.safetensors" in msg and "found: adapter_config.json" in msg
    assert ("cut short" in msg or "not even a safetensors header" in msg) and "Restore the damaged file" in msg


def test_damaged_json_and_yaml_and_an_unknown_family(run_dir):
    (run_dir / "config.yaml").write_text("seed: [1, 2\n")
    (run_dir / "adapter_config.json").write_text("{not json")
    msg = error(run_dir, runfolder.FOR_MODEL)
    assert "config.yaml is not valid YAML" in msg and "adapter_config.json is not valid JSON" in msg
    (run_dir / "config.yaml").write_text("seed: 1\n")
    (run_dir / "adapter_config.json").write_text("{}")
    (run_dir / "run_info.json").write_text(json.dumps({"family": "llama"}))
    assert "names no known model family ('llama'" in error(run_dir, runfolder.FOR_REPORT)


def test_every_missing_file_at_once_and_the_unfinished_run_hint(run_dir):
    for name in ("adapter_model.safetensors", "system_prompt.txt"):
        (run_dir / name).unlink()
    (run_dir / "checkpoint-6").mkdir()
    msg = error(run_dir, runfolder.FOR_MODEL)
    assert "adapter_model.safetensors, system_prompt.txt missing" in msg and "checkpoint-6/" in msg
    assert "the run did not finish; resume it with --resume" in msg


def test_no_folder(tmp_path):
    assert "There is no run folder at" in error(tmp_path / "nowhere", runfolder.FOR_REPORT)
    assert "the folder does not exist" in error(tmp_path / "nowhere", runfolder.FOR_REPORT)


def test_an_export_knows_its_run(run_dir, tmp_path):
    gguf = run_dir / "export" / "phi3-smoke-q4_k_m.gguf"
    (run_dir / "export" / "merged").mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    for path in (run_dir / "export", run_dir / "export" / "merged", gguf):
        assert runfolder.run_of(path) == run_dir
    assert runfolder.run_of(tmp_path / "elsewhere.gguf") is None
