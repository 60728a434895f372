"""How likely a lean is by chance: the sign test behind the verdicts that count choices or rows
going one way or the other (top-1 choices in :mod:`.outputs`, rounding directions in :mod:`.weights`)."""

from __future__ import annotations

import math


def sign_test(worse: int, better: int) -> float:
    """One-sided p-value of the sign test: the chance of at least ``worse`` of the ``worse + better``
    discordant cases going one way, were each equally likely to go either way. Summed in
    logarithms: exact binomial coefficients of thousands of cases are slow big integers."""
    n = worse + better
    log_terms = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2)
                 for k in range(worse, n + 1)]
    return min(1.0, math.fsum(math.exp(t) for t in log_terms))


def lean(one: int, other: int) -> float:
    """Two-sided p-value of the sign test: the chance of a lean at least this strong either way."""
    return min(1.0, 2 * sign_test(max(one, other), min(one, other)))
