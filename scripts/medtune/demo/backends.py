"""Models behind the demo: a GGUF through llama.cpp, merged safetensors through transformers, or a
LoRA run folder through Unsloth (GPU) or PEFT (CPU). Each streams text pieces for a chat."""
import codecs
import os
import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from medtune.config import default_system_prompt
from medtune.errors import UserError
from medtune.families import FAMILIES, family_of_model_type
from medtune.runfolder import FOR_MODEL, FOR_PROMPT, RUN_INFO, open_run, run_of

BACKENDS = ("auto", "gguf", "transformers", "unsloth")
UPDATES_PER_S = 12  # streamed UI updates: smooth to read, cheap to render


@dataclass
class Settings:
    max_new_tokens: int = 512
    temperature: float = 0.6
    top_p: float = 0.9
    repetition_penalty: float = 1.05


@dataclass
class Stats:
    ttft_s: float = 0.0
    tokens: int = 0
    tokens_per_s: float = 0.0

    def __str__(self):
        return f"time to first token {self.ttft_s:.2f} s · {self.tokens_per_s:.1f} tokens/s · {self.tokens} tokens"


def render_template(template, messages, bos_token, eos_token):
    """A chat template rendered as transformers renders it (sandboxed Jinja, same options)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=True)


class Backend:
    name: str  # shown in the UI
    kind: str
    context: int
    system_prompt: str  # the one the model was trained with: where the demo starts

    def __init__(self):
        self.lock = threading.Lock()  # one generation at a time per model: llama.cpp contexts aren't shared

    def count_tokens(self, text):
        raise NotImplementedError

    def stream(self, messages, settings, stats):
        """Yield the answer's text as it grows, in pieces; fill `stats` as tokens arrive.

        The model generates in its own thread at full speed while the caller (the web UI) takes
        whatever has arrived since its last look, at most UPDATES_PER_S times a second: each UI update
        re-renders the chat, and on a small CPU that work would otherwise slow generation down.
        Tokens/s counts the tokens after the first over the time since the first (decoding speed,
        apart from prompt processing).

        Closing the generator (Stop, a cancelled API call) ends the generation at its next token and
        frees the model for the next question. Gradio can only close a generator that is waiting at a
        yield, so this one yields (an empty piece when nothing new came) at least every 1/UPDATES_PER_S
        seconds, also while the model is still reading the prompt.
        """
        pieces, stop = queue.Queue(), threading.Event()

        def produce():
            try:
                with self.lock, closing(self._stream(messages, settings, stop)) as generated:
                    started, first = time.perf_counter(), None
                    for piece, n_tokens in generated:
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            stats.ttft_s = first - started
                        stats.tokens = n_tokens
                        stats.tokens_per_s = (n_tokens - 1) / (now - first) if now > first else 0.0
                        pieces.put(piece)
                        if stop.is_set():
                            break
            except Exception as e:  # re-raised in the caller's thread
                pieces.put(e)
            pieces.put(None)

        threading.Thread(target=produce, daemon=True).start()
        try:
            done = False
            while not done:
                time.sleep(1 / UPDATES_PER_S)
                batch = []
                while not pieces.empty():
                    batch.append(pieces.get_nowait())
                text = []
                for item in batch:
                    if item is None:
                        done = True
                    elif isinstance(item, Exception):
                        raise item
                    else:
                        text.append(item)
                yield "".join(text)
        finally:
            stop.set()


class GGUFBackend(Backend):
    kind = "llama.cpp"

    def __init__(self, path, n_ctx=4096, threads=None):
        super().__init__()
        from medtune.export.gguf import gguf_metadata, llama_cpp_module

        llama_cpp = llama_cpp_module()
        meta = gguf_metadata(path)
        self.template = meta["chat_template"]
        if not self.template:
            raise UserError(f"{path} carries no chat template. Export it with scripts/export.py, which writes one.")
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count(),
                                   verbose=False)
        self.bos = self.llm.detokenize([self.llm.token_bos()], special=True).decode()
        self.eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode()
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)  # end-of-generation: EOS, <|end|>, ...
        self.end_tokens = {t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
        self.name, self.context = Path(path).name, n_ctx

    def prompt_ids(self, messages):
        text = render_template(self.template, messages, self.bos, self.eos)
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def count_tokens(self, text):
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False))

    def _stream(self, messages, settings, stop):
        """Tokens straight from llama.cpp's sampler, their bytes decoded as they complete.

        Not create_completion(stream=True): it re-decodes all tokens not yet sent after each new one
        while they are not valid UTF-8, so one stray byte token (a small or random model writes them)
        makes every later token cost more (33 s instead of 0.5 s for 512 tokens). An incremental decoder
        holds back at most an unfinished character and drops bytes that can never be one.
        """
        prompt = self.prompt_ids(messages)  # token ids: the template already holds BOS
        decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        budget = min(settings.max_new_tokens, self.context - len(prompt))
        tokens = self.llm.generate(prompt, temp=settings.temperature, top_p=settings.top_p, top_k=40, min_p=0.05,
                                   repeat_penalty=settings.repetition_penalty)
        n = 0
        try:
            for token in tokens:
                if token in self.end_tokens or stop.is_set():
                    break
                n += 1
                yield decoder.decode(self.llm.detokenize([token])), n
                if n >= budget:
                    break
            yield decoder.decode(b"", final=True), n
        finally:
            tokens.close()


class TransformersBackend(Backend):
    kind = "transformers"

    def __init__(self, model, tokenizer, name, family):
        super().__init__()
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.family = FAMILIES[family]
        self.context = getattr(model.config, "max_position_embeddings", 4096)
        self.stop_ids = self.family.stop_ids(tokenizer)

    @classmethod
    def from_folder(cls, path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        if not tokenizer.chat_template:
            raise UserError(f"{path} has no chat template; export the run with scripts/export.py.")
        return cls(model, tokenizer, f"{Path(path).parent.parent.name}/merged", family_of_model_type(model.config.model_type).name)

    def count_tokens(self, text):
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _stream(self, messages, settings, stop):
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        stop_ids = torch.tensor(self.stop_ids)

        class CountingStreamer(TextIteratorStreamer):
            tokens = 0

            def put(self, value):
                if not self.next_tokens_are_prompt:  # the end-of-turn token is not part of the answer
                    self.tokens += int((~torch.isin(value.cpu(), stop_ids)).sum())
                super().put(value)

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"].to(self.model.device)
        streamer = CountingStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = settings.temperature > 0
        kwargs = dict(input_ids=ids, max_new_tokens=settings.max_new_tokens, streamer=streamer,
                      do_sample=sampling, repetition_penalty=settings.repetition_penalty,
                      eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0],
                      stopping_criteria=StoppingCriteriaList([lambda input_ids, scores, **kw: stop.is_set()]))
        if sampling:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        thread = threading.Thread(target=lambda: torch.inference_mode()(self.model.generate)(**kwargs), daemon=True)
        thread.start()
        try:
            for text in streamer:
                yield text, streamer.tokens
        finally:
            stop.set()
            thread.join()


def run_folder_backend(run_dir):
    """A LoRA run folder without export: Unsloth on a GPU, transformers + PEFT on a CPU."""
    import torch

    run = open_run(run_dir, FOR_MODEL)
    if torch.cuda.is_available():
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(str(run.path), load_in_4bit=True)
        FastLanguageModel.for_inference(model)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(run.base_source(), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run.path)
        tokenizer = AutoTokenizer.from_pretrained(run.tokenizer_dir)
    tokenizer.chat_template = run.chat_template()
    return TransformersBackend(model, tokenizer, f"{run.name} (LoRA)", run.info["family"])


def trained_system_prompt(path):
    """The system prompt the model at `path` was trained with: its run folder's, for a run or anything
    exported from one; the repository's for a model from elsewhere."""
    p = Path(path)
    run_dir = p if p.is_dir() and (p / RUN_INFO).is_file() else run_of(p)
    return open_run(run_dir, FOR_PROMPT).system_prompt() if run_dir else default_system_prompt()


def load(path, backend="auto", n_ctx=4096):
    """The backend for a run folder, an export folder, a merged model folder or a .gguf file, with the
    system prompt its model was trained with."""
    system_prompt = trained_system_prompt(path)  # a damaged run folder stops the demo before any loading
    model = _load_model(path, backend, n_ctx)
    model.system_prompt = system_prompt
    return model


def _load_model(path, backend, n_ctx):
    p = Path(path)
    if not p.exists():
        raise UserError(f"There is nothing at {path}. Pass a run folder (checkpoints/NAME), its export folder, "
                        "a merged model folder or a .gguf file.")
    if p.is_dir() and (p / "export").is_dir() and backend != "unsloth":
        p = p / "export"
    if p.is_dir() and p.name == "export":
        ggufs = sorted(p.glob("*.gguf"), key=lambda f: ("q4_k_m" not in f.name, f.stat().st_size))
        if backend in ("auto", "gguf") and ggufs:
            p = ggufs[0]
        elif (p / "merged").is_dir():
            p = p / "merged"
    if p.suffix == ".gguf":
        if backend not in ("auto", "gguf"):
            raise UserError(f"{p} is a GGUF file: it runs with --backend gguf (llama.cpp) only.")
        return GGUFBackend(p, n_ctx=n_ctx)
    if p.is_dir() and (p / "config.json").is_file():
        return TransformersBackend.from_folder(p)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return run_folder_backend(p)
    found = ", ".join(sorted(c.name for c in p.iterdir())[:10]) if p.is_dir() else "a file"
    raise UserError(f"{path} is neither a run folder, an export, a merged model nor a .gguf file (found: {found}).")
