"""The GPU benchmark's pure pieces (no GPU, no Unsloth): the length distribution of the training data,
synthetic token rows drawn from it, the FLOP count behind MFU, and the report.

The length distribution (tokens per rendered example, system prompt and chat template included):
- mean: medical-o1-reasoning-SFT's English split has 19,704 rows and about 56.7 MB of text (its
  published size), about 2,880 characters of Question + Complex_CoT + Response per row. Our
  tokenizers read this kind of English at 3.46 (Phi-3) / 3.59 (Mistral) characters per token and the
  system prompt plus template add 83 / 79 tokens (both measured on data/medical_reasoning_sample.jsonl),
  so a row averages about 915 (Phi-3) / 880 (Mistral) tokens.
- shape: log-normal with sigma 0.4 in log space (an assumption: the published card gives no spread);
  rows longer than --max-seq-length are dropped, as training drops them.
- the prompt (system + question, no loss) is 70 tokens of template plus 23% of the text, the
  question's share in our sample.
Pass --lengths-from DATASET to draw from the real tokenized dataset instead.
"""
import math
import random
from dataclasses import dataclass

CHARS_PER_ROW = 2880
TEMPLATE_TOKENS = {"phi3": 83, "mistral": 79}
CHARS_PER_TOKEN = {"phi3": 3.46, "mistral": 3.59}
PROMPT_TEMPLATE_TOKENS = 70
QUESTION_SHARE = 0.23
LOG_SIGMA = 0.4


@dataclass(frozen=True)
class LengthModel:
    """Log-normal lengths with the given mean (tokens), cut at the training limit by rejection."""
    mean: float
    sigma: float = LOG_SIGMA
    minimum: int = 96

    @property
    def median(self):
        return self.mean / math.exp(self.sigma ** 2 / 2)

    def sample(self, n, max_len, seed):
        rng = random.Random(seed)
        out = []
        while len(out) < n:
            x = round(rng.lognormvariate(math.log(self.median), self.sigma))
            if self.minimum <= x <= max_len:
                out.append(x)
        return out


def medical_o1_lengths(family):
    return LengthModel(mean=TEMPLATE_TOKENS[family] + CHARS_PER_ROW / CHARS_PER_TOKEN[family])


def prompt_length(total, family):
    """Tokens of system prompt + question in a row of `total` tokens (no loss on them)."""
    return min(total - 1, PROMPT_TEMPLATE_TOKENS + round(QUESTION_SHARE * (total - TEMPLATE_TOKENS[family])))


def synthetic_rows(lengths, vocab_size, seed, prompt_lengths=None, family="phi3"):
    """{input_ids, labels} rows of the given lengths: random ordinary token ids (special ids below 3
    and above 32000 avoided), the prompt part masked with -100 as training masks it."""
    rng = random.Random(seed)
    top = min(vocab_size, 32000)
    rows = []
    for i, n in enumerate(lengths):
        p = prompt_lengths[i] if prompt_lengths else prompt_length(n, family)
        ids = [1] + [rng.randrange(3, top) for _ in range(n - 1)]
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return rows


def parameter_count(cfg, model_type=None):
    """Parameters of a Llama-style decoder (Phi-3, Mistral, Gemma 3) from its config dict, counted
    from the shapes: 4-bit checkpoints pack two weights per byte, so counting their tensors undercounts."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    kv = cfg.get("num_key_value_heads") or heads
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h  # two RMSNorm weights
    if model_type == "gemma3_text":  # norms before and after the MLP too, and on the queries and keys
        per_layer += 2 * h + 2 * head_dim
    embed = vocab * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return embed + layers * per_layer + h + head


def model_flops_per_token(n_params):
    """LoRA training FLOPs per token as MFU counts them: 2N forward + 2N for the input gradients of
    the frozen weights (no weight gradients; recomputation by gradient checkpointing not counted)."""
    return 4 * n_params


def mfu(n_params, tokens_per_s, matmul_flops_per_s):
    return model_flops_per_token(n_params) * tokens_per_s / matmul_flops_per_s


def steady_state(steps, warmup):
    """(tokens/s, s/step, steps measured, steps left out) from [(step, seconds, tokens seen[, compile
    events so far])] after `warmup` steps; None when no step remains to time. A step during which
    torch.compile compiled something (a new shape of a compiled block: tens of seconds once, then
    never again in a long run) is left out and named."""
    kept = [s for s in steps if s[0] >= warmup]
    pairs = list(zip(kept, kept[1:]))
    timed = [(a, b) for a, b in pairs if len(b) < 4 or b[3] == a[3]]
    seconds = sum(b[1] - a[1] for a, b in timed)
    if not timed or seconds <= 0:
        return None
    compiled = [b[0] for a, b in pairs if len(b) >= 4 and b[3] != a[3]]
    return {"tokens_per_s": sum(b[2] - a[2] for a, b in timed) / seconds, "s_per_step": seconds / len(timed),
            "steps_measured": f"{kept[0][0] + 1}-{kept[-1][0]}"
                              + (f" less {len(compiled)} that compiled" if compiled else ""),
            "compiling_steps": compiled}


def hardware_flops_per_token(n_params, recomputed):
    """FLOPs the GPU does per token: gradient checkpointing runs the forward (2N) a second time."""
    return model_flops_per_token(n_params) + (2 * n_params if recomputed else 0)


def recomputes(checkpointing):
    """Whether a run's gradient checkpointing ("unsloth", "true", "false" or None) recomputes the forward."""
    return checkpointing not in ("false", None)


# Where a step's GPU time goes, by kernel name (lower case; the first bucket that matches wins).
PROFILE_BUCKETS = [
    ("4-bit dequantization", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("loss", ("cross_entropy", "crossentropy", "logsumexp", "nll_loss")),
    ("optimizer", ("adam", "optimizer", "multi_tensor_apply", "foreach")),
    ("copies between GPU and host", ("memcpy htod", "memcpy dtoh", "memcpy_htod", "memcpy_dtoh")),
    ("communication", ("nccl", "allreduce", "all_reduce")),
    ("matmuls", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "cublas", "sm90", "sm80")),
    ("fused elementwise (Triton)", ("triton",)),
]


LORA_BUCKET = "LoRA's low-rank matmuls"
# The products that launch kernels themselves (aten::matmul and aten::linear only dispatch to these).
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def bucket_of(kernel_name):
    low = kernel_name.lower()
    return next((b for b, keys in PROFILE_BUCKETS if any(k in low for k in keys)), "other")


def lora_matmuls(events, rank):
    """The matrix products of LoRA's adapters among torch.profiler's FunctionEvents of a profile taken with
    record_shapes: those with a side of `rank` (X @ A, XA @ B and their gradients; no frozen weight of
    these models has a side that narrow)."""
    def sides(e):
        shapes = getattr(e, "input_shapes", None) or []
        return [d for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2 for d in s[-2:]]

    return [e for e in events if e.name in MATMUL_OPS and rank in sides(e)] if rank else []


def lora_kernels(events, rank):
    """[(kernel name, device microseconds)] that LoRA's matrix products launched (each kernel hangs under
    the one operator that launched it)."""
    return [(k.name, k.duration) for e in lora_matmuls(events, rank) for k in e.kernels]


def profile_buckets(kernels, lora=()):
    """{"buckets": {name: ms}, "device_ms": total, "top": [[kernel, ms], ...]} from [(kernel name, device
    microseconds)] of one profiled step; the kernels in `lora` (medtune.bench.perf.lora_kernels, also
    counted in `kernels`) move from the bucket their name puts them in to LoRA's own."""
    buckets = {name: 0.0 for name, _ in PROFILE_BUCKETS}
    buckets["other"] = 0.0
    for name, us in kernels:
        buckets[bucket_of(name)] += us / 1e3
    if lora:
        buckets[LORA_BUCKET] = 0.0
    for name, us in lora:
        buckets[bucket_of(name)] -= us / 1e3
        buckets[LORA_BUCKET] += us / 1e3
    top = sorted(kernels, key=lambda k: -k[1])[:10]
    return {"buckets": {k: round(v, 2) for k, v in buckets.items()},
            "device_ms": round(sum(us for _, us in kernels) / 1e3, 2),
            "top": [[name[:100], round(us / 1e3, 2)] for name, us in top]}


def loss_difference(losses, reference, steps=20):
    """Largest relative difference of the first `steps` logged losses from the reference run's; None
    when either run logged fewer."""
    if not losses or not reference or min(len(losses), len(reference)) < steps:
        return None
    return max(abs(a - b) / abs(b) for a, b in zip(losses[:steps], reference[:steps]))
