"""The offline Phi-3 and Mistral tokenizers (scripts/medtune/offline_tokenizers.py) against their references.

Phi-3 is checked against llama.cpp's own tokenizer test vectors and vocabulary file, Mistral against the
SentencePiece model that Mistral ships. The first run downloads two packages with pip (about 80 MB) into the
medtune cache; later runs take a few seconds.
"""

import pytest
import sentencepiece as spm

from medtune.offline_tokenizers import llama_cpp_dir, tokenizer_dir

TEXTS = [
    "Patient presents with acute chest pain radiating to the left arm.",
    "BP 120/80 mmHg, HR 72 bpm, SpO2 98%.",
    "Temp 38.5 °C, 5 µg/kg/min norepinephrine",
    "Take 1–2 tablets (500 mg) every 4–6 h; max 4 g/24 h.",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\n  indented",
    "\ttab\tseparated\t",
    "Émilie's café — naïve façade",
    "Diagnóstico: neumonía adquirida en la comunidad",
    "Пациент жалуется на головную боль",
    "患者有高血压病史。",
    "💊 twice daily 😷🤒",
    "ICD-10 J18.9; HbA1c 7.2%; eGFR <60 mL/min/1.73m²",
    "3333333 1234567890",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a careful clinician."},
    {"role": "user", "content": "Dose of paracetamol?"},
    {"role": "assistant", "content": "1 g every 6 h, max 4 g/day."},
]


@pytest.fixture(scope="module")
def phi3():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir("phi3"))


@pytest.fixture(scope="module")
def mistral():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir("mistral"))


def sentencepiece(family):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir(family) / "tokenizer.model"))


def llama_cpp_vectors():
    """(text, ids) pairs read the way llama.cpp's tests/test-tokenizer-0.cpp reads them: inputs separated by
    "\\n__ggml_vocab_test__\\n" (the file ends with one), one line of space-separated ids per input."""
    models = llama_cpp_dir() / "models"
    inputs = (models / "ggml-vocab-phi-3.gguf.inp").read_bytes().decode("utf-8").split("\n__ggml_vocab_test__\n")
    assert inputs.pop() == ""
    outputs = (models / "ggml-vocab-phi-3.gguf.out").read_text(encoding="utf-8").splitlines()
    return list(zip(inputs, [[int(t) for t in line.split()] for line in outputs], strict=True))


def test_phi3_reproduces_llama_cpp_test_vectors(phi3):
    vectors = llama_cpp_vectors()
    assert len(vectors) == 46
    # test-tokenizer-0 tokenizes with add_special=false (no BOS) and parse_special=false; no input contains a
    # special token's text, so HF's matching of added tokens plays no part.
    assert not any(token in text for text, _ in vectors for token in phi3.get_added_vocab())
    wrong = [(text, ids, phi3.encode(text, add_special_tokens=False)) for text, ids in vectors
             if phi3.encode(text, add_special_tokens=False) != ids]
    assert wrong == []
    # The vectors include the SentencePiece dummy prefix: " " is "▁▁" (259), "\n" is "▁" + <0x0A>.
    assert dict(vectors)[" "] == [259] and dict(vectors)["\n"] == [29871, 13]


def test_phi3_special_tokens(phi3):
    ids = {t: phi3.convert_tokens_to_ids(t)
           for t in ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]}
    assert ids == {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
                   "<|user|>": 32010}
    assert (phi3.bos_token, phi3.bos_token_id) == ("<s>", 1)
    assert (phi3.eos_token, phi3.eos_token_id) == ("<|endoftext|>", 32000)
    assert (phi3.unk_token, phi3.unk_token_id) == ("<unk>", 0)
    assert (phi3.pad_token, phi3.pad_token_id) == ("<|endoftext|>", 32000)
    assert len(phi3) == 32011
    assert (phi3.model_max_length, phi3.padding_side) == (4096, "right")
    # The chat tokens swallow the whitespace after them (rstrip), as Microsoft's tokenizer and llama.cpp do.
    assert phi3.encode("<|end|>\n<|assistant|>", add_special_tokens=False) == [32007, 32001]
    assert phi3.encode("<|endoftext|>\nx", add_special_tokens=False) == [32000, 29871, 13, 29916]


def test_phi3_vocabulary_is_llama_cpps(phi3):
    from gguf import GGUFReader, TokenType

    fields = GGUFReader(llama_cpp_dir() / "models" / "ggml-vocab-phi-3.gguf").fields
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert phi3.convert_ids_to_tokens(list(range(len(phi3)))) == tokens[: len(phi3)]
    sp = sentencepiece("phi3")
    assert [sp.GetScore(i) for i in range(sp.GetPieceSize())] == fields["tokenizer.ggml.scores"].contents()[:32000]
    # llama.cpp's converter types an added token CONTROL if HF calls it special, USER_DEFINED otherwise: the
    # flags reproduce the GGUF's types (<unk>, <s> and the chat tokens CONTROL, </s> USER_DEFINED).
    for i, token in phi3.added_tokens_decoder.items():
        assert types[i] == (TokenType.CONTROL if token.special else TokenType.USER_DEFINED), token


def test_phi3_matches_its_sentencepiece_model(phi3):
    sp = sentencepiece("phi3")
    assert [phi3.encode(t, add_special_tokens=False) for t in TEXTS] == sp.encode(TEXTS)
    text = "Temp 38.5 °C, 5 µg/kg"
    assert phi3(text).input_ids == [1, *sp.encode(text)]  # a plain call adds BOS, as the real model's does
    assert phi3.decode(phi3(text).input_ids, skip_special_tokens=True) == text


def test_mistral_matches_its_sentencepiece_model(mistral):
    sp = sentencepiece("mistral")
    assert [mistral.encode(t, add_special_tokens=False) for t in TEXTS] == sp.encode(TEXTS)
    assert [mistral(t).input_ids for t in TEXTS] == [[1, *ids] for ids in sp.encode(TEXTS)]
    # Known ids, read from tokenizer.model.v1 with sentencepiece: [INST] is plain text, not a special token.
    assert mistral.encode("[INST]", add_special_tokens=False) == [733, 16289, 28793]  # ▁[ INST ]
    assert mistral.encode("[/INST]", add_special_tokens=False) == [733, 28748, 16289, 28793]  # ▁[ / INST ]
    assert mistral.encode("Hello world", add_special_tokens=False) == [22557, 1526]
    assert mistral.encode("\n", add_special_tokens=False) == [28705, 13]  # ▁ <0x0A>
    text = "Temp 38.5 °C, 5 µg/kg"
    assert mistral.decode(mistral(text).input_ids, skip_special_tokens=True) == text


def test_mistral_special_tokens(mistral):
    assert (mistral.bos_token, mistral.bos_token_id) == ("<s>", 1)
    assert (mistral.eos_token, mistral.eos_token_id) == ("</s>", 2)
    assert (mistral.unk_token, mistral.unk_token_id) == ("<unk>", 0)
    assert mistral.pad_token is None
    assert len(mistral) == 32000
    assert (mistral.model_max_length, mistral.padding_side) == (32768, "right")


@pytest.mark.parametrize("family, expected", [
    ("phi3", "<s><|system|>\nYou are a careful clinician.<|end|>\n<|user|>\nDose of paracetamol?<|end|>\n"
             "<|assistant|>\n1 g every 6 h, max 4 g/day.<|end|>\n"),
    ("mistral", "<s>[INST] You are a careful clinician.\n\nDose of paracetamol? [/INST] "
                "1 g every 6 h, max 4 g/day.</s>"),
], ids=["phi3", "mistral"])
def test_chat_template(family, expected, request):
    tokenizer = request.getfixturevalue(family)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False) == expected
    # Rendered text carries its own BOS: tokenizing it without special tokens gives exactly one.
    ids = tokenizer(expected, add_special_tokens=False).input_ids
    assert ids[0] == 1 and 1 not in ids[1:]
    assert (tokenizer_dir(family) / "tokenizer.model").is_file()


def test_llama_cpp_dir_has_the_converter():
    root = llama_cpp_dir()
    for rel in ["convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py",
                "requirements/requirements-convert_hf_to_gguf.txt"]:
        assert (root / rel).is_file(), rel
