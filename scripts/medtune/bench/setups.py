"""The three configurations the GPU benchmark trains, each returning (model, trainer, LoRA targets,
settings): this project's defaults, the Unsloth notebook configuration and plain transformers + PEFT
QLoRA. Run by medtune.bench.worker, one configuration per process."""
import sys

import torch


def load_ours(spec, family, cfg):
    from medtune.train import modeling

    model, tokenizer, _ = modeling.load_model(spec["model"], cfg)
    family.prepare_tokenizer(tokenizer)
    model, targets = modeling.attach_lora(model, cfg, family)
    return model, tokenizer, targets


def ours_config(spec, **extra):
    from medtune.config import TrainConfig

    steps = spec["warmup"] + spec["steps"]
    return TrainConfig(model=spec["model"], max_steps=steps, save_steps=10**6, eval_samples=0, logging_steps=1,
                       warmup_steps=5, **{**spec.get("overrides", {}), **extra})


def train_ours(spec, family, rows, run_dir, timer):
    from medtune.train.trainer import build_trainer

    cfg = ours_config(spec)
    model, tokenizer, targets = load_ours(spec, family, cfg)
    trainer = build_trainer(model, tokenizer, rows, [], cfg, run_dir, [timer])
    settings = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "max_seq_length": cfg.max_seq_length,
                "packing": cfg.packing, "optim": cfg.optim}
    return model, trainer, targets, settings


def train_notebook(spec, family, rows, run_dir, timer):
    """The configuration of the Unsloth notebooks most users copy, Unsloth's defaults otherwise."""
    from unsloth import FastLanguageModel, is_bfloat16_supported
    from trl import SFTConfig, SFTTrainer

    from medtune.families import PROJECTIONS, linear_names, resolve_lora_targets

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=spec["model"], max_seq_length=2048, dtype=None,
                                                         load_in_4bit=True)
    family.prepare_tokenizer(tokenizer)
    # The notebooks name the 7 split projections; on Phi-3's fused weights the same layers are
    # qkv_proj and gate_up_proj, resolved as for every configuration here so that all attach alike.
    targets, _ = resolve_lora_targets(list(PROJECTIONS), linear_names(model))
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=targets, lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    from datasets import Dataset

    args = SFTConfig(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=2e-4, fp16=not is_bfloat16_supported(),
        bf16=is_bfloat16_supported(), logging_steps=1, optim="adamw_8bit", weight_decay=0.01,
        lr_scheduler_type="linear", seed=3407, output_dir=str(run_dir), report_to="none", max_length=2048,
        packing=False, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=[timer])
    return model, trainer, targets, {"batch_size": 2, "grad_accum": 4, "max_seq_length": 2048, "packing": False,
                                     "optim": "adamw_8bit"}


def train_baseline(spec, family, rows, run_dir, timer):
    """Plain transformers + PEFT + bitsandbytes NF4 QLoRA: Hugging Face gradient checkpointing, SDPA
    attention, TRL padding each batch to its longest row."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from medtune.families import PROJECTIONS, linear_names, resolve_lora_targets

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
    args = SFTConfig(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5,
        max_steps=spec["warmup"] + spec["steps"], learning_rate=2e-4, bf16=on_gpu, logging_steps=1,
        optim="adamw_8bit", weight_decay=0.01, lr_scheduler_type="linear", seed=3407, output_dir=str(run_dir),
        report_to="none", max_length=2048, packing=False, padding_free=False, gradient_checkpointing=True,
        gradient_checkpointing_kwargs=gc_kwargs, save_strategy="no", include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(rows), args=args,
                         callbacks=[timer])
    return model, trainer, targets, {"batch_size": 2, "grad_accum": 4, "max_seq_length": 2048, "packing": False,
                                     "optim": "adamw_8bit"}


TRAINERS = {"ours": train_ours, "baseline": train_baseline, "notebook": train_notebook}
