"""Extractive question answering: the official SQuAD v1.1 exact match and F1, and span decoding.

Scores follow the official SQuAD v1.1 evaluation script: an answer is normalized by lower-casing, removing
ASCII punctuation (``string.punctuation``), removing the articles a/an/the as whole words and collapsing
whitespace; exact match is 1 when the normalized prediction equals a normalized gold answer; F1 is the
harmonic mean of token precision and recall over the bag of normalized tokens; each question takes the best
over its gold answers; the totals are means in percent. Span decoding is exact: the highest
``start_logit[i] + end_logit[j]`` over context tokens ``i <= j < i + max_answer_length``, best over the
windows of a question. numpy and the standard library only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (as the official script).

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 over normalized tokens; 0 when no token is shared (an empty side included).

    >>> round(token_f1("the cat sat", "a cat sat down"), 4)  # P = 2/2, R = 2/3
    0.8
    """
    pred, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent: per question the best over its gold answers, then the mean."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        return {"exact_match": float("nan"), "f1": float("nan")}
    em = [max(exact_match(p, g) for g in gold) for p, gold in zip(predictions, golds)]
    f1 = [max(token_f1(p, g) for g in gold) for p, gold in zip(predictions, golds)]
    return {"exact_match": 100.0 * sum(em) / len(em), "f1": 100.0 * sum(f1) / len(f1)}


def best_spans(start_logits: np.ndarray, end_logits: np.ndarray, context: np.ndarray, max_answer_length: int,
               n_best: int = 20) -> list[tuple[float, int, int]]:
    """The ``n_best`` highest-scoring spans ``(score, i, j)`` of one window, best first.

    Args:
        start_logits, end_logits: ``(L,)`` logits of the window's tokens.
        context: ``(L,)`` bool, True on the tokens of the context (spans may start and end only there).
        max_answer_length: the most tokens a span may have (``j - i + 1``).

    A span is ``context[i] and context[j] and i <= j < i + max_answer_length``; its score is
    ``start_logits[i] + end_logits[j]``. Ties keep the lower ``(i, j)`` first.
    """
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    keep = np.asarray(context, dtype=bool)
    n = len(keep)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    valid = keep[:, None] & keep[None, :] & (j >= i) & (j - i < max_answer_length)  # (L, L)
    if not valid.any():
        return []
    scores = np.where(valid, start[:n, None] + end[None, :n], -np.inf).ravel()
    order = np.argsort(-scores, kind="stable")[:min(n_best, int(valid.sum()))]
    return [(float(scores[k]), int(k // n), int(k % n)) for k in order]
