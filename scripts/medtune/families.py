"""What differs between the model families we train: data, not code paths."""
from dataclasses import dataclass
from pathlib import Path

from medtune.config import REPO_ROOT
from medtune.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    default_model: str
    end_of_turn: str  # the token that closes an assistant turn; generation stops on it
    stop_tokens: tuple[str, ...]
    # Every attention and MLP projection, by the split names of Unsloth's uploads (Llama-style).
    lora_targets: tuple[str, ...]
    model_type: str  # transformers' name of the architecture
    # A 2-layer random-weight stand-in for tests and the offline quickstart. Its larger init scale
    # (0.1, not 0.02) lets LoRA move the logits far enough for a visibly falling loss.
    tiny_config: dict
    full_config: dict  # the real architecture's sizes, for random-weight GPU runs and benchmarks
    preset: str  # the training script of this family
    gguf_name: str  # general.name in its GGUF files; llama.cpp keys some tokenizer rules on it (Phi-3)

    @property
    def chat_template_path(self) -> Path:
        return REPO_ROOT / "prompts" / "chat_templates" / f"{self.name}.jinja"

    def chat_template(self) -> str:
        return self.chat_template_path.read_text()

    def prepare_tokenizer(self, tokenizer):
        """The family's chat template, and a pad token where the model has none (Mistral): pads never carry loss."""
        tokenizer.chat_template = self.chat_template()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token

    def stop_ids(self, tokenizer, eos_id=None):
        """Token ids that end an answer: EOS (the tokenizer's, or `eos_id`) and the end-of-turn token."""
        eos = tokenizer.eos_token_id if eos_id is None else eos_id
        return sorted({eos, tokenizer.convert_tokens_to_ids(self.end_of_turn)})


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Microsoft's Phi-3 checkpoints fuse these projections into one Linear each.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

FAMILIES = {
    "phi3": Family(
        name="phi3",
        title="Phi-3-mini-4k-instruct",
        default_model="unsloth/Phi-3-mini-4k-instruct-bnb-4bit",
        end_of_turn="<|end|>",
        stop_tokens=("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"),
        lora_targets=PROJECTIONS,
        model_type="phi3",
        full_config=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                         rope_theta=10000.0, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                         tie_word_embeddings=False),
        tiny_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096,
                         rope_theta=10000.0, bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                         tie_word_embeddings=False, initializer_range=0.1),
        preset="scripts/train_phi.py",
        gguf_name="Phi-3",
    ),
    "mistral": Family(
        name="mistral",
        title="Mistral-7B-Instruct-v0.2",
        default_model="unsloth/mistral-7b-instruct-v0.2-bnb-4bit",
        end_of_turn="</s>",
        stop_tokens=("</s>", "[INST]"),
        lora_targets=PROJECTIONS,
        model_type="mistral",
        full_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                         rope_theta=1000000.0, sliding_window=None, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False),
        tiny_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=32768,
                         rope_theta=1000000.0, sliding_window=None, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, initializer_range=0.1),
        preset="scripts/train_mistral.py",
        gguf_name="Mistral",
    ),
    "gemma3": Family(
        name="gemma3",
        title="Gemma-3-1B-it",
        default_model="unsloth/gemma-3-1b-it-bnb-4bit",
        end_of_turn="<end_of_turn>",
        stop_tokens=("<end_of_turn>", "<eos>"),
        lora_targets=PROJECTIONS,
        model_type="gemma3_text",
        # google/gemma-3-1b-it's config.json; every 6th layer attends globally, the others to 512 tokens.
        full_config=dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, vocab_size=262144,
                         max_position_embeddings=32768, sliding_window=512, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0, tie_word_embeddings=True),
        tiny_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, vocab_size=262144,
                         max_position_embeddings=32768, sliding_window=512, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0, tie_word_embeddings=True, initializer_range=0.1),
        preset="scripts/train_gemma.py",
        gguf_name="Gemma 3",
    ),
}


def get_family(name):
    """The family of that name (a run's run_info.json, a preset); one clear error for any other name."""
    if name not in FAMILIES:
        raise UserError(f"Unknown model family {name!r}. The families are {', '.join(FAMILIES)}: each is a chat "
                        "template in prompts/chat_templates/ and a row in scripts/medtune/families.py.")
    return FAMILIES[name]


def family_of_model_type(model_type):
    """The family whose architecture is transformers' `model_type` (a model folder's config.json)."""
    matches = [f for f in FAMILIES.values() if f.model_type == model_type]
    if not matches:
        known = ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES.values())
        raise UserError(f"No model family has the architecture {model_type!r}. The families are {known}; "
                        "a model of another architecture needs its own row in scripts/medtune/families.py.")
    return matches[0]


def linear_names(model):
    """Last name components of the model's Linear layers (4-bit ones included), lm_head excluded."""
    import torch

    return sorted({full.rsplit(".", 1)[-1] for full, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and not full.endswith("lm_head")})


def resolve_lora_targets(requested, linear_names):
    """Map requested module names onto the model's real Linear layer names.

    `linear_names` are the last components of the model's Linear layers' names (e.g. "qkv_proj").
    A split name whose projection the model fuses is replaced by the fused name, so the preset's
    defaults fit both Unsloth's split Phi-3 uploads and Microsoft's fused weights. Returns
    (targets, missing): `missing` lists requested names that match nothing.
    """
    available = set(linear_names)
    targets, missing = [], []
    for name in requested:
        if name in available:
            match = name
        else:
            match = next((fused for fused, parts in FUSED.items() if name in parts and fused in available), None)
        if match is None:
            missing.append(name)
        elif match not in targets:
            targets.append(match)
    return targets, missing
