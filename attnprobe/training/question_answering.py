"""``refine --task question-answering``: extractive question answering on SQuAD-layout data.

Data: JSON lines, Parquet or a ``save_to_disk`` folder in the Hugging Face ``squad`` layout (``id``,
``context``, ``question``, ``answers`` with ``text`` and ``answer_start`` lists), or SQuAD's own JSON file
(``data[].paragraphs[].qas[]``). A missing ``answer_start`` is the first occurrence of the answer's text in
the context; an answer that is not in its context is an error.

Windows: question and context are tokenized together (fast tokenizers only), the context truncated
(``truncation="only_second"``) into windows of ``--max-length`` tokens that overlap by ``--doc-stride``
tokens (``return_overflowing_tokens``, ``stride``). The tokens' character offsets
(``return_offsets_mapping``) map the first gold answer to start and end token positions in every window
that holds it whole; the other windows point at the first token (``[CLS]``), as in BERT's SQuAD recipe.
Evaluation decodes each window exactly (qa_scores.best_spans, ``--max-answer-length``), keeps the best span
over a question's windows, and scores it with SQuAD v1.1 exact match and F1 (qa_scores.squad_scores).
The diagnostics ride the Trainer's evaluation pass, so they are over the eval windows (question + context).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from attnprobe.errors import AttnprobeError
from attnprobe.data import readers, sources
from attnprobe.training import classification, qa_scores
from attnprobe.training.tasks import Built, Task

N_BEST = 20  # spans kept per window before the best over windows is chosen


@dataclass
class QAData:
    """Questions with their context and gold answers; ``starts[i][k]`` is answer k's character offset."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[str]]
    starts: list[list[int]]
    stats: dict
    label_names: list[str] = field(default_factory=list)

    def subset(self, index: list[int], stats: dict) -> QAData:
        index = sorted(index)
        return QAData(*([getattr(self, k)[i] for i in index] for k in ("ids", "questions", "contexts", "answers",
                                                                          "starts")),
                      {**stats, "questions_used": len(index)})


# ---- reading ---------------------------------------------------------------------------------------


def _squad_json(name: str, obj: Any) -> list[dict]:
    """Rows of SQuAD's own JSON (``data[].paragraphs[].qas[]``), or of a JSON list of row objects."""
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise AttnprobeError(f"{name} is neither SQuAD's JSON (a 'data' list of articles) nor a JSON list of rows")
    rows = []
    for article in obj["data"]:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers") or []
                rows.append({"id": qa.get("id"), "context": paragraph.get("context"), "question": qa.get("question"),
                             "answers": {"text": [a.get("text") for a in answers],
                                         "answer_start": [a.get("answer_start") for a in answers]}})
    return rows


def _answers(name: str, where: str, value: Any) -> tuple[list[str], list[int | None]]:
    if isinstance(value, list):  # [{"text", "answer_start"}, ...]
        value = {"text": [a.get("text") if isinstance(a, dict) else a for a in value],
                 "answer_start": [a.get("answer_start") if isinstance(a, dict) else None for a in value]}
    if not isinstance(value, dict) or not isinstance(value.get("text"), list):
        raise AttnprobeError(f"{name} {where}: 'answers' must hold a 'text' list (and 'answer_start'), "
                             f"got {str(value)[:80]!r}")
    texts = [str(t) for t in value["text"] if t is not None and str(t).strip()]
    starts = list(value.get("answer_start") or [])
    starts += [None] * (len(texts) - len(starts))
    return texts, [None if s is None or (isinstance(s, int) and s < 0) else int(s) for s in starts[:len(texts)]]


def read_qa(path: str, encoding: str = "utf-8") -> QAData:
    """Read SQuAD-layout questions; derive missing ``answer_start`` and check every answer is in its context."""
    name = str(path)
    if Path(path).suffix.lower() == ".json" and Path(path).is_file():
        try:
            obj = json.loads(Path(path).read_text(encoding=encoding))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AttnprobeError(f"{name} is not valid JSON ({str(exc).splitlines()[0]})") from None
        rows = _squad_json(name, obj)
        stats = {"name": name, "path": name, "format": "json", "rows_read": len(rows),
                 "sha256": readers.file_sha256(name)}
        columns = sorted({k for r in rows if isinstance(r, dict) for k in r})
    else:
        columns, rows, stats = sources.read_rows(path, encoding=encoding)
    missing = [c for c in ("context", "question", "answers") if c not in columns]
    if missing:
        raise AttnprobeError(f"{name} has no column {missing[0]!r} (columns found: {', '.join(columns)}); question "
                             "answering reads the squad layout: id, context, question, answers")
    data = QAData([], [], [], [], [], stats)
    derived = 0
    for n, row in enumerate(rows):
        where = f"row {n + 1}" + (f" (id {row.get('id')})" if row.get("id") is not None else "")
        context, question = row.get("context"), row.get("question")
        if not isinstance(context, str) or not context.strip() or not isinstance(question, str) or not question.strip():
            raise AttnprobeError(f"{name} {where} has an empty context or question")
        texts, starts = _answers(name, where, row.get("answers"))
        if not texts:
            raise AttnprobeError(f"{name} {where} has no answer; unanswerable questions (SQuAD 2.0) are not supported")
        for k, (text, start) in enumerate(zip(texts, starts)):
            if start is None or context[start:start + len(text)] != text:
                found = context.find(text)
                if found < 0:
                    raise AttnprobeError(f"{name} {where}: the answer {text[:60]!r} is not in its context")
                starts[k], derived = found, derived + 1
        data.ids.append(str(row.get("id")) if row.get("id") is not None else str(n))
        data.questions.append(question.strip())
        data.contexts.append(context)
        data.answers.append(texts)
        data.starts.append(starts)
    if not data.ids:
        raise AttnprobeError(f"{name} holds no questions")
    stats.update(questions=len(data.ids), answer_start_derived=derived)
    return data


def prepare_data(cfg) -> tuple[QAData, QAData]:
    """Train and eval questions: the files, or a seeded ``--eval-split`` hold-out; seeded samples."""
    train = read_qa(cfg.train, cfg.encoding)
    evaluation = read_qa(cfg.eval, cfg.encoding) if cfg.eval is not None else None
    train_index, eval_all, eval_index, eval_stats = classification.choose_rows(
        cfg, random.Random(cfg.seed), train, len(train.ids), evaluation,
        0 if evaluation is None else len(evaluation.ids), "questions")
    return (train.subset(train_index, {**train.stats, "source": "file"}), eval_all.subset(eval_index, eval_stats))


# ---- windows ----------------------------------------------------------------------------------------


def token_span(offsets: list[tuple[int, int] | None], start_char: int, end_char: int) -> tuple[int, int] | None:
    """Token positions ``(s, e)`` of the characters ``[start_char, end_char)`` in one window, or None when the
    window's context tokens (``offsets`` not None) do not hold the whole answer."""
    context = [k for k, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return None
    s = next(k for k in reversed(context) if offsets[k][0] <= start_char)
    e = next(k for k in context if offsets[k][1] >= end_char)
    return s, e


def windows(tokenizer, data: QAData, max_length: int, doc_stride: int) -> tuple[list[dict], list[int], list]:
    """The windows of every question: ``(features, question index per window, context offsets per window)``.

    A feature holds the model inputs and ``start_positions`` / ``end_positions`` of the first gold answer
    (the first token where this window does not hold it whole). Offsets are ``(start, end)`` characters in
    the context, None for tokens outside it (question, special tokens).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise AttnprobeError("question answering needs a fast tokenizer (character offsets); use a model whose "
                             "tokenizer has a tokenizer.json")
    try:
        enc = tokenizer(data.questions, data.contexts, truncation="only_second", max_length=max_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
    except Exception as exc:  # the tokenizers library: a question longer than the window, a stride too large
        raise AttnprobeError(f"cannot split the contexts into windows of --max-length {max_length} with --doc-stride "
                             f"{doc_stride} ({str(exc).splitlines()[0][:120]}); raise --max-length or lower "
                             "--doc-stride") from None
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    features, owners, offsets = [], [], []
    for w, owner in enumerate(enc["overflow_to_sample_mapping"]):
        ids = enc.sequence_ids(w)
        window = [tuple(o) if ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][w])]
        cls = enc["input_ids"][w].index(tokenizer.cls_token_id) if tokenizer.cls_token_id in enc["input_ids"][w] else 0
        start = data.starts[owner][0]
        span = token_span(window, start, start + len(data.answers[owner][0])) or (cls, cls)
        features.append({**{k: enc[k][w] for k in keys}, "start_positions": span[0], "end_positions": span[1]})
        owners.append(int(owner))
        offsets.append(window)
    return features, owners, offsets


def decode(start_logits: np.ndarray, end_logits: np.ndarray, owners: list[int], offsets: list, contexts: list[str],
           max_answer_length: int, n_best: int = N_BEST) -> list[str]:
    """The best answer text per question: the highest-scoring span over all its windows ("" if none)."""
    best: dict[int, tuple[float, str]] = {}
    for w, owner in enumerate(owners):
        window = offsets[w]
        context = np.array([o is not None for o in window])
        spans = qa_scores.best_spans(start_logits[w][:len(window)], end_logits[w][:len(window)], context,
                                     max_answer_length, n_best)
        if spans and (owner not in best or spans[0][0] > best[owner][0]):
            score, i, j = spans[0]
            best[owner] = (score, contexts[owner][window[i][0]:window[j][1]])
    return [best[q][1] if q in best else "" for q in range(len(contexts))]


class QAMetrics:
    """``compute_metrics`` for question answering: decodes the eval windows and scores exact match and F1."""

    def __init__(self, data: QAData, owners: list[int], offsets: list, max_answer_length: int):
        self.data, self.owners, self.offsets = data, owners, offsets
        self.max_answer_length = max_answer_length
        self.last_logits: tuple[np.ndarray, np.ndarray] | None = None
        self.last_answers: list[str] | None = None

    def __call__(self, prediction) -> dict[str, float]:
        start, end = prediction.predictions[:2]
        self.last_logits = (np.asarray(start), np.asarray(end))
        self.last_answers = decode(*self.last_logits, self.owners, self.offsets, self.data.contexts,
                                   self.max_answer_length)
        return qa_scores.squad_scores(self.last_answers, self.data.answers)

    def predictions(self) -> list[dict[str, Any]] | None:
        if self.last_answers is None:
            return None
        return [{"id": i, "prediction": a} for i, a in zip(self.data.ids, self.last_answers)]


def build(tokenizer, train_data: QAData, eval_data: QAData, max_length: int, cfg) -> Built:
    from transformers import DataCollatorWithPadding

    from attnprobe.training.trainer import EncodedExamples

    train_features, _, _ = windows(tokenizer, train_data, max_length, cfg.doc_stride)
    eval_features, owners, offsets = windows(tokenizer, eval_data, max_length, cfg.doc_stride)
    train_data.stats["windows"], eval_data.stats["windows"] = len(train_features), len(eval_features)
    return Built(EncodedExamples(train_features), EncodedExamples(eval_features), DataCollatorWithPadding(tokenizer),
                 QAMetrics(eval_data, owners, offsets, cfg.max_answer_length))


TASK = Task(name="question-answering", scores=("exact_match", "f1"), prepare_data=prepare_data, build=build,
            scan_texts=lambda d: (d.questions, d.contexts), predictions=True)
