"""Defaults and limits that more than one layer reads, in one place (torch-free: the
Serve layer and the clients import it)."""
from __future__ import annotations

from pathlib import Path

# Shipped data: the embedded default's diffusion view, prompt sets, MT-bench.
DATA_DIR = Path(__file__).resolve().parent / "data"
