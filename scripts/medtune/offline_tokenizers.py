"""Build the real Phi-3-mini-4k-instruct and Mistral-7B-Instruct-v0.2 tokenizers without the Hugging Face Hub.

Both models use a 32000-piece SentencePiece BPE model. The only network access is the Python package
registry, through pip:

* Phi-3: the sdist of llama-cpp-python vendors llama.cpp, whose ``models/ggml-vocab-phi-3.gguf`` holds the
  Phi-3 vocabulary (pieces, scores, types, special ids) and whose ``.inp``/``.out`` files are llama.cpp's
  tokenizer test vectors for it. The same extraction also provides ``convert_hf_to_gguf.py``.
* Mistral: the mistral-common wheel ships ``mistral_common/data/tokenizer.model.v1``, the SentencePiece model
  of Mistral-7B v0.1/v0.2, read straight from the wheel (mistral-common is not installed).

Each family becomes a folder loadable by ``transformers.AutoTokenizer.from_pretrained(path)``, holding
``tokenizer.json``, ``tokenizer_config.json``, the chat template and ``tokenizer.model`` (which llama.cpp's
converter reads). Everything is cached under ``$MEDTUNE_CACHE`` (default ``<repo>/.cache/medtune``).

Run from the repository root::

    python scripts/medtune/offline_tokenizers.py            # both families
    python scripts/medtune/offline_tokenizers.py phi3       # or just one

or from Python: ``from medtune.offline_tokenizers import tokenizer_dir; tokenizer_dir("phi3")``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # run as a file: its own folder is on sys.path, the package's parent is not
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from medtune.config import REPO_ROOT  # noqa: E402
from medtune.cache_checks import OfflineSetupError, check_tokenizer_dir, damaged_download  # noqa: E402
from medtune.fileio import atomic_dir, write_text_atomic  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
MISTRAL_COMMON_VERSION = "1.13.1"
CHAT_TEMPLATES = REPO_ROOT / "prompts" / "chat_templates"

# What the toolkit uses of vendor/llama.cpp: the Phi-3 vocabulary and its test vectors, and what
# convert_hf_to_gguf.py needs (its model classes, its co-versioned gguf-py, its pinned requirements).
_LLAMA_CPP_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_LLAMA_CPP_FILES = (
    "models/ggml-vocab-phi-3.gguf",
    "models/ggml-vocab-phi-3.gguf.inp",
    "models/ggml-vocab-phi-3.gguf.out",
    "convert_hf_to_gguf.py",
)
_LLAMA_CPP_TREES = ("conversion/", "gguf-py/", "requirements/")

# Phi-3 keeps Llama 2's SentencePiece model (ids 0..31999: <unk>, <s>, </s>, 256 byte pieces, merges) and
# appends its chat tokens (<|endoftext|>, <|assistant|>, ..., <|user|>) as ids 32000..32010; the GGUF
# then pads the list with [PADnnnnn] rows up to the embedding size 32064.
_PHI3_SPM_PIECES = 32000
_MISTRAL_MAX_LENGTH = 32768  # Mistral-7B-Instruct-v0.2's context length; the wheel does not record it.


def cache_dir() -> Path:
    """Root of the medtune cache: $MEDTUNE_CACHE, or <repo>/.cache/medtune."""
    return Path(os.environ.get("MEDTUNE_CACHE") or REPO_ROOT / ".cache" / "medtune")


def _pip_download(filename: str, requirement: str, *pip_args: str) -> Path:
    """Return cache_dir()/downloads/<filename>, fetching it with `pip download` if it is not there yet."""
    target = cache_dir() / "downloads" / filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # pip writes into a private folder first so that an interrupted download never looks complete.
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", *pip_args, requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if proc.returncode != 0 or not fetched.is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise OfflineSetupError(
                f"Could not download {filename} ({requirement}) with `pip download` (exit status "
                f"{proc.returncode}: {last[0][:300]}). The offline tokenizers are built from files published on "
                f"the Python package registry, so setup needs pip to reach its package index once; after that "
                f"everything is read from {cache_dir()}."
            )
        os.replace(fetched, target)
    return target


def llama_cpp_sdist() -> Path:
    """The llama-cpp-python sdist (it vendors llama.cpp), downloaded into cache_dir()/downloads if missing."""
    return _pip_download(
        f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz",
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        "--no-binary", ":all:",
    )


def llama_cpp_dir() -> Path:
    """cache_dir()/llama.cpp-<version>: the subset of vendor/llama.cpp listed above, extracted once."""
    target = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
    if target.is_dir():
        return target

    def wanted(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for member in tar:
            rel = member.name.removeprefix(_LLAMA_CPP_PREFIX)
            if member.isfile() and rel != member.name and (
                    rel in _LLAMA_CPP_FILES or rel.startswith(_LLAMA_CPP_TREES)):
                member.name = rel
                yield member

    sdist = llama_cpp_sdist()
    with damaged_download(sdist), atomic_dir(target) as tmp, tarfile.open(sdist) as tar:
        tar.extractall(tmp, members=wanted(tar), filter="data")
        missing = [name for name in _LLAMA_CPP_FILES if not (tmp / name).is_file()]
        if missing:
            raise tarfile.TarError(f"it has no vendor/llama.cpp/{', '.join(missing)}")
    return target


def tokenizer_dir(family: str) -> Path:
    """cache_dir()/tokenizers/<family> ("phi3", "mistral" or "gemma3"), built on first use."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {tuple(BUILDERS)}")
    target = cache_dir() / "tokenizers" / family
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            BUILDERS[family](tmp)
    check_tokenizer_dir(target, family)
    # The chat template is the repo's file, which can change after the build: keep the cached copy current.
    template = _chat_template(family)
    cached = target / "chat_template.jinja"
    if cached.read_text(encoding="utf-8") != template:
        write_text_atomic(cached, template)
    return target


def _chat_template(family: str) -> str:
    return (CHAT_TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


def _build_phi3(out: Path) -> None:
    from gguf import GGUFReader, TokenType
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import AddedToken

    reader = GGUFReader(llama_cpp_dir() / "models" / "ggml-vocab-phi-3.gguf")

    def field(key: str):
        return reader.fields[key].contents()

    tokens, scores, types = (field(f"tokenizer.ggml.{key}") for key in ("tokens", "scores", "token_type"))
    if tokens[:3] != ["<unk>", "<s>", "</s>"]:
        raise ValueError(f"unexpected Phi-3 vocabulary head {tokens[:3]}")

    # Rebuild Llama 2's SentencePiece model. llama.cpp marks <unk>/<s>/</s> CONTROL or USER_DEFINED after
    # HF's added_tokens_decoder; in the SentencePiece model <unk> is the unknown piece, <s> and </s> control
    # symbols. Llama's normalizer: no Unicode normalization, a dummy "▁" prefix, spaces kept, written "▁".
    proto = spm_pb2.ModelProto()
    piece_type = spm_pb2.ModelProto.SentencePiece
    for i in range(_PHI3_SPM_PIECES):
        piece = proto.pieces.add(piece=tokens[i], score=scores[i])
        if i == 0:
            piece.type = piece_type.UNKNOWN
        elif types[i] == TokenType.BYTE:
            piece.type = piece_type.BYTE
        elif types[i] == TokenType.NORMAL:
            piece.type = piece_type.NORMAL
        else:
            piece.type = piece_type.CONTROL
    proto.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = _PHI3_SPM_PIECES
    proto.trainer_spec.byte_fallback = True
    spec = proto.trainer_spec
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True

    # HF added tokens: the ones llama.cpp's converter typed from HF's added tokens, CONTROL where HF called
    # them special, USER_DEFINED (only </s>) where not, so the flags round-trip to the same GGUF types.
    # Microsoft's Phi-3 tokenizer strips the whitespace after its chat tokens and </s> (rstrip), and
    # llama.cpp copies that for models named phi3/phi-3 (the model-name switch in src/llama-vocab.cpp):
    # "<|end|>\n<|assistant|>" is [32007, 32001] in both. <unk>, <s> and <|endoftext|> strip nothing.
    added = {i: AddedToken(token, special=types[i] == TokenType.CONTROL, normalized=False, lstrip=False,
                           rstrip=token not in ("<unk>", "<s>", "<|endoftext|>"))
             for i, token in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)}

    def special(key: str) -> str:
        return tokens[field(f"tokenizer.ggml.{key}_token_id")]

    _save_tokenizer(
        out, proto, added, "phi3",
        bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=bool(field("tokenizer.ggml.add_bos_token")),
        add_eos_token=bool(field("tokenizer.ggml.add_eos_token")),
        model_max_length=int(field("phi3.context_length")),
    )


def _build_mistral(out: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import AddedToken

    wheel = _pip_download(
        f"mistral_common-{MISTRAL_COMMON_VERSION}-py3-none-any.whl",
        f"mistral-common=={MISTRAL_COMMON_VERSION}",
        "--only-binary", ":all:",
    )
    with damaged_download(wheel), zipfile.ZipFile(wheel) as zf:
        proto = spm_pb2.ModelProto.FromString(zf.read("mistral_common/data/tokenizer.model.v1"))
    spec = proto.trainer_spec
    added = {i: AddedToken(proto.pieces[i].piece, special=True, normalized=False)
             for i in (spec.unk_id, spec.bos_id, spec.eos_id)}
    # No pad token: Mistral has none, and callers choose their own.
    _save_tokenizer(
        out, proto, added, "mistral",
        bos_token=spec.bos_piece, eos_token=spec.eos_piece, unk_token=spec.unk_piece,
        add_bos_token=True, add_eos_token=False, model_max_length=_MISTRAL_MAX_LENGTH,
    )


def _build_gemma3(out: Path) -> None:
    from medtune.offline_gemma import build_tokenizer  # from the Gemma-3-270M GGUF (a dev requirement)

    build_tokenizer(out)


def _save_tokenizer(out: Path, proto, added: dict, family: str, **config) -> None:
    """Write `proto` as tokenizer.model plus the equivalent HF fast tokenizer, with `added` ({id: AddedToken}).

    The fast tokenizer is the one HF ships for Llama-style SentencePiece models (legacy mode): a BPE over
    the same pieces with byte fallback, and a normalizer that prepends "▁" and turns spaces into "▁".
    That reproduces SentencePiece exactly, leading spaces included (the Metaspace pre-tokenizer that
    transformers 5 uses for LlamaTokenizer does not: it skips the dummy prefix when the text already
    starts with a space). Hence the folder names the generic TokenizersBackend class, which loads
    tokenizer.json as written instead of rebuilding it.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    # SentencePiece BPE joins the adjacent pair whose union is the best-scored piece; HF BPE the pair
    # ranked first in its merge list. So list every split of every normal piece in two, best score first.
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces)
              if p.type == spm_pb2.ModelProto.SentencePiece.NORMAL}
    merges = sorted((rank, piece[:k], piece[k:]) for piece, rank in normal.items()
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}

    backend = Tokenizer(BPE(vocab, [(left, right) for _, left, right in merges], unk_token=config["unk_token"],
                            fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    # Tokens outside the SentencePiece vocabulary get the next free ids, so add them in id order.
    backend.add_tokens([added[i] for i in sorted(added)])  # AddedToken.special decides if it is special
    wrong = {i: t.content for i, t in added.items() if backend.token_to_id(t.content) != i}
    if wrong:
        raise ValueError(f"added tokens did not get their ids: {wrong}")

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, padding_side="right", clean_up_tokenization_spaces=False, **config)
    tokenizer.chat_template = _chat_template(family)
    tokenizer.save_pretrained(out)
    # transformers 5 no longer writes the SentencePiece model; llama.cpp's converter reads it.
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())


# the families whose tokenizers are built here; Gemma 3's from the Gemma-3-270M GGUF, a dev requirement
BUILDERS = {"phi3": _build_phi3, "mistral": _build_mistral, "gemma3": _build_gemma3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=["phi3", "mistral"], metavar="family",
                        help=f"tokenizers to build: {', '.join(BUILDERS)} (default: phi3 mistral)")
    args = parser.parse_args(argv)
    if unknown := sorted(set(args.families) - set(BUILDERS)):
        parser.error(f"unknown tokenizer family {', '.join(unknown)}; expected {', '.join(BUILDERS)}")
    for family in dict.fromkeys(args.families):
        try:
            path = tokenizer_dir(family)
        except OfflineSetupError as e:
            sys.exit(f"error: {e}")
        print(f"{family}: {path} ({', '.join(sorted(p.name for p in path.iterdir()))})")
        if family == "phi3":
            print(f"llama.cpp (phi-3 vocab, test vectors, convert_hf_to_gguf.py): {llama_cpp_dir()}")


if __name__ == "__main__":
    main()
