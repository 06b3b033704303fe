"""benchmarks/build_distill_prompts.py's filters and 1:1:1 quota on made-up sources (the
real sources are PyPI packages the suite does not install; test_distill_prompts.py checks
the shipped file itself)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_pool_filters_and_an_extension_takes_only_new_prompts_one_to_one_to_one():
    import build_distill_prompts as B
    from orthrus_runtime.tools.eval_acceptance import mt_bench_questions

    turn = mt_bench_questions()[0]["turns"][0]
    chat = [("chat", f"Tell me about the history of town number {i} in the valley.", f"sharegpt:c{i}") for i in range(9)]
    code = [("code", f"Write a Python function that returns the square of {i} plus one.", f"sharegpt:k{i}") for i in range(4)]
    math = [("math", f"Solve: {i} x + 3 = {2 * i + 3}. Show your working.", f"mathgenerator:1:{i}") for i in range(6)]
    noise = [("chat", "too short", "sharegpt:s"),                                   # length
             ("chat", "Please answer this: " + turn, "sharegpt:mt"),                 # an MT-bench turn inside
             ("chat", "Tell me about the HISTORY of town number 3 in the valley!", "sharegpt:dup")]  # a duplicate
    old = [{"prompt": chat[0][1], "category": "chat", "source": "sharegpt:c0"}]  # already in the file
    seen = {B.normalised(r["prompt"]) for r in old}
    dropped = {"contaminated": 0, "duplicate": 0, "length/language": 0}
    pools = B.pool([iter(chat + noise), iter(code), iter(math)], B.evaluation_windows(), seen, dropped)
    assert dropped == {"contaminated": 1, "duplicate": 2, "length/language": 1}
    assert [len(pools[c].get("sharegpt", [])) for c in ("chat", "code")] == [8, 4]
    new = B.take_balanced(pools, 100, random.Random(0))
    counts = {c: sum(r["category"] == c for r in new) for c in B.CATEGORIES}
    assert counts == {"chat": 4, "code": 4, "math": 4}  # as many as the smallest category (code) has
    assert not {r["prompt"] for r in new} & {r["prompt"] for r in old}
    assert len(B.take_balanced(pools, 2, random.Random(0))) == 6
