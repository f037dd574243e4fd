"""Whether a training step may keep every activation for the backward pass, or must recompute them
(gradient checkpointing), decided from the model's shape, the batch and the GPU's free memory.

Used by --gradient-checkpointing auto (medtune/train/modeling.py); pure arithmetic, no GPU needed:

    python -c "from medtune.train.memory import activation_bytes; print(activation_bytes(dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, vocab_size=32064), 8 * 2048) / 2**30)"
"""

GIB = 2**30
# 16-bit values kept for the backward per token and decoder layer without checkpointing: about 8
# hidden-sized ones (norm inputs and outputs, the q/k/v/o projections' inputs and outputs, residuals)
# and 3.5 intermediate-sized ones (gate and up, their product, the down projection's input). Checked
# on an H200 (issue 14): Phi-3-mini, 8 rows of about 924 tokens a step (the largest step about 9,250),
# Unsloth with checkpointing off reserved 27.6 GiB more than with it: about 100 KB per token and
# layer; this counts 106 KB.
HIDDEN_COPIES, INTERMEDIATE_COPIES = 8, 3.5
# The loss: float32 logits and their gradient over the vocabulary, per token.
LOGIT_BYTES = 8
# What the estimate must leave free: a share for the allocator's fragmentation, and a fixed amount
# for the LoRA weights, the optimizer state and the CUDA kernels' workspaces.
MARGIN = 1.15
HEADROOM = 2 * GIB
# auto's token cap per micro-batch without checkpointing, where the asked micro-batch's worst case does
# not fit, must hold this many rows at --max-seq-length. Measured on an H100 80GB (2026-12-06, Mistral-7B,
# rows of about 880 tokens, 8 rows a step): 4 x 2 without checkpointing trained 1.41x as fast as 8 x 1
# with Unsloth's, 2 x 4 without it 0.97x; 8 x 1 without it, even without 16-bit weight copies, 1.04x of
# 4 x 2 with them (Phi-3: 4 x 2 ran 0.90x of 8 x 1). So a step trains whole where it fits, and parts pay
# only down to about 4 rows.
MIN_MICRO_BATCH = 4
CHOICES = ("auto", "unsloth", "true", "false")
DEQUANTIZE_CHOICES = ("auto", "true", "false")


def activation_bytes(config, tokens, bytes_per_value=2):
    """Bytes of activations a step over `tokens` tokens keeps without checkpointing (config: a dict or
    an object with hidden_size, intermediate_size, num_hidden_layers, vocab_size)."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    per_layer = HIDDEN_COPIES * get("hidden_size") + INTERMEDIATE_COPIES * get("intermediate_size")
    per_token = get("num_hidden_layers") * per_layer * bytes_per_value + LOGIT_BYTES * get("vocab_size")
    return tokens * per_token


def with_margin(need_bytes):
    """What a step needing need_bytes of activations must find free: the margin and the headroom added."""
    return need_bytes * MARGIN + HEADROOM


def choose_checkpointing(requested, need_bytes, free_bytes):
    """(choice, one line saying why): choice is "unsloth", "true" or "false". auto keeps every
    activation ("false") when need x MARGIN + HEADROOM fits in free_bytes, else Unsloth's offloaded
    checkpointing; free_bytes None (no GPU to measure) keeps Unsloth's."""
    if requested not in CHOICES:
        raise ValueError(f"gradient checkpointing must be one of {CHOICES}, got {requested!r}")
    named = {"unsloth": "Unsloth's (activations offloaded to the CPU, recomputed)",
             "true": "plain recomputation", "false": "none (every activation kept)"}
    if requested != "auto":
        return requested, f"Gradient checkpointing: {named[requested]}, as asked."
    if free_bytes is None:
        return "unsloth", f"Gradient checkpointing: {named['unsloth']}; no GPU memory to measure."
    wanted = with_margin(need_bytes)
    choice = "false" if wanted <= free_bytes else "unsloth"
    return choice, (f"Gradient checkpointing (auto): {named[choice]}: a step's activations need up to "
                    f"{need_bytes / GIB:.1f} GiB without it ({wanted / GIB:.1f} GiB with the margin), "
                    f"{free_bytes / GIB:.1f} GiB of the GPU is free.")


def token_cap(per_token_bytes, free_bytes, reserve_bytes=0):
    """The most tokens one micro-batch may hold keeping every activation: the largest count whose
    activations, with reserve_bytes beside them, pass with_margin within free_bytes (0 where none)."""
    room = (free_bytes - HEADROOM) / MARGIN - reserve_bytes
    return max(0, int(room // per_token_bytes))


def cap_line(per_token_bytes, max_seq_length, batch_size, cap, free_bytes, reserve_bytes):
    """The line saying why auto keeps every activation in micro-batches of at most `cap` tokens."""
    worst = per_token_bytes * max_seq_length * batch_size
    beside = f" beside {reserve_bytes / GIB:.1f} GiB of 16-bit weight copies" if reserve_bytes else ""
    return (f"Gradient checkpointing (auto): none (every activation kept), in micro-batches of at most {cap:,} tokens: "
            f"the {batch_size} rows of a micro-batch train whole when they hold no more, else in parts of whole rows "
            f"(the same rows, loss and gradient per optimizer step). {batch_size} rows of {max_seq_length} tokens "
            f"would need {worst / GIB:.1f} GiB of activations, {cap:,} tokens "
            f"{with_margin(per_token_bytes * cap + reserve_bytes) / GIB:.1f} GiB with the margin{beside}; "
            f"{free_bytes / GIB:.1f} GiB of the GPU is free.")


def plan_checkpointing(requested, per_token_bytes, max_seq_length, batch_size, free_bytes, reserve_bytes=0):
    """(choice, the line saying why, cap) with activations weighed at their worst (batch_size rows of
    max_seq_length tokens). Where auto would need checkpointing for that worst case but a micro-batch
    of MIN_MICRO_BATCH such rows fits, it keeps every activation and caps a micro-batch's tokens
    instead (cap; None: no cap): most micro-batches of real rows hold far fewer tokens than the worst
    case and train whole, a longer one trains in parts (medtune.train.trainer.split_long_micro_batches).
    The cap leaves room for reserve_bytes (the 16-bit weight copies) where it can."""
    choice, why = choose_checkpointing(requested, per_token_bytes * max_seq_length * batch_size, free_bytes)
    if requested != "auto" or choice == "false" or free_bytes is None:
        return choice, why, None
    for reserve in dict.fromkeys((reserve_bytes, 0)):
        cap = token_cap(per_token_bytes, free_bytes, reserve)
        if cap >= MIN_MICRO_BATCH * max_seq_length:
            return "false", cap_line(per_token_bytes, max_seq_length, batch_size, cap, free_bytes, reserve), cap
    return choice, why, None


def choose_dequantize(requested, copy_bytes, checkpointing, need_bytes, free_bytes):
    """(make the copies?, one line saying why) for --dequantize-once. copy_bytes: the 16-bit copies of
    the 4-bit weights (0: no 4-bit weight to copy); need_bytes: a step's activations, kept where
    checkpointing is "false". auto makes the copies only where every activation is kept too and
    both fit in free_bytes with the margin: a GPU with room to spare. With checkpointing on (a T4)
    the weights stay 4-bit, as measured under the 15 GB cap (BENCHMARKS.md)."""
    if requested not in DEQUANTIZE_CHOICES:
        raise ValueError(f"--dequantize-once must be one of {DEQUANTIZE_CHOICES}, got {requested!r}")
    if not copy_bytes:
        return False, "Frozen weights: 16-bit already (no 4-bit weight to dequantize)."
    size = f"{copy_bytes / GIB:.1f} GiB"
    if requested != "auto":
        made = requested == "true"
        return made, (f"Frozen 4-bit weights: {'dequantized once to 16-bit copies' if made else 'dequantized at each use'} "
                      f"({size} of copies{'' if made else ' not made'}), as asked.")
    wanted = with_margin((need_bytes if checkpointing == "false" else 0) + copy_bytes)
    made = checkpointing == "false" and free_bytes is not None and wanted <= free_bytes
    if made:
        return True, (f"Frozen 4-bit weights (auto): dequantized once to 16-bit copies ({size}), the same values the "
                      f"4-bit layers compute at each use; with every activation kept they need {wanted / GIB:.1f} GiB "
                      f"with the margin, {free_bytes / GIB:.1f} GiB of the GPU is free.")
    why = ("no GPU memory to measure" if free_bytes is None
           else "gradient checkpointing is on (memory is short)" if checkpointing != "false"
           else f"the copies and every activation need {wanted / GIB:.1f} GiB with the margin, "
                f"{(free_bytes or 0) / GIB:.1f} GiB of the GPU is free")
    return False, f"Frozen 4-bit weights (auto): dequantized at each use, as bitsandbytes does: {why}."
