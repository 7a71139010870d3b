"""What a request asks of generation: plain, validated, picklable data (no torch).

SamplingParams: temperature 0 is greedy; otherwise logits / temperature, keep the top_k
largest (0 = all), then the smallest prefix whose probability mass reaches top_p. `seed`
keys the request's counter-based noise (None: unseeded).

Sampling: those parameters with max_new_tokens and stop strings, as a batch job gives them:
its defaults (the launch's sampling.*) and each input line's overrides go through
`Sampling.overridden`, the one place where these values are checked; a bad value raises
SamplingError naming its key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")


class SamplingError(ValueError):
    """A sampling value that cannot work; `key` names it, `problem` says why."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _require(key: str, ok: bool, what: str, value: Any) -> None:
    if not ok:
        raise SamplingError(key, f"must be {what}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        _require("temperature", _is_real(t) and t >= 0, "a number >= 0", t)
        _require("top_p", _is_real(p) and 0 < p <= 1, "a number in (0, 1]", p)
        _require("top_k", _is_int(k) and k >= 0, "an integer >= 0", k)
        _require("seed", self.seed is None or _is_int(self.seed), "an integer or null",
                 self.seed)

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


@dataclass(frozen=True)
class Sampling:
    """A request's sampling parameters, the most tokens it generates, its stop strings."""
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        _require("max_new_tokens", _is_int(n) and n >= 1, "an integer >= 1", n)
        _require("stop", isinstance(self.stop, tuple)
                 and all(isinstance(s, str) and s for s in self.stop),
                 "a string or a list of non-empty strings", self.stop)

    def overridden(self, values: dict[str, Any]) -> Sampling:
        """These defaults with `values` over them (SAMPLING_KEYS; a stop string alone is a
        list of one, a null stop none, a null top_k 0; integers are numbers too)."""
        unknown = sorted(set(values) - set(SAMPLING_KEYS))
        if unknown:
            raise SamplingError(unknown[0], f"not a sampling key ({', '.join(SAMPLING_KEYS)})")
        p = asdict(self.params)
        for key in ("temperature", "top_p"):
            if key in values:
                v = values[key]
                _require(key, _is_real(v), "a number", v)
                p[key] = float(v)
        if "top_k" in values:
            p["top_k"] = 0 if values["top_k"] is None else values["top_k"]
        if "seed" in values:
            _require("seed", _is_int(values["seed"]), "an integer", values["seed"])
            p["seed"] = values["seed"]
        stop = values.get("stop", self.stop)
        if isinstance(stop, str):
            stop = [stop]
        if isinstance(stop, list):
            stop = tuple(stop)
        return Sampling(SamplingParams(**p), values.get("max_new_tokens", self.max_new_tokens),
                        () if stop is None else stop)

    def as_dict(self) -> dict[str, Any]:
        """The flat form a summary records (stop: a list, or null when none)."""
        return {"max_new_tokens": self.max_new_tokens, **self.params.as_dict(),
                "stop": list(self.stop) or None}
