"""Math answer accuracy: 1.0 when the completion's final answer equals the reference answer.

Answers are compared as exact rational numbers, so ``72``, ``72.00``, ``$72``, ``1,234`` /
``1234``, ``0.5`` / ``1/2`` / ``\\frac{1}{2}`` compare as you would expect. Non-numeric answers
are compared as normalised strings (case, spaces, ``$`` and a trailing period ignored).

Which part of a completion is its answer, in order of preference:
1. the last ``\\boxed{...}`` (balanced braces);
2. the text after the last ``####`` (GSM8K's marker);
3. the first number after the last "answer is" / "answer:" (any case);
4. the last number anywhere in the text.
The reference answer (column ``answer`` or ``solution``) is its last ``\\boxed{}``, else the text
after ``####``, else the whole text, so GSM8K's ``"... #### 72"``, MATH's
``"... \\boxed{\\frac{1}{2}}"`` and a bare ``"72"`` work as they come.
"""

from __future__ import annotations

import re
from fractions import Fraction

from lit_posttrain.rewards.text import completion_text

# a number: optional sign and currency, thousands groups "1,234,567" or plain digits, decimals
_NUM = r"[-+−]?\$?\s?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_FRAC = r"[-+−]?\\[dt]?frac\{\s*(" + _NUM + r")\s*\}\{\s*(" + _NUM + r")\s*\}"
_NUMBER_RE = re.compile(rf"{_FRAC}|({_NUM})(?:\s*/\s*({_NUM}))?")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)


def accuracy_reward(prompts, completions, answer=None, solution=None, **kwargs) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference, else 0.0.

    Args:
        completions: strings, or message lists (the assistant's content is read).
        answer / solution: the reference answer per sample (dataset column; ``answer`` is used when
            both are present).
    Returns:
        per sample 1.0 / 0.0, or None where the reference is empty or None (the reward does not
        apply to that sample).
    """
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError("accuracy_reward needs an 'answer' or 'solution' column in the dataset")
    rewards: list[float | None] = []
    for completion, reference in zip(completions, references, strict=True):
        gold = extract_reference(str(reference)) if reference is not None else None
        if gold is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion_text(completion))
        rewards.append(float(predicted is not None and answers_equal(predicted, gold)))
    return rewards


def extract_reference(text: str) -> str | None:
    """The reference answer in a dataset's answer column: its last ``\\boxed{}``, else the text after
    ``####``, else the whole text (datasets usually store the bare answer)."""
    text = _clean_latex(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip() or None
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip() or None


def extract_answer(text: str) -> str | None:
    """The final-answer part of ``text`` (see the module docstring), or None when there is none."""
    text = _clean_latex(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    matches = list(_ANSWER_IS_RE.finditer(text))
    if matches:
        after = text[matches[-1].end() :]
        number = _NUMBER_RE.search(after)
        if number:
            return number.group(0)
    numbers = list(_NUMBER_RE.finditer(text))
    return numbers[-1].group(0) if numbers else None


def parse_number(text: str) -> Fraction | None:
    """The value of the first number in ``text`` as an exact fraction (None when there is none).

    Handles signs, ``$``, thousands separators, decimals, ``a/b`` and ``\\frac{a}{b}``; LaTeX
    spacing (``\\!``, ``\\,``, ``{,}``) is removed first.
    """
    match = _NUMBER_RE.search(_clean_latex(text))
    if match is None:
        return None
    if match.group(1) is not None:  # \frac{a}{b}
        sign = -1 if match.group(0).lstrip().startswith(("-", "−")) else 1
        numerator, denominator = _to_fraction(match.group(1)), _to_fraction(match.group(2))
        return None if denominator == 0 else sign * numerator / denominator
    value = _to_fraction(match.group(3))
    if match.group(4) is not None:  # a/b
        denominator = _to_fraction(match.group(4))
        return None if denominator == 0 else value / denominator
    return value


def answers_equal(predicted: str, reference: str) -> bool:
    """Numbers compare by exact value; anything else by normalised text."""
    reference_value = parse_number(reference)
    if reference_value is not None and _is_numeric(reference):
        value = parse_number(predicted)
        return value is not None and value == reference_value
    return _normalise(predicted) == _normalise(reference)


def _to_fraction(text: str) -> Fraction:
    text = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    return Fraction(text)


def _is_numeric(text: str) -> bool:
    """True when ``text`` is one number, possibly followed by a unit word, ``%`` or a period."""
    text = re.sub(r"\\text\{[^}]*\}", "", _clean_latex(text)).strip().rstrip(".")
    text = re.sub(r"\s*(%|[a-zA-Z]+)$", "", text)
    return bool(_NUMBER_RE.fullmatch(text.strip()))


def _clean_latex(text: str) -> str:
    """Drop LaTeX spacing and escapes that split numbers: ``\\!``, ``\\,``, ``{,}``, ``\\%``, ``\\$``."""
    return (
        text.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\\%", "%").replace("\\$", "$")
    )


def _normalise(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    return re.sub(r"\s+", "", text.replace("$", "")).rstrip(".").lower()


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), honouring nested braces."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None
