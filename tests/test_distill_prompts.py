"""The shipped distillation prompts (orthrus_runtime/data/distill_prompts.jsonl.gz): chat,
code and math 1:1:1, provenance on every record, no duplicates, and nothing that overlaps
the evaluation sets: no normalised 8-word window shared with an MT-bench turn or a
HumanEval prompt or canonical solution. Checked here independently of the builder."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import unicodedata
from collections import Counter

import pytest

from orthrus_runtime.tools import distill as D
from orthrus_runtime.tools import eval_acceptance as E

N = 8


def grams(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKC", text).lower())
    return {tuple(w[i : i + N]) for i in range(len(w) - N + 1)}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    with gzip.open(D.DEFAULT_PROMPTS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def banned() -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for q in E.mt_bench_questions():
        for t in q["turns"]:
            out |= grams(t)
    for p in E.humaneval_prompts():
        out |= grams(p["prompt"]) | grams(p["canonical_solution"])
    return out


def test_no_prompt_overlaps_mt_bench_or_humaneval(records, banned):
    hits = [r["source"] for r in records if grams(r["prompt"]) & banned]
    assert not hits, f"{len(hits)} prompts overlap the evaluation sets, e.g. {hits[:5]}"
    # The check can fail: an evaluation prompt inside a longer one is caught.
    assert grams("Please help. " + E.mt_bench_questions()[3]["turns"][0]) & banned
    assert grams("Finish this:\n" + E.humaneval_prompts()[10]["prompt"]) & banned


def test_mix_provenance_and_no_duplicates(records):
    assert len(records) >= 10_000
    cats = Counter(r["category"] for r in records)
    assert set(cats) == {"chat", "code", "math"} and max(cats.values()) == min(cats.values()), cats
    sources = {c: {r["source"].split(":")[0] for r in records if r["category"] == c} for c in cats}
    assert sources["chat"] == {"sharegpt"}
    assert sources["code"] == {"sharegpt", "neetcode150"}
    assert sources["math"] == {"gsm-symbolic", "champ", "mathgenerator"}
    norm = [" ".join(re.findall(r"[a-z0-9]+", r["prompt"].lower())) for r in records]
    assert len(set(norm)) == len(norm)
    assert all(16 <= len(r["prompt"]) <= 1000 for r in records)
    assert D.DEFAULT_PROMPTS.stat().st_size < 4_000_000
    assert len(D.load_prompts(D.DEFAULT_PROMPTS)) == len(records)


def test_the_first_prompts_keep_their_places():
    """The file only grows at the end (build_distill_prompts.py --extend): the prompt streams
    that trained the shipped view answered prompts by position (uid), and a curve that
    continues must still mean the same prompt by the same uid. Pinned: the file before each
    extension (16,116, then 27,375 prompts)."""
    lines = gzip.open(D.DEFAULT_PROMPTS, "rb").read().split(b"\n")
    for n, digest in ((16116, "254042375431f02c0b86799e5ced4c2f6c56c911d2d8422882aa2f9a03d54357"),
                      (27375, "d86a3deb2e84807c528b892fcc578fca5fc8b8085927fe7bf9787e793a33a686")):
        assert hashlib.sha256(b"\n".join(lines[:n]) + b"\n").hexdigest() == digest, n
