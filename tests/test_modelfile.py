"""The Ollama Modelfile reads back, through Ollama's own parsing rules, as exactly what was trained.

Ollama is a Go program and is not installed here, so `ollama_parse` is a line-by-line port of its
parser (ollama/ollama parser/parser.go: ParseFile, parseRuneForState, unquote), checked first against
the expectations of Ollama's own tests (parser_test.go, TestParseFileQuoted).
"""
import pytest

from conftest import train
from medtune.errors import UserError
from medtune.export.modelfile import TEMPLATES, modelfile
from medtune.families import FAMILIES

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}
NIL, NAME, VALUE, PARAMETER, MESSAGE, COMMENT = range(6)


def _unquote(s):
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _next_state(r, state):
    """(next state, rune to keep or None); parseRuneForState."""
    space, newline, alpha = r in " \t", r in "\r\n", r.isascii() and r.isalpha()
    if state == NIL:
        return (COMMENT, None) if r == "#" else (NIL, None) if space or newline else (NAME, r)
    if state == NAME:
        if alpha:
            return NAME, r
        if space:
            return VALUE, None
        raise ValueError("invalid command")
    if state == VALUE:
        return (NIL, r) if space or newline else (VALUE, r)
    if state in (PARAMETER, MESSAGE):
        if alpha or (state == PARAMETER and (r.isdigit() or r == "_")):
            return state, r
        if space:
            return VALUE, None
        raise ValueError("unexpected EOF")
    return (NIL, None) if newline else (COMMENT, None)


def ollama_parse(text):
    """[(command, argument)] as Ollama's ParseFile reads them; ValueError where it fails."""
    commands, name, role, state, buf = [], None, "", NIL, []
    for r in text:
        nxt, r = _next_state(r, state)
        if nxt != state:
            if state == NAME:
                word = "".join(buf).lower()
                if word not in COMMANDS:
                    raise ValueError("invalid command")
                name = {"from": "model"}.get(word, word)
                nxt = {"parameter": PARAMETER, "message": MESSAGE}.get(word, nxt)
            elif state == PARAMETER:
                name = "".join(buf)
            elif state == MESSAGE:
                role = "".join(buf)
            elif state == VALUE:
                value, ok = _unquote("".join(buf).strip())
                if not ok or r in (" ", "\t"):
                    buf.append(r)
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = [], nxt
        if r is not None and r.isprintable():
            buf.append(r)
    if state == VALUE:
        value, ok = _unquote("".join(buf).strip())
        if not ok:
            raise ValueError("unexpected EOF")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise ValueError("unexpected EOF")
    return commands


@pytest.mark.parametrize("modelfile_text, expected", [  # parser_test.go, TestParseFileQuoted
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t',
     [("model", "foo"), ("system", "\nThis is a\nmultiline system.\n")]),
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n\t\t\t',
     [("model", "foo"), ("system", "\nThis is a\nmultiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system."""\n\t\t\t', [("model", "foo"), ("system", "This is a multiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t', ValueError),
    ('\nFROM foo\nSYSTEM "\'"\n', [("model", "foo"), ("system", "\'")]),
    ('\nFROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
     [("model", "foo"), ("system", """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'""")]),
    ('FROM foo\nPARAMETER stop """### User:\n"""\n', [("model", "foo"), ("stop", "### User:\n")]),  # ...Parameters
    ('FROM foo\nPARAMETER stop "### User: "\n', [("model", "foo"), ("stop", "### User: ")]),
    ('FROM foo\nPARAMETER stop ### User: \n', [("model", "foo"), ("stop", "### User:")]),
    ('\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""', [("model", "foo"), ("template", "\n{{ .Prompt }}\n")]),
])
def test_the_port_reads_as_ollamas_own_tests_expect(modelfile_text, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            ollama_parse(modelfile_text)
    else:
        assert ollama_parse(modelfile_text) == expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("prompt", [
    'You are a medical expert. Wrap quotes as """like this""" when you cite a guideline.',
    '"""Quoted from the start""" and on.\nA second line with "quotes" at its end: "x"',
    'Two quotes end this line: ""\nand three sit """ inside this one.',
    "Plain prompt.",
])
def test_modelfile_reads_back_the_exact_system_prompt(family, prompt):
    text = modelfile(FAMILIES[family], "run-q4_k_m.gguf", prompt)
    parsed = ollama_parse(text)
    assert ("system", prompt) in parsed and ("template", TEMPLATES[family]) in parsed
    assert ("model", "./run-q4_k_m.gguf") in parsed
    assert [v for k, v in parsed if k == "stop"] == list(FAMILIES[family].stop_tokens)


def test_a_prompt_ollama_cannot_read_back_is_refused_when_training_starts(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text('Cite guidelines as follows: """\nGuideline text here."""\n')
    out = tmp_path / "runs"
    with pytest.raises(UserError) as e:
        train("phi3", "--smoke", "--output-dir", out, "--system-prompt-file", prompt)
    assert "line 1 ends with" in str(e.value) and "Ollama" in str(e.value) and not out.exists()
