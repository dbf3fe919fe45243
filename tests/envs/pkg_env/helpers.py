"""What ``pkg_env.env`` imports relatively (``from .helpers import ...``): its questions and its score."""

from __future__ import annotations

import re

QUESTIONS = (
    "What colour is the sky on a clear day?",
    "What is frozen water called?",
    "Which animal says moo?",
    "What is the opposite of hot?",
    "Which season comes after winter?",
    "What do bees make?",
)
INSTRUCTION = "Answer in exactly one word."
WORD = re.compile(r"[A-Za-z0-9']+")


def question(index: int) -> str:
    """The ``index``-th question of a repeating stream, with the one-word instruction."""
    return f"{QUESTIONS[index % len(QUESTIONS)]} {INSTRUCTION}"


def one_word_score(reply: str) -> float:
    """1.0 when ``reply`` holds exactly one word (punctuation ignored), else 0.0."""
    return 1.0 if len(WORD.findall(reply)) == 1 else 0.0
