"""Ollama Modelfile for an exported GGUF: the family's chat format as an Ollama (Go) template."""

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
PARAMETERS = {  # reasoning answers are long: room for the <think> block, mild sampling
    "phi3": {"num_ctx": 4096, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
    "mistral": {"num_ctx": 8192, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
    "gemma3": {"num_ctx": 8192, "temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.05},
}


def modelfile(family, gguf_name, system_prompt):
    if '"""' in system_prompt:
        raise ValueError('the system prompt may not contain """ (Ollama\'s string delimiter)')
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_name}", "",
             f'TEMPLATE """{TEMPLATES[family.name]}"""', "", f'SYSTEM """{system_prompt}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in family.stop_tokens]
    lines += [f"PARAMETER {k} {v}" for k, v in PARAMETERS[family.name].items()]
    return "\n".join(lines) + "\n"
