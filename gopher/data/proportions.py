"""Sampling proportions: how much of each source a training batch draws, by name.

MassiveText's shares (Gopher Table A1), the embedded corpus's sources in the same roles,
how a named mixture lands on a corpus that lacks some of its sources (`named_weights`),
and the `--config.data.mixture` flag parsed into a name or explicit weights
(`parse_weights`). Kept apart from the mixer (gopher/data/mixture.py), which only needs
a dict of weights: the tables are the paper's numbers and the flag is configuration, and
both are read before any corpus is built or loaded (a typo should not cost a build).
"""

from __future__ import annotations

import math

# MassiveText's sampling proportions (Gopher Table A1).
MASSIVETEXT_WEIGHTS = {
    "massiveweb": 0.48,
    "books": 0.27,
    "c4": 0.10,
    "news": 0.10,
    "github": 0.03,
    "wikipedia": 0.02,
}
# The embedded corpus's sources in MassiveText's roles: technical prose takes
# MassiveWeb's share, the dictionary C4's and Wikipedia's, code GitHub's.
EMBEDDED_WEIGHTS = {
    "technical": 0.48,
    "books": 0.27,
    "encyclopedic": 0.12,
    "news": 0.10,
    "code": 0.03,
}
MIXTURES = {"massivetext": MASSIVETEXT_WEIGHTS, "embedded": EMBEDDED_WEIGHTS}
# Where a MassiveText source's share goes on a corpus that lacks it: the embedded
# corpus's source in that role (so "massivetext" on the embedded corpus is its weights).
ROLES = {
    "massiveweb": "technical",
    "c4": "encyclopedic",
    "wikipedia": "encyclopedic",
    "github": "code",
}


def named_weights(name: str, available) -> dict[str, float]:
    """A named mixture's weights over the sources `available`: each share goes to its own
    source, else to the source in its role (`ROLES`), else it is dropped (a source skipped
    when the corpus was built); the mixer normalises what is left."""
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; choose from {sorted(MIXTURES)}")
    out: dict[str, float] = {}
    for source, weight in MIXTURES[name].items():
        target = source if source in available else ROLES.get(source)
        if target in available:
            out[target] = out.get(target, 0.0) + weight
    return out


def parse_weights(text: str) -> str | dict[str, float] | None:
    """'' (the corpus's own), a mixture name, or 'source=weight,source=weight'."""
    if not text or "=" not in text:
        if text and text not in MIXTURES:  # before a corpus build, which a typo would cost
            raise ValueError(
                f"unknown mixture {text!r} in --config.data.mixture; choose from "
                f"{sorted(MIXTURES)} or give weights as SOURCE=NUMBER,..."
            )
        return text or None
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not name or not math.isfinite(weight):
            raise ValueError(
                f"mixture weight {part!r} is not SOURCE=NUMBER with a finite number; e.g. "
                "--config.data.mixture=books=0.3,code=0.1,news=0.6"
            )
        if name in weights:
            raise ValueError(
                f"mixture names source {name!r} twice ({text!r}); give each source one "
                "weight in --config.data.mixture"
            )
        weights[name] = weight
    bad = {k: v for k, v in weights.items() if v < 0}
    if bad or sum(weights.values()) <= 0:
        raise ValueError(
            f"mixture weights {weights} must be >= 0 with a positive sum "
            f"({'negative: ' + ', '.join(bad) if bad else 'they sum to zero'}); fix "
            "--config.data.mixture"
        )
    return weights
