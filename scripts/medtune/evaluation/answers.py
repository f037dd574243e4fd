"""Read the chosen option out of a model's response, and check the response's format.

Only the final answer counts: the text after the last </think>, or the whole response when the
model wrote no reasoning block. A response whose reasoning block never closes (usually cut off by
the token limit) has no final answer, so letters inside the reasoning are never read. Nothing is
guessed: a final answer that names no option, or several without saying which one it chooses, is
unparseable and counted as such.

Multiple choice (labels A, B, C, D), the first rule that finds something decides:
1. explicit: "Answer: C", "The correct answer is (C).", "final answer - c", "answer is option C",
   "the best option is C", "C is correct". Of several, the last one is the model's final word.
2. letter: option letters standing alone, "(C)", "C." / "C)" / "C:" opening a line, "**C**",
   "option C", a letter alone on a line; upper case only, as a lone "a" is an article. Used when
   they name exactly one option.
3. text: the final answer contains exactly one option's text (a text found only inside a longer
   matching option's text does not count).
Yes/no/maybe (labels are the words): "Answer: yes", or a final answer that starts with the word.
"""
import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_VERB = r"(?:is|would\s+be|will\s+be|should\s+be|must\s+be|here\s+is)"
_MARK = r"[\s*_:=\-–—]*"  # separators and markdown between "answer" and the letter
# A letter that ends there: not "D-dimer", "B12", nor "C. difficile" / "E. coli" (a lower-case word after the dot).
_ALONE = r"(?![A-Za-z0-9\-'’])(?!\.\s*[a-z])"


def final_answer(response):
    """The part of a response that holds the final answer; None when the reasoning never closes."""
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1].strip()
    if THINK_OPEN in response:
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
    """A letter label: upper case before a non-letter, or lower case only where it ends the phrase
    ("answer: c", "answer is (b)"), so that "the answer is a beta-blocker" is not option A."""
    up, low = "".join(letters), "".join(letters).lower()
    return rf"(?:([{up}]){_ALONE}|([{low}])(?=\s*$|[.)\]:,;!*]))"


def _explicit_letter(text, letters):
    letter = _letter(letters)
    patterns = [
        # "Answer: C", "The correct answer is (C)", "answer would be option c"
        rf"(?i:\banswer\b)(?:\s*\*+)?(?:\s+(?i:{_VERB})\b(?:\s+\w+ly\b)?|\s*[:=\-–—]){_MARK}"
        rf"(?:(?i:option|choice|letter)\s*)?[(\[]?\s*{letter}",
        # "the best option is C", "The correct choice is (B)"
        rf"(?i:\b(?:option|choice)\s+{_VERB})\b{_MARK}[(\[]?\s*{letter}",
        # "C is correct", "(B) is the correct answer"
        rf"[(\[]?\b([{''.join(letters)}])\b[)\]]?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best)\b)",
    ]
    found = []
    for p in patterns:
        for m in re.finditer(p, text, re.MULTILINE):
            found.append((m.start(), next(g for g in m.groups() if g).upper()))
    return max(found)[1] if found else None


def _standalone_letters(text, letters):
    up = "".join(letters)
    patterns = [
        rf"\(([{up}])\)",                                     # (C)
        rf"^\s*[*_]*([{up}]){_ALONE}[*_]*\s*(?:[.):]|$)",    # "C." / "C)" / "C:" / "C" opening a line
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


def extract(response, labels, options):
    """(label chosen, rule that found it) or (None, why not). `labels` are letters (A, B, ...) or the
    answer words themselves (yes, no, maybe); `options` are the option texts in the same order."""
    text = final_answer(response)
    if text is None:
        return None, "reasoning not closed"
    if not text:
        return None, "no final answer"
    if all(len(label) == 1 for label in labels):
        letter = _explicit_letter(text, labels)
        if letter:
            return letter, "explicit"
        alone = _standalone_letters(text, labels)
        if len(alone) == 1:
            return alone.pop(), "letter"
        if len(alone) > 1:
            return None, "several letters"
        chosen = _option_texts(text, options, labels)
        return (chosen, "text") if chosen else (None, "no option named")
    words = "|".join(re.escape(w) for w in labels)
    said = [m.group(1).lower() for m in re.finditer(
        rf"(?i:\banswer\b)(?:\s*\*+)?(?:\s+(?i:{_VERB})\b|\s*[:=\-–—]){_MARK}(?i:({words}))\b", text)]
    if said:
        return said[-1], "explicit"
    first = re.match(rf"^[\W_]*(?i:({words}))\b", text)
    return (first.group(1).lower(), "leading word") if first else (None, "no option named")
