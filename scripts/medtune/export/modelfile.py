"""Ollama Modelfile for an exported GGUF: the family's chat format as an Ollama (Go) template."""
import re

# Equivalent to prompts/chat_templates/<family>.jinja for one system + user turn and the answer.
# Ollama adds BOS itself (the GGUF says add_bos_token), so the templates start after <s> / <bos>.
TEMPLATES = {
    "phi3": (
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        "{{ if .Prompt }}<|user|>\n{{ .Prompt }}<|end|>\n{{ end }}"
        "<|assistant|>\n{{ .Response }}<|end|>\n"
    ),
    "mistral": (
        "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }} [/INST]"
        " {{ .Response }}</s>"
    ),
    "gemma3": (
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n"
    ),
}
TRIPLE = '"' * 3  # Ollama's multi-line string delimiter
PARAMETERS = {  # reasoning answers are long: room for the <think> block, mild sampling
    "phi3": {"num_ctx": 4096, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
    "mistral": {"num_ctx": 8192, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
    "gemma3": {"num_ctx": 8192, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
}


def quoting_problem(text):
    """Why `text` can't be written as an Ollama Modelfile string, or None if it can.

    Ollama's parser (parser/parser.go, ParseFile) has no escapes: a value ends at the first line break
    (CR or LF) where all it has read so far, white space trimmed, is a whole triple-quoted (or quoted)
    string. So a triple-quoted text reads back exactly, quotes inside included, unless one of its lines
    ends with three quotes: the string would end there. Characters that Go does not count as printable,
    other than tab and line breaks, are dropped."""
    for m in re.finditer(r"[\r\n]", text):
        head = (TRIPLE + text[:m.start()]).rstrip()
        if len(head) >= 2 * len(TRIPLE) and head.endswith(TRIPLE):
            return (f"line {text.count(chr(10), 0, m.start()) + 1} ends with {TRIPLE}, where Ollama's Modelfile parser "
                    "would end the string (it has no escapes); put another character after those quotes")
    odd = sorted({c for c in text if not c.isprintable() and c not in "\t\r\n"})
    if odd:
        return (f"it holds the non-printing character(s) {', '.join(f'U+{ord(c):04X}' for c in odd)}, which Ollama's "
                "Modelfile parser drops; remove them")
    return None


def modelfile(family, gguf_name, system_prompt):
    problem = quoting_problem(system_prompt)
    if problem:
        raise ValueError(f"the system prompt can't be written into an Ollama Modelfile: {problem}")
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}", "",
             f"TEMPLATE {TRIPLE}{TEMPLATES[family.name]}{TRIPLE}", "", f"SYSTEM {TRIPLE}{system_prompt}{TRIPLE}", ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in family.stop_tokens]
    lines += [f"PARAMETER {k} {v}" for k, v in PARAMETERS[family.name].items()]
    return "\n".join(lines) + "\n"
