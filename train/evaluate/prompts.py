"""k-shot prompts: demonstrations that end "The answer is: X", then the question.

A question reads

    Question: <question>            (PubMedQA: "Context: <abstract>" first)
    Options:
    A. <option>  ...                (PubMedQA: no option list)

A demonstration adds "The answer is: X" (with chain of thought, "Explanation: <exp>" before it);
the prompt ends with "The answer is:" (or "Explanation:"), and demonstrations and question are
separated by a blank line. The demonstrations of a seed are the same for every question of a
(sub)task: a sample of the pool drawn by ``random.Random(seed)``.
"""
from __future__ import annotations

import random

from .tasks import Question

ANSWER_PREFIX = "The answer is:"
EXPLANATION_PREFIX = "Explanation:"


def question_block(q: Question) -> str:
    lines = []
    if q.context:
        lines.append(f"Context: {q.context}")
    lines.append(f"Question: {q.question}")
    if q.options:
        lines.append("Options:")
        lines += [f"{label}. {text}" for label, text in zip(q.labels, q.options)]
    return "\n".join(lines) + "\n"


def demonstration(q: Question, chain_of_thought: bool = False) -> str:
    why = f"{EXPLANATION_PREFIX} {q.explanation}\n" if chain_of_thought else ""
    return f"{question_block(q)}{why}{ANSWER_PREFIX} {q.gold}"


def build_prompt(q: Question, demos: list[Question], chain_of_thought: bool = False) -> str:
    """The text the model continues: demonstrations, then ``q`` up to the answer (or explanation)."""
    tail = EXPLANATION_PREFIX if chain_of_thought else ANSWER_PREFIX
    parts = [demonstration(d, chain_of_thought) for d in demos] + [question_block(q) + tail]
    return "\n\n".join(parts)


def continuations(q: Question) -> list[str]:
    """What log-likelihood scoring compares after the prompt: " A", " B", ... or " yes", " no", " maybe"."""
    return [f" {label}" for label in q.labels]


def supports_chain_of_thought(pool: list[Question]) -> bool:
    """Chain-of-thought demonstrations need explanations (MedMCQA, PubMedQA have them)."""
    return any(d.explanation for d in pool)


def choose_demonstrations(pool: list[Question], shots: int, seed: int, chain_of_thought: bool = False,
                          source: str = "the demonstration pool") -> list[Question]:
    """``shots`` demonstrations of ``pool`` for ``seed`` (with chain of thought: among those with an
    explanation). Raises ValueError when the pool is smaller than ``shots``."""
    if chain_of_thought:
        pool = [d for d in pool if d.explanation]
    if shots > len(pool):
        kind = "demonstrations with an explanation" if chain_of_thought else "demonstrations"
        raise ValueError(f"--shots {shots} is larger than the {len(pool)} {kind} in {source}")
    return random.Random(seed).sample(pool, shots)
