"""One goodness-of-fit check of sampled token tuples against an exactly enumerated distribution."""
from __future__ import annotations

from scipy.stats import chisquare


def fit_to_exact(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float],
                 label: str = "") -> tuple[float, float]:
    """-> (chi-square p-value, total-variation distance). Fails at once on a sample that has
    probability 0; pools the cells expected fewer than 5 times (chi-square validity) and
    requires at least 8 cells, so that the test means something."""
    n = len(samples)
    counts = {c: 0 for c in exact}
    for s in samples:
        assert exact.get(s, 0) > 0, f"{label} sampled {s}, which has probability 0 under the AR model"
        counts[s] += 1
    cells = [c for c in exact if exact[c] * n >= 5]
    rest = [c for c in exact if c not in cells]
    obs, exp = [counts[c] for c in cells], [exact[c] * n for c in cells]
    if rest:
        obs.append(sum(counts[c] for c in rest))
        exp.append(sum(exact[c] for c in rest) * n)
    assert len(obs) >= 8, f"{label}: only {len(obs)} cells"
    exp = [e * n / sum(exp) for e in exp]  # float rounding of the enumerated probabilities
    tv = 0.5 * sum(abs(counts[c] / n - exact[c]) for c in exact)
    return chisquare(obs, exp).pvalue, tv
