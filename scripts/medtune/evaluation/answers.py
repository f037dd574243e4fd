"""Read the chosen option out of a model's response, and check the response's format.

Only the final answer counts: the text after the last </think> (or after a "## Final Response"
heading, HuatuoGPT-o1's format), or the whole response when the model wrote no reasoning block. A
response whose reasoning never closes (usually cut off by the token limit) has no final answer, so
letters inside the reasoning are never read. Within the final answer, the part after its last
"Answer" / "Final Answer" heading or bold label is read first, the whole final answer if that part
names nothing. Nothing is guessed: a final answer that names no option, or several without saying
which one it chooses ("Answer: A or B"), is unparseable and counted as such.

Multiple choice (labels A, B, C, D, ...), the first rule that finds something decides:
1. explicit: "Answer: C", "The correct answer is (C).", "final answer - c", "answer is option C",
   "the best option is C", "C is correct", "The answer is "D".", "\\boxed{C}", "Therefore, B.",
   "I would choose B", lm-evaluation-harness's "Final Answer: The final answer is C". Of several,
   the last one is the model's final word.
2. letter: option letters standing alone, "(C)", "C." / "C)" / "C:" opening a line, "**C**",
   "option C", a letter alone on a line; upper case only, as a lone "a" is an article. Used when
   they name exactly one option.
3. text: the final answer contains exactly one option's text (a text found only inside a longer
   matching option's text does not count).
Yes/no/maybe (labels are the words): "Answer: yes", "\\boxed{no}", a final answer that starts with
the word, or whose last sentence ends with it after a comma or a conclusion ("Therefore, yes.").
"""
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
FINAL_RESPONSE = re.compile(r"^#{1,6}[ \t]*Final Response[ \t]*$", re.MULTILINE | re.IGNORECASE)
THINKING = re.compile(r"^\s*#{1,6}[ \t]*Thinking[ \t]*$", re.MULTILINE | re.IGNORECASE)
# A line that is only "## Final Answer", "**Answer:**", "### Answer": the model's final word follows it
ANSWER_HEADING = re.compile(r"^[ \t]*(?:#{1,6}[ \t]*|[*_]{1,3})(?:final[ \t]+)?answer\b[*_ \t]*:?[*_ \t]*$",
                            re.MULTILINE | re.IGNORECASE)
_ANSWER = r"(?<![A-Za-z])(?i:answer)(?![A-Za-z])"
_VERB = r"(?:is|would\s+be|will\s+be|should\s+be|must\s+be|here\s+is)"
_MARK = r"[\s*_:=\-–—]*"  # separators and markdown between "answer" and the letter
_QUOTES = "\"'“”‘’"
# A letter that ends there: not "D-dimer", "B12", nor "C. difficile" / "E. coli" (a lower-case word after the dot).
_ALONE = r"(?![A-Za-z0-9\-'’])(?!\.\s*[a-z])"
_CONCLUSION = r"(?i:therefore|thus|hence|so|consequently|in\s+conclusion|in\s+summary|in\s+short|overall)"
_BOXED = r"\\boxed\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\{)?\s*"


def final_answer(response):
    """The part of a response that holds the final answer; None when the reasoning never closes."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in response:
        return None
    split = list(FINAL_RESPONSE.finditer(response))
    if split:
        return response[split[-1].end():].strip()
    if THINKING.match(response):
        return None
    return response.strip()


def reasoning_block_ok(response):
    """The response opens with one <think>...</think> block with reasoning inside and text after it."""
    text = response.strip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    inside, after = text[len(THINK_OPEN):].split(THINK_CLOSE)
    return bool(inside.strip()) and bool(after.strip())


def _letter(letters):
    """A letter label: upper case before a non-letter, in quotes, or lower case only where it ends the
    phrase ("answer: c", "answer is (b)"), so that "the answer is a beta-blocker" is not option A."""
    up, low = "".join(letters), "".join(letters).lower()
    return (rf"(?:[{_QUOTES}]([{up}])[{_QUOTES}]|([{up}]){_ALONE}|([{low}])(?=\s*$|[.)\]:,;!*{_QUOTES}]))")


_CONNECTOR = re.compile(rf"[\s)\]}}$*_{_QUOTES}]*(?:,|/|&|(?i:or|and))[\s(\[$*_{_QUOTES}]*")  # "\\boxed{A} or \\boxed{B}"


def _hedged(text, end, labels):
    """The label just read is followed by another: "A or B", "A/B", "A, C", "yes or no"."""
    others = "|".join(re.escape(label) for label in labels)
    return re.match(rf"[)\]*_{_QUOTES}]*\s*(?:,|/|&|\bor\b|\band\b)\s*[(\[*_{_QUOTES}]*(?i:{others})(?![A-Za-z0-9])",
                    text[end:]) is not None


def _explicit_letter(text, letters):
    """The last explicit statement's letter; "" when that statement hedges; None when there is none."""
    letter = _letter(letters)
    ends = r"(?=[)\]]?\s*(?:[.!,;:]|$))"  # the letter closes its clause: "Therefore, B." not "So A is wrong"
    patterns = [
        # "Answer: C", "The correct answer is (C)", "answer would be option c", 'The answer is "D".'
        rf"{_ANSWER}(?:\s*[*_]+)?(?:\s+(?i:{_VERB})\b(?:\s+\w+ly\b)?|\s*[:=\-–—]){_MARK}"
        rf"(?:(?i:option|choice|letter)\s*)?[(\[]?\s*(?:\$?{_BOXED})?{letter}",
        # "the best option is C", "The correct choice is (B)", "Correct option: B"
        rf"(?i:\b(?:option|choice)(?:\s+{_VERB}\b|\s*[:=]))(?!\s*$){_MARK}[(\[]?\s*{letter}",
        # "C is correct", "(B) is the correct answer"
        rf"[(\[]?\b([{''.join(letters)}])\b[)\]]?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best)\b)",
        rf"{_BOXED}\(?{letter}",  # \boxed{C}, \boxed{\text{C. Aspirin}}
        rf"\b{_CONCLUSION}\b,?\s+(?:(?i:option|choice)\s+)?[(\[]?{letter}{ends}",  # "Therefore, B."
        rf"(?i:\b(?:choose|select|pick|go\s+with|opt\s+for))\s+(?:(?i:option|choice)\s+)?[(\[]?{letter}",
    ]
    found = set()
    for p in patterns:
        for m in re.finditer(p, text, re.MULTILINE):
            group = next(i for i, g in enumerate(m.groups(), 1) if g)
            found.add((m.start(), m.group(group).upper(), m.end(group)))
    if not found:
        return None
    found = sorted(found)
    start, chosen, end = found[-1]
    joined = any(letter != chosen and _CONNECTOR.fullmatch(text[e:start]) for _, letter, e in found[:-1] if e <= start)
    return "" if joined or _hedged(text, end, letters) else chosen


def _standalone_letters(text, letters):
    up = "".join(letters)
    patterns = [
        rf"\(([{up}])\)",                                     # (C)
        rf"^\s*(?:#+\s*)?[*_]*([{up}]){_ALONE}[*_]*\s*(?:[.):]|$)",  # "C." / "C)" / "C:" / "C" opening a line
        rf"\*\*([{up}])\*\*",                                 # **C**
        rf"(?i:\b(?:option|choice))\s+\(?([{up}]){_ALONE}",   # option C
    ]
    return {m.group(1) for p in patterns for m in re.finditer(p, text, re.MULTILINE)}


def _normalize(text):
    return " ".join(text.lower().split()).strip(" .;:,")


def _option_texts(text, options, letters):
    said = _normalize(text)
    found = {}
    for letter, option in zip(letters, options):
        norm = _normalize(option)
        if norm and re.search(rf"(?<!\w){re.escape(norm)}(?!\w)", said):
            found[letter] = norm
    # "Metformin" inside a matched "Metformin and insulin" is not a second answer
    kept = [k for k, v in found.items() if not any(v != w and v in w for w in found.values())]
    return kept[0] if len(kept) == 1 else None


def _multiple_choice(text, labels, options):
    letter = _explicit_letter(text, labels)
    if letter == "":
        return None, "several letters"
    if letter:
        return letter, "explicit"
    alone = _standalone_letters(text, labels)
    if len(alone) == 1:
        return alone.pop(), "letter"
    if len(alone) > 1:
        return None, "several letters"
    chosen = _option_texts(text, options, labels)
    return (chosen, "text") if chosen else (None, "no option named")


def _yes_no_maybe(text, labels):
    words = "|".join(re.escape(w) for w in labels)
    word = rf"[*_{_QUOTES}]*(?i:({words}))(?![A-Za-z0-9])"
    said = [m for p in (rf"{_ANSWER}(?:\s*[*_]+)?(?:\s+(?i:{_VERB})\b|\s*[:=\-–—]){_MARK}{word}", rf"{_BOXED}{word}")
            for m in re.finditer(p, text)]
    if said:
        last = max(said, key=lambda m: m.start())
        return (None, "several options") if _hedged(text, last.end(1), labels) else (last.group(1).lower(), "explicit")
    first = re.match(rf"^[\W_]*(?i:({words}))\b", text)
    if first:
        return (None, "several options") if _hedged(text, first.end(1), labels) else (first.group(1).lower(), "leading word")
    last_sentence = re.split(r"(?<=[.!?])\s+", text.strip())[-1]
    closing = re.search(rf"(?:[,;:]|\b{_CONCLUSION}\b,?)\s+{word}[*_{_QUOTES}]*[.!]?[*_]*$", last_sentence)
    named = {w.lower() for w in re.findall(rf"(?i)(?<![A-Za-z])(?:{words})(?![A-Za-z])", last_sentence)}
    if closing and len(named) == 1:
        return closing.group(1).lower(), "closing word"
    return None, "no option named"


def extract(response, labels, options):
    """(label chosen, rule that found it) or (None, why not). `labels` are letters (A, B, ...) or the
    answer words themselves (yes, no, maybe); `options` are the option texts in the same order."""
    text = final_answer(response)
    if text is None:
        return None, "reasoning not closed"
    if not text:
        return None, "no final answer"
    headed = list(ANSWER_HEADING.finditer(text))
    parts = [text[headed[-1].end():], text] if headed else [text]
    for part in parts:  # the part after the last answer heading first, then the whole final answer
        if all(len(label) == 1 for label in labels):
            chosen, how = _multiple_choice(part, labels, options)
        else:
            chosen, how = _yes_no_maybe(part, labels)
        if chosen or how.startswith("several"):
            return chosen, how
    return chosen, how
