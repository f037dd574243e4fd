"""Answer extraction, table-driven: what a response says it chooses, or None when it does not say."""
import pytest

from medtune.evaluation.answers import extract, final_answer, reasoning_block_ok

LETTERS = ("A", "B", "C", "D")
OPTIONS = ("Aspirin", "Clopidogrel", "Aspirin and clopidogrel", "Warfarin")
WORDS = ("yes", "no", "maybe")
R = "<think>Inferior STEMI; dual antiplatelet therapy is indicated before PCI.</think>\n"

MULTIPLE_CHOICE = [
    (R + "Answer: C", "C", "explicit"),
    (R + "The correct answer is C. Aspirin with clopidogrel before primary PCI.", "C", "explicit"),
    (R + "(C)", "C", "letter"),
    (R + "answer: c", "C", "explicit"),
    ("Answer: B", "B", "explicit"),  # no reasoning block: the whole response is the final answer
    (R + "**Answer:** D", "D", "explicit"),
    (R + "Final answer - b", "B", "explicit"),
    (R + "The answer is (A).", "A", "explicit"),
    (R + "The answer would be option d", "D", "explicit"),
    (R + "The best option is D.", "D", "explicit"),
    (R + "The correct choice is (B) because it is safer.", "B", "explicit"),
    (R + "A is wrong because it is not enough alone; C is correct.", "C", "explicit"),
    (R + "Not A and not B: the answer is D.", "D", "explicit"),
    (R + "The correct answer is C, not A.", "C", "explicit"),
    (R + "Answer: B\n\nOn reflection, the answer is C.", "C", "explicit"),  # the last statement wins
    (R + "D-dimer is not needed here. Answer: A", "A", "explicit"),
    (R + "Answer: Clopidogrel", "B", "text"),
    (R + "C) Aspirin and clopidogrel", "C", "letter"),
    (R + "Option B.", "B", "letter"),
    (R + "B", "B", "letter"),
    (R + "**B**, since it is safer.", "B", "letter"),
    (R + "Clopidogrel", "B", "text"),
    (R + "Give aspirin and clopidogrel together.", "C", "text"),  # "Aspirin" inside the longer option
    ("<think>B is right.</think>\nAnswer: A", "A", "explicit"),  # letters in the reasoning are not read
    ("<think>a</think><think>b</think>Answer: A", "A", "explicit"),  # after the last </think>
    # unparseable: never guessed
    (R + "Aspirin or warfarin, depending on bleeding risk.", None, "no option named"),
    (R + "(A) or (C), most likely (C).", None, "several letters"),
    (R + "The answer is a beta-blocker.", None, "no option named"),  # "a" is an article
    (R + "Answer: E", None, "no option named"),  # not one of the options
    (R + "C. difficile colitis explains the diarrhoea.", None, "no option named"),
    (R + "c.", None, "no option named"),  # a lone lower-case letter is not read
    ("<think>A is tempting but B fits better.</think>\nI am not sure.", None, "no option named"),
    ("<think>The answer is B</think>", None, "no final answer"),
    ("<think>The reasoning was cut off here; the answer is probably A", None, "reasoning not closed"),
    ("", None, "no final answer"),
]

YES_NO_MAYBE = [
    (R + "Answer: yes", "yes", "explicit"),
    (R + "**Answer:** Yes", "yes", "explicit"),
    (R + "The answer is Maybe.", "maybe", "explicit"),
    (R + "No. The trial showed no benefit.", "no", "leading word"),
    (R + "Answer: no\nOn reflection, answer: maybe", "maybe", "explicit"),
    (R + "The evidence is mixed, so maybe.", None, "no option named"),
    (R + "Yesterday's data are not enough.", None, "no option named"),
    ("<think>yes</think>\nIt depends on the population.", None, "no option named"),
]


@pytest.mark.parametrize("response, expected, how", MULTIPLE_CHOICE)
def test_multiple_choice(response, expected, how):
    assert extract(response, LETTERS, OPTIONS) == (expected, how)


@pytest.mark.parametrize("response, expected, how", YES_NO_MAYBE)
def test_yes_no_maybe(response, expected, how):
    assert extract(response, WORDS, WORDS) == (expected, how)


@pytest.mark.parametrize("response, final, ok", [
    (R + "Answer: C", "Answer: C", True),
    ("Answer: C", "Answer: C", False),  # no reasoning block
    ("<think>\n</think>\nAnswer: C", "Answer: C", False),  # empty reasoning
    ("<think>reasoning</think>", "", False),  # no final answer
    ("<think>unfinished", None, False),
    ("<think>a</think>b<think>c</think>d", "d", False),  # two blocks
])
def test_final_answer_and_format(response, final, ok):
    assert final_answer(response) == final
    assert reasoning_block_ok(response) is ok
