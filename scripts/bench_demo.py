"""Benchmark: generation speed in the demo versus bare llama-cpp-python, same GGUF, threads and settings.

    python scripts/bench_demo.py checkpoints/phi3-smoke/export/phi3-smoke-q4_k_m.gguf [--tokens 256 --runs 5]

Three ways to generate the same greedy answer, each measured the same way (tokens after the first,
over the time since the first): llama.cpp's token loop (`Llama.generate`, the raw speed), llama-cpp-
python's `create_completion(stream=True)` (what the demo used before), and the demo inside its
server while a gradio_client streams the answer, as a browser would. Runs alternate. Two questions:
one whose answer is valid text, and one whose answer (from the random-weight smoke model) holds a
stray byte that never becomes a UTF-8 character, which is where create_completion's streaming
slows down: it re-decodes every unsent token after each new one. Prints medians and ratios.
"""
import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medtune.config import REPO_ROOT
from medtune.errors import UserError, report_user_errors

QUESTIONS = {  # what the random-weight smoke model writes for each: valid text, or a stray byte early on
    "valid text": "A 24-year-old woman has fever, neck stiffness and a petechial rash. What is the most likely organism?",
    "stray byte": "Chest pain and ST elevation. What now?",
}


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


def speed(chunks):
    """Tokens after the first over the time since the first, for an iterator of one item per token."""
    first, n = None, 0
    for _ in chunks:
        n += 1
        first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)


def measure(path, tokens, runs, system):
    """{question: {way: [tokens/s per run]}}, the ways alternating so that all see the same machine."""
    from gradio_client import Client

    from medtune.demo.backends import GGUFBackend

    backend = GGUFBackend(path)  # the demo's own loader: same context size and threads
    proc, port = start_demo(path)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        results = {}
        for name, question in QUESTIONS.items():
            ids = backend.prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": question}])
            ways = results[name] = {"raw generate": [], "create_completion stream": [], "demo": []}
            for _ in range(runs + 1):  # the first round warms up (pages the model in) and is not counted
                raw = backend.llm.generate(ids, temp=0.0, top_k=40, min_p=0.05, repeat_penalty=1.0)
                ways["raw generate"].append(speed(itertools.islice(raw, tokens)))
                ways["create_completion stream"].append(speed(backend.llm.create_completion(
                    ids, max_tokens=tokens, temperature=0.0, top_p=1.0, repeat_penalty=1.0, stream=True)))
                _, stats = client.predict(question, [], system, tokens, 0.0, 1.0, 1.0, api_name="/chat")
                # "**name** (llama.cpp) · time to first token 0.02 s · 289.2 tokens/s · 256 tokens"
                ways["demo"].append(float(stats.split(" tokens/s")[0].rsplit("· ", 1)[1]))
            for k in ways:
                ways[k] = ways[k][1:]
        return results
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
    results = measure(args.gguf, args.tokens, args.runs, system)
    print(f"{Path(args.gguf).name}, {os.cpu_count()} threads, greedy, up to {args.tokens} tokens, {args.runs} runs each")
    for name, ways in results.items():
        medians = {k: statistics.median(v) for k, v in ways.items()}
        print(f"{name}: {QUESTIONS[name]}")
        for k, v in ways.items():
            print(f"  {k:26s} {medians[k]:8.1f} tokens/s  (runs: {', '.join(f'{x:.1f}' for x in v)})")
        print(f"  demo / raw generate: {medians['demo'] / medians['raw generate']:.3f}; create_completion stream / raw "
              f"generate: {medians['create_completion stream'] / medians['raw generate']:.3f}")


if __name__ == "__main__":
    main()
