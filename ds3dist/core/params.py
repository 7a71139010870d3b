"""Sampling parameters of one request: plain, validated, picklable data (no torch).

temperature 0 is greedy; otherwise logits / temperature, keep the top_k largest (0 = all),
then the smallest prefix whose probability mass reaches top_p. `seed` keys the request's
counter-based noise (None: unseeded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real
from typing import Any


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        # `not (x >= 0)` also refuses NaN
        if not (_is_real(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, params: SamplingParams | dict[str, Any]) -> SamplingParams:
        """`params` itself, or the parameters a dict names (unknown keys: ValueError)."""
        if isinstance(params, cls):
            return params
        if not isinstance(params, dict):
            raise ValueError(f"sampling params must be SamplingParams or a dict, got {type(params).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(map(str, unknown))}; "
                             f"expected {', '.join(known)}")
        return cls(**params)
