"""Replays the adaptive policy at batch 128 on a measured H200 pass table, on the CPU.

    python3 benchmarks/simulate_policy.py [results/2026-11-27-h200-8b-final.json]

Model of the benchmark's forced-acceptance point (8B shape, batch 128, acceptance 0.875 per
draft): AR steps take 6.64 ms (what the run measured, 11 % over the pass table), speculative
cycles 7 % over their table cost. Counts the speculative cycles that land in the timed window
(cycles 43-72, after the 43 warm-up cycles) over 20 fresh policies, with the excess over the
table modelled as an added constant (pipelined=False, as the policy did before) and as a ratio
(pipelined=True, what the engine now uses with pipelined decoding). README, "About the
batch-128 target", says what it showed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthrus_runtime.adaptive import PassCosts, VerifyPolicy  # noqa: E402


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/results/2026-11-27-h200-8b-final.json"
    table = json.loads(path.read_text())["shapes"]["qwen3-8b"]["pass_ms"]
    costs = PassCosts()
    for kind in ("verify", "draft"):
        for b, row in table[kind].items():
            for T, ms in row.items():
                costs.record(kind, int(b), int(T), ms / 1e3, replace=True)
    for pipelined in (False, True):
        late = replay(costs, pipelined)
        print(f"pipelined={pipelined}: speculative cycles in the timed window over 20 runs: {len(late)}", late)
    return 0


def replay(costs: PassCosts, pipelined: bool) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(0)
    late = []
    for trial in range(20):
        pol = VerifyPolicy(32, costs, pipelined=pipelined)
        for step in range(73):
            K, D = pol.choose(128, 1500)
            if K == 1:
                pol.observe_time(128, 1, 0, 6.64e-3)
                continue
            if step >= 43:
                late.append((trial, step, K, D))
            accepted = []
            for _ in range(128):
                a = 0
                while a < K - 1 and rng.random() < 0.875:
                    a += 1
                accepted.append(a)
            pol.observe(D, [K - 1] * 128, accepted)
            pol.observe_time(128, K, D, 1.07 * (costs.estimate("draft", 128, D) + costs.estimate("verify", 128, K)))
    return late


if __name__ == "__main__":
    sys.exit(main())
