"""Greedy generation for `scripts/evaluate.py --mode generate`, and its meter (the estimate printed
before a long evaluation, tokens/s and time left while it runs).

Three engines yield the same results (index, text cut at the first stop token, tokens generated):
- compiled (the default): `model.generate` over batches as large as the GPU's memory holds, every
  batch in one shape (prompts left-padded to the longest, a static key/value cache of that length
  plus --max-new-tokens, reused), so the decode step is compiled once and replayed as a CUDA graph
  (16-bit weights on a GPU; 4-bit weights and CPUs run the same loop uncompiled).
- continuous: transformers' continuous batching. Every prompt is queued at once; a row that stops
  frees its place for the next prompt at the next step, and the key/value cache is paged.
- static: `model.generate` over batches of --batch-size prompts sorted by length (the earlier path).

    python scripts/evaluate.py checkpoints/phi3-medical --engine compiled     # the default
    python scripts/bench_eval.py --model /tmp/m/phi3-nf4                      # measures both
"""
import math
import time
from dataclasses import dataclass

import torch

KV_SHARE = 0.85  # of the GPU memory left after the weights: the rest holds activations and logits
CPU_BATCH_TOKENS = 1024  # tokens per forward on a CPU: small models, small steps
RESOLVED = ("block_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch", "use_cuda_graph",
            "use_async_batching", "max_memory_percent")


@dataclass
class Step:
    """What one engine step returns: finished rows, and tokens generated so far by unfinished rows."""
    results: list  # (index, text, tokens generated)
    in_flight_tokens: int = 0


def _cut(tokenizer, new, stop_ids):
    n = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
    return tokenizer.decode(new[:n], skip_special_tokens=True), n


def static(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size):
    from medtune.evaluation.scoring import generate

    for batch in generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size):
        yield Step(batch)


PAD_TO = 64  # prompts are left-padded to a multiple of this: one cache length for every batch
MAX_ROWS = 256  # beyond this a decode step is no longer bound by reading the weights
# Compiling the decode step took 50-90 s on an H200 and then saves most of an eager step's ~90 ms
# (BENCHMARKS.md): below this many decode steps in all, the eager loop finishes first.
COMPILE_FROM_STEPS = 1024
STATIC_SHARE = 0.7  # of the memory left after the weights: the rest holds the CUDA graphs' pools and the logits
CPU_ROWS = 8


def kv_bytes_per_token(model):
    """Bytes of key/value cache one token takes in every layer (an upper bound for sliding layers)."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * model.dtype.itemsize


def prefill_bytes_per_token(model):
    """A generous bound on the activations one prompt token holds during the prefill: the MLP's
    widest tensors and a few hidden-size copies, as 4 live at once."""
    cfg = model.config.get_text_config()
    return 4 * (2 * cfg.intermediate_size + 4 * cfg.hidden_size) * model.dtype.itemsize


def static_rows(model, width, length, n_prompts):
    """Rows per batch of the compiled engine: as many rows as STATIC_SHARE of the memory left after
    the weights holds, each a static cache of `length` tokens and the prefill of `width` prompt
    tokens, at most MAX_ROWS."""
    if not torch.cuda.is_available():
        return min(n_prompts, CPU_ROWS)
    row = length * kv_bytes_per_token(model) + width * prefill_bytes_per_token(model)
    fits = int(STATIC_SHARE * memory_budget() // row)
    if fits < 1:
        raise torch.OutOfMemoryError(f"one row of {length} tokens does not fit the key/value cache")
    return min(n_prompts, fits, MAX_ROWS)


def compiled(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size=None, compile=True, compile_settings=None,
             info=None):
    """Greedy continuations, batch by batch in one shape: `batch_size` rows (default: as many as
    fit), the last batch filled up with copies of its last prompt, every prompt left-padded to the
    longest, one static cache reused. The decode step compiles once ("reduce-overhead": CUDA graphs)
    where transformers can compile the model (16-bit weights on a GPU) and there are at least
    COMPILE_FROM_STEPS decode steps to run; `compile_settings` override
    CompileConfig fields and `info`, a dict, receives the settings used (for the benchmark)."""
    from transformers import CompileConfig, GenerationConfig, StaticCache

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = math.ceil(max(map(len, encoded)) / PAD_TO) * PAD_TO
    rows = batch_size or static_rows(model, width, width + max_new_tokens, len(encoded))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              disable_compile=True)
    quantized = getattr(getattr(model, "get_base_model", lambda: model)(), "hf_quantizer", None) is not None
    steps = math.ceil(len(encoded) / rows) * max_new_tokens
    if compile and model.device.type == "cuda" and not quantized and steps >= COMPILE_FROM_STEPS:
        config.disable_compile = False
        config.compile_config = CompileConfig(**{"dynamic": False, **(compile_settings or {})})
    if info is not None:
        info.update(rows=rows, cache_tokens=width + max_new_tokens, compiled=not config.disable_compile)
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    device = model.device
    for start in range(0, len(encoded), rows):
        idx = list(range(start, min(start + rows, len(encoded))))
        batch = idx + [idx[-1]] * (rows - len(idx))
        ids = torch.full((rows, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, width - len(encoded[i]):] = 1
        cache.reset()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), past_key_values=cache,
                                 generation_config=config)
        results = [(i, *_cut(tokenizer, row, stop_ids)) for i, row in zip(idx, out[: len(idx), width:].tolist())]
        if info is not None:  # the first batch's time includes compiling the decode step
            info.setdefault("batch_seconds", []).append(round(time.perf_counter() - started, 1))
            info.setdefault("batch_tokens", []).append(sum(n for _, _, n in results))
        yield Step(results)


def memory_budget():
    """Bytes of GPU memory this process may still take: what is free, and no more than its share
    under torch.cuda.set_per_process_memory_fraction (a 15 GB cap set on a larger card)."""
    free, total = torch.cuda.mem_get_info()
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = get_fraction() if get_fraction else 1.0
    return min(free, int(total * fraction) - torch.cuda.memory_reserved())


def _cb_config(lengths, max_new_tokens, concurrency, settings):
    """The continuous-batching settings for these prompts: the cache holds every row at once where it
    can, within this process's memory (transformers would size it from the whole card's free memory)."""
    from transformers import ContinuousBatchingConfig

    block = 256 if torch.cuda.is_available() else 32
    blocks_per_row = [math.ceil((n + max_new_tokens) / block) for n in lengths]
    rows = sorted(blocks_per_row, reverse=True)[:concurrency] if concurrency else blocks_per_row
    wanted = sum(rows) + 1
    if not torch.cuda.is_available():
        return ContinuousBatchingConfig(block_size=block, num_blocks=wanted, max_batch_tokens=CPU_BATCH_TOKENS,
                                        max_requests_per_batch=concurrency, **settings)
    from transformers.generation.continuous_batching.requests import get_device_and_memory_breakdown

    _, total, reserved, allocated = get_device_and_memory_breakdown()
    seen_free = total - max(allocated, reserved)  # what transformers multiplies max_memory_percent by
    percent = max(0.05, min(0.9, KV_SHARE * memory_budget() / seen_free))
    return ContinuousBatchingConfig(block_size=block, max_memory_percent=percent, max_requests_per_batch=concurrency,
                                    **settings)


def _in_flight(manager):
    """Tokens generated so far by unfinished rows (for the progress bar only; 0 if transformers'
    internals differ from 5.17's)."""
    try:
        active = manager.batch_processor.scheduler.active_requests
        return sum(state.generated_len() for state in list(active.values()))
    except (AttributeError, RuntimeError):
        return 0


def continuous(model, tokenizer, prompts, stop_ids, max_new_tokens, concurrency=None, settings=None, info=None):
    """Greedy continuations of every prompt through one continuous-batching manager: finished rows
    as they come (each Step), in no particular order. `concurrency` caps the rows decoded at once
    (None: as many as the memory holds); `settings` override ContinuousBatchingConfig fields; `info`,
    a dict, receives the settings transformers resolved (for the benchmark)."""
    from transformers import GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    hints = WorkloadHints(max_prompt_length=max(map(len, encoded)), max_generated_length=max_new_tokens,
                          num_requests=len(encoded))
    cb = _cb_config([len(e) for e in encoded], max_new_tokens, concurrency, settings or {})
    with model.continuous_batching_context_manager(generation_config=config, continuous_batching_config=cb,
                                                   workload_hints=hints, block=True, timeout=30) as manager:
        ids = manager.add_requests(inputs=encoded, max_new_tokens=max_new_tokens)
        if info is not None:
            resolved = manager.continuous_batching_config
            info.update({k: str(getattr(resolved, k, None)) for k in RESOLVED})
        index = {rid: i for i, rid in enumerate(ids)}
        pending = set(ids)
        while pending:
            finished = []
            result = manager.get_result(timeout=1)
            while result is not None:
                if result.is_finished() and result.request_id in pending:
                    if result.error is not None:
                        _raise(result.error)
                    pending.discard(result.request_id)
                    finished.append((index[result.request_id], *_cut(tokenizer, result.generated_tokens, stop_ids)))
                result = manager.get_result(timeout=0) if pending else None
            if pending and not finished and not manager.is_running():
                raise RuntimeError(f"transformers' continuous batching stopped with {len(pending)} prompts left "
                                   "and no error given. Run again with --engine static.")
            yield Step(finished, _in_flight(manager))


def _raise(error):
    if "out of memory" in str(error).lower():
        raise torch.OutOfMemoryError(str(error))
    raise RuntimeError(f"transformers' continuous batching failed: {error}. Run again with --engine static.")


class Meter:
    """Tokens/s and time left, from the tokens generated since the first step. The time left is an
    upper bound: rows not finished yet count as running to --max-new-tokens."""

    def __init__(self, items, max_new_tokens, bar, say=print, estimate_after_s=20.0):
        self.items, self.cap, self.bar, self.say = items, max_new_tokens, bar, say
        self.estimate_after_s, self.estimated = estimate_after_s, False
        self.start = time.perf_counter()
        self.done_items = self.done_tokens = 0

    def update(self, step):
        self.done_items += len(step.results)
        self.done_tokens += sum(n for _, _, n in step.results)
        elapsed = time.perf_counter() - self.start
        tokens = self.done_tokens + step.in_flight_tokens
        rate = tokens / elapsed if elapsed > 0 else 0.0
        left = self.seconds_left(rate, step.in_flight_tokens)
        if not self.estimated and rate and (self.done_items or elapsed >= self.estimate_after_s):
            self.estimated = True
            self.say(f"Estimated time: at most {_duration(elapsed + left)} for {self.items:,} items x up to "
                     f"{self.cap:,} new tokens at {rate:,.0f} tokens/s (measured over the first {elapsed:.0f} s)")
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s, left <= {_duration(left)}" if rate else "warming up",
                                 refresh=False)
        self.bar.update(len(step.results))

    def seconds_left(self, rate, in_flight):
        if not rate:
            return math.inf
        return max(0, (self.items - self.done_items) * self.cap - in_flight) / rate

    def summary(self):
        seconds = time.perf_counter() - self.start
        return {"generated_tokens": self.done_tokens, "generation_seconds": round(seconds, 1),
                "tokens_per_second": round(self.done_tokens / seconds, 1) if self.done_tokens else None}


def _duration(seconds):
    if seconds == math.inf:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
