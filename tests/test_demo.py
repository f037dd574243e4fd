"""The Gradio demo, served for real on a loopback port, driven by headless Chromium and gradio_client.

The models are tiny Phi-3s trained through the real training path until they answer two questions in
the trained format (<think>reasoning</think>answer), each with its own system prompt file, then
exported: the first run's q8_0 GGUF runs on llama.cpp and the second's merged safetensors on
transformers, side by side.
"""
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from conftest import REPO, train

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# Each run's own system prompt (--system-prompt-file): the demo must start from it, not from the repository's.
PROMPTS = {"answers": "You are a careful clinician. Reason step by step inside <think></think>, then answer.",
           "answers-b": "Answer as a cardiology consultant would: reasoning in <think></think> first."}
QUESTIONS = {"Chest pain and ST elevation. What now?": ("ST elevation means infarction.", "Reperfuse now."),
             "Fever and neck stiffness. What now?": ("This suggests meningitis.", "Give antibiotics.")}


@pytest.fixture(scope="module")
def answering_exports(tmp_path_factory):
    """Two runs on the same two questions, each trained with its own system prompt, and their exports."""
    from medtune.export.cli import export, parse_args

    root = tmp_path_factory.mktemp("demo")
    data = root / "two.jsonl"
    rows = [{"Question": q, "Complex_CoT": r, "Response": a} for q, (r, a) in QUESTIONS.items()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    exports = []
    for name, prompt in PROMPTS.items():
        (root / f"{name}-prompt.txt").write_text(prompt)
        run = train("phi3", "--smoke", "--dataset", data, "--output-dir", root, "--run-name", name,
                    "--system-prompt-file", root / f"{name}-prompt.txt", "--max-steps", "60", "--learning-rate",
                    "1e-2", "--lr-scheduler", "constant", "--warmup-steps", "0", "--eval-samples", "0",
                    "--batch-size", "2", "--grad-accum", "1", "--save-steps", "1000")
        export(parse_args([str(run), "--quant", "q8_0"]))
        exports.append(run / "export")
    return exports


@pytest.fixture(scope="module")
def answering_export(answering_exports):
    return answering_exports[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(log_path, *args):
    """Start scripts/demo.py on a free loopback port; yield (process, url) once it listens."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "scripts/demo.py", *map(str, args), "--port", str(port)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the demo did not start listening within 300 s")
        yield proc, url
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(answering_exports):
    answering_export, other = answering_exports
    yield from serve(answering_export.parent / "demo.log", answering_export / "answers-q8_0.gguf", "--compare",
                     other / "merged", "--temperature", "0", "--max-new-tokens", "48")


@pytest.fixture(scope="module")
def random_export(smoke_runs, tmp_path_factory):
    """The quickstart's random-weight Phi-3, exported: it writes 2048 tokens of noise."""
    import shutil

    from medtune.export.cli import export, parse_args

    run = tmp_path_factory.mktemp("random") / "phi3-smoke"
    shutil.copytree(smoke_runs("phi3"), run, ignore=shutil.ignore_patterns("checkpoint-*", "export"))
    export(parse_args([str(run), "--no-verify"]))
    return run / "export"


@pytest.fixture(scope="module")
def random_server(random_export):
    yield from serve(random_export.parent / "demo.log", random_export / "phi3-smoke-q4_k_m.gguf", "--compare",
                     random_export / "merged", "--temperature", "0", "--max-new-tokens", "2048")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh --dev installs Debian's chromium for these tests")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.mark.browser
def test_browser_chat_streams_reasoning_apart_from_the_answer(server, browser):
    _, url = server
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    assert "not medical advice" in page.content()
    question, (reasoning, answer) = next(iter(QUESTIONS.items()))
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    chat = page.locator("#chat")
    chat.get_by_text(answer).wait_for(timeout=60_000)
    block = chat.locator(".thought-group")  # Gradio's collapsible block of a message with metadata
    block.get_by_text("Reasoning").wait_for()
    block.get_by_text("Reasoning").click()  # expand it
    block.get_by_text(reasoning).wait_for()
    answer_msg = chat.locator("[data-testid=bot]").filter(has_text=answer)
    assert answer_msg.count() == 1 and reasoning not in answer_msg.inner_text()
    assert answer not in block.inner_text()
    stats = page.locator("#chat-stats").inner_text()
    assert "tokens/s" in stats and "time to first token" in stats and "llama.cpp" in stats
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "demo-chat.png", full_page=True)

    page.get_by_role("tab", name="Compare").click()
    question, (_, answer) = list(QUESTIONS.items())[1]
    page.locator("#compare-question textarea").fill(question)
    page.locator("#compare-send").click()
    for i in (0, 1):  # llama.cpp (GGUF) and transformers (merged safetensors), streaming side by side
        page.locator(f"#compare-{i}").get_by_text(answer).wait_for(timeout=60_000)
        page.locator(f"#compare-stats-{i}").get_by_text("tokens/s").wait_for()
    assert "transformers" in page.locator("#compare-stats-1").inner_text()
    page.screenshot(path=ARTIFACTS / "demo-compare.png", full_page=True)
    page.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


# the system prompt the model was trained with, max new tokens, temperature (greedy), top-p, repetition penalty
SETTINGS = (PROMPTS["answers"], 48, 0.0, 0.9, 1.0)


@pytest.mark.browser
def test_each_model_starts_from_the_system_prompt_it_was_trained_with(server, browser):
    """The run's own system prompt, not the repository's: in the chat, the API and per model in Compare."""
    _, url = server
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(url)
    page.get_by_text("System prompt and generation settings").click()  # the accordion opens
    assert page.locator("#system-prompt textarea").input_value() == PROMPTS["answers"]
    page.get_by_role("tab", name="Compare").click()
    for i, name in enumerate(PROMPTS):
        assert page.locator(f"#compare-system-{i} textarea").input_value() == PROMPTS[name]
    page.close()

    c = client(url)
    params = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/ask"]["parameters"]
    assert params[1]["parameter_default"] == PROMPTS["answers"] != (REPO / "prompts/system_prompt.txt").read_text().strip()
    question, (reasoning, answer) = next(iter(QUESTIONS.items()))
    settings = {p["parameter_name"]: value for p, value in zip(params[2:], SETTINGS[1:])}  # all but the prompt
    assert c.predict(question, api_name="/ask", **settings) == f"<think>\n{reasoning}\n</think>\n\n{answer}"


def test_gradio_client_gets_an_answer(server):
    question, (reasoning, answer) = next(iter(QUESTIONS.items()))
    out = client(server[1]).predict(question, *SETTINGS, api_name="/ask")
    assert out == f"<think>\n{reasoning}\n</think>\n\n{answer}"


def test_overlong_and_empty_input(server):
    from gradio_client.exceptions import AppError

    c = client(server[1])
    with pytest.raises(AppError, match="limit is 4,000"):
        c.predict("Dyspnea. " * 600, *SETTINGS, api_name="/ask")
    assert c.predict("   ", *SETTINGS, api_name="/ask") == ""


def test_ten_concurrent_requests_all_complete(server):
    c = client(server[1])
    questions = [list(QUESTIONS)[i % 2] for i in range(10)]
    jobs = [c.submit(q, *SETTINGS, api_name="/ask") for q in questions]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda j: j.result(timeout=300), jobs))
    assert all(QUESTIONS[q][1] in r for q, r in zip(questions, results)), results


def test_listens_on_loopback_only(server):
    proc, url = server
    port = int(url.rsplit(":", 1)[1].strip("/"))
    sockets = [c for c in psutil.Process(proc.pid).net_connections(kind="inet")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert sockets and {c.laddr.ip for c in sockets} == {"127.0.0.1"}


@pytest.mark.parametrize("argv, words", [
    (["nowhere/model"], ["nothing at nowhere/model"]),
    (["{run}", "--auth", "nopassword"], ["--auth takes USER:PASS"]),
    (["{run}", "--backend", "transformers"], ["GGUF file", "--backend gguf"]),
])
def test_bad_input(answering_export, argv, words):
    argv = [a.replace("{run}", str(answering_export / "answers-q8_0.gguf")) for a in argv]
    r = subprocess.run([sys.executable, "scripts/demo.py", *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for w in words:
        assert w in r.stderr


def test_notebook_runs_end_to_end_in_smoke_mode(tmp_path):
    """The Colab notebook, executed headless: train, export, demo, one answer (CPU, offline, tiny model)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "notebooks/medtune_colab.ipynb", as_version=4)
    port = free_port()
    env = {"MEDTUNE_NOTEBOOK_SMOKE": "1", "MEDTUNE_NOTEBOOK_OUT": str(tmp_path), "MEDTUNE_NOTEBOOK_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    printed = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code"]
    assert "Done: 12 steps" in printed[2] and f"Wrote {tmp_path / 'phi3-smoke'}/:" in printed[2]
    assert any(o.get("output_type") == "display_data" for o in nb.cells[6].outputs)  # the loss curve
    assert "One answer from" in printed[4] and (tmp_path / "phi3-smoke/export/phi3-smoke-q4_k_m.gguf").is_file()
    assert f"http://127.0.0.1:{port}" in printed[5]
    assert printed[6].strip()  # the demo answered through its API


def test_a_run_folder_without_export_answers_through_its_adapter(answering_export):
    """No export needed: a LoRA run folder loads with its adapter (Unsloth on a GPU, PEFT on a CPU)."""
    from medtune.demo.backends import Settings, Stats, load

    backend = load(answering_export.parent, "unsloth")
    assert backend.kind == "transformers" and backend.name == "answers (LoRA)"
    question, (reasoning, answer) = next(iter(QUESTIONS.items()))
    assert backend.system_prompt == PROMPTS["answers"]
    messages = [{"role": "system", "content": backend.system_prompt}, {"role": "user", "content": question}]
    stats = Stats()
    text = "".join(backend.stream(messages, Settings(48, 0.0, 1.0, 1.0), stats))
    assert text.strip() == f"<think>\n{reasoning}\n</think>\n{answer}" and stats.tokens > 0


def test_port_in_use_is_one_clear_error_before_serving(answering_export):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "scripts/demo.py", answering_export / "answers-q8_0.gguf", "--port",
                            str(port)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Serving" not in r.stdout, r.stdout + r.stderr
    said = " ".join(r.stderr.split())
    assert f"Port {port} on 127.0.0.1 is already in use" in said and f"--port {port + 1}" in said
    assert said.count("error:") == 1


def test_chat_stats_count_the_tokens_generated(server, answering_export):
    """A 16-token limit shows 16 tokens (not 17), and both backends count an answer that ends by itself alike."""
    from medtune.demo.backends import GGUFBackend, Settings, Stats, TransformersBackend

    question = next(iter(QUESTIONS))
    _, stats = client(server[1]).predict(question, [], SETTINGS[0], 16, 0.0, 0.9, 1.0, api_name="/chat")
    assert stats.endswith("· 16 tokens"), stats
    messages = [{"role": "system", "content": SETTINGS[0]}, {"role": "user", "content": question}]
    counted = {}
    for backend in (GGUFBackend(answering_export / "answers-q8_0.gguf"),
                    TransformersBackend.from_folder(answering_export / "merged")):
        s = Stats()
        text = "".join(backend.stream(messages, Settings(48, 0.0, 1.0, 1.0), s))
        assert QUESTIONS[question][1] in text
        counted[backend.kind] = s.tokens
    assert counted["llama.cpp"] == counted["transformers"] < 48, counted


STRAY_BYTES_QUESTION = "Chest pain and ST elevation. What now?"  # the random model answers it at length


def test_llama_cpp_stream_decodes_each_token_once_whatever_the_bytes(random_export):
    """create_completion(stream=True) re-decoded every unsent token after each new one while they were not
    valid UTF-8: one stray byte made each later token cost more (minutes for 512 tokens; see
    scripts/bench_demo.py). The demo decodes each token's bytes once and streams the same text."""
    import threading

    from medtune.demo.backends import GGUFBackend, Settings

    import numpy as np

    backend = GGUFBackend(random_export / "phi3-smoke-q4_k_m.gguf")
    messages = [{"role": "system", "content": SETTINGS[0]}, {"role": "user", "content": STRAY_BYTES_QUESTION}]
    # Which bytes a random model writes depends on the CPU's arithmetic (an AVX2-only machine answered
    # in valid UTF-8), so llama.cpp's sampler is made to write a lone lead byte, then " the", as the
    # first two tokens; the model writes the rest.
    lone = next(t for t in range(512) if backend.llm.detokenize([t]) == b"\xe2")
    word = backend.llm.tokenize(b" the", add_bos=False)[-1]
    start = len(backend.prompt_ids(messages))

    def force(ids, scores):  # ids is llama.cpp's whole buffer: n_tokens says how many are in use
        forced = {0: lone, 1: word}.get(backend.llm.n_tokens - start)
        if forced is not None:
            scores[:] = -np.inf
            scores[forced] = 0.0
        return scores

    generate = backend.llm.generate
    backend.llm.generate = lambda *a, **k: generate(*a, **k, logits_processor=[force])
    tokens = []
    for t in backend.llm.generate(backend.prompt_ids(messages), temp=0.0, top_k=40, min_p=0.05, repeat_penalty=1.0):
        if t in backend.end_tokens or len(tokens) == 256:
            break
        tokens.append(t)
    raw = b"".join(backend.llm.detokenize([t]) for t in tokens)
    assert tokens[:2] == [lone, word] and len(tokens) > 2
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # the case at hand: bytes that never become a character

    real, calls = backend.llm.detokenize, []
    backend.llm.detokenize = lambda *a, **k: calls.append(1) or real(*a, **k)
    pieces = list(backend._stream(messages, Settings(256, 0.0, 1.0, 1.0), threading.Event()))
    assert pieces[-1][1] == len(tokens) and len(calls) == len(tokens)  # one decode per token, no re-decoding
    assert "".join(p for p, _ in pieces) == raw.decode("utf-8", errors="ignore")


def test_stop_ends_the_generation_and_the_next_question_is_served_at_once(random_server):
    """A cancelled /chat (what Stop sends) ends llama.cpp's 2048-token generation, so the next request is
    answered within a second instead of waiting for it."""
    c = client(random_server[1])
    idle = timed_answer(c)  # what the next question takes on an idle server (a loaded 2-core VM: up to ~1 s)
    job = c.submit(STRAY_BYTES_QUESTION, [], SETTINGS[0], 2048, 0.0, 1.0, 1.0, api_name="/chat")
    deadline = time.time() + 120
    while len(job.outputs()) < 3:  # streaming
        assert time.time() < deadline and not job.done(), "the answer never started streaming"
        time.sleep(0.05)
    assert not job.done()
    job.cancel()
    waited = timed_answer(c)
    assert waited - idle < 1.0, f"the next question was answered after {waited:.1f} s ({idle:.1f} s when idle)"


def timed_answer(c):
    """Seconds until /ask answers a 16-token question."""
    started = time.perf_counter()
    assert c.predict("Fever and neck stiffness. What now?", SETTINGS[0], 16, 0.0, 1.0, 1.0, api_name="/ask")
    return time.perf_counter() - started


@pytest.mark.browser
def test_compare_tab_enter_stop_and_layout(random_server, browser):
    """Compare: Ask both above the panels, Enter sends, Stop ends both generations (llama.cpp and transformers)."""
    proc, url = random_server
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(url)
    idle = timed_answer(client(url))
    page.get_by_role("tab", name="Compare").click()
    send, panel = page.locator("#compare-send").bounding_box(), page.locator("#compare-0").bounding_box()
    assert send["y"] + send["height"] <= panel["y"] and send["y"] < 900  # in view, above the 480 px panels
    box = page.locator("#compare-question textarea")
    box.fill(STRAY_BYTES_QUESTION)
    box.press("Enter")
    for i in (0, 1):
        page.locator(f"#compare-{i} [data-testid=bot]").first.wait_for(timeout=120_000)  # both stream
    page.locator("#compare-stop").click()
    assert timed_answer(client(url)) - idle < 1.5  # the click travels through the browser first
    server = psutil.Process(proc.pid)
    server.cpu_percent()
    time.sleep(2)
    assert server.cpu_percent() < 25, "a generation is still running after Stop"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "demo-compare-stopped.png", full_page=True)
    page.close()


def test_first_screen_of_the_demo_is_ours(server, answering_export):
    shown = (answering_export.parent / "demo.log").read_text()
    assert "To create a public link" not in shown and "Failed to load" not in shown and "_pytree" not in shown, shown
    assert "Serving answers-q8_0.gguf and answers-b/merged: local URL http://127.0.0.1:" in shown
    assert "Third-party messages: " in shown and "demo.log (--verbose shows them here)" in shown
