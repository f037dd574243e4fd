"""Benchmark: generation speed in the demo versus bare llama-cpp-python, same GGUF, threads and settings.

    python scripts/bench_demo.py checkpoints/phi3-smoke/export/phi3-smoke-q4_k_m.gguf [--tokens 256 --runs 5]

Both sides measure decoding the same way (tokens after the first, over the time since the first):
bare in this process, the demo inside its server while a gradio_client streams the answer, as a
browser would. Runs alternate between the two. Prints both medians and their ratio.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medtune.config import REPO_ROOT
from medtune.errors import UserError, report_user_errors

QUESTION = "A 58-year-old smoker has crushing chest pain and ST elevation in V1-V4. What is the next step?"


def start_demo(path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "scripts/demo.py"), str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise UserError(f"The demo could not start on {path}: run python scripts/demo.py {path} to see why.")
            time.sleep(0.5)
    raise UserError("The demo did not start listening within 5 minutes.")


def measure(path, tokens, runs, system):
    """Alternate bare and demo answers, so that both see the same machine (a shared VM drifts)."""
    from gradio_client import Client

    from medtune.demo.backends import GGUFBackend

    backend = GGUFBackend(path)  # the demo's own loader: same context size and threads
    ids = backend.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": QUESTION}])
    proc, port = start_demo(path)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        bare, demo = [], []
        for _ in range(runs + 1):  # the first round warms up (pages the model in) and is not counted
            first, n = None, 0
            for _ in backend.llm.create_completion(ids, max_tokens=tokens, temperature=0.0, top_p=1.0,
                                                   repeat_penalty=1.0, stream=True):
                n += 1
                first = first or time.perf_counter()
            bare.append((n - 1) / (time.perf_counter() - first))
            _, stats = client.predict(QUESTION, [], system, tokens, 0.0, 1.0, 1.0, api_name="/chat")
            # "**name** (llama.cpp) · time to first token 0.02 s · 289.2 tokens/s · 256 tokens"
            demo.append(float(stats.split(" tokens/s")[0].rsplit("· ", 1)[1]))
        return bare[1:], demo[1:]
    finally:
        proc.terminate()
        proc.wait()


@report_user_errors
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", help="a .gguf file (e.g. an export's q4_k_m)")
    p.add_argument("--tokens", type=int, default=256, help="tokens to generate per answer (default 256)")
    p.add_argument("--runs", type=int, default=5, help="answers per side; the median is reported (default 5)")
    args = p.parse_args()
    if not Path(args.gguf).is_file() or not args.gguf.endswith(".gguf"):
        raise UserError(f"{args.gguf} is not a .gguf file. Export a run first: python scripts/export.py checkpoints/NAME")
    system = (REPO_ROOT / "prompts/system_prompt.txt").read_text().strip()
    bare_speeds, demo_speeds = measure(args.gguf, args.tokens, args.runs, system)
    b, d = statistics.median(bare_speeds), statistics.median(demo_speeds)
    print(f"{Path(args.gguf).name}, {os.cpu_count()} threads, greedy, up to {args.tokens} tokens, {args.runs} runs each")
    print(f"  bare llama-cpp-python: {b:8.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in bare_speeds)})")
    print(f"  through the demo:      {d:8.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in demo_speeds)})")
    print(f"  demo / bare: {d / b:.3f}")


if __name__ == "__main__":
    main()
