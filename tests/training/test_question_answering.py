"""refine --task question-answering: SQuAD exact match and F1 by hand, span decoding against brute force, windows
over long contexts, both data layouts, a tiny run whose scores equal its predictions.jsonl, reloading the
model in plain transformers, errors."""

from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from attnprobe.cli import app
from attnprobe.errors import AttnprobeError
from attnprobe.runtime import outputs
from attnprobe.training import qa_scores
from attnprobe.training.question_answering import QAData, decode, read_qa, token_span, windows
from tests.conftest import bundled_path

WORDS = ("river city music paper garden window yellow morning bridge castle winter doctor summer forest "
         "market silver island teacher engine button").split()
CODES = "apple orange lemon cherry grape melon".split()  # answers: never among the filler WORDS


# ---- scores, by hand -------------------------------------------------------------------------------


def test_normalization_cases():
    assert qa_scores.normalize_answer("The Cat, a dog!") == "cat dog"
    assert qa_scores.normalize_answer("  An  apple\tthe  pie ") == "apple pie"
    assert qa_scores.normalize_answer("another theory") == "another theory"  # articles only as whole words
    assert qa_scores.normalize_answer("don't-stop") == "dontstop"
    assert qa_scores.exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    assert qa_scores.exact_match("Eiffel", "Eiffel tower") == 0.0


def test_f1_and_exact_match_hand_computed():
    # pred tokens {cat, sat, on, mat}, gold {cat, on, mat}: P = 3/4, R = 1
    assert qa_scores.token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert qa_scores.token_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)  # common: red 1, blue 1
    assert qa_scores.token_f1("", "x") == 0.0 and qa_scores.token_f1("x y", "z") == 0.0
    # best over gold answers, then the mean, in percent
    scores = qa_scores.squad_scores(["Denver Broncos", "xyz", "nothing"],
                                    [["Broncos", "Denver Broncos"], ["abc", "xyz w"], ["other"]])
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)  # F1("xyz", "xyz w") = 2 * 1 * 0.5 / 1.5


def test_best_spans_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n = int(rng.integers(3, 40))
        start, end = rng.normal(size=n), rng.normal(size=n)
        context = rng.random(n) < 0.7
        most = int(rng.integers(1, 8))
        pairs = sorted(((start[i] + end[j], i, j) for i in range(n) for j in range(i, min(n, i + most))
                        if context[i] and context[j]), key=lambda p: -p[0])
        found = qa_scores.best_spans(start, end, context, most, n_best=5)
        if not pairs:
            assert found == []
            continue
        assert (found[0][1], found[0][2]) == (pairs[0][1], pairs[0][2])
        np.testing.assert_allclose([f[0] for f in found], [p[0] for p in pairs[:5]])
        assert all(context[i] and context[j] and 0 <= j - i < most for _, i, j in found)


# ---- windows ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_path(), local_files_only=True)


def _context(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_an_answer_across_a_window_boundary_is_found_in_the_window_holding_it(tokenizer):
    context, question = _context(60), "which words?"
    alone = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    probe = QAData(["q"], [question], [context], [["river"]], [[0]], {})
    feats, owners, offsets = windows(tokenizer, probe, max_length=32, doc_stride=8)
    assert owners == [0] * len(feats) and len(feats) > 2
    k = sum(o is not None for o in offsets[0])  # context tokens in the first window
    start_char, end_char = alone[k - 2][0], alone[k][1]  # tokens k-2..k: the last two of window 0 and the next
    answer = context[start_char:end_char]
    data = QAData(["q"], [question], [context], [[answer]], [[start_char]], {})
    feats, owners, offsets = windows(tokenizer, data, max_length=32, doc_stride=8)
    assert (feats[0]["start_positions"], feats[0]["end_positions"]) == (0, 0)  # [CLS]: not whole in window 0
    s, e = feats[1]["start_positions"], feats[1]["end_positions"]
    assert s > 0 and context[offsets[1][s][0]:offsets[1][e][1]] == answer
    assert e - s == 2 and token_span(offsets[0], start_char, end_char) is None
    # the windows overlap by the stride: window 1 starts doc_stride tokens before window 0 ends
    first_of_1 = next(o for o in offsets[1] if o is not None)
    assert first_of_1 == tuple(alone[k - 8])
    # decoding picks the span back out of the window that holds it
    start_logits = np.full((len(feats), 32), -5.0)
    end_logits = np.full((len(feats), 32), -5.0)
    start_logits[1, s], end_logits[1, e] = 5.0, 5.0
    assert decode(start_logits, end_logits, owners, offsets, [context], max_answer_length=10) == [answer]
    assert decode(start_logits, end_logits, owners, offsets, [context], max_answer_length=2) != [answer]


# ---- data ------------------------------------------------------------------------------------------


def toy_questions(n: int, seed: int) -> list[dict]:
    """Contexts of filler words with one 'code is <word>' fact; the question asks for the code."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word = rng.choice(CODES)
        before, after = _context(rng.randint(3, 30), seed * 1000 + i), _context(rng.randint(3, 30), seed * 999 + i)
        context = f"{before}. the code is {word}. {after}."
        rows.append({"id": f"q{seed}-{i}", "title": "toy", "context": context, "question": "what is the code?",
                     "answers": {"text": [word, f"{word}"], "answer_start": [context.index(f"is {word}") + 3] * 2}})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_squad_json(path: Path, rows: list[dict]) -> Path:
    """SQuAD v1.1's own layout, without answer_start (derived on reading)."""
    paragraphs = [{"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                                     "answers": [{"text": t} for t in r["answers"]["text"]]}]}
                  for r in rows]
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "toy", "paragraphs": paragraphs}]}))
    return path


def test_both_layouts_read_alike(tmp_path):
    rows = toy_questions(5, 1)
    a = read_qa(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    b = read_qa(str(write_squad_json(tmp_path / "b.json", rows)))
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    c = read_qa(str(tmp_path / "c.parquet"))
    for d in (a, b, c):
        assert d.ids == [r["id"] for r in rows] and d.contexts == [r["context"] for r in rows]
        assert d.answers == [r["answers"]["text"] for r in rows]
        assert d.starts == [r["answers"]["answer_start"] for r in rows]
        assert all(ctx[s:s + len(t)] == t for ctx, ts, ss in zip(d.contexts, d.answers, d.starts)
                   for t, s in zip(ts, ss))
    assert b.stats["answer_start_derived"] == 10 and a.stats["answer_start_derived"] == 0


def test_bad_questions_fail_with_one_line(tmp_path):
    rows = toy_questions(3, 2)
    rows[1]["answers"] = {"text": ["not in there"], "answer_start": [4]}
    with pytest.raises(AttnprobeError, match=r"row 2 \(id q2-1\): the answer 'not in there' is not in its context"):
        read_qa(str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    with pytest.raises(AttnprobeError, match="has no column 'answers'"):
        read_qa(str(write_jsonl(tmp_path / "cols.jsonl", [{"context": "a", "question": "b"}])))
    with pytest.raises(AttnprobeError, match="unanswerable"):
        read_qa(str(write_jsonl(tmp_path / "none.jsonl", [{"context": "a", "question": "b",
                                                             "answers": {"text": [], "answer_start": []}}])))


# ---- a tiny run ------------------------------------------------------------------------------------


def official_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> tuple[float, float]:
    """The SQuAD v1.1 evaluation script's arithmetic, written out again as the reference."""
    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    def f1(p, g):
        p, g = norm(p).split(), norm(g).split()
        same = sum((Counter(p) & Counter(g)).values())
        return 0.0 if same == 0 else 2 * (same / len(p)) * (same / len(g)) / (same / len(p) + same / len(g))

    em = [max(float(norm(predictions[q]) == norm(g)) for g in gs) for q, gs in golds.items()]
    f = [max(f1(predictions[q], g) for g in gs) for q, gs in golds.items()]
    return 100 * sum(em) / len(em), 100 * sum(f) / len(f)


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("qa")
    train = write_jsonl(root / "train.jsonl", toy_questions(48, 3))
    dev = write_squad_json(root / "dev.json", toy_questions(12, 4))
    out = root / "run"
    res = CliRunner().invoke(app, ["refine", str(tiny_bert), "--task", "question-answering", "--train", str(train),
                                   "--eval", str(dev), "--variant", "bp-high", "--epochs", "2", "--batch-size", "8",
                                   "--lr", "5e-3", "--max-length", "40", "--doc-stride", "8", "--max-answer-length",
                                   "5", "--device", "cpu", "--seed", "0", "--out", str(out), "--no-checkpoints"])
    assert res.exit_code == 0, res.output
    return {"out": out, "dev": dev, "root": root}


@pytest.mark.slow
def test_run_scores_equal_its_predictions(qa_run):
    out = qa_run["out"]
    meta = outputs.read_run_json(out)
    history = pd.read_parquet(out / outputs.HISTORY)
    assert list(history.columns) == ["epoch", "step", "train_loss", "eval_loss", "exact_match", "f1"]
    assert meta["task"] == "question-answering" and meta["diagnostics_from"] == "evaluation"
    assert meta["data"]["eval"]["windows"] > 12  # long contexts were split
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    gold = read_qa(str(qa_run["dev"]))
    assert [p["id"] for p in preds] == gold.ids
    em, f1 = official_scores({p["id"]: p["prediction"] for p in preds}, dict(zip(gold.ids, gold.answers)))
    assert history["exact_match"].iloc[-1] == pytest.approx(em) == meta["final"]["exact_match"]
    assert history["f1"].iloc[-1] == pytest.approx(f1) == meta["final"]["f1"]
    assert all(p["prediction"] in ctx for p, ctx in zip(preds, gold.contexts))
    diag = pd.read_parquet(out / outputs.DIAGNOSTICS)
    assert sorted(diag["epoch"].unique()) == [0.0, 1.0, 2.0] and diag["bp_shift"].notna().all()


@pytest.mark.slow
def test_model_reloads_with_saobp_in_plain_transformers(qa_run, tokenizer):
    out = qa_run["out"]
    gold = read_qa(str(qa_run["dev"]))
    code = (
        "import json, sys, torch, attnprobe\n"
        "from transformers import AutoModelForQuestionAnswering, AutoTokenizer\n"
        "from attnprobe.training.question_answering import read_qa, windows, decode\n"
        "m = AutoModelForQuestionAnswering.from_pretrained(sys.argv[1]).eval()\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "data = read_qa(sys.argv[2])\n"
        "feats, owners, offsets = windows(tok, data, 40, 8)\n"
        "keys = ('input_ids', 'token_type_ids', 'attention_mask')\n"
        "batch = tok.pad([{k: f[k] for k in keys} for f in feats], return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    o = m(**batch)\n"
        "answers = decode(o.start_logits.numpy(), o.end_logits.numpy(), owners, offsets, data.contexts, 5)\n"
        "print(json.dumps({'impl': m.config._attn_implementation, 'saobp': m.config.saobp, 'answers': answers}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out / "model"), str(qa_run["dev"])], capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["impl"] == "saobp" and got["saobp"]["variant"] == "bp-high"
    preds = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert got["answers"] == preds and len(preds) == len(gold.ids)


@pytest.mark.slow
def test_answer_not_in_context_exits_1_and_writes_nothing(tmp_path, tiny_bert):
    rows = toy_questions(6, 5)
    rows[3]["answers"] = {"text": ["zebra"]}
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["refine", str(tiny_bert), "--task", "question-answering", "--train", str(train),
                                   "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 1
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "the answer 'zebra' is not in its context" in lines[0]
    assert not (out / outputs.RUN_JSON).exists()
    res = CliRunner().invoke(app, ["refine", str(tiny_bert), "--task", "question-answering", "--train", str(train),
                                   "--doc-stride", "64", "--max-length", "64", "--out", str(out)])
    assert res.exit_code == 1 and "--doc-stride must be in [0, 32)" in res.output
