"""--prompt-format lm-eval against lm-evaluation-harness itself, on the tiny models: lm-eval's own
task files (medqa_4options, medmcqa, pubmedqa) build the requests from the offline samples, its
HFLM computes every option's log-likelihood and its process_results scores them; evaluate.py must
give the same context strings, log-likelihoods within 1e-4 and the same acc / acc_norm, item by item."""
import json
from pathlib import Path

import lm_eval
import pytest
import torch

from conftest import FAMILIES, REPO
from medtune.evaluation.tasks import LMEVAL

TASK_FILES = {"medqa": "medqa/medqa.yaml", "medmcqa": "medmcqa/medmcqa.yaml", "pubmedqa": "pubmedqa/pubmedqa.yaml"}


def lm_eval_task(name):
    """lm-eval's task, as its YAML defines it, reading our offline sample instead of the Hub."""
    from datasets import Dataset, DatasetDict
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / TASK_FILES[name])
    sample = REPO / "data" / "eval" / LMEVAL[name].sample_name
    docs = [json.loads(line) for line in sample.read_text().splitlines() if line.strip()]
    split = config["test_split"]
    config.update(training_split=None, validation_split=None, dataset_path=None, dataset_name=None,
                  custom_dataset=lambda **_: DatasetDict({split: Dataset.from_list(docs)}))
    return ConfigurableTask(config=config), docs


def lm_eval_scores(lm, task):
    """Per doc: (context string, log-likelihood of each choice, lm-eval's metrics)."""
    task.build_all_requests(rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
    results = lm.loglikelihood(instances)
    by_doc = {}
    for inst, result in zip(instances, results):
        by_doc.setdefault(inst.doc_id, (inst.doc, inst.arguments[0], []))[2].append(result)
    return {doc_id: (context, [ll for ll, _ in res], task.process_results(doc, res))
            for doc_id, (doc, context, res) in by_doc.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lm_eval_format_matches_lm_evaluation_harness(family, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.families import FAMILIES as SPECS
    from medtune.train.modeling import tiny_model_dir
    from test_evaluate import evaluate, rows

    model_dir = tiny_model_dir(SPECS[family])
    out, summary = evaluate(model_dir, "--offline", "--prompt-format", "lm-eval", "--out", tmp_path / "out")
    assert summary["results"]["model"]["medqa-lm-eval"]["prompt_format"] == "lm-eval"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(model_dir), batch_size=4)
    for name in TASK_FILES:
        task, docs = lm_eval_task(name)
        theirs = lm_eval_scores(lm, task)
        ours = {r["id"]: r for r in rows(out / f"{name}-lm-eval.jsonl")}
        assert len(ours) == len(theirs) == len(docs)
        for doc_id, doc in enumerate(docs):
            context, loglik, metrics = theirs[doc_id]
            mine = ours[str(doc.get("id", doc.get("pubid")))]
            assert mine["prompt"] == context
            assert mine["loglik"] == pytest.approx(loglik, abs=1e-4)
            assert mine["correct"] == bool(metrics["acc"])
            if "acc_norm" in metrics:
                assert mine["correct_norm"] == bool(metrics["acc_norm"])
        entry = summary["results"]["model"][f"{name}-lm-eval"]
        assert entry["accuracy"] == pytest.approx(sum(m["acc"] for _, _, m in theirs.values()) / len(docs))


def test_lm_eval_format_bad_input(tmp_path):
    from medtune.errors import UserError
    from test_evaluate import evaluate

    with pytest.raises(UserError, match="scores by log-likelihood only"):
        evaluate("whatever", "--prompt-format", "lm-eval", "--mode", "generate", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
