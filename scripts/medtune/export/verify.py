"""Checks that the exported files compute the fine-tuned model.

References are computed in float32 by transformers: the merged model, and the adapter applied to
the base (PEFT, unmerged). Each GGUF is loaded by llama.cpp and fed the same token ids.

Tolerances (max |difference| of next-token logits, relative to the largest |logit| of the reference):
- merged vs adapter-on-base: 1e-2. Merging stores W + scale * B @ A once in 16-bit; rounding to
  float16 moves each weight by at most 2^-11 of itself, which over a forward pass stays well
  under 1% of the logit scale (measured: ~1e-3 on the tiny models).
- f16 GGUF vs merged: 2e-2. The weights are identical (float16 in both), but llama.cpp rounds
  activations to float16 before its f16 matrix products and sums in another order; measured
  ~2e-3 on the tiny models, so a wrong tensor, a wrong norm or a wrong rope shows up far above it.
Quantized files change the weights themselves. They pass when their top-1 next token agrees with
the merged model's on the decisive positions, where the merged model's best token leads the
runner-up by at least half a standard deviation of its logits (limits: q8_0 0.98, q4_k_m 0.85;
measured on the tiny models: 1.00 and 0.91). Quantization noise does not flip such a lead in a
trained model; a wrong tensor or tokenizer gives chance-level agreement. The RMS logit error (over
the logit standard deviation), top-1 agreement over all positions and the greedy continuation are
reported beside it. A random-weight model of full depth amplifies quantization noise layer by layer
(measured on full-size random Mistral-7B: q8_0 still 1.00, q4_k_m 0.06), so its 4-bit files fail.
"""
import numpy as np
import torch

from medtune.fileio import read_jsonl

LOGIT_TOL = {"merged vs adapter-on-base": 1e-2, "f16 GGUF vs merged": 2e-2}
DECISIVE_MIN = {"bf16": 0.99, "q8_0": 0.98, "q6_k": 0.95, "q5_k_m": 0.9, "q5_0": 0.9, "q4_k_m": 0.85, "q4_0": 0.8}
MAX_PROMPT_TOKENS = 384
GREEDY_TOKENS = 16


def prompts(run_dir, tokenizer, system_prompt):
    """Medical prompts rendered with the run's chat template: held-out questions, and one whole
    conversation (answer and end-of-turn token included) so the answer format is covered too."""
    from medtune.train.data import Example, conversation_texts

    rows = read_jsonl(run_dir / "heldout.jsonl")
    if not rows:
        from medtune.config import REPO_ROOT

        rows = read_jsonl(REPO_ROOT / "data/medical_reasoning_sample.jsonl")[:3]
    examples = [Example(r["Question"], r["Complex_CoT"], r["Response"]) for r in rows[:3]]
    texts = [conversation_texts(tokenizer, ex, system_prompt)[0] for ex in examples[:2]]
    texts.append(conversation_texts(tokenizer, examples[-1], system_prompt)[1])
    return [(t, tokenizer(t, add_special_tokens=False)["input_ids"][:MAX_PROMPT_TOKENS]) for t in texts]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()


def hf_greedy(model, ids, n, stop_ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    return out[0, len(ids):].tolist()


def relative_max_diff(a, b):
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def load_reference(merged_dir):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).to(device).eval()


def adapter_on_base(run_dir, source):
    """PEFT's unmerged adapter over the base in float32 (a 4-bit base dequantized)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from medtune.export.merge import base_files

    base_dir, _ = base_files(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if getattr(base, "hf_quantizer", None) is not None:
        base = base.dequantize()
    return PeftModel.from_pretrained(base.float(), run_dir).to(device).eval()


def verify(run_dir, source, merged_dir, f16_path, ggufs, family, tokenizer, system_prompt):
    from medtune.export.gguf import gguf_greedy, gguf_logits, gguf_metadata, load_gguf

    cases = prompts(run_dir, tokenizer, system_prompt)
    merged = load_reference(merged_dir)
    reference = [hf_logits(merged, ids) for _, ids in cases]
    stop_ids = family.stop_ids(tokenizer)
    greedy_ref = hf_greedy(merged, cases[0][1], GREEDY_TOKENS, stop_ids)
    checks = []

    def check(file, name, value, limit, ok, fmt="{:.2e}"):
        checks.append({"file": file, "check": name, "value": fmt.format(value) if isinstance(value, float) else value,
                       "limit": limit, "ok": bool(ok)})

    peft_model = adapter_on_base(run_dir, source)
    diff = max(relative_max_diff(reference[i], hf_logits(peft_model, ids)) for i, (_, ids) in enumerate(cases))
    del peft_model
    tol = LOGIT_TOL["merged vs adapter-on-base"]
    check("merged/", "logits vs adapter-on-base (rel. max)", diff, f"{tol:.0e}", diff <= tol)

    files = {"f16": f16_path, **{q: p for q, p in ggufs.items() if q != "f16"}}
    for quant, path in files.items():
        name = path.name
        meta = gguf_metadata(path)
        ids_in_file = (meta["bos"], meta["eos"], meta["pad"])
        expected = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        check(name, "chat template, BOS/EOS/pad ids in GGUF", "/".join(map(str, ids_in_file)),
              "/".join(map(str, expected)), meta["chat_template"] == tokenizer.chat_template and ids_in_file == expected)
        llm = load_gguf(path, n_ctx=MAX_PROMPT_TOKENS + GREEDY_TOKENS + 8)
        same = all(llm.tokenize(text.encode(), add_bos=False, special=True)[:MAX_PROMPT_TOKENS] == ids
                   for text, ids in cases)
        check(name, "tokenization equals HF tokenizer", "same" if same else "differs", "same", same)
        logits = [gguf_logits(llm, ids) for _, ids in cases]
        if quant == "f16":
            diff = max(relative_max_diff(g, r) for g, r in zip(logits, reference))
            tol = LOGIT_TOL["f16 GGUF vs merged"]
            check(name, "logits vs merged (rel. max)", diff, f"{tol:.0e}", diff <= tol)
        else:
            g, r = np.concatenate(logits), np.concatenate(reference)
            rms = float(np.sqrt(((g - r) ** 2).mean()) / r.std())
            check(name, "logit RMS error / logit std", rms, "report", True, fmt="{:.3f}")
            top2 = np.sort(r, axis=-1)[:, -2:]
            decisive = top2[:, 1] - top2[:, 0] >= 0.5 * r.std()
            agree = g.argmax(-1) == r.argmax(-1)
            value = float(agree[decisive].mean()) if decisive.any() else 1.0
            check(name, f"top-1 agreement ({int(decisive.sum())} decisive)", value, f">= {DECISIVE_MIN[quant]}",
                  value >= DECISIVE_MIN[quant], fmt="{:.3f}")
            check(name, "top-1 agreement (all positions)", float(agree.mean()), "report", True, fmt="{:.3f}")
        greedy = gguf_greedy(llm, cases[0][1], len(greedy_ref))
        n_same = next((i for i, (a, b) in enumerate(zip(greedy, greedy_ref)) if a != b), min(len(greedy), len(greedy_ref)))
        check(name, "greedy continuation = merged's", f"{n_same}/{len(greedy_ref)} tokens", "report", True)
        llm.close()
    return checks


def sample_answer(gguf_path, tokenizer, family, system_prompt, run_dir, max_tokens=64):
    from medtune.export.gguf import gguf_greedy, load_gguf

    heldout = read_jsonl(run_dir / "heldout.jsonl")
    question = heldout[0]["Question"] if heldout else "What is the first-line treatment of anaphylaxis?"
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    llm = load_gguf(gguf_path, n_ctx=1024)
    try:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        stop_ids = family.stop_ids(tokenizer, eos_id=llm.token_eos())
        out = gguf_greedy(llm, ids, max_tokens, stop_ids)
        return f"Q: {question}\nA: {llm.detokenize(out).decode('utf-8', errors='replace').strip()}"
    finally:
        llm.close()
