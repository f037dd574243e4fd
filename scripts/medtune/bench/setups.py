"""The configurations the benchmark trains, each built as its trainer (run in medtune/bench/worker.py):
ours (this project's path, medtune.train), notebook (the Unsloth notebooks' configuration) and baseline
(plain transformers + PEFT QLoRA). The notebook and the baseline take the spec's batch, so that they
run at this project's micro-batch and gradient accumulation; the notebook's own 2 x 4 is one more run.
"""
import sys

import torch

from medtune.families import PROJECTIONS, linear_names, resolve_lora_targets


def read_rows(spec):
    import json
    from pathlib import Path

    return json.loads(Path(spec["rows"]).read_text())


def lora_summary(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    return {"trainable_params": trainable, "lora_modules": modules}


def total_steps(spec):
    """Warm-up and measured steps, and one more where a profile of one step is taken."""
    return spec["warmup"] + spec["steps"] + (1 if spec.get("profile") else 0)


def load_ours(spec, family, cfg):
    from medtune.train import dequantize, modeling

    model, tokenizer, _ = modeling.load_model(spec["model"], cfg)
    family.prepare_tokenizer(tokenizer)
    checkpointing, why, cap = modeling.choose_checkpointing(model, cfg)
    print(f"[ours] {why}", flush=True)
    dequantized, why = dequantize.apply(model, cfg, checkpointing, modeling.free_gpu_bytes(), cap)
    print(f"[ours] {why}", flush=True)
    model, targets = modeling.attach_lora(model, cfg, family, checkpointing, tokenizer)
    return model, tokenizer, targets, checkpointing, dequantized, cap


def ours_config(spec, **extra):
    from medtune.config import TrainConfig

    return TrainConfig(model=spec["model"], max_steps=total_steps(spec), save_steps=10**6, eval_samples=0,
                       logging_steps=1, warmup_steps=5, **{**spec.get("overrides", {}), **extra})


def train_ours(spec, family, rows, run_dir, callbacks):
    from medtune.train import lora_add
    from medtune.train.memory import activation_bytes
    from medtune.train.trainer import build_trainer

    cfg = ours_config(spec)
    model, tokenizer, targets, checkpointing, dequantized, cap = load_ours(spec, family, cfg)
    trainer = build_trainer(model, tokenizer, rows, [], cfg, run_dir, callbacks, checkpointing, cap)
    # With the largest step's tokens and the peak memory, this checks --gradient-checkpointing auto's estimate.
    settings = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_seq_length": cfg.max_seq_length,
                "packing": cfg.packing, "optim": cfg.optim, "gradient_checkpointing": checkpointing,
                "dequantized_once": dequantized, "micro_batch_token_cap": cap, "lora_add": lora_add.path_of(model),
                "estimated_activation_bytes_per_token": activation_bytes(model.config, 1)}
    return model, trainer, targets, settings


def sft_args(spec, run_dir, **extra):
    """The notebooks' SFTConfig, at the spec's batch."""
    from trl import SFTConfig

    batch = spec["batch"]
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu and torch.cuda.is_bf16_supported()
    return SFTConfig(
        per_device_train_batch_size=batch["batch_size"], gradient_accumulation_steps=batch["grad_accum"],
        warmup_steps=5, max_steps=total_steps(spec), learning_rate=2e-4, fp16=on_gpu and not bf16, bf16=bf16,
        logging_steps=1, optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407,
        output_dir=str(run_dir), report_to="none", max_length=2048, packing=False, save_strategy="no",
        include_num_input_tokens_seen="non_padding", **extra)


def settings_of(spec, checkpointing):
    return {**spec["batch"], "max_seq_length": 2048, "packing": False, "optim": "adamw_8bit",
            "gradient_checkpointing": checkpointing}


def train_notebook(spec, family, rows, run_dir, callbacks):
    """The configuration of the Unsloth notebooks most users copy, Unsloth's defaults otherwise."""
    from unsloth import FastLanguageModel
    from datasets import Dataset
    from trl import SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=spec["model"], max_seq_length=2048, dtype=None,
                                                         load_in_4bit=True)
    family.prepare_tokenizer(tokenizer)
    # The notebooks name the 7 split projections; on Phi-3's fused weights the same layers are
    # qkv_proj and gate_up_proj, resolved as for every configuration here so that all attach alike.
    targets, _ = resolve_lora_targets(list(PROJECTIONS), linear_names(model))
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=targets, lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         args=sft_args(spec, run_dir), callbacks=callbacks)
    return model, trainer, targets, settings_of(spec, "unsloth")


def train_baseline(spec, family, rows, run_dir, callbacks):
    """Plain transformers + PEFT + bitsandbytes NF4 QLoRA: Hugging Face gradient checkpointing, SDPA
    attention, TRL padding each batch to its longest row."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    assert "unsloth" not in sys.modules, "the baseline must run without Unsloth's patches"
    on_gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 device_map={"": 0} if on_gpu else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    family.prepare_tokenizer(tokenizer)
    gc_kwargs = {"use_reentrant": False}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs=gc_kwargs)
    targets, _ = resolve_lora_targets(list(PROJECTIONS), linear_names(model))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    args = sft_args(spec, run_dir, padding_free=False, gradient_checkpointing=True,
                    gradient_checkpointing_kwargs=gc_kwargs)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=callbacks)
    return model, trainer, targets, settings_of(spec, "true")


SETUPS = {"ours": train_ours, "baseline": train_baseline, "notebook": train_notebook}
