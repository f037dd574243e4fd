"""The three measurements on a loaded model: greedy generation, the log-likelihood of each option
(as lm-evaluation-harness scores multiple choice) and the loss on the answer tokens of held-out rows.

Each yields its results one batch at a time, so the caller can store them as they come and a
later run can resume. Inputs are sorted by length first: similar lengths share a batch, which
wastes less on padding.
"""
import torch

from medtune.train.data import IGNORE_INDEX


def _batches(lengths, batch_size):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _right_padded(sequences, pad, device):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size):
    """Greedy continuations of the prompt texts: per batch, a list of (index, text, generated tokens),
    the text cut at the first stop token."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    tokenizer.padding_side = "left"  # every row then continues from the batch's last position
    for idx in _batches([len(p) for p in prompts], batch_size):
        enc = tokenizer([prompts[i] for i in idx], add_special_tokens=False, padding=True, return_tensors="pt")
        enc = enc.to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config)
        results = []
        for i, new in zip(idx, out[:, enc["input_ids"].shape[1]:].tolist()):
            n = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            results.append((i, tokenizer.decode(new[:n], skip_special_tokens=True), n))
        yield results


def encode_request(tokenizer, context, continuation, special_tokens=False):
    """(token ids of context + continuation, number of them that belong to the context), split as
    lm-evaluation-harness splits them: the continuation's tokens are those beyond the context's own
    tokenization, so a token merging across the boundary counts as continuation. `special_tokens`:
    what the tokenizer adds by default (BOS), as lm-eval's HFLM encodes plain-text prompts; chat
    prompts carry their own."""
    whole = tokenizer(context + continuation, add_special_tokens=special_tokens)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=special_tokens)["input_ids"])
    assert 0 < n_context < len(whole), f"{continuation!r} adds no token to its context"
    return whole, n_context


def _logits_at(model, sequences, pad, positions):
    """Logits of the right-padded batch at the given positions only (a union over its rows), and
    where each position landed: the vocabulary projection is skipped everywhere else."""
    ids, mask = _right_padded(sequences, pad, model.device)
    keep = sorted(positions)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor(keep, device=ids.device)).logits
    return logits, {p: k for k, p in enumerate(keep)}


def loglikelihoods(model, tokenizer, requests, batch_size, special_tokens=False):
    """Sum of the log-probabilities of each (context, continuation)'s continuation tokens: per
    batch, a list of (index, log-likelihood)."""
    encoded = [encode_request(tokenizer, c, x, special_tokens) for c, x in requests]
    for idx in _batches([len(encoded[i][0]) for i in range(len(encoded))], batch_size):
        # the logits at position t predict token t + 1
        wanted = [range(encoded[i][1] - 1, len(encoded[i][0]) - 1) for i in idx]
        logits, column = _logits_at(model, [encoded[i][0] for i in idx], tokenizer.pad_token_id,
                                    {p for span in wanted for p in span})
        results = []
        for row, (i, span) in enumerate(zip(idx, wanted)):
            whole, n_context = encoded[i]
            logprobs = logits[row, [column[p] for p in span]].float().log_softmax(-1)
            target = torch.tensor(whole[n_context:], device=logprobs.device)
            results.append((i, logprobs.gather(-1, target[:, None]).sum().item()))
        yield results


def answer_nll(model, rows, pad_id, batch_size):
    """Negative log-likelihood summed over each row's labelled tokens (the assistant turn, as in
    training): per batch, a list of (index, summed NLL, labelled tokens)."""
    for idx in _batches([len(rows[i][0]) for i in range(len(rows))], batch_size):
        # position t predicts label t + 1
        wanted = [[t for t, label in enumerate(rows[i][1][1:]) if label != IGNORE_INDEX] for i in idx]
        logits, column = _logits_at(model, [rows[i][0] for i in idx], pad_id, {p for span in wanted for p in span})
        results = []
        for row, (i, span) in enumerate(zip(idx, wanted)):
            logprobs = logits[row, [column[p] for p in span]].float().log_softmax(-1)
            target = torch.tensor([rows[i][1][p + 1] for p in span], device=logprobs.device)
            results.append((i, -logprobs.gather(-1, target[:, None]).sum().item(), len(span)))
        yield results
