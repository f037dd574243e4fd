"""The real Unsloth + TRL path on tiny random-weight models with the real tokenizers."""
import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FAMILIES, REPO, train
from medtune.config import SAMPLE_DATASET, to_dict, TrainConfig
from medtune.errors import UserError
from medtune.families import FAMILIES as FAMILY_SPECS, resolve_lora_targets

RUN_FILES = ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "chat_template.jinja", "system_prompt.txt", "config.yaml", "run_info.json",
             "metrics.jsonl", "loss_curve.png", "heldout.jsonl"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_smoke_run_writes_a_complete_run_folder(smoke_runs, family):
    run_dir = smoke_runs(family)
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "chat_template.jinja").read_text() == FAMILY_SPECS[family].chat_template()
    assert (run_dir / "system_prompt.txt").read_text() == (REPO / "prompts/system_prompt.txt").read_text()
    assert len((run_dir / "heldout.jsonl").read_text().splitlines()) == 8

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert set(saved) == set(to_dict(TrainConfig()))  # every option, resolved
    assert saved["smoke"] and saved["max_steps"] == 12 and saved["dataset"] == SAMPLE_DATASET

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["family"] == family and info["base_model"] == saved["model"]
    assert set(info["lora_targets"]) == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if family == "phi3"
                                         else {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    for lib in ("torch", "transformers", "trl", "peft", "unsloth"):
        assert info["versions"][lib]
    s = info["summary"]
    assert s["steps"] == 12 and s["tokens_per_s"] > 0 and s["eval_loss"] > 0
    assert info["data"]["train"]["kept"] == 56 and info["data"]["eval"]["kept"] == 8

    adapter = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 16 and adapter["base_model_name_or_path"] == saved["model"]
    weights = load_file(run_dir / "adapter_model.safetensors")
    assert weights and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(losses(run_dir)) == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]


@pytest.mark.slow
def test_saved_config_reproduces_the_run(smoke_runs, runs_root):
    original = smoke_runs("phi3")
    again = train("phi3", "--config", original / "config.yaml", "--output-dir", runs_root, "--run-name", "phi3-again")
    a, b = losses(original), losses(again)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)


def stop_at(step):
    """A callback that stands in for a crash or Ctrl-C part-way through training."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

    return StopAt()


@pytest.mark.slow
def test_resume_continues_at_the_saved_step(smoke_runs, runs_root):
    reference = losses(smoke_runs("mistral"))
    with pytest.raises(KeyboardInterrupt):
        train("mistral", "--smoke", "--output-dir", runs_root, "--run-name", "cut", callbacks=[stop_at(8)])
    run_dir = runs_root / "cut"
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-6"]
    assert not (run_dir / "adapter_model.safetensors").exists()

    train("mistral", "--smoke", "--output-dir", runs_root, "--run-name", "cut", "--resume")
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["summary"]["resumed_from"] == "checkpoint-6" and info["summary"]["steps"] == 12
    resumed = losses(run_dir)
    assert sorted(resumed) == list(range(1, 13))  # steps 7-8 of the cut run were replaced, not duplicated
    # same step, same data order, same optimizer state: the same losses as the uninterrupted run
    assert all(abs(resumed[k] - reference[k]) < 1e-3 for k in range(7, 13)), (resumed, reference)


@pytest.mark.slow
def test_resume_may_extend_but_not_change_the_run(smoke_runs, runs_root):
    run_dir = smoke_runs("phi3")
    with pytest.raises(UserError, match="lora_r"):
        train("phi3", "--smoke", "--output-dir", runs_root, "--run-name", run_dir.name, "--resume", "--lora-r", "8")


@pytest.mark.slow
def test_lora_learns_and_the_base_stays_frozen(tmp_path):
    """A few steps on a repeated small batch: loss falls by at least half, LoRA weights move, base weights don't."""
    from medtune.train.modeling import attach_lora, load_model, tiny_model_dir
    from medtune.train.trainer import build_trainer
    from medtune.config import parse_config

    family = FAMILY_SPECS["phi3"]
    cfg, _ = parse_config(["--smoke", "--learning-rate", "1e-2", "--max-steps", "30", "--eval-samples", "0",
                           "--warmup-steps", "0", "--lr-scheduler", "constant", "--logging-steps", "1",
                           "--save-steps", "1000", "--batch-size", "2", "--grad-accum", "1"],
                          "phi3", "t", "t")
    model, tok, _ = load_model(str(tiny_model_dir(family)), cfg)
    model, _ = attach_lora(model, cfg, family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    batch = [torch.randint(100, 32000, (40,), generator=gen).tolist() for _ in range(2)]
    rows = [{"input_ids": ids, "labels": [-100] * 8 + ids[8:]} for ids in batch] * 30
    trainer = build_trainer(model, tok, rows, [], cfg, tmp_path, [])
    trainer.train()
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert logged[-1] <= logged[0] / 2, logged
    after = dict(model.named_parameters())
    lora_moved = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n].detach())]
    assert len(lora_moved) == 2 * 4  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj)
    base_moved = [n for n in before if "lora_" not in n and not torch.equal(before[n], after[n].detach())]
    assert base_moved == []


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.slow
def test_preset_targets_exist_in_the_family_model(family):
    from medtune.train.modeling import attach_lora, linear_names, load_model, tiny_model_dir
    from medtune.config import parse_config

    cfg, _ = parse_config(["--smoke"], family, "t", "t")
    model, _, _ = load_model(str(tiny_model_dir(FAMILY_SPECS[family])), cfg)
    names = linear_names(model)
    targets, missing = resolve_lora_targets(FAMILY_SPECS[family].lora_targets, names)
    assert missing == [] and set(targets) <= set(names)
    model, attached = attach_lora(model, cfg, FAMILY_SPECS[family])
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert attached == targets and n_lora == model.config.num_hidden_layers * len(targets)


def test_target_resolution_handles_fused_and_split_weights():
    split = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    fused = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert resolve_lora_targets(split, split) == (split, [])
    assert resolve_lora_targets(split, fused) == (fused, [])
    assert resolve_lora_targets(["q_proj", "c_attn"], fused) == (["qkv_proj"], ["c_attn"])


@pytest.mark.slow
def test_quickstart_command_runs_on_cpu(tmp_path):
    """The README's quickstart, as a user runs it: the real CLI, a fresh process."""
    r = subprocess.run([sys.executable, "scripts/train_mistral.py", "--smoke", "--output-dir", tmp_path],
                       cwd=REPO, capture_output=True, text=True, )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "training on CPU" in out  # no GPU: a warning and Unsloth's CPU path, not a failure
    assert "step 12/12 | loss" in out and "Done: 12 steps" in out
    assert f"Wrote {tmp_path / 'mistral-smoke'}/:" in out


GIB = 2**30


def test_auto_checkpointing_keeps_activations_only_where_they_fit():
    from medtune.train.memory import HEADROOM, MARGIN, activation_bytes, choose_checkpointing

    phi3, mistral = (FAMILY_SPECS[f].full_config for f in ("phi3", "mistral"))
    need = activation_bytes(phi3, 8 * 2048)  # the defaults' worst step: 8 rows of 2048 tokens
    assert 50 * GIB < need < 60 * GIB
    assert activation_bytes(mistral, 8 * 2048) > need and activation_bytes(phi3, 2048) == need / 8
    # An H200 with a 4-bit model loaded (~134 GiB free) keeps them; a T4 (or the 15 GB cap) recomputes.
    choice, line = choose_checkpointing("auto", need, 134 * GIB)
    assert choice == "false" and "none" in line and f"{need / GIB:.1f} GiB" in line and "134.0 GiB" in line
    assert choose_checkpointing("auto", activation_bytes(mistral, 8 * 2048), 134 * GIB)[0] == "false"
    assert choose_checkpointing("auto", need, 13 * GIB)[0] == "unsloth"
    assert choose_checkpointing("auto", need, 74 * GIB)[0] == "false"  # an 80 GB H100: Phi-3 fits...
    assert choose_checkpointing("auto", activation_bytes(mistral, 8 * 2048), 74 * GIB)[0] == "unsloth"  # ...Mistral not
    edge = int(need * MARGIN + HEADROOM)
    assert choose_checkpointing("auto", need, edge + 1)[0] == "false"
    assert choose_checkpointing("auto", need, edge - 1)[0] == "unsloth"
    assert choose_checkpointing("auto", need, None)[0] == "unsloth"  # no GPU to measure: the old default
    for asked in ("unsloth", "true", "false"):
        choice, line = choose_checkpointing(asked, need, 1)
        assert choice == asked and "as asked" in line
    with pytest.raises(ValueError):
        choose_checkpointing("sometimes", need, 1)


def test_auto_keeps_activations_in_micro_batches_of_capped_tokens():
    from medtune.train.memory import MIN_MICRO_BATCH, activation_bytes, plan_checkpointing, with_margin

    mistral = FAMILY_SPECS["mistral"].full_config
    per_token, copies = activation_bytes(mistral, 1), 13 * GIB
    # An 80 GB H100 with Mistral loaded in 4-bit (74.6 GiB free): 8 rows of 2048 tokens need checkpointing,
    # but micro-batches of up to `cap` tokens, with room for the 16-bit copies of the weights, do not.
    free = int(74.6 * GIB)
    choice, line, cap = plan_checkpointing("auto", per_token, 2048, 8, free, copies)
    assert choice == "false" and MIN_MICRO_BATCH * 2048 <= cap < 8 * 2048
    assert with_margin(per_token * cap + copies) <= free < with_margin(per_token * (cap + 1) + copies)
    assert f"in micro-batches of at most {cap:,} tokens" in line and "parts of whole rows" in line
    assert "beside 13.0 GiB of 16-bit weight copies" in line and "74.6 GiB of the GPU is free" in line
    assert f"{per_token * 8 * 2048 / GIB:.1f} GiB of activations" in line
    # Where the copies leave no room for MIN_MICRO_BATCH rows but the activations alone have it: the cap
    # without them (and --dequantize-once auto then makes none).
    tight = int(with_margin(per_token * MIN_MICRO_BATCH * 2048)) + GIB
    choice, line, cap = plan_checkpointing("auto", per_token, 2048, 8, tight, copies)
    assert choice == "false" and cap >= MIN_MICRO_BATCH * 2048 and "copies" not in line
    assert with_margin(per_token * cap) <= tight < with_margin(per_token * (cap + 1))
    # The whole micro-batch fits (an H200): no cap. Not even MIN_MICRO_BATCH rows fit (a T4): Unsloth's.
    assert plan_checkpointing("auto", per_token, 2048, 8, 134 * GIB, copies)[::2] == ("false", None)
    assert plan_checkpointing("auto", per_token, 2048, 8, 13 * GIB, copies)[::2] == ("unsloth", None)
    almost = int(with_margin(per_token * MIN_MICRO_BATCH * 2048)) - 1
    assert plan_checkpointing("auto", per_token, 2048, 8, almost)[::2] == ("unsloth", None)
    # Only auto caps; without a GPU to measure nothing changes.
    for asked in ("unsloth", "true", "false"):
        assert plan_checkpointing(asked, per_token, 2048, 8, free, copies)[::2] == (asked, None)
    assert plan_checkpointing("auto", per_token, 2048, 8, None, copies)[::2] == ("unsloth", None)


def test_the_cap_leaves_room_for_the_copies_dequantize_then_makes(monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from medtune.train import dequantize, modeling
    from medtune.train.memory import activation_bytes, choose_dequantize

    config = FAMILY_SPECS["mistral"].full_config
    model, free, copies = SimpleNamespace(config=config), int(74.6 * GIB), 13 * GIB
    monkeypatch.setattr(modeling, "free_gpu_bytes", lambda: free)
    monkeypatch.setattr(dequantize, "copy_bytes", lambda m: copies)
    cfg = TrainConfig()
    choice, line, cap = modeling.choose_checkpointing(model, cfg)
    assert choice == "false" and cap < cfg.batch_size * cfg.max_seq_length
    assert choose_dequantize("auto", copies, choice, activation_bytes(config, cap), free)[0] is True
    # Without copies to make, the activations take their room: a larger cap.
    assert modeling.choose_checkpointing(model, replace(cfg, dequantize_once="false"))[2] > cap
    monkeypatch.setattr(modeling, "free_gpu_bytes", lambda: None)
    assert modeling.choose_checkpointing(model, cfg)[::2] == ("unsloth", None)


def test_a_long_micro_batch_splits_into_parts_of_whole_rows():
    from medtune.train.trainer import part_bounds, split_rows

    # Padding-free: one sequence of packed rows of 5, 4, 6, 5 and 5 tokens, each restarting its positions.
    lengths = [5, 4, 6, 5, 5]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.arange(25)[None]
    # Unsloth's collator adds packed_seq_lengths, one entry per row: attention takes the rows' bounds from it.
    batch = {"input_ids": ids, "labels": ids + 100, "position_ids": positions, "flag": True,
             "packed_seq_lengths": torch.tensor(lengths, dtype=torch.int32)}
    assert split_rows(batch, 25) is None
    parts = split_rows(batch, 10)
    assert [p["input_ids"].shape[1] for p in parts] == [9, 6, 10]
    assert [p["packed_seq_lengths"].tolist() for p in parts] == [[5, 4], [6], [5, 5]]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts], 1), ids)
    assert torch.equal(torch.cat([p["labels"] for p in parts], 1), ids + 100)
    assert all(p["position_ids"][0, 0] == 0 and p["flag"] is True for p in parts)
    # Metadata a part could not be given as its own: the micro-batch is not split.
    assert split_rows({**batch, "packed_seq_lengths": torch.tensor([9, 6, 10])}, 10) is None
    assert split_rows({**batch, "cu_seq_lens_q": torch.tensor([0, 5, 9, 15, 20, 25, 25])}, 10) is None
    assert len(split_rows({**batch, "scale": torch.tensor(2.0)}, 10)) == 3  # a scalar goes to every part
    assert part_bounds([0, 12, 14], 20, 10) == [(0, 12), (12, 20)]  # a row longer than the cap: a part alone
    # Padded: lines of 8 tokens, at most 2 per part of 16 tokens.
    padded = {"input_ids": torch.ones(5, 8), "attention_mask": torch.ones(5, 8), "labels": torch.ones(5, 8)}
    parts = split_rows(padded, 16)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1] and all(p["labels"].shape[1] == 8 for p in parts)


def test_gradient_checkpointing_option_lists_its_choices():
    from medtune.config import parse_config, validate

    cfg, _ = parse_config([], "phi3", "t", "t")
    assert cfg.gradient_checkpointing == "auto" and cfg.hang_timeout == 600
    assert parse_config(["--gradient-checkpointing", "false"], "phi3", "t", "t")[0].gradient_checkpointing == "false"
    with pytest.raises(UserError, match="--gradient-checkpointing must be one of auto, unsloth, true, false"):
        validate(TrainConfig(gradient_checkpointing="maybe"))  # from a --config YAML file
    with pytest.raises(UserError, match="--hang-timeout must be at least 1"):
        parse_config(["--hang-timeout", "0"], "phi3", "t", "t")


def test_dequantize_once_only_where_memory_is_plentiful():
    from medtune.train.memory import HEADROOM, MARGIN, activation_bytes, choose_dequantize

    phi3 = FAMILY_SPECS["phi3"].full_config
    need, copies = activation_bytes(phi3, 8 * 2048), int(6.7 * GIB)  # Phi-3-mini's linear weights in 16 bits
    made, line = choose_dequantize("auto", copies, "false", need, 134 * GIB)  # an H200
    assert made and "dequantized once to 16-bit copies (6.7 GiB)" in line and "134.0 GiB" in line
    edge = math.ceil(need * MARGIN + copies * MARGIN + HEADROOM)
    assert choose_dequantize("auto", copies, "false", need, edge)[0]
    assert not choose_dequantize("auto", copies, "false", need, edge - 1)[0]  # activations fit, copies not
    made, line = choose_dequantize("auto", copies, "unsloth", need, 11 * GIB)  # a T4: checkpointing on
    assert not made and "gradient checkpointing is on" in line
    made, line = choose_dequantize("auto", copies, "unsloth", need, None)  # no GPU
    assert not made and "no GPU memory to measure" in line
    assert choose_dequantize("true", copies, "unsloth", need, 1)[0] and not choose_dequantize("false", copies, "false", 0, 10**15)[0]
    assert choose_dequantize("auto", 0, "false", need, 134 * GIB) == (False, "Frozen weights: 16-bit already (no 4-bit weight to dequantize).")
    with pytest.raises(ValueError):
        choose_dequantize("yes", copies, "false", need, 1)


def test_dequantized_copies_compute_what_the_4bit_layers_do_and_train_lora():
    """bitsandbytes' real NF4 layers (on the CPU) in a tiny Phi-3: replaced by their dequantized
    copies, the model gives the same logits, and LoRA on the copies trains while they stay frozen."""
    from medtune.train.modeling import tiny_model_dir  # imports Unsloth first

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.train.dequantize import copy_bytes, dequantize_once, quantized_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(FAMILY_SPECS["phi3"]), dtype=torch.float32)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.float32,
                                          quant_type="nf4")
                layer.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
                setattr(parent, name, layer)
    n = len(quantized_linears(model))
    assert n == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    assert copy_bytes(model) == 2 * sum(c.in_features * c.out_features for _, _, c in quantized_linears(model))
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert dequantize_once(model) == n and quantized_linears(model) == []
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["qkv_proj", "down_proj"], init_lora_weights=False))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads) and all(g.abs().sum() > 0 for g in grads.values())
    assert not model.base_model.model.model.layers[0].self_attn.qkv_proj.base_layer.weight.requires_grad


def untrained_eot_base(tmp_path):
    """The tiny Gemma with its <end_of_turn> row made a near copy of 40 reserved rows, as in the real
    Gemma-3-270M base: (folder, the token's id, the row)."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.train.modeling import tiny_model_dir

    base = tmp_path / "tiny-gemma3-base"
    shutil.copytree(tiny_model_dir(FAMILY_SPECS["gemma3"]), base)
    eot = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids("<end_of_turn>")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        reserved = weight[300:340].mean(0)
        weight[300:340] = reserved + 1e-4 * torch.randn(40, weight.shape[1])  # reserved rows, never trained
        weight[eot] = reserved
    model.save_pretrained(base)
    return base, eot, reserved


def test_the_turn_row_trains_after_unsloths_gpu_freeze(tmp_path):
    """On a GPU, Unsloth's loader runs unsloth_zoo's prepare_model_for_training after PEFT has attached,
    which freezes every parameter not named lora_*: on an H200 the trained row stayed at its initial
    value (8 steps, lr 2e-3; Unsloth counted 63,488 trainable parameters, the LoRA ones only). The same
    function runs here on the CPU; expose_trained_rows unfreezes the row, and a loss through the output
    layer's `weight` (as the fused losses read it) gives the row a gradient."""
    from medtune.train.modeling import expose_trained_rows, trainable_tokens  # imports Unsloth first

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from unsloth_zoo.training_utils import prepare_model_for_training

    base, eot, _ = untrained_eot_base(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    extra = trainable_tokens(model, tokenizer, say=lambda *a: None)
    assert extra == {"trainable_token_indices": [eot]}
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **extra))
    model = prepare_model_for_training(model, use_gradient_checkpointing=False)
    delta = [p for n, p in model.named_parameters() if ".token_adapter.trainable_tokens_delta." in n]
    assert len(delta) == 1 and not delta[0].requires_grad  # what Unsloth's GPU path leaves
    expose_trained_rows(model)
    assert delta[0].requires_grad
    ids = tokenizer("<start_of_turn>model\nYes.<end_of_turn>", return_tensors="pt")["input_ids"]
    hidden = model.base_model.model.model(input_ids=ids).last_hidden_state
    logits = hidden @ model.get_output_embeddings().weight.T
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    assert delta[0].grad is not None and delta[0].grad.abs().sum() > 0


@pytest.mark.slow
def test_an_untrained_end_of_turn_row_is_trained_and_exported(tmp_path, capsys):
    """A base model whose <end_of_turn> row was never trained (a near copy of many reserved rows, as in
    Gemma-3-270M): training says so and trains that row of the embeddings, which the tied output layer
    shares, with the adapter; export puts the trained row into the merged weights and verifies."""
    from safetensors.torch import load_file

    from medtune.export.cli import export, parse_args

    base, eot, reserved = untrained_eot_base(tmp_path)
    run = train("gemma3", "--smoke", "--model", base, "--output-dir", tmp_path, "--run-name", "base", "--max-steps", "4")
    assert "This model's <end_of_turn> embedding looks untrained (a base model)" in capsys.readouterr().out
    adapter = load_file(run / "adapter_model.safetensors")
    rows = [k for k in adapter if "token_adapter" in k]
    assert rows and json.loads((run / "adapter_config.json").read_text())["trainable_token_indices"] == [eot]
    trained = adapter[rows[0]][0].float()
    # The row moved in training: by about lr x steps (frozen, it differs only by rounding, about 1e-4).
    assert (trained - reserved).abs().max() > 1e-3
    final, report = export(parse_args([str(run), "--quant", "q8_0"]))
    assert report["passed"], report["checks"]
    merged = load_file(final / "merged" / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.allclose(merged[eot].float(), trained, atol=1e-2)


def test_trained_turn_tokens_get_no_warning():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.train.modeling import tiny_model_dir, untrained_turn_tokens

    for family, spec in FAMILY_SPECS.items():
        tiny = tiny_model_dir(spec)
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        spec.prepare_tokenizer(tokenizer)
        assert untrained_turn_tokens(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), tokenizer) == []


def test_the_banner_names_the_model_trained():
    """The preset's title only for the preset's model: the real Gemma-3-270M is not Gemma-3-1B-it."""
    from medtune.train.cli import model_label
    from medtune.train.modeling import tiny_model_path

    gemma = FAMILY_SPECS["gemma3"]
    assert model_label(gemma, TrainConfig(model=gemma.default_model)) == "Gemma-3-1B-it"
    assert model_label(gemma, TrainConfig(model="/data/models/gemma-3-270m/")) == "gemma-3-270m (gemma3 family)"
    assert model_label(gemma, TrainConfig(model="google/gemma-3-270m")) == "gemma-3-270m (gemma3 family)"
    assert model_label(gemma, TrainConfig(model=str(tiny_model_path(gemma)), smoke=True)) == \
        "Gemma-3-1B-it (tiny random-weight stand-in)"
    # --smoke's settings with a model of the user's own: that model, not the stand-in
    assert model_label(gemma, TrainConfig(model="/data/models/gemma-3-270m", smoke=True)) == \
        "gemma-3-270m (gemma3 family)"


@pytest.mark.slow
def test_auto_trains_long_micro_batches_in_parts_with_the_same_losses(tmp_path, monkeypatch, capsys):
    """Where free memory holds 4 rows at --max-seq-length but not 8 (Mistral on an 80 GB card), a run keeps
    every activation and trains each micro-batch of more tokens than its cap in parts of whole rows: it
    says so, counts them, and logs the losses of the same run trained whole; a resume decides again."""
    from medtune.train import modeling, trainer
    from medtune.train.memory import activation_bytes, with_margin

    config = json.loads((modeling.tiny_model_dir(FAMILY_SPECS["mistral"]) / "config.json").read_text())
    monkeypatch.setattr(modeling, "free_gpu_bytes", lambda: int(with_margin(activation_bytes(config, 4 * 1024))) + 1)
    seen, split_rows = [], trainer.split_rows
    monkeypatch.setattr(trainer, "split_rows", lambda inputs, cap: seen.append(sorted(inputs)) or split_rows(inputs, cap))
    # The sample's rows hold 502 tokens or more: 8 of them always more than the cap of 4 rows of 1024.
    common = ["--smoke", "--batch-size", "8", "--grad-accum", "1", "--max-seq-length", "1024", "--output-dir", tmp_path]
    run_dir = train("mistral", *common, "--max-steps", "2", "--run-name", "parts")
    out = capsys.readouterr().out
    assert "none (every activation kept), in micro-batches of at most 4,096 tokens" in out
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["micro_batch_token_cap"] == 4096 and info["micro_batches_split"] == 2
    assert info["gradient_checkpointing"] == "false" and info["summary"]["effective_batch"] == 8
    assert info["lora_add"] is None  # on a CPU Unsloth leaves PEFT's LoRA forward alone (tests/test_lora_add.py)
    # On a CPU Unsloth pads its batches (on a GPU they are padding-free, split in
    # test_a_long_micro_batch_splits_into_parts_of_whole_rows): these split into groups of lines.
    assert seen and all("attention_mask" in keys for keys in seen), seen
    whole = train("mistral", *common, "--max-steps", "2", "--run-name", "whole", "--gradient-checkpointing", "false")
    assert json.loads((whole / "run_info.json").read_text())["micro_batch_token_cap"] is None
    split, kept = losses(run_dir), losses(whole)
    assert sorted(split) == [1, 2] and all(math.isclose(split[k], kept[k], rel_tol=1e-5) for k in kept)
    # config.yaml keeps what was asked, so a resume with the same options decides again.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["batch_size"], saved["grad_accum"], saved["gradient_checkpointing"]) == (8, 1, "auto")
    train("mistral", *common, "--max-steps", "3", "--run-name", "parts", "--resume")
    assert "resuming from checkpoint-2" in capsys.readouterr().out and sorted(losses(run_dir)) == [1, 2, 3]
