"""Notes on a comparison's steps for the benchmark's report: the profiled step, the steps that compiled and
Python's garbage collections."""
SHORT = {"ours": "(a)", "notebook": "(b)", "baseline": "(c)", "notebook_2x4": "the reference"}


def profile_table(run):
    p = (run or {}).get("profile")
    if not p:
        return ""
    total = p["device_ms"] or 1
    lines = [f"One steady-state step (step {p['step']}) of (a) under torch.profiler: {p['wall_ms']:.0f} ms of wall "
             f"time, {p['device_ms']:.0f} ms of GPU kernel time.", "", "| where the GPU's time goes | ms | share |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in sorted(p["buckets"].items(), key=lambda kv: -kv[1]) if v]
    lines += ["", "Longest kernels: " + "; ".join(f"`{name}` {ms:.1f} ms" for name, ms in p["top"][:5]) + "."]
    return "\n".join(lines + ([f"", p["note"]] if p.get("note") else []))


def collections_note(entry, warmup):
    """Time the comparison's measured steps spent in CPython's full garbage collections, where recorded."""
    said = []
    for key, r in entry.get("runs", {}).items():
        if key not in SHORT or "step_gc_seconds" not in r:
            continue
        slow = [(i + 1, s) for i, s in enumerate(r["step_gc_seconds"]) if i + 1 > warmup and s >= 0.01]
        said.append(f"{SHORT[key]} " + (", ".join(f"{s:.2f} s in step {i}" for i, s in slow) if slow else "none"))
    if not said:
        return ""
    return ("Full garbage collections of Python during the measured steps (the GPU runs out of queued work while "
            "one runs), 0.01 s or more: " + "; ".join(said) + ".")


def compiled_note(entry):
    """Which measured steps of the comparison compiled (left out of the speeds), where recorded."""
    runs = {SHORT[k]: r for k, r in entry.get("runs", {}).items() if k in SHORT and "compiling_steps" in r}
    if not runs:
        return ""
    said = [f"{name} {', '.join(map(str, r['compiling_steps'])) or 'none'}" for name, r in runs.items()]
    return ("Measured steps left out because torch.compile compiled during them (a new shape of a compiled block: "
            "a one-off cost a long run does not repeat): " + "; ".join(said) + ".")
