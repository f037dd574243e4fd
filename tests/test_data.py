"""Rendering and masking with the real tokenizers, and every bad dataset file."""
import json
from types import SimpleNamespace

import pytest

from medtune.train.data import IGNORE_INDEX, Example, assistant_labels, conversation_texts, load_rows, to_examples
from medtune.errors import UserError
from medtune.families import FAMILIES
from medtune.offline_tokenizers import tokenizer_dir

EXAMPLE = Example(question="A 30-year-old has a fever of 39 °C and neck stiffness. Next step?",
                  reasoning="Fever with meningism: think bacterial meningitis.\nDon't delay antibiotics.",
                  answer="Blood cultures, then empirical ceftriaxone before the lumbar puncture.")
SYSTEM = "You are a careful medical expert."
EXPECTED = {
    "phi3": "<s><|system|>\nYou are a careful medical expert.<|end|>\n"
            "<|user|>\nA 30-year-old has a fever of 39 °C and neck stiffness. Next step?<|end|>\n"
            "<|assistant|>\n<think>\nFever with meningism: think bacterial meningitis.\nDon't delay antibiotics.\n"
            "</think>\nBlood cultures, then empirical ceftriaxone before the lumbar puncture.<|end|>\n",
    "mistral": "<s>[INST] You are a careful medical expert.\n\n"
               "A 30-year-old has a fever of 39 °C and neck stiffness. Next step? [/INST]"
               " <think>\nFever with meningism: think bacterial meningitis.\nDon't delay antibiotics.\n"
               "</think>\nBlood cultures, then empirical ceftriaxone before the lumbar puncture.</s>",
    "gemma3": "<bos><start_of_turn>user\nYou are a careful medical expert.\n\n"
              "A 30-year-old has a fever of 39 °C and neck stiffness. Next step?<end_of_turn>\n"
              "<start_of_turn>model\n<think>\nFever with meningism: think bacterial meningitis.\nDon't delay antibiotics.\n"
              "</think>\nBlood cultures, then empirical ceftriaxone before the lumbar puncture.<end_of_turn>\n",
}
PROMPT_END = {"phi3": "<|assistant|>\n", "mistral": "[/INST]", "gemma3": "<start_of_turn>model\n"}
# what follows the end-of-turn token, unlabeled: Phi-3's "\n" after <|end|> is stripped into the token
# (rstrip), as in llama.cpp; Gemma's template ends the turn with a newline token of its own
AFTER_TURN = {"phi3": "", "mistral": "", "gemma3": "\n"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_tokenizer(request):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(request.param))
    tok.chat_template = FAMILIES[request.param].chat_template()
    return FAMILIES[request.param], tok


def test_rendered_training_text_is_exact(family_tokenizer):
    family, tok = family_tokenizer
    prompt, full = conversation_texts(tok, EXAMPLE, SYSTEM)
    assert full == EXPECTED[family.name]
    assert full.startswith(prompt) and prompt.endswith(PROMPT_END[family.name])


def test_labels_cover_exactly_the_assistant_turn(family_tokenizer):
    family, tok = family_tokenizer
    prompt, full = conversation_texts(tok, EXAMPLE, SYSTEM)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(full, add_special_tokens=False)["input_ids"]
    labels = assistant_labels(prompt_ids, ids, tok.convert_tokens_to_ids(family.end_of_turn))
    assert len(labels) == len(ids)
    labeled = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    start, stop = labeled[0], labeled[-1] + 1
    assert labeled == list(range(start, stop)), "the labeled tokens must be one contiguous span"
    assert start == len(prompt_ids) and ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert [labels[i] for i in labeled] == ids[start:stop]
    assert ids[stop - 1] == tok.convert_tokens_to_ids(family.end_of_turn)  # end-of-turn token is learned
    # the labeled tokens are exactly the assistant turn; system, user and markup are not
    assert tok.decode(ids[start:stop]) == EXAMPLE.assistant_text() + family.end_of_turn
    assert tok.decode(ids[stop:]) == AFTER_TURN[family.name]
    assert ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]  # exactly the prompt's tokens
    assert all(lab == IGNORE_INDEX for lab in labels[stop:])


def test_instruction_shape_maps_to_the_same_example():
    rows = [{"instruction": "Q?", "input": "Extra context.", "output": "<think>\nWhy.\n</think>\nBecause."}]
    assert to_examples(rows, "x") == [Example("Q?\n\nExtra context.", "Why.", "Because.")]


def cfg(path):
    return SimpleNamespace(dataset=str(path), dataset_config=None, split="train")


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


GOOD = {"Question": "Q?", "Complex_CoT": "Think.", "Response": "A."}


@pytest.mark.parametrize("name, content, words", [
    ("missing.jsonl", None, ["does not exist", "Hub dataset id"]),
    ("empty.jsonl", "\n\n", ["has no rows"]),
    ("bad.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{not json\n", ["line 3", "not valid JSON"]),
    ("list.jsonl", "[1, 2]\n", ["line 1", "not an object"]),
    ("latin1.jsonl", '{"Question": "caf\xe9"}\n'.encode("latin-1"), ["not UTF-8"]),
    ("bad.json", '{"Question": 1', ["not valid JSON"]),
    ("obj.json", json.dumps(GOOD), ["list of objects"]),
    ("bad.parquet", b"PAR1 not really", ["not a readable Parquet"]),
    ("data.txt", "hello", ["unknown kind", ".jsonl"]),
])
def test_bad_dataset_files(tmp_path, name, content, words):
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    with pytest.raises(UserError) as e:
        load_rows(cfg(path))
    for w in words:
        assert w in str(e.value)


def test_missing_columns_lists_missing_and_found(tmp_path):
    path = write(tmp_path, "cols.csv", "Question,Answer\nQ?,A.\n")
    rows = load_rows(cfg(path))
    with pytest.raises(UserError) as e:
        to_examples(rows, path)
    msg = str(e.value)
    assert "lacks the required column(s) Complex_CoT, Response" in msg and "it has Answer, Question" in msg


def test_empty_cell_names_the_row():
    with pytest.raises(UserError, match="Row 2 .* Complex_CoT"):
        to_examples([GOOD, {**GOOD, "Complex_CoT": " "}], "x")


def test_local_formats_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD, {**GOOD, "Question": "Q2, with a comma?"}]
    write(tmp_path, "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp_path, "d.json", json.dumps(rows))
    write(tmp_path, "d.csv", 'Question,Complex_CoT,Response\nQ?,Think.,A.\n"Q2, with a comma?",Think.,A.\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert to_examples(load_rows(cfg(tmp_path / f"d.{suffix}")), suffix) == to_examples(rows, "x"), suffix
