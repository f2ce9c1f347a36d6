"""The frozen target's outputs over a dataset, computed once and kept on disk: `FeatureStore`.

EAGLE-3 training needs three things from the target per token: the low / mid / high features (the draft's
input), the target's next-token distribution over the draft vocabulary (the soft label) and the argmax over
the full vocabulary (the acceptance check). None of them depends on the draft, so the target runs once per
data set and every epoch reads them back, instead of re-running the 135M target for every batch of every
epoch (it cost about as much as the draft's own train-time test).

What is stored per token:
- the features in fp16 (3H values; the draft reads them through `fc`, which is robust to fp16 rounding);
- the target's final-norm hidden state in fp32 (H values). The soft label over the draft vocabulary is
  recomputed from it at batch time with the target's own output rows for those ids (and its post-processing):
  the same numbers as slicing the full logits, at the cost of an (H x Vd) product per row, and 4H bytes per
  token instead of 4 Vd (8x less for SmolLM2 and a 8192-token draft vocabulary);
- the argmax of the target's full-vocabulary logits (int32).

Files live under `$CONFU_CACHE/features/<key>`, where the key hashes the data file, the truncation length,
the target's identity and the feature layers, so a changed input is never read stale. The
build is resumable: sequences are written in chunks and `progress.json` records the chunks done. ConFu's
contemplate pass needs the target's KV of each sequence (far larger than the features), so ConFu training
still runs the target itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from confu.errors import CheckpointError

COMPLETE = "complete"  # written once every chunk of every rank is stored
CHUNK_TOKENS = 16384  # padded tokens per target forward while building (and per progress record)
FP16_MAX = 65504.0


def store_key(data_path: str, max_len: int, target, feature_layers: Sequence[int]) -> str:
    """A digest of everything the stored numbers depend on."""
    digest = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cfg = target.model.config.to_json_string(use_diff=False)
    digest.update(json.dumps([max_len, target.name, list(feature_layers), cfg]).encode())
    return digest.hexdigest()[:20]


@dataclass
class FeatureStore:
    """Memory-mapped per-token target outputs of a list of sequences (offsets index the token rows)."""

    root: Path
    offsets: np.ndarray  # (S + 1,) int64
    features: np.ndarray  # (T, 3H) float16
    last_hidden: np.ndarray  # (T, H) float32
    argmax: np.ndarray  # (T,) int32

    @classmethod
    def open(cls, root: Path, mode: str = "c") -> FeatureStore:
        """mode "c" (copy-on-write) for readers: torch wants writable arrays; nothing reaches the files."""
        meta = json.loads((root / "meta.json").read_text())
        offsets = np.load(root / "offsets.npy")
        t, h = int(offsets[-1]), meta["hidden_size"]

        def mm(name: str, dtype, shape):
            return np.memmap(root / name, dtype=dtype, mode=mode, shape=shape)

        return cls(root, offsets, mm("features.f16", np.float16, (t, 3 * h)),
                   mm("last_hidden.f32", np.float32, (t, h)), mm("argmax.i32", np.int32, (t,)))

    @property
    def sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def hidden_size(self) -> int:
        return self.last_hidden.shape[1]

    def rows(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, last_hidden, argmax) of sequence `index`."""
        rows = self.rows(index)
        return self.features[rows], self.last_hidden[rows], self.argmax[rows]


class StoreSet:
    """Several stores read as one data set: sequence i of the set is sequence i - start[k] of store k.

    Why not one store: each `--data` file keeps its own store, so a data set that grows by a file costs the
    target pass of that file only, not a rebuild of everything before it.
    """

    def __init__(self, stores: Sequence[FeatureStore]):
        if len({s.hidden_size for s in stores}) != 1:
            raise CheckpointError("feature stores of different hidden sizes cannot be read as one data set")
        self.stores = list(stores)
        self.starts = np.cumsum([0] + [s.sequences for s in self.stores])

    @property
    def sequences(self) -> int:
        return int(self.starts[-1])

    @property
    def hidden_size(self) -> int:
        return self.stores[0].hidden_size

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not 0 <= index < self.sequences:
            raise IndexError(f"sequence {index} of a store set of {self.sequences}")
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.stores[k].sequence(index - int(self.starts[k]))


def _progress(marker: Path) -> int:
    path = marker / "progress.json"
    return json.loads(path.read_text())["chunks_done"] if path.is_file() else 0


def _chunks(lengths: Sequence[int]) -> list[list[int]]:
    """Sequence indices in length order, cut into forwards of at most CHUNK_TOKENS padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and lengths[i] * (len(chunks[-1]) + 1) <= CHUNK_TOKENS:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


@torch.no_grad()
def build_feature_store(target, seqs: Sequence[tuple[list[int], list[int]]], feature_layers: Sequence[int],
                        root: Path, rank: int = 0, world: int = 1, progress: bool = True) -> None:
    """Run the target over `seqs` and write its outputs under `root` (resumes an interrupted build).

    With several processes each writes its share of the chunks into the same files (rank r takes chunks
    r, r + world, ...); the caller synchronises before reading.
    """
    from tqdm import tqdm

    if (root / COMPLETE).is_file():
        return
    lengths = [len(ids) for ids, _ in seqs]
    h = target.hidden_size
    if rank == 0 and not (root / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        np.save(root / "offsets.npy", offsets)
        t = int(offsets[-1])
        for name, dtype, shape in (("features.f16", np.float16, (t, 3 * h)),
                                   ("last_hidden.f32", np.float32, (t, h)), ("argmax.i32", np.int32, (t,))):
            np.memmap(root / name, dtype=dtype, mode="w+", shape=shape).flush()
        (root / "meta.json").write_text(json.dumps({"hidden_size": h, "sequences": len(seqs), "tokens": t,
                                                    "feature_layers": list(feature_layers)}))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    store = FeatureStore.open(root, mode="r+")
    chunks = _chunks(lengths)
    mine = list(range(rank, len(chunks), world))
    marker = root / f"world{world}-rank{rank}"  # a resumed build with another world size starts over
    done = _progress(marker)
    decoder = target.reference_model.get_decoder()
    tic = time.perf_counter()
    bar = tqdm(total=len(mine), initial=done, desc="target features", disable=not progress, dynamic_ncols=True)
    for step in range(done, len(mine)):
        chunk = chunks[mine[step]]
        width = max(lengths[i] for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, : lengths[i]] = torch.tensor(seqs[i][0])
        # Right padding needs no mask: no real token sees a pad under causal attention. transformers' own
        # linear layers, the output layer included: the quantized kernels are built for the few rows of a
        # decoding step, and on thousands of rows the output layer alone took 86% of the build.
        out = decoder(input_ids=ids.to(target.device), use_cache=False, output_hidden_states=True)
        last = out.last_hidden_state
        argmax = target.logits(last, reference=True).argmax(-1)
        features = torch.cat([out.hidden_states[j] for j in feature_layers], dim=-1)
        if features.abs().max() > FP16_MAX:
            raise CheckpointError("target features exceed the fp16 range; this target needs an fp32 store")
        for r, i in enumerate(chunk):
            rows, n = store.rows(i), lengths[i]
            store.features[rows] = features[r, :n].half().cpu().numpy()
            store.last_hidden[rows] = last[r, :n].float().cpu().numpy()
            store.argmax[rows] = argmax[r, :n].int().cpu().numpy()
        for arr in (store.features, store.last_hidden, store.argmax):
            arr.flush()
        marker.mkdir(exist_ok=True)
        (marker / "progress.json").write_text(json.dumps({"chunks_done": step + 1}))
        bar.update(1)
    bar.close()
    if progress and rank == 0:
        print(f"target features: {store.offsets[-1]} tokens in {time.perf_counter() - tic:.0f} s", file=sys.stderr)


def store_root() -> Path:
    from confu.hub import cache_dir

    return cache_dir() / "features"


def feature_store(target, seqs: Sequence[tuple[list[int], list[int]]], feature_layers: Sequence[int], key: str,
                  rank: int = 0, world: int = 1, progress: bool = True) -> FeatureStore:
    """The store for `key`, built first where missing or incomplete."""
    root = store_root() / key
    build_feature_store(target, seqs, feature_layers, root, rank, world, progress)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        (root / COMPLETE).touch()
    return FeatureStore.open(root)


class DraftLabels:
    """The target's logits over a draft vocabulary, from stored final-norm hidden states: its output rows for
    those ids, then its own post-processing (`Target.finish_logits`)."""

    def __init__(self, target, draft_ids: Tensor):
        self.target = target
        weight = target.model.get_output_embeddings().weight
        self.weight = weight.detach()[draft_ids.to(weight.device)].float()  # (Vd, H)
        bias = getattr(target.model.get_output_embeddings(), "bias", None)
        self.bias = None if bias is None else bias.detach()[draft_ids.to(bias.device)].float()

    def __call__(self, last_hidden: Tensor) -> Tensor:
        logits = last_hidden.float() @ self.weight.T.to(last_hidden.device)
        if self.bias is not None:
            logits = logits + self.bias.to(logits.device)
        return self.target.finish_logits(logits)
