"""The comparison report's charts: both loss curves on one chart, accuracy bars with 95% intervals,
training speed and memory bars. PNG files through matplotlib's Agg backend (no display needed)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curves(runs, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, color in zip(runs, COLORS):
        train = [(r["step"], r["loss"]) for r in run.metrics if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in run.metrics if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.85, label=f"{run.label}: train")
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, label=f"{run.label}: held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on the assistant turn")
    ax.set_title("Training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_bars(runs, rows, path):
    """rows: [(benchmark label, [(run index, role, entry)])] with entry's accuracy and ci95."""
    bars = sorted({(i, role) for _, cells in rows for i, role, _ in cells})
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(rows) + 2), 4.5))
    for b, (i, role) in enumerate(bars):
        xs, ys, err = [], [], [[], []]
        for x, (_, cells) in enumerate(rows):
            entry = next((e for j, r, e in cells if (j, r) == (i, role)), None)
            if entry is None:
                continue
            acc, (lo, hi) = 100 * entry["accuracy"], entry["ci95"]
            xs.append(x - 0.4 + width * (b + 0.5))
            ys.append(acc)
            err[0].append(acc - 100 * lo)
            err[1].append(100 * hi - acc)
        base = role == "base"
        ax.bar(xs, ys, width, yerr=err, capsize=3, color=COLORS[i], alpha=0.45 if base else 0.95,
               hatch="//" if base else None, label=f"{runs[i].label}: {'base' if base else 'fine-tuned'}")
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.set_title("Benchmark accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def speed_memory_bars(runs, path):
    panels = [("trained tokens/s", lambda s: s.get("tokens_per_s")),
              ("training wall time (min)", lambda s: s["wall_time_s"] / 60 if s.get("wall_time_s") else None),
              ("peak GPU memory reserved (GiB)", lambda s: s.get("peak_gpu_reserved_gib"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.8))
    for ax, (title, value) in zip(axes, panels):
        if all(value(run.info["summary"]) is None for run in runs):
            ax.set_yticks([])  # nothing measured: no scale to read
        for x, (run, color) in enumerate(zip(runs, COLORS)):
            v = value(run.info["summary"])
            if v is None:
                ax.text(x, 0.5, "n/a\n(no GPU)", ha="center", va="center", fontsize=9,
                        transform=ax.get_xaxis_transform())
            else:
                ax.bar(x, v, color=color)
                ax.text(x, v, f"{v:,.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(runs)), [run.label for run in runs], fontsize=8)
        ax.set_xlim(-0.6, len(runs) - 0.4)  # the same slots when a panel has no bars
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
