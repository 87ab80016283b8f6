"""Synthetic shapes VQA data and its tokenizer, for the from-scratch demo model."""

from minillava.shapes.data import (
    COLORS,
    POSITIONS,
    QA,
    QTYPES,
    SHAPES,
    EvalQuestion,
    answers_match,
    conversation,
    generate_dataset,
    iter_questions,
    make_sample,
    normalize_answer,
    sample_rng,
)

__all__ = [
    "COLORS",
    "POSITIONS",
    "QA",
    "QTYPES",
    "SHAPES",
    "EvalQuestion",
    "answers_match",
    "conversation",
    "generate_dataset",
    "iter_questions",
    "make_sample",
    "normalize_answer",
    "sample_rng",
]
