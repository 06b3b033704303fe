"""Dataset loaders for the two lm-eval tasks here: the JSONL files next to this file.

lm-eval calls these through `custom_dataset: !function utils.load_*` (with the task's
metadata as keyword arguments), so the tasks work from any working directory.
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name):
    import datasets

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def load_mc(**kwargs):
    return _load("mc.jsonl")


def load_qa(**kwargs):
    return _load("qa.jsonl")
