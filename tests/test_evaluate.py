"""evaluate.py on the quickstart runs and the bundled samples: every output, resume, loglik against a
direct computation, held-out loss with the training masks, the other kinds of model, bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import EVAL_ARGS, REPO, copy_run, evaluate
from medtune.evaluation.tasks import BENCHMARKS, load_items, user_message
from medtune.errors import UserError
from medtune.fileio import read_jsonl as rows

FILES = [f"{b}-{m}.jsonl" for b in BENCHMARKS for m in ("generate", "loglik")] + ["heldout-loss.jsonl"]


@pytest.mark.slow
def test_generate_and_loglik_write_every_output(evaluated):
    run = evaluated("phi3")
    out = run / "eval"
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "base", "summary.json"])
    assert sorted(p.name for p in (out / "base").iterdir()) == sorted(FILES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["kind"] == "run" and summary["model"]["smoke"] and summary["model"]["family"] == "phi3"
    system = (run / "system_prompt.txt").read_text().strip()
    for role, folder in (("finetuned", out), ("base", out / "base")):
        for name in BENCHMARKS:
            generated = rows(folder / f"{name}-generate.jsonl")
            assert len(generated) == 6 and len({r["id"] for r in generated}) == 6
            for r in generated:
                assert {"prompt", "output", "answer", "gold", "correct", "output_tokens"} <= set(r)
                assert system in r["prompt"] and r["prompt"].endswith("<|assistant|>\n")
                assert "Answer: X" in r["prompt"] or "Answer: yes" in r["prompt"]
                assert 0 < r["output_tokens"] <= 8 and r["correct"] == (r["answer"] == r["gold"])
            entry = summary["results"][role][f"{name}-generate"]
            assert entry["n"] == 6 and entry["new_items"] == 6 and entry["data"] == f"data/eval/{name}_sample.jsonl"
            assert entry["unparseable"] == sum(r["answer"] is None for r in generated)
            lo, hi = entry["ci95"]
            assert 0 <= lo <= entry["accuracy"] <= hi <= 1
            scored = rows(folder / f"{name}-loglik.jsonl")
            assert len(scored) == 6 and all(r["prompt"].endswith("<|assistant|>\nAnswer:") for r in scored)
            entry = summary["results"][role][f"{name}-loglik"]
            assert entry["accuracy"] == sum(r["correct"] for r in scored) / 6
            assert entry["accuracy_norm"] == sum(r["correct_norm"] for r in scored) / 6


@pytest.mark.slow
def test_a_second_run_resumes_without_redoing_items(evaluated, tmp_path, capsys):
    moved = shutil.copytree(evaluated("mistral"), tmp_path / "moved")  # results follow the run folder
    out = moved / "eval"
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    _, summary = evaluate(out.parent, *EVAL_ARGS)
    assert all(e["new_items"] == 0 for role in summary["results"].values() for e in role.values())
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before
    printed = capsys.readouterr().out
    assert "accuracy [95% CI]" in printed and "Held-out loss" in printed and f"Wrote {out}/:" in printed

    # a larger --limit with the same seed keeps the earlier sample and evaluates only the new items
    _, summary = evaluate(out.parent, *EVAL_ARGS[:-5], "--limit", "8", "--max-new-tokens", "8", "--benchmarks", "medqa")
    entry = summary["results"]["finetuned"]["medqa-generate"]
    assert entry["n"] == 8 and entry["new_items"] == 2 and len(rows(out / "medqa-generate.jsonl")) == 8


def direct_loglik(model, tokenizer, context, continuation):
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logprobs[t - 1, ids[t]].item() for t in range(n, len(ids)))


@pytest.mark.slow
def test_loglik_equals_a_direct_computation(evaluated):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = evaluated("phi3")
    info = json.loads((run / "run_info.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(info["base_model"]), run).eval()
    for folder, name in ((run / "eval", "medqa"), (run / "eval", "pubmedqa"), (run / "eval" / "base", "medmcqa")):
        for r in rows(folder / f"{name}-loglik.jsonl")[:2]:
            if folder.name == "base":
                with model.disable_adapter():
                    direct = [direct_loglik(model, tokenizer, r["prompt"], " " + c) for c in r["choices"]]
            else:
                direct = [direct_loglik(model, tokenizer, r["prompt"], " " + c) for c in r["choices"]]
            assert r["loglik"] == pytest.approx(direct, abs=1e-3)
            assert r["answer"] == r["choices"][max(range(len(direct)), key=direct.__getitem__)]
            per_char = [ll / len(c) for ll, c in zip(direct, r["choices"])]
            assert r["answer_norm"] == r["choices"][max(range(len(per_char)), key=per_char.__getitem__)]


@pytest.mark.slow
def test_heldout_loss_uses_the_training_masks(evaluated):
    from medtune.config import TrainConfig
    from medtune.train.data import IGNORE_INDEX, to_examples, tokenize_examples
    from medtune.families import FAMILIES as SPECS
    from transformers import AutoTokenizer

    run = evaluated("phi3")
    summary = json.loads((run / "eval" / "summary.json").read_text())
    cfg = TrainConfig(**yaml.safe_load((run / "config.yaml").read_text()))
    heldout = to_examples(rows(run / "heldout.jsonl"), "heldout")
    tokenized, _ = tokenize_examples(heldout, AutoTokenizer.from_pretrained(run), SPECS["phi3"], cfg,
                                     (run / "system_prompt.txt").read_text().strip())
    labelled = sum(label != IGNORE_INDEX for row in tokenized for label in row["labels"])
    tuned, base = summary["results"]["finetuned"]["heldout"], summary["results"]["base"]["heldout"]
    assert tuned["rows"] == base["rows"] == len(heldout) and tuned["tokens"] == base["tokens"] == labelled
    # training's eval loss (bfloat16, averaged per batch) on the same rows and tokens
    trained = json.loads((run / "run_info.json").read_text())["summary"]["eval_loss"]
    assert tuned["loss"] == pytest.approx(trained, abs=0.05)
    assert tuned["loss"] < base["loss"]  # twelve steps of LoRA already fit the answers a little better


@pytest.mark.slow
def test_export_and_model_folders(evaluated, tmp_path):
    """An export evaluates as the merged model (base from its run); a plain model folder as itself."""
    from medtune.export.merge import copy_tokenizer, merge

    evaluated_run = evaluated("phi3")
    run = copy_run(evaluated_run, tmp_path / "phi3-smoke")
    merged = run / "export" / "merged"
    merged.mkdir(parents=True)
    base_model = json.loads((run / "run_info.json").read_text())["base_model"]
    merge(run, base_model, merged, torch.float16, progress=lambda _: None)
    copy_tokenizer(run, merged)
    args = ["--offline", "--benchmarks", "medqa", "--mode", "loglik", "--limit", "3", "--compare-base"]
    out, summary = evaluate(run / "export", *args)
    assert out == run / "export" / "eval" and summary["model"]["kind"] == "export"
    adapter = {r["id"]: r for r in rows(evaluated_run / "eval" / "medqa-loglik.jsonl")}
    for r in rows(out / "medqa-loglik.jsonl"):  # the merged float16 weights compute the adapter's model
        assert r["loglik"] == pytest.approx(adapter[r["id"]]["loglik"], abs=0.05)
    base = {r["id"]: r for r in rows(evaluated_run / "eval" / "base" / "medqa-loglik.jsonl")}
    for r in rows(out / "base" / "medqa-loglik.jsonl"):
        assert r["loglik"] == pytest.approx(base[r["id"]]["loglik"], abs=1e-4)

    out, summary = evaluate(base_model, "--offline", "--benchmarks", "pubmedqa", "--mode", "generate", "--limit", "2",
                            "--max-new-tokens", "4", "--out", tmp_path / "plain")
    assert summary["model"]["kind"] == "model" and list(summary["results"]) == ["model"]
    assert len(rows(out / "pubmedqa-generate.jsonl")) == 2


def test_samples_map_to_items_and_limit_is_a_nested_seeded_sample():
    counts = {}
    for name, bench in BENCHMARKS.items():
        items, source = load_items(bench, offline=True)
        counts[name] = len(items)
        assert source == f"data/eval/{name}_sample.jsonl" and len({it.id for it in items}) == len(items)
        for it in items:
            text = user_message(it, bench, "generate")
            assert it.question in text and all(option in text for option in it.options)
        small, _ = load_items(bench, offline=True, limit=5, seed=7)
        large, _ = load_items(bench, offline=True, limit=9, seed=7)
        assert [it.id for it in large[:5]] == [it.id for it in small]
    assert counts == {"medqa": 16, "medmcqa": 16, "pubmedqa": 14}


def no_model(tmp_path):
    """A model folder whose tokenizer has no chat template."""
    from medtune.families import FAMILIES as SPECS
    from medtune.train.modeling import tiny_model_dir

    folder = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir(SPECS["phi3"]), folder, ignore=shutil.ignore_patterns("chat_template.jinja"))
    return folder


def bad_sample(tmp_path, line):
    path = tmp_path / "medqa.jsonl"
    good = (REPO / "data/eval/medqa_sample.jsonl").read_text().splitlines()[0]
    path.write_text(f"{good}\n{line}\n")
    return f"medqa={path}"


@pytest.mark.slow
@pytest.mark.parametrize("case, words", [
    (lambda run, tmp: [run, "--benchmarks", "medqa,usmle"], ["usmle", "medqa, medmcqa, pubmedqa, heldout"]),
    (lambda run, tmp: [tmp / "missing-run"], ["no run folder or model folder", "missing-run"]),
    (lambda run, tmp: ["nobody/no-such-model"], ["nobody/no-such-model", "local cache", "HF_HUB_OFFLINE"]),
    (lambda run, tmp: [run, "--benchmarks", "medqa"], ["Can't load MedQA", "GBaker/MedQA-USMLE-4-options:test",
                                                       "--offline", "--data medqa=FILE"]),  # the Hub is offline
    (lambda run, tmp: [run, "--data", bad_sample(tmp, "{oops")], ["line 2", "not valid JSON"]),
    (lambda run, tmp: [run, "--data", bad_sample(tmp, '{"question": "Q?", "options": {"A": "a", "B": "b", "C": "c", '
                                                  '"D": "d"}}')], ["line 2", "answer_idx", "fix or remove that row"]),
    (lambda run, tmp: [no_model(tmp), "--offline"], ["no chat template", "chat_template.jinja"]),
    (lambda run, tmp: [no_model(tmp), "--compare-base"], ["--compare-base needs a run folder"]),
    (lambda run, tmp: [no_model(tmp), "--benchmarks", "heldout"], ["heldout needs a run folder"]),
    (lambda run, tmp: [run, "--mode", "sample"], ["--mode 'sample'", "generate, loglik"]),
    (lambda run, tmp: [run, "--data", "usmle=x.jsonl"], ["--data 'usmle=x.jsonl'", "NAME=FILE"]),
    (lambda run, tmp: [run, "--limit", "0"], ["--limit must be at least 1"]),
])
def test_bad_input_says_what_and_writes_nothing(evaluated, tmp_path, case, words):
    run = evaluated("phi3")
    before = sorted(p for p in run.rglob("*"))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        evaluate(*case(run, tmp_path), "--out", out)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert not out.exists() and sorted(p for p in run.rglob("*")) == before


@pytest.mark.slow
def test_results_of_other_settings_are_not_mixed(evaluated):
    out = evaluated("phi3") / "eval"
    before = (out / "medqa-generate.jsonl").read_bytes()
    with pytest.raises(UserError, match="computed with other settings"):
        evaluate(out.parent, *EVAL_ARGS[:-1], "16")
    assert (out / "medqa-generate.jsonl").read_bytes() == before


def test_cli_reports_bad_input_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "scripts/evaluate.py", str(tmp_path / "nowhere"), "--offline"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no run folder or model folder" in r.stderr


@pytest.mark.slow
def test_every_engine_gives_the_same_answers_and_reports_throughput(evaluated, tmp_path, capsys):
    """The default engine (compiled: one-shape batches over a static cache) against the earlier one
    (model.generate in static batches) and continuous batching: token-identical outputs on the tiny
    models, for the adapter and for the base."""
    run = evaluated("phi3")
    summaries = {}
    for engine in ("static", "continuous"):
        _, summaries[engine] = evaluate(run, "--offline", "--mode", "generate", "--compare-base", "--limit", "6",
                                        "--max-new-tokens", "8", "--engine", engine, "--batch-size", "4",
                                        "--out", tmp_path / engine)
        assert "Estimated time: at most" in capsys.readouterr().out
    default_summary = json.loads((run / "eval" / "summary.json").read_text())
    for folder in (".", "base"):
        for name in BENCHMARKS:
            default = {r["id"]: (r["output"], r["output_tokens"])
                       for r in rows(run / "eval" / folder / f"{name}-generate.jsonl")}
            for engine in summaries:
                other = {r["id"]: (r["output"], r["output_tokens"])
                         for r in rows(tmp_path / engine / folder / f"{name}-generate.jsonl")}
                assert other == default, (engine, folder, name)
    engines = {s["results"]["finetuned"]["medqa-generate"]["engine"] for s in (default_summary, *summaries.values())}
    assert engines == {"compiled", "continuous", "static"}
    summary = summaries["static"]
    for role in ("finetuned", "base"):
        entry = summary["results"][role]["pubmedqa-generate"]
        assert entry["generated_tokens"] == sum(r["output_tokens"] for r in rows(
            tmp_path / "static" / ("base" if role == "base" else ".") / "pubmedqa-generate.jsonl"))
        assert entry["tokens_per_second"] > 0 and entry["weights"] == "float32"


@pytest.mark.slow
def test_out_of_memory_while_generating_is_one_clear_error(evaluated, tmp_path, monkeypatch):
    """The default engine sizes its batches itself: running out of memory anyway says so, and how to
    go on, with the items finished so far kept."""
    from medtune.evaluation import generation

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield

    monkeypatch.setattr(generation, "compiled", out_of_memory)
    with pytest.raises(UserError, match=r"Out of GPU memory on medqa-generate \(finetuned\) with as many rows at once as "
                                        r"the free memory seemed to hold and --max-new-tokens 8\. Pass a lower --batch-size"):
        evaluate(evaluated("phi3"), "--offline", "--mode", "generate", "--limit", "2", "--max-new-tokens", "8",
                 "--out", tmp_path)
