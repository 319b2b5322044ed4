"""MADA's six coefficients: their names, in the order every layer indexes them
by, and the highest value each may take."""
from __future__ import annotations

import math

COEFFICIENTS: tuple[str, ...] = ("beta1", "beta2", "beta3", "rho", "c", "gamma")

# The betas are EMA weights and the bias corrections divide by 1 - beta^t, so
# they stay below 1; rho, c and gamma are blend weights, defined up to 1.
HIGHEST: dict[str, float] = {
    n: 1.0 if n in ("rho", "c", "gamma") else math.nextafter(1.0, 0.0) for n in COEFFICIENTS
}
