"""Which sequences a step reads: the data set (`load_sequences`, one list per `--data` file), the held-out split,
length-bucketed global batches (`LengthBatches`), and the data-parallel ranks that share them (`Dist`)."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from confu.errors import InputError

LENGTH_BUCKET = 32  # sequences whose lengths agree to this many tokens are interchangeable within an epoch


Seq = tuple[list[int], list[int]]  # (input_ids, loss_mask)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """Pick the device; join the process group only when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1:
        return Dist(0, 1, dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def local_part(global_ids: list[int], d: Dist) -> list[int]:
    return global_ids[d.rank :: d.world]


def load_sequences(path: str, max_len: int) -> list[Seq]:
    """The prepared dataset, truncated to max_len; sequences with nothing to learn are dropped."""
    from confu.training.data import load_dataset
    from confu.training.ttt import loss_rows

    out = []
    for s in load_dataset(path):
        ids, mask = list(s.input_ids[:max_len]), list(s.loss_mask[:max_len])
        if any(loss_rows(len(ids), mask)):
            out.append((ids, mask))
    if not out:
        raise InputError(f"{path}: no sample has response tokens to train on (after --max-len {max_len})")
    return out


def load_parts(paths: Sequence[str], max_len: int) -> list[list[Seq]]:
    """The sequences of each `--data` file; the data set is their concatenation, in this order."""
    return [load_sequences(path, max_len) for path in paths]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) sample indices, a fixed function of the seed."""
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    n_eval = 0 if eval_fraction <= 0 or n < 2 else max(1, round(n * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


class LengthBatches:
    """The global batches of each epoch: sequences of similar length, at most `batch_tokens` padded tokens each.

    Per epoch, a seeded shuffle followed by a stable sort on length // LENGTH_BUCKET varies which sequences
    share a batch while keeping their lengths close; the batches are then cut greedily and shuffled. Every
    batch holds at least `min_size` sequences (one per data-parallel rank). A pure function of (seed, epoch),
    so resumed and data-parallel runs see the same batches as one uninterrupted process.
    """

    def __init__(self, lengths: Sequence[int], batch_tokens: int, seed: int, min_size: int = 1):
        if len(lengths) < min_size:
            raise InputError(f"the training split has {len(lengths)} samples, fewer than the {min_size} "
                             "processes")
        self.lengths, self.batch_tokens, self.seed, self.min_size = list(lengths), batch_tokens, seed, min_size
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch(self, epoch: int, shuffle: bool = True) -> list[list[int]]:
        """The batches of `epoch`; without `shuffle`, the deterministic length-sorted cut (evaluation)."""
        if shuffle and epoch in self._epochs:
            return self._epochs[epoch]
        order = list(range(len(self.lengths)))
        rng = random.Random(f"order:{self.seed}:{epoch}")
        if shuffle:
            rng.shuffle(order)
        order.sort(key=lambda i: self.lengths[i] // LENGTH_BUCKET)
        batches: list[list[int]] = [[]]
        width = 0
        for i in order:
            width = max(width, self.lengths[i])
            if len(batches[-1]) >= self.min_size and width * (len(batches[-1]) + 1) > self.batch_tokens:
                batches.append([])
                width = self.lengths[i]
            batches[-1].append(i)
        if len(batches) > 1 and len(batches[-1]) < self.min_size:
            batches[-2].extend(batches.pop())
        if shuffle:
            rng.shuffle(batches)
            self._epochs[epoch] = batches
        return batches

    @property
    def per_epoch(self) -> int:
        return len(self.epoch(0))

    def batch(self, step: int) -> list[int]:
        epoch = 0
        while step >= len(self.epoch(epoch)):
            step -= len(self.epoch(epoch))
            epoch += 1
        return self.epoch(epoch)[step]
