"""Gradio demo: chat with an exported or trained model, its reasoning shown apart from its answer,
or compare two models side by side.

The module behind scripts/demo.py:

    python scripts/demo.py checkpoints/phi3-medical                       # export (GGUF) or LoRA run
    python scripts/demo.py model.gguf --compare checkpoints/mistral-medical/export/merged
    python scripts/demo.py checkpoints/phi3-medical --share --auth me:secret    # Colab
"""
import argparse
import errno
import socket
import sys

from medtune import noise
from medtune.demo.backends import BACKENDS, Settings, Stats, load
from medtune.errors import UserError, parse_options, report_user_errors

MAX_QUESTION_CHARS = 4000
DISCLAIMER = ("**Research demo, not medical advice.** Answers come from a small fine-tuned language model and "
              "can be wrong or dangerous. Do not use them to diagnose or treat anyone.")
EXAMPLES = [
    "A 64-year-old man has crushing chest pain for 40 minutes, sweating, and ST elevation in II, III and aVF. "
    "What is the diagnosis and the immediate management?",
    "A 24-year-old woman has fever, neck stiffness and a petechial rash. What is the most likely organism and "
    "what should be given first?",
    "A 7-year-old boy has periorbital edema, cola-colored urine and hypertension two weeks after a sore throat. "
    "What is the most likely diagnosis?",
]


def message_text(message):
    """A chat message's text, whether Gradio gives the content as a string or as a list of parts."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def split_reasoning(text):
    """(reasoning or None, answer, reasoning finished). The model opens its answer with <think>."""
    stripped = text.lstrip()
    if not stripped.startswith("<think>"):
        return None, text, False
    body = stripped[len("<think>"):]
    if "</think>" in body:
        reasoning, answer = body.split("</think>", 1)
        return reasoning.strip(), answer.strip(), True
    for k in range(len("</think>") - 1, 0, -1):  # don't show half a closing tag while it streams in
        if body.endswith("</think>"[:k]):
            body = body[:-k]
            break
    return body.strip(), "", False


def assistant_messages(text, done):
    reasoning, answer, closed = split_reasoning(text)
    out = []
    if reasoning is not None:
        out.append({"role": "assistant", "content": reasoning,
                    "metadata": {"title": "Reasoning", "status": "done" if closed or done else "pending"}})
    if answer or reasoning is None:
        out.append({"role": "assistant", "content": answer})
    return out


def model_messages(system_prompt, history, question):
    """The conversation for the model: earlier answers without their reasoning blocks (they would
    fill the context and the model never sees its old reasoning in training either)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for m in history:
        if m["role"] == "user" or not m.get("metadata"):
            messages.append({"role": m["role"], "content": message_text(m)})
    messages.append({"role": "user", "content": question})
    return messages


def check_question(question, backend, settings):
    import gradio as gr

    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"Your question is {len(question):,} characters long; the limit is {MAX_QUESTION_CHARS:,}. "
                       "Shorten it (keep the key findings) and send it again.")
    n = backend.count_tokens(question)
    if n + settings.max_new_tokens > backend.context:
        raise gr.Error(f"Your question is {n:,} tokens and the answer may take {settings.max_new_tokens:,}, more than "
                       f"the model's {backend.context:,}-token context. Shorten the question or lower max new tokens.")


def respond(backend, question, history, system, max_new, temperature, top_p, penalty):
    """Stream one answer into the chat: (messages shown, stats line) as it grows."""
    import gradio as gr

    question = (question or "").strip()
    if not question:
        gr.Warning("Type a question first.")
        yield history, ""
        return
    settings = Settings(int(max_new), float(temperature), float(top_p), float(penalty))
    check_question(question, backend, settings)
    messages = model_messages(system, history, question)
    history = [*history, {"role": "user", "content": question}]
    stats, text = Stats(), ""
    for piece in backend.stream(messages, settings, stats):
        text += piece
        yield history + assistant_messages(text, done=False), f"{backend.name} · generating …"
    yield history + assistant_messages(text, done=True), f"**{backend.name}** ({backend.kind}) · {stats}"


def ask(backend, question, system, max_new, temperature, top_p, penalty):
    """One question, the whole answer: the API endpoint (gradio_client)."""
    history = []
    for history, _ in respond(backend, question, [], system, max_new, temperature, top_p, penalty):
        pass
    return "\n\n".join(message_text(m) if not m.get("metadata") else f"<think>\n{message_text(m)}\n</think>"
                       for m in history[1:])


def chat_tab(backend, settings):
    """The chat with the first model; returns its question box (the API's input too)."""
    import gradio as gr

    chat = gr.Chatbot(label=backend.name, height=480, elem_id="chat", group_consecutive_messages=False)
    stats = gr.Markdown(elem_id="chat-stats")
    with gr.Row():
        question = gr.Textbox(placeholder="Describe the clinical case and ask your question …", show_label=False,
                              scale=8, elem_id="question", max_lines=8)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
    gr.Examples(EXAMPLES, inputs=question)
    clear = gr.Button("New conversation", size="sm")

    def chat_fn(q, h, *s):
        yield from respond(backend, q, h, *s)

    events = []
    for trigger, name in ((send.click, "chat"), (question.submit, False)):
        event = trigger(chat_fn, [question, chat, *settings], [chat, stats], concurrency_id="model-0", api_name=name)
        event.then(lambda: "", None, question, api_name=False)
        events.append(event)
    stop.click(None, None, None, cancels=events, api_name=False)
    clear.click(lambda: ([], ""), None, [chat, stats], api_name=False)
    return question


def compare_tab(backends, generation):
    """Both models answer one question side by side, each with the system prompt it was trained with;
    the question box, Ask both and Stop above the panels, Enter sends."""
    import gradio as gr

    with gr.Row():
        question = gr.Textbox(placeholder="One question for both models …", show_label=False, scale=8,
                              elem_id="compare-question", max_lines=8)
        send = gr.Button("Ask both", variant="primary", scale=1, elem_id="compare-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="compare-stop")
    with gr.Row():
        columns = []
        for i, b in enumerate(backends):
            with gr.Column():
                columns.append((gr.Chatbot(label=f"{b.name} ({b.kind})", height=480, group_consecutive_messages=False,
                                           elem_id=f"compare-{i}"),
                                gr.Markdown(elem_id=f"compare-stats-{i}"),
                                gr.Textbox(b.system_prompt, label=f"System prompt of {b.name}", lines=2,
                                           elem_id=f"compare-system-{i}")))
    events = []
    for i, (b, (box, note, system)) in enumerate(zip(backends, columns)):
        def one(q, *s, backend=b):
            yield from respond(backend, q, [], *s)

        for trigger in (send.click, question.submit):
            events.append(trigger(one, [question, system, *generation], [box, note], concurrency_id=f"model-{i}",
                                  api_name=False))
    stop.click(None, None, None, cancels=events, api_name=False)


def build(backends, defaults):
    import gradio as gr

    primary = backends[0]
    with gr.Blocks(title="medtune demo") as demo:
        names = " vs ".join(f"{b.name} ({b.kind})" for b in backends)
        gr.Markdown(f"# Medical reasoning demo\nModel: **{names}**\n\n{DISCLAIMER}")
        with gr.Accordion("System prompt and generation settings", open=False):
            system = gr.Textbox(primary.system_prompt, label=f"System prompt of {primary.name}", lines=3,
                                elem_id="system-prompt")
            with gr.Row():
                generation = [
                    gr.Slider(16, 2048, defaults.max_new_tokens, step=16, label="Max new tokens"),
                    gr.Slider(0.0, 1.5, defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
                    gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label="Top-p"),
                    gr.Slider(1.0, 1.5, defaults.repetition_penalty, step=0.01, label="Repetition penalty")]
        with gr.Tab("Chat"):
            question = chat_tab(primary, [system, *generation])
        if len(backends) > 1:
            with gr.Tab("Compare"):
                compare_tab(backends, generation)
        def ask_primary(question, system, max_new, temperature, top_p, penalty):
            return ask(primary, question, system, max_new, temperature, top_p, penalty)

        gr.Button(visible=False).click(ask_primary, [question, system, *generation],
                                       gr.Textbox(visible=False), api_name="ask", concurrency_id="model-0")
    return demo


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("model", help="run folder, export folder, merged model folder or .gguf file")
    p.add_argument("--compare", metavar="OTHER", help="a second model to answer side by side")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="force llama.cpp (gguf), transformers or unsloth instead of choosing by what MODEL is")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also open a public Gradio link (Colab)")
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    p.add_argument("--n-ctx", type=int, default=4096, help="llama.cpp context length in tokens (default 4096)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="initial max new tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.6, help="initial temperature (default 0.6; 0 = greedy)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generations at once per model (default 1: others wait in the queue)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait before new ones are refused")
    p.add_argument("--verbose", action="store_true",
                   help="show other libraries' warnings and Gradio's own start-up lines instead of keeping them in the log")
    args = parse_options(p, argv)
    if args.auth and ":" not in args.auth:
        raise UserError("--auth takes USER:PASS, e.g. --auth clinician:s3cret.")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port number (1-65535).")
    return args


def check_port(host, port):
    """Fail before the models load, and before "Serving ...", if the address can't be listened on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no obstacle
            s.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"Port {port} on {host} is already in use, perhaps by another demo (`ss -ltnp "
                            f"'sport = :{port}'` names the program). Stop that program, or pass another port, "
                            f"e.g. --port {port + 1}.") from None
        raise UserError(f"Can't listen on {host}:{port} ({e.strerror or e}). Check --host and --port.") from None


@report_user_errors
def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    noise.divert("demo", args.verbose)
    check_port(args.host, args.port)
    backends = [load(args.model, args.backend, args.n_ctx)]
    if args.compare:
        backends.append(load(args.compare, "auto", args.n_ctx))
    demo = build(backends, Settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, show_error=True,
                    prevent_thread_lock=True, quiet=not args.verbose)  # our line below says where
    except OSError as e:  # taken between the check and now
        raise UserError(f"The demo could not listen on {args.host}:{args.port} ({e}). Pass another --port.") from None
    public = f", public URL {demo.share_url}" if args.share and demo.share_url else ""
    print(f"Serving {' and '.join(b.name for b in backends)}: local URL http://{args.host}:{args.port}{public}. "
          f"Ctrl-C stops it.{' ' + noise.where() if noise.where() else ''}", flush=True)
    demo.block_thread()
