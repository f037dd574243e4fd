"""The medical benchmarks evaluate.py runs, read from the Hugging Face Hub, a local file or the
bundled samples and mapped to one item format. The only place where benchmark columns are read.

| name     | Hub dataset                         | split      | items                              |
|----------|-------------------------------------|------------|------------------------------------|
| medqa    | GBaker/MedQA-USMLE-4-options        | test       | 1,273 USMLE questions, options A-D |
| medmcqa  | openlifescienceai/medmcqa           | validation | 4,183 (the test split has no answers), A-D |
| pubmedqa | qiaojin/PubMedQA, config pqa_labeled | train     | the 1,000 expert-labelled abstracts, yes/no/maybe |

`--prompt-format lm-eval` reads the datasets of lm-evaluation-harness's zero-shot tasks instead, and
keeps its plain-text context for each item (LMEVAL below):

| name     | lm-eval task   | Hub dataset                                   | split      | items |
|----------|----------------|-----------------------------------------------|------------|-------|
| medqa    | medqa_4options | GBaker/MedQA-USMLE-4-options-hf               | test       | 1,273 |
| medmcqa  | medmcqa        | openlifescienceai/medmcqa                     | validation | 4,183 |
| pubmedqa | pubmedqa       | bigbio/pubmed_qa, pubmed_qa_labeled_fold0_source | test    | 500   |

`data/eval/<name>_sample.jsonl` (and `<name>_lm-eval_sample.jsonl` where lm-eval's columns differ)
holds a few items written for this project in each dataset's own columns (`--offline`);
`--data NAME=FILE` reads a local file of the same columns.
"""
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medtune.config import REPO_ROOT, resolve_path
from medtune.train.data import LOCAL_SUFFIXES, read_local
from medtune.errors import UserError
from medtune.fileio import read_jsonl

LETTERS = ("A", "B", "C", "D")
DECISIONS = ("yes", "no", "maybe")
PROMPTS = REPO_ROOT / "prompts" / "eval"


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: tuple[str, ...]  # option texts
    labels: tuple[str, ...]  # what the model answers with: letters, or for yes/no/maybe the words
    gold: int  # index of the correct option
    context: str = ""  # PubMedQA's abstract
    text: str = ""  # --prompt-format lm-eval: the task's own context string, as its doc_to_text writes it

    @property
    def gold_label(self):
        return self.labels[self.gold]


def _text(row, key):
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be non-empty text, got {value!r}")
    return value.strip()


def _medqa(row, index):
    options = row.get("options")
    if not isinstance(options, dict) or sorted(options) != list(LETTERS):
        raise ValueError(f"'options' must map A, B, C and D to the option texts, got {options!r}")
    answer = row.get("answer_idx")
    if answer not in LETTERS:
        raise ValueError(f"'answer_idx' must be one of A, B, C, D, got {answer!r}")
    return Item(str(row.get("id", index)), _text(row, "question"), tuple(_text(options, k) for k in LETTERS),
                LETTERS, LETTERS.index(answer))


def _medmcqa(row, index):
    cop = row.get("cop")
    if isinstance(cop, str) and cop.strip() in ("0", "1", "2", "3"):  # CSV files hold text
        cop = int(cop)
    if isinstance(cop, bool) or cop not in (0, 1, 2, 3):
        raise ValueError(f"'cop' (the correct option) must be 0, 1, 2 or 3 for opa..opd, got {cop!r}")
    options = tuple(_text(row, k) for k in ("opa", "opb", "opc", "opd"))
    return Item(str(row.get("id", index)), _text(row, "question"), options, LETTERS, cop)


def _pubmedqa(row, index):
    context = row.get("context")
    parts = context.get("contexts") if isinstance(context, dict) else None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        raise ValueError("'context' must hold 'contexts', a list of the abstract's paragraphs")
    # Section names (BACKGROUND, METHODS, ...) head their paragraphs where the row has them.
    names = context.get("labels") or []
    if len(names) == len(parts):
        parts = [f"{n.strip().capitalize()}: {p.strip()}" for n, p in zip(names, parts)]
    decision = row.get("final_decision")
    if decision not in DECISIONS:
        raise ValueError(f"'final_decision' must be yes, no or maybe, got {decision!r}")
    return Item(str(row.get("pubid", index)), _text(row, "question"), DECISIONS, DECISIONS,
                DECISIONS.index(decision), "\n".join(p.strip() for p in parts))


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    hub_id: str
    hub_config: str | None
    split: str
    columns: str  # what a row needs, for error messages
    style: str  # "multiple_choice" or "yes_no_maybe": which prompt files ask the question
    to_item: Callable[[dict, int], Item]
    sample_name: str = ""  # the offline sample's file name, when not <name>_sample.jsonl
    lm_eval_task: str = ""  # the lm-evaluation-harness task whose prompts and data these are
    fallback_revision: str | None = None  # Hub revision tried when the dataset's own loader fails

    @property
    def sample(self):
        return REPO_ROOT / "data" / "eval" / (self.sample_name or f"{self.name}_sample.jsonl")

    @property
    def hub_label(self):
        return f"{self.hub_id}{'/' + self.hub_config if self.hub_config else ''}:{self.split}"


BENCHMARKS = {b.name: b for b in (
    Benchmark("medqa", "MedQA (USMLE, 4 options)", "GBaker/MedQA-USMLE-4-options", None, "test",
              "question, options (A-D) and answer_idx", "multiple_choice", _medqa),
    Benchmark("medmcqa", "MedMCQA", "openlifescienceai/medmcqa", None, "validation",
              "id, question, opa, opb, opc, opd and cop (0-3)", "multiple_choice", _medmcqa),
    Benchmark("pubmedqa", "PubMedQA (labelled)", "qiaojin/PubMedQA", "pqa_labeled", "train",
              "pubid, question, context.contexts and final_decision", "yes_no_maybe", _pubmedqa),
)}


def _raw(row, key):
    """A text column as lm-eval reads it: unstripped, so the context strings match its own."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be non-empty text, got {value!r}")
    return value


def _index(row, key, n):
    value = row.get(key)
    if isinstance(value, str) and value.strip().isdigit():  # CSV files hold text
        value = int(value)
    if isinstance(value, bool) or value not in range(n):
        raise ValueError(f"'{key}' must be an option index 0-{n - 1}, got {value!r}")
    return value


def _lmeval_medqa(row, index):
    """lm-eval's medqa_4options: preprocess_medqa.doc_to_text."""
    endings = [_raw(row, f"ending{k}") for k in range(4)]
    options = "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, endings))
    return Item(str(row.get("id", index)), _raw(row, "sent1"), tuple(endings), LETTERS, _index(row, "label", 4),
                text=f"Question: {row['sent1']}\n{options}Answer:")


def _lmeval_medmcqa(row, index):
    """lm-eval's medmcqa: utils_medmcqa.doc_to_text."""
    options = [_raw(row, k) for k in ("opa", "opb", "opc", "opd")]
    text = "Question: " + _raw(row, "question") + "\nChoices:\n"
    text += "".join(f"{k}. {v}\n" for k, v in zip(LETTERS, options)) + "Answer:"
    return Item(str(row.get("id", index)), row["question"], tuple(options), LETTERS, _index(row, "cop", 4), text=text)


def _lmeval_pubmedqa(row, index):
    """lm-eval's pubmedqa: preprocess_pubmedqa.doc_to_text over bigbio's source columns."""
    parts = row.get("CONTEXTS")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("'CONTEXTS' must be a list of the abstract's paragraphs")
    decision = row.get("final_decision")
    if decision not in DECISIONS:
        raise ValueError(f"'final_decision' must be yes, no or maybe, got {decision!r}")
    abstract = "\n".join(parts)
    return Item(str(row.get("pubid", index)), _raw(row, "QUESTION"), DECISIONS, DECISIONS, DECISIONS.index(decision),
                abstract, text=f"Abstract: {abstract}\nQuestion: {row['QUESTION']}\nAnswer:")


LMEVAL = {b.name: b for b in (
    Benchmark("medqa", "MedQA (lm-eval medqa_4options)", "GBaker/MedQA-USMLE-4-options-hf", None, "test",
              "sent1, ending0..ending3 and label (0-3)", "multiple_choice", _lmeval_medqa,
              "medqa_lm-eval_sample.jsonl", "medqa_4options"),
    Benchmark("medmcqa", "MedMCQA (lm-eval medmcqa)", "openlifescienceai/medmcqa", None, "validation",
              "id, question, opa, opb, opc, opd and cop (0-3)", "multiple_choice", _lmeval_medmcqa,
              "medmcqa_sample.jsonl", "medmcqa"),
    Benchmark("pubmedqa", "PubMedQA (lm-eval pubmedqa, test fold)", "bigbio/pubmed_qa",
              "pubmed_qa_labeled_fold0_source", "test", "QUESTION, CONTEXTS and final_decision", "yes_no_maybe",
              _lmeval_pubmedqa, "pubmedqa_lm-eval_sample.jsonl", "pubmedqa", "refs/convert/parquet"),
)}
PROMPT_FORMATS = {"chat": BENCHMARKS, "lm-eval": LMEVAL}
HELDOUT = "heldout"  # loss on the run's held-out split: not a Hub benchmark
VALID = (*BENCHMARKS, HELDOUT)


def parse_names(text):
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VALID]
    if unknown or not names:
        raise UserError(f"Unknown benchmark(s) {', '.join(unknown) or repr(text)} in --benchmarks. Valid ones are "
                        f"{', '.join(VALID)}; give several separated by commas, e.g. --benchmarks medqa,pubmedqa.")
    return list(dict.fromkeys(names))


def _load_hub(bench):
    import datasets

    try:
        return datasets.load_dataset(bench.hub_id, bench.hub_config, split=bench.split).to_list()
    except Exception as e:  # offline, unknown id, gated, changed splits: all mean "no data from the Hub"
        if bench.fallback_revision:  # bigbio's loader script, which datasets 4 no longer runs: its Parquet copy
            try:
                return datasets.load_dataset(bench.hub_id, bench.hub_config, split=bench.split,
                                             revision=bench.fallback_revision).to_list()
            except Exception:
                pass
        raise UserError(f"Can't load {bench.title} from the Hugging Face Hub ({bench.hub_label}): "
                        f"{type(e).__name__}: {e}. Connect to the Hub, or pass --offline to evaluate on the bundled "
                        f"samples, or --data {bench.name}=FILE for a local copy with the columns "
                        f"{bench.columns}.") from None


def _read_file(bench, path):
    if not path.is_file() or path.suffix.lower() not in LOCAL_SUFFIXES:
        raise UserError(f"The {bench.name} data file {path} does not exist or is not a "
                        f"{'/'.join(LOCAL_SUFFIXES)} file. Pass an existing file with the columns {bench.columns}.")
    rows = read_local(path)
    if path.suffix.lower() == ".jsonl":  # name lines, not rows, where blank lines are skipped
        where = [f"line {n}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    else:
        where = [f"row {n}" for n in range(1, len(rows) + 1)]
    return rows, where


def load_items(bench, data_file=None, offline=False, limit=None, seed=0):
    """(items, where they came from). With `limit`, a seeded sample: a larger limit with the same
    seed keeps every item of a smaller one, so a resumed evaluation only adds items."""
    if data_file or offline:
        path = resolve_path(data_file) if data_file else bench.sample
        rows, where = _read_file(bench, Path(path))
        source = str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
    else:
        rows = _load_hub(bench)
        where, source = [f"row {n}" for n in range(1, len(rows) + 1)], bench.hub_label
    if not rows:
        raise UserError(f"{source} holds no {bench.name} items. Add rows with the columns {bench.columns}.")
    items = []
    for index, (row, at) in enumerate(zip(rows, where)):
        try:
            items.append(bench.to_item(row, index))
        except ValueError as e:
            raise UserError(f"{source} {at} is not a {bench.title} item: {e}. Each row needs {bench.columns}, "
                            "as in the Hub dataset; fix or remove that row.") from None
    seen = {}
    for item, at in zip(items, where):
        if item.id in seen:
            raise UserError(f"{source} {at} repeats the id {item.id!r} of {seen[item.id]}. Item ids must be unique: "
                            "results are stored and resumed by id.")
        seen[item.id] = at
    if limit and limit < len(items):
        order = list(range(len(items)))
        random.Random(seed).shuffle(order)
        items = [items[i] for i in order[:limit]]
    return items, source


def _template(mode, style):
    return (PROMPTS / f"{mode}_{style}.txt").read_text().strip()


def user_message(item, bench, mode):
    """The question as the user turn: prompts/eval/<mode>_<style>.txt filled in."""
    options = "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.options))
    return _template(mode, bench.style).format(question=item.question, options=options, context=item.context)


def heldout_rows(run_dir):
    """The run's held-out rows (Question, Complex_CoT, Response) as written by training."""
    path = run_dir / "heldout.jsonl"
    rows = read_jsonl(path, missing_ok=True)
    if not rows:
        raise UserError(f"{run_dir} has no held-out rows ({path.name} is missing or empty: the run was trained with "
                        "--eval-samples 0). Drop heldout from --benchmarks.")
    return rows

