"""GGUF files with llama.cpp's own converter and quantizer, and checks that they compute the merged model.

The converter (convert_hf_to_gguf.py with its co-versioned conversion/ and gguf-py/) and the quantizer
(llama_model_quantize, through llama-cpp-python) both come from the pinned llama-cpp-python release:
nothing is cloned or downloaded at export time.
"""
import ctypes
import json
import os
import subprocess
import sys

import numpy as np

from medtune.errors import UserError
from medtune.offline_tokenizers import LLAMA_CPP_PYTHON_VERSION, cache_dir

# Written directly by the converter, or quantized by llama.cpp from the f16 file.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANTIZER_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
                   "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0"}
QUANT_TYPES = CONVERTER_TYPES + tuple(QUANTIZER_TYPES)
BYTES_PER_PARAM = {"f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72, "q5_0": 0.69,
                   "q4_k_m": 0.61, "q4_0": 0.57}
SETUP_HINT = ("Run `bash scripts/setup.sh`: it extracts llama.cpp's converter from the llama-cpp-python "
              f"{LLAMA_CPP_PYTHON_VERSION} source package into .cache/medtune/ and builds llama-cpp-python "
              "(without it: `pip install -r requirements-export.txt && python scripts/medtune/offline_tokenizers.py`).")


def llama_cpp_sources():
    """The extracted llama.cpp folder, or a clear error if set-up has not provided it."""
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    needed = [root / "convert_hf_to_gguf.py", root / "conversion", root / "gguf-py" / "gguf"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise UserError(f"llama.cpp's converter is not available: {', '.join(missing)} missing. {SETUP_HINT}")
    return root


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"llama-cpp-python is not installed in this environment ({e}). {SETUP_HINT}") from None
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON_VERSION:
        raise UserError(f"llama-cpp-python {llama_cpp.__version__} is installed, but the converter is from "
                        f"{LLAMA_CPP_PYTHON_VERSION}; they must match. {SETUP_HINT}")
    return llama_cpp


def convert(merged_dir, out_file, outtype, model_name):
    """merged safetensors -> GGUF through llama.cpp's convert_hf_to_gguf.py (its own gguf-py first on the path)."""
    root = llama_cpp_sources()
    declare_user_defined_tokens(merged_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
           "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(root / "convert_hf_to_gguf.py"), str(merged_dir), "--outfile", str(out_file),
           "--outtype", outtype, "--model-name", model_name]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out_file.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"llama.cpp's converter failed ({outtype}):\n{tail}")


def declare_user_defined_tokens(merged_dir):
    """List the SentencePiece model's user-defined pieces in added_tokens.json, where llama.cpp's
    converter looks for them: it types a tokenizer.model's pieces from the model alone, where a
    user-defined piece reads as normal. Gemma has 165 of them ("\n", "\n\n", runs of spaces and tabs,
    ...), which llama.cpp must match in the raw text before the rest is split, as the Hugging Face
    tokenizer does. (transformers 5 neither writes nor reads the file; Phi-3's and Mistral's models have none.)"""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    path = merged_dir / "tokenizer.model"
    if not path.is_file():
        return
    proto = spm_pb2.ModelProto.FromString(path.read_bytes())
    user = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == spm_pb2.ModelProto.SentencePiece.USER_DEFINED}
    if user:
        (merged_dir / "added_tokens.json").write_text(json.dumps(user, ensure_ascii=False, indent=2) + "\n")


def quantize(src, dst, quant):
    llama_cpp = llama_cpp_module()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[quant])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp's quantizer failed to write {quant} (return code {rc}).")


def load_gguf(path, n_ctx):
    llama_cpp = llama_cpp_module()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=os.cpu_count(), n_batch=512)


def gguf_logits(llm, ids):
    """Next-token logits at every position of `ids`, as llama.cpp computes them."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def gguf_greedy(llm, ids, n, stop_ids=()):
    """Up to n greedy tokens after `ids`, ending before any of `stop_ids`."""
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if len(out) == n or token in stop_ids:
            break
        out.append(token)
    return out


def gguf_metadata(path):
    """The GGUF's chat template and special token ids, read back from the file (with the gguf-py
    that wrote it)."""
    gguf_py = str(llama_cpp_sources() / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def get(key):
        return fields[key].contents() if key in fields else None

    return {"chat_template": get("tokenizer.chat_template"), "bos": get("tokenizer.ggml.bos_token_id"),
            "eos": get("tokenizer.ggml.eos_token_id"), "pad": get("tokenizer.ggml.padding_token_id"),
            "name": get("general.name"), "add_bos": get("tokenizer.ggml.add_bos_token")}
