"""What `confu bench` reads off a decoder while it runs: stage times, KV tensors, MoE routing, process memory.

- `StageClock` is the decoding loop's `RoundHooks` (`confu.engine.generate`): a perf_counter lap after each
  stage of each round. Five clock reads a round (about a microsecond against rounds of milliseconds), and a
  decoder without hooks runs none of it.
- `kv_footprint` reads the bytes of the tensors a generation allocated: the target's cache (whose committed
  entries include ConFu's soft prompt) and the draft head's own cache.
- `RouterTap` keeps the logits of a ConFu head's `[con]` and `[f]` routers through forward hooks on the
  router modules the decoder actually runs (the drafter's may be a quantized copy of the head); the tallies are
  made after the timed generation, so the tap adds a tensor copy per decision to it and nothing else.

torch is imported by the callers' objects only: this module imports none of the engine at import time.
"""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from confu.bench.stats import router_tally

ROUTERS = {"con": ("extension", "con_moe"), "f": ("proposer", "future_moe")}  # decoder part, MoE attribute


class StageClock:
    """Seconds per stage of every round since the last `reset` (`rounds[i][stage]`)."""

    def __init__(self) -> None:
        self.cache = None  # the target cache of the latest sequence
        self.rounds: list[dict[str, float]] = []
        self._laps: dict[str, float] = {}
        self._last = 0.0

    def reset(self) -> None:
        self.rounds = []

    def sequence_start(self, cache) -> None:
        self.cache = cache

    def round_start(self) -> None:
        self._laps = {}
        self._last = time.perf_counter()

    def stage_done(self, stage: str) -> None:
        now = time.perf_counter()
        self._laps[stage] = now - self._last
        self._last = now

    def round_done(self) -> None:
        self.rounds.append(self._laps)

    def by_stage(self, stages: tuple[str, ...]) -> dict[str, list[float]]:
        """Parallel lists over rounds, one per stage."""
        return {s: [r.get(s, 0.0) for r in self.rounds] for s in stages}


def _kv_bytes(keys, values) -> tuple[int, int]:
    """(bytes per position, bytes allocated) of a (B, heads, positions, head_dim) key / value pair."""
    return int(keys[:, :, :1].nbytes + values[:, :, :1].nbytes), int(keys.nbytes + values.nbytes)


def kv_footprint(cache, proposer) -> dict[str, int]:
    """Bytes of the KV tensors one generation used: the target's per token (all layers) and as allocated
    (the buffer grows by doubling), the soft prompt's entries, and the draft cache's per row and allocated."""
    layers = [layer for layer in cache.kv.layers if getattr(layer, "is_initialized", False)]
    out = {"target_kv_per_token": 0, "target_kv_allocated": 0, "soft_prompt": 0,
           "draft_kv_per_token": 0, "draft_kv_allocated": 0}
    for layer in layers:
        per_token, allocated = _kv_bytes(layer.keys, layer.values)
        out["target_kv_per_token"] += per_token
        out["target_kv_allocated"] += allocated
    out["soft_prompt"] = cache.prefix * out["target_kv_per_token"]
    drafter = getattr(proposer, "drafter", None)
    if drafter is not None:
        out["draft_kv_per_token"], out["draft_kv_allocated"] = _kv_bytes(drafter.keys, drafter.values)
    return out


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RouterTap:
    """Forward hooks on a ConFu decoder's `[con]` and `[f]` routers; `take()` tallies what they routed."""

    def __init__(self, decoder) -> None:
        self.logits: dict[str, list[Any]] = {}
        self.top_k: dict[str, int] = {}
        self._handles = []
        for name, (part, attr) in ROUTERS.items():
            moe = getattr(getattr(getattr(decoder, part, None), "head", None), attr, None)
            if moe is None:
                continue
            self.logits[name] = []
            self.top_k[name] = moe.top_k
            self._handles.append(moe.router.register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str):
        def keep(_module, _inputs, output) -> None:
            self.logits[name].append(output.detach().reshape(-1, output.shape[-1]).float().cpu().clone())
        return keep

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def take(self) -> dict[str, dict] | None:
        """The tallies of everything routed since the last take (None for a decoder without routers)."""
        if not self.active:
            return None
        import torch

        out = {}
        for name, rows in self.logits.items():
            if rows:
                out[name] = router_tally(torch.cat(rows).numpy(), self.top_k[name])
            self.logits[name] = []
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
