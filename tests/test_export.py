"""Export of the quickstart runs: merged safetensors, GGUF through llama.cpp's own tools, Modelfile,
verification, atomicity and every bad input."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, REPO, copy_run
from medtune.errors import UserError
from medtune.families import FAMILIES as SPECS

pytestmark = pytest.mark.slow
QUANTS = "q4_k_m,q8_0,f16"


def export(*argv):
    from medtune.export.cli import export as run_export, parse_args

    return run_export(parse_args([str(a) for a in argv]))


@pytest.fixture(scope="session")
def exported(smoke_runs):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = export(smoke_runs(family), "--quant", QUANTS)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_every_file_and_verifies(exported, family):
    final, report = exported(family)
    run = final.parent.name
    expected = {f"{run}-q4_k_m.gguf", f"{run}-q8_0.gguf", f"{run}-f16.gguf", "Modelfile", "report.json", "merged"}
    assert {p.name for p in final.iterdir()} == expected
    assert report["passed"] and json.loads((final / "report.json").read_text())["passed"]
    checks = {(c["file"], c["check"]): c for c in report["checks"]}
    for q in ("f16", "q8_0", "q4_k_m"):
        assert checks[(f"{run}-{q}.gguf", "tokenization equals HF tokenizer")]["ok"]
        assert checks[(f"{run}-{q}.gguf", "chat template, BOS/EOS/pad ids in GGUF")]["ok"]
    f16 = checks[(f"{run}-f16.gguf", "logits vs merged (rel. max)")]
    assert f16["ok"] and float(f16["value"]) <= 2e-2
    assert checks[("merged/", "logits vs adapter-on-base (rel. max)")]["ok"]
    q8 = [c for c in report["checks"] if c["file"] == f"{run}-q8_0.gguf" and c["check"].startswith("top-1 agreement (")]
    assert q8[0]["ok"] and float(q8[0]["value"]) >= 0.98
    assert set(report["stage_seconds"]) >= {"merge", "gguf f16", "gguf q8_0", "quantize q4_k_m", "verify"}


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_loads_without_peft_or_unsloth(exported, family):
    merged = exported(family)[0] / "merged"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer.model",
                 "chat_template.jinja"):
        assert (merged / name).is_file(), name
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    gen = json.loads((merged / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids(SPECS[family].end_of_turn) in gen["eos_token_id"]
    # a clean interpreter: no Unsloth patches, no PEFT
    code = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
            "assert 'peft' not in sys.modules and 'unsloth' not in sys.modules; "
            "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(merged)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == {"phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM"}[family]


def go_template(template, system, prompt, response=""):
    """Enough of Ollama's Go templates for our Modelfiles: {{ if .X }}...{{ end }} and {{ .X }}."""
    values = {"System": system, "Prompt": prompt, "Response": response}
    out = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m.group(2) if values[m.group(1)] else "",
                 template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m.group(1)], out)


@pytest.mark.parametrize("family", FAMILIES)
def test_modelfile_matches_the_chat_template(exported, family):
    final, _ = exported(family)
    text = (final / "Modelfile").read_text()
    assert f"FROM ./{final.parent.name}-q4_k_m.gguf" in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    assert system == (REPO / "prompts/system_prompt.txt").read_text().strip()
    stops = re.findall(r'PARAMETER stop "(.*?)"', text)
    assert stops == list(SPECS[family].stop_tokens) and SPECS[family].end_of_turn in stops
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final / "merged")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]
    jinja = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token  # Ollama adds BOS itself
    assert bos + go_template(template, system, "Q?") == prompt + (" " if family == "mistral" else "") + (
        "<|end|>\n" if family == "phi3" else "</s>")
    assert bos + go_template(template, system, "Q?", "A.") == jinja


def test_a_4bit_base_is_dequantized_before_merging(tmp_path):
    """Unsloth's default bases are bitsandbytes 4-bit checkpoints: export dequantizes, then merges."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from conftest import train
    from medtune.train.modeling import tiny_model_dir

    tiny = tiny_model_dir(SPECS["phi3"])
    base = tmp_path / "tiny-phi3-bnb-4bit"
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float16)
    AutoModelForCausalLM.from_pretrained(tiny, quantization_config=quant, dtype=torch.float16).save_pretrained(base)
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy2(f, base / f.name)
    run = train("phi3", "--smoke", "--model", base, "--output-dir", tmp_path, "--run-name", "bnb", "--max-steps", "4")
    final, report = export(run, "--quant", "q8_0")
    assert report["passed"], report["checks"]
    assert "quantization_config" not in json.loads((final / "merged" / "config.json").read_text())


def test_gguf_carries_template_and_special_ids(exported):
    from medtune.export.gguf import gguf_metadata

    final, _ = exported("phi3")
    meta = gguf_metadata(final / "phi3-smoke-q4_k_m.gguf")
    assert (meta["bos"], meta["eos"], meta["pad"], meta["add_bos"]) == (1, 32000, 32000, True)
    assert meta["chat_template"] == SPECS["phi3"].chat_template()
    assert "phi-3" in meta["name"].lower()  # llama.cpp keys Phi-3's whitespace handling on the name


def test_failure_mid_export_leaves_nothing(smoke_runs, tmp_path, monkeypatch):
    from medtune.export import gguf

    def quantize_fails(*args):  # after the real merge and f16 conversion
        raise RuntimeError("injected failure in quantize")

    monkeypatch.setattr(gguf, "quantize", quantize_fails)
    run = tmp_path / "run"
    shutil.copytree(smoke_runs("mistral"), run, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
    with pytest.raises(RuntimeError, match="injected"):
        export(run)
    assert sorted(p.name for p in run.iterdir() if "export" in p.name) == []


def test_existing_export_needs_overwrite(exported, smoke_runs):
    exported("mistral")
    with pytest.raises(UserError, match="already exists. Add --overwrite"):
        export(smoke_runs("mistral"))


@pytest.mark.parametrize("argv, words", [
    (["--quant", "q4_k_m,q3_xs"], ["q3_xs", "Valid types", "q5_k_m", "bf16"]),
    (["--push-to-hub", "not a repo"], ["owner/name"]),
    (["--push-to-hub", "me/model"], ["token", "huggingface-cli login"]),
])
def test_bad_arguments(smoke_runs, argv, words, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # as on a machine never logged in
    with pytest.raises(UserError) as e:
        export(smoke_runs("phi3"), *argv)
    for w in words:
        assert w in str(e.value)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(UserError, match="no run folder"):
        export(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError) as e:
        export(tmp_path)
    assert "adapter_model.safetensors" in str(e.value) and "found: notes.txt" in str(e.value)


@pytest.mark.parametrize("damage, words", [
    (lambda run: (run / "adapter_model.safetensors").write_bytes((run / "adapter_model.safetensors").read_bytes()[:-999]),
     ["adapter_model.safetensors is cut short", "Restore the damaged file"]),
    (lambda run: (run / "tokenizer.model").unlink(), ["tokenizer.model missing", "Copy the base model's tokenizer.model"]),
])
def test_a_damaged_run_folder_stops_before_the_merge(smoke_runs, tmp_path, monkeypatch, damage, words):
    from medtune.export import merge

    monkeypatch.setattr(merge, "merge", lambda *a, **k: pytest.fail("a damaged run folder was merged"))
    run = copy_run(smoke_runs("phi3"), tmp_path / "run")
    damage(run)
    with pytest.raises(UserError) as e:
        export(run)
    for w in [*words, "(found: ", "adapter_config.json, adapter_model.safetensors, chat_template.jinja, config.yaml"]:
        assert w in str(e.value), str(e.value)
    assert not any("export" in p.name for p in run.iterdir())


def test_adapter_that_does_not_match_the_base(smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs("phi3"), run, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
    info = json.loads((run / "run_info.json").read_text())
    info["base_model"] = json.loads((smoke_runs("mistral") / "run_info.json").read_text())["base_model"]
    (run / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not match the base model"):
        export(run, "--no-verify")
    assert not any("export" in p.name for p in run.iterdir())


def test_not_enough_disk(smoke_runs, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError) as e:
        export(smoke_runs("phi3"), "--overwrite")
    assert "Not enough disk space" in str(e.value) and "GB is free" in str(e.value)


def test_llama_cpp_sources_missing(smoke_runs, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path))
    with pytest.raises(UserError) as e:
        export(smoke_runs("phi3"), "--overwrite")
    assert "llama.cpp's converter is not available" in str(e.value) and "bash scripts/setup.sh" in str(e.value)


def test_cli_exports_and_answers_through_llama_cpp(smoke_runs, tmp_path):
    run = tmp_path / "phi3-smoke"
    shutil.copytree(smoke_runs("phi3"), run, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
    r = subprocess.run([sys.executable, "scripts/export.py", str(run)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"One answer from {run}/export/phi3-smoke-q4_k_m.gguf through llama.cpp" in r.stdout
    assert f"Wrote {run}/export/" in r.stdout
    bad = subprocess.run([sys.executable, "scripts/export.py", str(run), "--quant", "q9"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "Valid types" in bad.stderr
