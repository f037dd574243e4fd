"""Data: read rows, map them to (question, reasoning, answer), render them with the family's chat
template and tokenize them with labels on the assistant turn only."""
import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from medtune.config import resolve_path
from medtune.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MEDICAL_O1 = ("Question", "Complex_CoT", "Response")
INSTRUCTION = ("instruction", "output")  # plus an optional "input"
THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)
IGNORE_INDEX = -100  # label of tokens that carry no loss


@dataclass(frozen=True)
class Example:
    question: str
    reasoning: str
    answer: str

    def assistant_text(self):
        if not self.reasoning:
            return self.answer
        return f"<think>\n{self.reasoning}\n</think>\n{self.answer}"

    def as_row(self):
        return dict(zip(MEDICAL_O1, (self.question, self.reasoning, self.answer)))


def read_local(path: Path):
    """Rows of a local file as a list of dicts; errors name the file (and line) and the fix."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path} line {n} is not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno}). "
                                        "Each line of a .jsonl file must be one JSON object; fix or remove that line.") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{path} line {n} is a JSON {type(row).__name__}, not an object. Each line of a "
                                        ".jsonl file must be one JSON object (one example, its columns as keys).")
                    rows.append(row)
            return rows
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). "
                                "A .json dataset must be a list of objects; for one object per line, name the file .jsonl.") from None
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path} must hold a JSON list of objects (one per example), "
                                f"but its top level is a {type(data).__name__}" +
                                ("" if not isinstance(data, list) else " with items that are not objects") + ".")
            return data
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow raises several types for damaged files
                raise UserError(f"{path} is not a readable Parquet file ({e}). Re-export it, or use .jsonl.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}). Save it as UTF-8 and run again.") from None
    except OSError as e:
        raise UserError(f"Can't read {path}: {e.strerror}. Check the path and its permissions.") from None
    raise AssertionError(suffix)


def _read_csv(path):
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        try:
            _check_separator(path, reader.fieldnames or [])
            for row in reader:
                if None in row:  # DictReader files the fields beyond the header under the key None
                    raise UserError(f"{path} line {reader.line_num} has {len(reader.fieldnames) + len(row[None])} "
                                    f"fields but the header has {len(reader.fieldnames)} "
                                    f"({', '.join(reader.fieldnames)}). Put double quotes around text that contains "
                                    'commas ("like, this"), or convert the file to .jsonl.')
                rows.append(row)
        except csv.Error as e:
            raise UserError(f"{path} is not a readable CSV file (line {reader.line_num}: {e}). "
                            "Save it as comma-separated UTF-8 with a header row.") from None
    return rows


def _check_separator(path, header):
    for sep, name in ((";", "semicolon"), ("\t", "tab")):
        if len(header) == 1 and sep in header[0]:
            raise UserError(f"{path} looks {name}-separated: its header line is the single column {header[0]!r}. "
                            "A .csv dataset must be comma-separated: save it again as comma-separated UTF-8 "
                            "(in Excel: CSV UTF-8), or convert it to .jsonl.")


def _load_hub(name, config, split):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(name, config, split=split).to_list()
    except DatasetNotFoundError:
        raise UserError(f"No dataset {name!r} could be found: it is not a local file and the Hugging Face Hub has no "
                        f"dataset of that id (or it is gated: log in with `huggingface-cli login`). Pass a Hub id such "
                        f"as FreedomIntelligence/medical-o1-reasoning-SFT or a local {'/'.join(LOCAL_SUFFIXES)} file.") from None
    except ConnectionError as e:
        raise UserError(f"Can't reach the Hugging Face Hub to load the dataset {name!r} ({e}). Check the network, or "
                        "pass a local .jsonl/.json/.csv/.parquet file with --dataset, or try the offline quickstart "
                        "with --smoke.") from None
    except ValueError as e:  # unknown config or split
        raise UserError(f"Can't load {name!r} (config {config!r}, split {split!r}): {e}. "
                        "Set --dataset-config and --split to ones the dataset has.") from None


def load_rows(cfg):
    """Raw rows of the configured dataset, as dicts."""
    name = cfg.dataset
    path = resolve_path(name)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"The dataset file {name} does not exist. Pass an existing .jsonl, .json, .csv or "
                            "Parquet file, or a Hugging Face Hub dataset id.")
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise UserError(f"{name} is a file of an unknown kind; local datasets must end in "
                            f"{', '.join(LOCAL_SUFFIXES)}.")
        rows = read_local(path)
    else:
        rows = _load_hub(name, cfg.dataset_config, cfg.split)
    if not rows:
        raise UserError(f"The dataset {name} has no rows. Add examples with the columns "
                        f"{', '.join(MEDICAL_O1)} and run again.")
    return rows


def to_examples(rows, source):
    """Map rows of either supported shape to Examples: the one place where column names are read."""
    columns = set().union(*(r.keys() for r in rows))
    if set(MEDICAL_O1) <= columns:
        shape = MEDICAL_O1
    elif set(INSTRUCTION) <= columns:
        shape = INSTRUCTION
    else:
        missing = [c for c in MEDICAL_O1 if c not in columns]
        raise UserError(f"The dataset {source} lacks the required column(s) {', '.join(missing)}; it has "
                        f"{', '.join(sorted(map(str, columns))) or 'no columns'}. Rows need Question, Complex_CoT and Response "
                        "(the medical-o1-reasoning-SFT columns), or instruction, optional input, and output with "
                        "the reasoning inside <think>...</think>. Rename the columns and run again.")
    examples = []
    for n, row in enumerate(rows, 1):
        values = [row.get(c) for c in shape]
        if not all(isinstance(v, str) and v.strip() for v in values):
            empty = [c for c, v in zip(shape, values) if not (isinstance(v, str) and v.strip())]
            raise UserError(f"Row {n} of {source} has an empty or non-text value in {', '.join(empty)}. "
                            "Every row needs text in each required column; fix or remove that row.")
        if shape == MEDICAL_O1:
            q, r, a = (v.strip() for v in values)
        else:
            q = values[0].strip()
            extra = row.get("input")
            if isinstance(extra, str) and extra.strip():
                q = f"{q}\n\n{extra.strip()}"
            m = THINK.match(values[1])
            r, a = (m.group(1).strip(), m.group(2).strip()) if m else ("", values[1].strip())
        examples.append(Example(q, r, a))
    _check_no_think_tags(examples, source, shape)
    return examples


def _check_no_think_tags(examples, source, shape):
    """The target wraps the reasoning in one <think> block itself: a tag inside a cell would teach the
    model to write two reasoning blocks, or one that never closes."""
    tagged = [n for n, ex in enumerate(examples, 1) if any(t in ex.reasoning + ex.answer for t in ("<think>", "</think>"))]
    if not tagged:
        return
    where = ("Complex_CoT or Response (the reasoning belongs in Complex_CoT, without tags, and only the answer in "
             "Response)" if shape == MEDICAL_O1 else
             "output beyond its one leading <think>...</think> block")
    shown = ", ".join(map(str, tagged[:10])) + (", ..." if len(tagged) > 10 else "")
    raise UserError(f"{len(tagged)} of the {len(examples)} rows of {source} (row {shown}) hold <think> or </think> "
                    f"inside {where}. Training adds the one <think>...</think> block itself, so these rows would teach "
                    "the model to write a second reasoning block. Remove those tags from the rows, or drop the rows.")


def messages(example, system_prompt):
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": example.question},
            {"role": "assistant", "content": example.assistant_text()}]


def conversation_texts(tokenizer, example, system_prompt):
    """(prompt text up to the assistant turn, full text): the training text is the full one."""
    msgs = messages(example, system_prompt)
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(prompt), "the chat template renders the prompt differently inside the conversation"
    return prompt, full


def assistant_labels(prompt_ids, ids, end_of_turn_id):
    """Labels for `ids` (the full text's tokens): equal to them from the assistant turn through its
    end-of-turn token, -100 elsewhere (system, user, template markup after the turn).

    The prompt's tokens are normally a prefix of the full text's. Should a tokenizer merge the last
    prompt character with the first answer character, the merged token starts the labeled span.
    """
    start = 0
    while start < min(len(prompt_ids), len(ids)) and ids[start] == prompt_ids[start]:
        start += 1
    ends = [i for i in range(start, len(ids)) if ids[i] == end_of_turn_id]
    assert ends, "the assistant turn has no end-of-turn token"
    stop = ends[-1] + 1
    return [IGNORE_INDEX] * start + ids[start:stop] + [IGNORE_INDEX] * (len(ids) - stop)


def split_examples(examples, cfg):
    """Seeded shuffle, --max-samples, then the held-out split. Returns (train, heldout)."""
    examples = list(examples)
    random.Random(cfg.seed).shuffle(examples)
    if cfg.max_samples:
        examples = examples[: cfg.max_samples]
    n = len(examples)
    if cfg.eval_fraction is not None:
        n_eval = max(1, round(n * cfg.eval_fraction))
    elif cfg.eval_samples is not None:
        n_eval = cfg.eval_samples
    else:
        n_eval = min(100, n // 10)
    if n - n_eval < 1:
        raise UserError(f"Holding out {n_eval} of {n} rows for evaluation leaves none to train on. "
                        "Lower --eval-samples or --eval-fraction, or use more data.")
    return examples[n_eval:], examples[:n_eval]


def tokenize_examples(examples, tokenizer, family, cfg, system_prompt):
    """Token rows ({input_ids, labels}) that fit --max-seq-length, and counts for the report."""
    eot_id = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    prompts, fulls = zip(*(conversation_texts(tokenizer, ex, system_prompt) for ex in examples)) if examples else ((), ())
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if examples else []
    full_ids = tokenizer(list(fulls), add_special_tokens=False)["input_ids"] if examples else []
    rows, too_long, truncated = [], 0, 0
    for p_ids, ids in zip(prompt_ids, full_ids):
        labels = assistant_labels(p_ids, ids, eot_id)
        if len(ids) > cfg.max_seq_length:
            too_long += 1
            if not cfg.truncate:
                continue
            ids, labels = ids[: cfg.max_seq_length], labels[: cfg.max_seq_length]
            if all(lab == IGNORE_INDEX for lab in labels):
                continue  # only the prompt fits: nothing to learn from this row
            truncated += 1
        rows.append({"input_ids": ids, "labels": labels})
    lengths = [len(ids) for ids in full_ids] or [0]
    return rows, dict(rows=len(examples), kept=len(rows), too_long=too_long, truncated=truncated,
                      dropped=len(examples) - len(rows), shortest=min(lengths), longest=max(lengths),
                      mean_tokens=round(sum(lengths) / len(lengths), 1))
