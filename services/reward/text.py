"""Text helpers shared by rule scorers: extraction of the part scored, and normalisation."""

from __future__ import annotations

import string
from dataclasses import dataclass

import re2

_FENCE = re2.compile(r"```[^\n`]*\n((?s:.*?))```")
_SPACE = re2.compile(r"\s+")
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class TextNorm:
    strip: bool = True
    lowercase: bool = False
    collapse_whitespace: bool = True
    remove_punctuation: bool = False


def normalize(text: str, norm: TextNorm) -> str:
    """Apply `norm` to `text`.

    >>> normalize("  The  Cat.\\n", TextNorm(lowercase=True, remove_punctuation=True))
    'the cat'
    """
    if norm.remove_punctuation:
        text = text.translate(_PUNCT)
    if norm.lowercase:
        text = text.lower()
    if norm.collapse_whitespace:
        text = _SPACE.sub(" ", text)
    return text.strip() if norm.strip else text


def last_tag(text: str, tag: str) -> str | None:
    """Contents of the last <tag>...</tag>, or None.

    >>> last_tag("<answer>1</answer> x <answer>2</answer>", "answer")
    '2'
    >>> last_tag("<answer>1", "answer") is None
    True
    """
    close = f"</{tag}>"
    end = text.rfind(close)
    if end < 0:
        return None
    start = text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : end]


def last_code_block(text: str) -> str | None:
    """Contents of the last ``` fenced block, or None.

    >>> last_code_block("x\\n```python\\nprint(1)\\n```\\n")
    'print(1)\\n'
    """
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def extract(text: str, tag: str = "", code_block: bool = False) -> str | None:
    """The part of `text` a rule looks at; None when the requested part is missing."""
    if tag:
        found = last_tag(text, tag)
        if found is None:
            return None
        text = found
    if code_block:
        return last_code_block(text)
    return text
