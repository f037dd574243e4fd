"""One evaluation task run on a loaded model: score the items not yet stored, append one JSON line
per item as results come, and summarize every stored item of the current selection.

Accuracy counts an unparseable answer as wrong; its 95% interval is Wilson's, which stays inside
[0, 1] and is honest for the small samples of --limit and the offline sets.
"""
import json
import math
import statistics

from tqdm.auto import tqdm

from medtune.evaluation.answers import extract, final_answer, reasoning_block_ok
from medtune.evaluation.tasks import BENCHMARKS, user_message
from medtune.evaluation.scoring import answer_nll, loglikelihoods

ANSWER_PREFIX = "Answer:"  # loglik mode: the assistant turn opens with it, then each option is scored
Z95 = 1.959964


def wilson(k, n, z=Z95):
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, center - half), 4), round(min(1.0, center + half), 4)]


def _store(task, f, row):
    task.done[row["id"]] = row
    f.write(json.dumps(row) + "\n")


def _progress(task, total):
    return tqdm(total=total, desc=f"{task.key} ({task.role})", unit="item", dynamic_ncols=True)


def _engine(args, model, tokenizer, prompts, stop):
    from medtune.evaluation import generation

    if args.engine == "compiled":
        return generation.compiled(model, tokenizer, prompts, stop, args.max_new_tokens, args.batch_size)
    if args.engine == "static":
        return generation.static(model, tokenizer, prompts, stop, args.max_new_tokens, args.batch_size or 8)
    return generation.continuous(model, tokenizer, prompts, stop, args.max_new_tokens, args.batch_size)


def run_generate(task, items, model, tokenizer, system, stop, args, **_):
    from medtune.evaluation.generation import Meter
    from medtune.evaluation.models import prompt_text

    bench = BENCHMARKS[task.name]
    pending = [it for it in items if it.id not in task.done]
    prompts = [prompt_text(tokenizer, system, user_message(it, bench, "generate")) for it in pending]
    with task.path.open("a") as f, _progress(task, len(pending)) as bar:
        meter = Meter(len(pending), args.max_new_tokens, bar, say=tqdm.write)
        for step in (_engine(args, model, tokenizer, prompts, stop) if pending else ()):
            for i, text, n_tokens in step.results:
                item = pending[i]
                answer, how = extract(text, item.labels, item.options)
                final = final_answer(text)
                _store(task, f, {
                    "id": item.id, "setup": task.setup, "prompt": prompts[i], "output": text, "answer": answer,
                    "extraction": how, "gold": item.gold_label, "correct": answer == item.gold_label,
                    "reasoning_block": reasoning_block_ok(text), "output_tokens": n_tokens,
                    "answer_tokens": len(tokenizer(final, add_special_tokens=False)["input_ids"]) if final else 0,
                })
            f.flush()
            meter.update(step)
    rows = [task.done[it.id] for it in items]
    n, correct = len(rows), sum(r["correct"] for r in rows)
    unparseable = sum(r["answer"] is None for r in rows)
    return {
        "n": n, "correct": correct, "accuracy": correct / n, "ci95": wilson(correct, n),
        "unparseable": unparseable, "unparseable_rate": unparseable / n,
        # a well-formed reasoning block followed by a final answer that names one option
        "format_ok_rate": sum(r["reasoning_block"] and r["answer"] is not None for r in rows) / n,
        "reasoning_block_rate": sum(r["reasoning_block"] for r in rows) / n,
        "median_output_tokens": statistics.median(r["output_tokens"] for r in rows),
        "median_answer_tokens": statistics.median(r["answer_tokens"] for r in rows),
        "new_items": len(pending), "engine": args.engine, **meter.summary(),
    }


def run_loglik(task, items, model, tokenizer, system, args, **_):
    from medtune.evaluation.models import prompt_text

    bench = BENCHMARKS[task.name]
    pending = [it for it in items if it.id not in task.done]
    lm_eval = task.prompt_format == "lm-eval"
    if lm_eval:  # lm-eval's plain context; its tokenizer call adds what the tokenizer adds by default (BOS)
        contexts = [it.text for it in pending]
    else:
        contexts = [prompt_text(tokenizer, system, user_message(it, bench, "loglik"), ANSWER_PREFIX) for it in pending]
    requests, owner = [], []  # one request per option; owner[r] = (item index, option index)
    for i, (item, context) in enumerate(zip(pending, contexts)):
        for k, label in enumerate(item.labels):
            requests.append((context, " " + label))
            owner.append((i, k))
    scores = [dict() for _ in pending]
    with task.path.open("a") as f, _progress(task, len(pending)) as bar:
        for batch in loglikelihoods(model, tokenizer, requests, args.batch_size or 8, special_tokens=lm_eval):
            for r, loglik in batch:
                i, k = owner[r]
                scores[i][k] = loglik
                item = pending[i]
                if len(scores[i]) < len(item.labels):
                    continue  # the item's other options are in later batches
                ll = [scores[i][k] for k in range(len(item.labels))]
                # acc_norm as lm-evaluation-harness: log-likelihood per character of the option
                norm = [x / len(label) for x, label in zip(ll, item.labels)]
                pred = max(range(len(ll)), key=ll.__getitem__)
                pred_norm = max(range(len(ll)), key=norm.__getitem__)
                _store(task, f, {
                    "id": item.id, "setup": task.setup, "prompt": contexts[i], "choices": list(item.labels),
                    "loglik": ll, "answer": item.labels[pred], "answer_norm": item.labels[pred_norm],
                    "gold": item.gold_label, "correct": pred == item.gold, "correct_norm": pred_norm == item.gold,
                })
                bar.update(1)
            f.flush()
    rows = [task.done[it.id] for it in items]
    n, k, k_norm = len(rows), sum(r["correct"] for r in rows), sum(r["correct_norm"] for r in rows)
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": wilson(k, n), "correct_norm": k_norm,
            "accuracy_norm": k_norm / n, "ci95_norm": wilson(k_norm, n), "new_items": len(pending)}


def run_loss(task, rows, model, tokenizer, system, source, args, **_):
    from medtune.train.data import assistant_labels, conversation_texts, to_examples
    from medtune.errors import UserError

    examples = to_examples(rows, task.setup["data"])
    eot = tokenizer.convert_tokens_to_ids(source.family.end_of_turn)
    max_len = source.config["max_seq_length"]
    kept, pending, encoded = [], [], []
    for index, example in enumerate(examples):
        prompt, full = conversation_texts(tokenizer, example, system)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len:
            continue  # longer than the run's --max-seq-length: training left it out of its eval loss too
        kept.append(str(index))
        if str(index) not in task.done:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            pending.append(str(index))
            encoded.append((ids, assistant_labels(prompt_ids, ids, eot)))
    with task.path.open("a") as f, _progress(task, len(pending)) as bar:
        for batch in answer_nll(model, encoded, tokenizer.pad_token_id, args.batch_size or 8):
            for i, nll, n_tokens in batch:
                _store(task, f, {"id": pending[i], "setup": task.setup, "tokens": n_tokens, "nll": nll,
                                 "loss": nll / n_tokens})
            f.flush()
            bar.update(len(batch))
    if not kept:
        raise UserError(f"Every held-out row of {task.setup['data']} is longer than the run's --max-seq-length "
                        f"{max_len} tokens, so there is no held-out loss to compute. Drop heldout from --benchmarks.")
    stored = [task.done[key] for key in kept]
    tokens, nll = sum(r["tokens"] for r in stored), sum(r["nll"] for r in stored)
    return {"rows": len(stored), "too_long": len(examples) - len(kept), "tokens": tokens, "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens), "new_items": len(pending)}


RUNNERS = {"generate": run_generate, "loglik": run_loglik, "loss": run_loss}
