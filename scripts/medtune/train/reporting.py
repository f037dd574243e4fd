"""What a run shows and keeps: one line per logging step, metrics.jsonl, the loss curve, speed."""
import json
import time

import torch
from transformers.trainer_callback import ProgressCallback

WARMUP_STEPS_EXCLUDED = 5  # the first steps compile kernels (~30 s on a GPU): not steady state


def gib(n_bytes):
    return n_bytes / 2**30


class RunLog(ProgressCallback):
    """The trainer's progress bar, one readable line per logging step instead of a dict, every
    logged value appended to metrics.jsonl, and per-step times and token counts for the summary."""

    def __init__(self, metrics_path):
        super().__init__()
        self.metrics_path = metrics_path
        self.steps = []  # (global step, seconds since start, input tokens seen), one per optimizer step
        self.start = None
        self.last = None  # (step, time, tokens) at the previous log line
        self.time_offset = 0.0  # on resume: the earlier sessions' training time, up to the checkpoint
        self.paused = set()  # steps after which the trainer evaluated or wrote a checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.is_world_process_zero and state.global_step and self.metrics_path.exists():
            # resumed: drop what an interrupted run logged after the checkpoint we continue from
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= state.global_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
            self.time_offset = max((json.loads(line)["time_s"] for line in kept), default=0.0)
        self.start = time.perf_counter()
        self.last = (state.global_step, 0.0, state.num_input_tokens_seen)

    def on_evaluate(self, args, state, control, **kwargs):
        super().on_evaluate(args, state, control, **kwargs)
        self.paused.add(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.paused.add(state.global_step)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass  # no second progress bar for the few eval batches: the eval loss line says enough

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.steps.append((state.global_step, time.perf_counter() - self.start, state.num_input_tokens_seen))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        now = time.perf_counter() - self.start
        record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                  "time_s": round(self.time_offset + now, 3),  # training time since the run began
                  "tokens_seen": state.num_input_tokens_seen, **logs}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if "loss" in logs or "eval_loss" in logs:
            self._print(state, now, logs)

    def _print(self, state, now, logs):
        step0, t0, tok0 = self.last
        parts = [f"step {state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        if "eval_loss" in logs:
            parts.append(f"eval loss {logs['eval_loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "loss" in logs and state.global_step > step0 and now > t0:
            parts.append(f"{(now - t0) / (state.global_step - step0):.2f} s/step")
            parts.append(f"{(state.num_input_tokens_seen - tok0) / (now - t0):,.0f} tok/s")
            self.last = (state.global_step, now, state.num_input_tokens_seen)
        if torch.cuda.is_available():
            parts.append(f"mem {gib(torch.cuda.max_memory_reserved()):.1f} GiB")
        line = " | ".join(parts)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def throughput(self):
        """Trained (non-pad) tokens per second and seconds per step, warm-up steps excluded and so are
        the steps whose time includes an evaluation or a checkpoint (one 18 s step among 4.6 s ones);
        None if the run was too short to have a steady state."""
        skip = min(WARMUP_STEPS_EXCLUDED, len(self.steps) // 2)
        timed = [(a, b) for a, b in zip(self.steps[skip:], self.steps[skip + 1:]) if a[0] not in self.paused]
        seconds = sum(b[1] - a[1] for a, b in timed)
        if not timed or seconds <= 0:
            return None
        left_out = len(self.steps) - skip - 1 - len(timed)
        return {"tokens_per_s": sum(b[2] - a[2] for a, b in timed) / seconds, "s_per_step": seconds / len(timed),
                "steps_measured": f"{timed[0][1][0]}-{timed[-1][1][0]}"
                                  + (f" less {left_out} with eval or checkpoint" if left_out else "")}


def describe_data(train_stats, eval_stats, cfg):
    """The run's one line about its data."""
    n_long = train_stats["too_long"] + eval_stats["too_long"]
    verb = "cut to fit" if cfg.truncate else "dropped"
    long = (f"{train_stats['too_long']} + {eval_stats['too_long']} longer than {cfg.max_seq_length} tokens {verb}"
            if n_long else f"none longer than {cfg.max_seq_length} tokens")
    return (f"Data: {train_stats['kept']} training rows, {eval_stats['kept']} held out; {long}; mean "
            f"{train_stats['mean_tokens']} tokens per row.")


def plot_losses(records, png_path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held-out)", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on the assistant turn")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
