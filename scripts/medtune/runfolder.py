"""The run folder, checkpoints/<run-name>/: the contract between training and every later stage.

Training writes it through the write_* functions here; export, evaluate, the demo and compare open it
with open_run(path, needs), which checks the files that stage needs (present, readable, not cut
short) and fails with one message that lists what the folder does hold.

    from medtune.runfolder import FOR_EXPORT, open_run
    run = open_run("checkpoints/phi3-smoke", FOR_EXPORT)
    run.family, run.system_prompt(), run.base_source()
"""
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from medtune.errors import UserError
from medtune.families import FAMILIES
from medtune.fileio import read_jsonl, write_json_atomic, write_jsonl_atomic, write_text_atomic, write_yaml_atomic

ADAPTER = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_MODEL = "tokenizer.model"
CHAT_TEMPLATE = "chat_template.jinja"
SYSTEM_PROMPT = "system_prompt.txt"
CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
HELDOUT = "heldout.jsonl"
CHECKPOINTS = "checkpoint-*"  # the trainer's checkpoint-<step>/ folders (--resume)
EXPORT = "export"

# Every file training leaves, as its summary lists them.
FILES = {
    ADAPTER: "LoRA adapter", ADAPTER_CONFIG: "LoRA config (base model id inside)", TOKENIZER: "tokenizer",
    TOKENIZER_MODEL: "SentencePiece model (for llama.cpp export)", CHAT_TEMPLATE: "chat template used",
    SYSTEM_PROMPT: "system prompt used", CONFIG: "every option (reproduce with --config)",
    RUN_INFO: "versions, data counts, summary", METRICS: "every logged value", LOSS_CURVE: "train and eval loss",
    HELDOUT: "held-out rows",
}
# What each reader needs. run_info.json is always needed: it names the family and the base model.
FOR_REPORT = (RUN_INFO,)  # compare: numbers only
FOR_PROMPT = (RUN_INFO, SYSTEM_PROMPT)  # the demo of an export: the run's system prompt
FOR_MODEL = (RUN_INFO, CONFIG, ADAPTER_CONFIG, ADAPTER, TOKENIZER, TOKENIZER_CONFIG, CHAT_TEMPLATE, SYSTEM_PROMPT)
FOR_EXPORT = (*FOR_MODEL, TOKENIZER_MODEL)  # llama.cpp's converter reads the SentencePiece model

HOW_TO_TRAIN = "e.g. checkpoints/phi3-smoke (train one with: python scripts/train_phi.py --smoke)"


def write_start(run_dir, config, system_prompt, chat_template, heldout_rows):
    """What a run is made of, written before training starts."""
    write_yaml_atomic(run_dir / CONFIG, config)
    write_text_atomic(run_dir / SYSTEM_PROMPT, system_prompt + "\n")
    write_text_atomic(run_dir / CHAT_TEMPLATE, chat_template)
    write_jsonl_atomic(run_dir / HELDOUT, heldout_rows)


def write_run_info(run_dir, info):
    """Written last: its presence marks a finished run."""
    write_json_atomic(run_dir / RUN_INFO, info)


def checkpoints(run_dir):
    return list(Path(run_dir).glob(CHECKPOINTS))


def listing(folder):
    return ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir())) or "nothing"


def _safetensors_problem(path):
    """Why a .safetensors file can't be read (cut short, not safetensors), or None. Reads only the header:
    8 bytes of header length, the JSON header, then exactly the bytes its tensors' offsets cover."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"holds {size} bytes, not even a safetensors header"
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            return f"is cut short: its header alone needs {n + 8:,} bytes and the file has {size:,}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has a header that is not valid JSON (not a safetensors file)"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"is {'cut short' if size < expected else 'longer than its header says'}: {size:,} bytes of {expected:,}"
    return None


def _content_problem(path):
    """Why a present file can't serve, or None."""
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.stat().st_size == 0:
        return "is empty"
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            return f"is not valid JSON ({e})"
        if path.name == RUN_INFO and data.get("family") not in FAMILIES:
            return f"names no known model family ({data.get('family')!r}; known: {', '.join(FAMILIES)})"
    if path.suffix == ".yaml":
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            return f"is not valid YAML ({' '.join(str(e).split())})"
        if not isinstance(data, dict):
            return "is not a mapping of options"
    return None


def check(path, needs=FOR_MODEL):
    """The run folder at `path`, checked for the files in `needs`; one UserError naming every problem."""
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise UserError(f"There is no run folder at {path} (the folder does not exist). Pass the folder a training "
                        f"run wrote, {HOW_TO_TRAIN}.")
    missing = [name for name in needs if not (run_dir / name).is_file()]
    damaged = [(name, why) for name in needs if name not in missing
               for why in [_content_problem(run_dir / name)] if why]
    if not missing and not damaged:
        return run_dir
    problems = ([f"{', '.join(missing)} missing"] if missing else []) + [f"{name} {why}" for name, why in damaged]
    hints = []
    if ADAPTER in missing and checkpoints(run_dir):
        hints.append("It holds trainer checkpoints but no final adapter: the run did not finish; resume it with "
                     "--resume.")
    if TOKENIZER_MODEL in missing:
        hints.append(f"Copy the base model's {TOKENIZER_MODEL} (its SentencePiece model, which llama.cpp's converter "
                     "reads) into the run folder.")
    if damaged:
        hints.append("Restore the damaged file(s) from a copy, or train the run again.")
    raise UserError(f"{path} is not a finished run folder: {'; '.join(problems)} (found: {listing(run_dir)})."
                    + "".join(" " + h for h in hints))


@dataclass
class Run:
    """A checked run folder and what later stages read from it."""
    path: Path
    info: dict = field(repr=False)
    config: dict = field(repr=False)  # {} when config.yaml was not needed and is absent

    @property
    def name(self):
        return self.path.name

    @property
    def family(self):
        return FAMILIES[self.info["family"]]

    @property
    def adapter(self):
        return self.path / ADAPTER

    @property
    def tokenizer_dir(self):
        return self.path

    @property
    def smoke(self):
        return bool(self.config.get("smoke"))

    def system_prompt(self):
        return (self.path / SYSTEM_PROMPT).read_text().strip()

    def chat_template(self):
        return (self.path / CHAT_TEMPLATE).read_text()

    def heldout(self):
        return read_jsonl(self.path / HELDOUT, missing_ok=True)

    def metrics(self):
        return read_jsonl(self.path / METRICS, missing_ok=True)

    def base_source(self):
        """The base model the adapter was trained on; a smoke run's tiny base is rebuilt if it moved."""
        from medtune.config import resolve_path

        source = self.info["base_model"]
        if self.smoke and not resolve_path(source).exists():
            from medtune.train.modeling import tiny_model_dir

            return str(tiny_model_dir(self.family))  # seeded: the same weights
        return source


def open_run(path, needs=FOR_MODEL):
    """The Run at `path`, after check(path, needs)."""
    import yaml

    optional = [CONFIG] if CONFIG not in needs and (Path(path) / CONFIG).is_file() else []
    run_dir = check(path, list(dict.fromkeys([RUN_INFO, *needs, *optional])))
    info = json.loads((run_dir / RUN_INFO).read_text())
    config = yaml.safe_load((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).is_file() else {}
    return Run(run_dir, info, config if isinstance(config, dict) else {})


def run_of(path):
    """The run folder that a model path sits in (<run>/export, <run>/export/merged, <run>/export/x.gguf),
    or None for a model that came from elsewhere."""
    p = Path(path).resolve()
    for folder in [p, *p.parents][:3]:
        if folder.name == EXPORT and (folder.parent / RUN_INFO).is_file():
            return folder.parent
    return None
