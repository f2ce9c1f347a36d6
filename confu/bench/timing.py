"""Wall-clock timing helpers shared by every benchmark (`confu bench`, `bench-ar`, `bench-verify`).

All timings use `time.perf_counter` (monotonic, highest resolution). Benchmarks on a shared CPU are noisy, so
the helpers warm up first (first calls pay for allocator growth, lazy imports and kernel selection), repeat,
interleave the things being compared (drift of the machine then hits every candidate alike) and report the
median, which one slow outlier does not move.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

perf_counter = time.perf_counter


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn` once; returns (its result, seconds)."""
    start = perf_counter()
    result = fn()
    return result, perf_counter() - start


@dataclass
class Timing:
    """Repeated measurements of one thing; `result` is what its last timed call returned."""

    samples: list[float] = field(default_factory=list)
    result: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else float("nan")

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: a quick indicator of how noisy the samples were."""
        if len(self.samples) < 2 or self.median == 0:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median

    def to_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median, "mean_s": self.mean, "min_s": self.min, "n": len(self.samples)}


K = TypeVar("K", bound=Hashable)


def measure_interleaved(
    fns: Mapping[K, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    reset: Callable[[K], None] | None = None,
    on_sample: Callable[[K, float], None] | None = None,
) -> dict[K, Timing]:
    """Time several callables round-robin: `warmup` untimed rounds, then `repeats` timed rounds.

    Each round calls every function once, in the mapping's order, so slow periods of a shared machine are
    spread over all candidates instead of landing on whichever ran last. `reset(key)` runs after every
    call, outside the timed region (e.g. to drop the KV entries a verify pass appended).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    timings: dict[K, Timing] = {key: Timing() for key in fns}
    for round_idx in range(warmup + repeats):
        for key, fn in fns.items():
            result, seconds = timed(fn)
            if reset is not None:
                reset(key)
            if round_idx < warmup:
                continue
            timings[key].samples.append(seconds)
            timings[key].result = result
            if on_sample is not None:
                on_sample(key, seconds)
    return timings
