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
    # final-answer styles of reasoning models and of the graders that read them
    (R + "Final Answer: The final answer is C. I hope it is correct.", "C", "explicit"),  # lm-eval (Minerva)
    (R + "__Answer__: B", "B", "explicit"),  # lm-eval's aaii regex: [*_]{0,2}Answer[*_]{0,2}\s*:
    (R + "*Answer*: **D**", "D", "explicit"),
    (R + "The answer is $\\boxed{C}$.", "C", "explicit"),  # LaTeX boxes
    (R + "\\boxed{B}", "B", "explicit"),
    (R + "Final answer: \\(\\boxed{\\text{C}}\\)", "C", "explicit"),
    (R + "$$\\boxed{\\text{D. Warfarin}}$$", "D", "explicit"),
    (R + 'The answer is "D".', "D", "explicit"),  # quoted letters
    (R + "The correct answer is 'B'.", "B", "explicit"),
    (R + "Answer: \u201cC\u201d", "C", "explicit"),
    (R + "Therefore, B.", "B", "explicit"),  # conclusions
    (R + "Aspirin alone is not enough before PCI. Thus (C).", "C", "explicit"),
    (R + "Hence, the best choice: C.", "C", "explicit"),
    (R + "I would choose C, aspirin with clopidogrel.", "C", "explicit"),
    (R + "I'd go with option B.", "B", "explicit"),
    (R + "Correct option: D", "D", "explicit"),
    (R + "## Final Answer\n\n**C. Aspirin and clopidogrel**", "C", "letter"),  # markdown headings
    (R + "### Answer\nB", "B", "letter"),
    (R + "Neither A nor D fits.\n\n## Final Answer\nC", "C", "letter"),  # what follows the heading decides
    (R + "**Final Answer:**\n\nClopidogrel", "B", "text"),
    (R + "The answer is C.\n\n## Final Answer\nSee above.", "C", "explicit"),  # nothing under it: all of it
    ("## Thinking\n\nA is tempting, but B fits.\n\n## Final Response\n\nThe answer is C.", "C", "explicit"),  # HuatuoGPT-o1
    ("## Thinking\n\nA is tempting, but B fits.\n\n## Final Response\n\nC", "C", "letter"),
    (R + "The most appropriate choice here is (C).", "C", "explicit"),
    (R + "The presentation corresponds to (C).", "C", "letter"),  # HuatuoGPT-o1's non-strict styles
    (R + "Option C: Aspirin and clopidogrel.", "C", "letter"),
    (R + "#### C", "C", "letter"),
    # unparseable: never guessed
    (R + "Answer: A or B", None, "several letters"),  # a hedge names two options
    (R + "The answer is A/C.", None, "several letters"),
    (R + "Answer: B, C", None, "several letters"),
    (R + "\\boxed{A} or \\boxed{B}", None, "several letters"),
    (R + "Answer: (A) and (C)", None, "several letters"),
    (R + "Vitamin B12 and hepatitis B serology first.", None, "no option named"),
    (R + "So A is wrong, and B is wrong too.", None, "no option named"),
    (R + "Thus, a beta-blocker.", None, "no option named"),
    (R + "Therefore, C. difficile toxin must be tested.", None, "no option named"),
    ("## Thinking\n\nThe answer is probably A but the reasoning was cut", None, "reasoning not closed"),
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
    (R + "The evidence is mixed, so maybe.", "maybe", "closing word"),  # PubMedQA: the word ends the answer
    (R + "Therefore, yes.", "yes", "closing word"),
    (R + "The trial was underpowered. In conclusion, no.", "no", "closing word"),
    (R + "Based on the cohort data, the answer is yes.", "yes", "explicit"),
    (R + "Final Answer: The final answer is yes. I hope it is correct.", "yes", "explicit"),
    (R + "$\\boxed{no}$", "no", "explicit"),
    (R + 'Answer: "Yes"', "yes", "explicit"),
    (R + "## Final Answer\n\n**Maybe**", "maybe", "leading word"),
    ("## Thinking\n\nyes\n\n## Final Response\n\nNo.", "no", "leading word"),
    (R + "Answer: yes or no, depending on the dose.", None, "several options"),
    (R + "Yes or no cannot be decided from this abstract.", None, "several options"),
    (R + "It could be yes, no, or maybe.", None, "no option named"),
    (R + "The evidence is mixed, so yes and no.", None, "no option named"),
    (R + "Whether the drug helps is unknown.", None, "no option named"),
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
    ("## Thinking\n\nA or B.\n\n## Final Response\n\nAnswer: B", "Answer: B", False),  # HuatuoGPT-o1's format
    ("## Thinking\n\ncut off", None, False),
])
def test_final_answer_and_format(response, final, ok):
    assert final_answer(response) == final
    assert reasoning_block_ok(response) is ok
