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


@pytest.fixture(scope="module")
def server(answering_exports):
    answering_export, other = answering_exports
    port = free_port()
    log = open(answering_export.parent / "demo.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "scripts/demo.py", answering_export / "answers-q8_0.gguf", "--compare",
         other / "merged", "--port", str(port), "--temperature", "0", "--max-new-tokens", "48"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, (answering_export.parent / "demo.log").read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail("the demo did not start listening within 180 s")
    yield proc, url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


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
