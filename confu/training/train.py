"""EAGLE-3 and ConFu training: `confu train` and `train(TrainConfig)`.

EAGLE-3: the frozen target runs once per data set (`confu.training.features`: features, soft labels and
argmax kept on disk), then every batch of every epoch reads them back for the draft head's train-time test
(`confu.training.ttt`). Batches are sequences of similar length up to a budget of padded tokens, so little
compute goes to padding. ConFu is trained from an EAGLE-3 head (`--init`): the shared weights are copied, the soft
prompt and the two MoEs start fresh (`confu.training.heads` builds the head to train); per sequence `--anchors`
contemplate rows run through the frozen target with gradients, and each anchor's future prediction f serves the
anchor row and the next `--replicate` rows.

Data order is a pure function of (seed, step), and ConFu's anchors of (seed, step, sample), so a resumed run
and a data-parallel run (`torchrun --nproc_per_node N`, the global batch split across ranks) reproduce a
single uninterrupted process. Losses are normalised by global counts, and gradients are summed over ranks
with one all-reduce, which makes the data-parallel step the same computation as the single-process step.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from confu.engine.draft import ConFuHead
from confu.engine.registry import HEAD_METHODS, head_method, method_of
from confu.errors import InputError
from confu.training.heads import FC_RMS_SEQS, HEAD_INITS, build_head, scale_fc_to_rms

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
LOG_NAME = "train_log.jsonl"
# Settings a resumed run must share with the run that wrote the checkpoint: they fix the data order, the
# split and the schedule, without which "resume" would silently be a different run.
RESUME_KEYS = ("method", "data", "batch_tokens", "max_len", "seed", "eval_fraction", "total_steps",
               "ttt_steps", "ttt_warmup", "anchors", "replicate", "oracle_future", "future_bias",
               "future_residual", "future_loss", "label_temperature", "stage", "future_ahead")
# What a checkpoint written before a key existed ran with (so such runs still resume).
RESUME_DEFAULTS = {"label_temperature": 1.0, "stage": "draft", "future_ahead": [2]}
# What a run trains: the whole head, or (ConFu, a deviation from the paper) only the parts that make f on the
# target side, the soft prompt and the [con] MoE, on the future loss alone, with the draft not run at all.
STAGES = ("draft", "future")
TARGET_SIDE_PARTS = ("soft_prompt", "con_moe")
LENGTH_BUCKET = 32  # sequences whose lengths agree to this many tokens are interchangeable within an epoch


@dataclass
class TrainConfig:
    data: list[str]  # prepared files read as one data set, in this order (a single path is accepted)
    out: str
    target: str = "smollm2-135m"
    method: str = "eagle3"  # a `confu.engine.registry.HEAD_METHODS` name
    init: str | None = None  # draft directory to start from (ConFu: a trained EAGLE-3 head)
    steps: int | None = None  # optimizer steps; None = `epochs` passes over the training split
    epochs: float = 1.0
    batch_tokens: int = 4096  # padded tokens per global batch (split across data-parallel ranks)
    max_len: int = 1024
    lr: float = 1e-4
    aux_lr_mult: float = 10.0  # lr multiplier of the soft prompt and the MoEs (they start from scratch)
    warmup_steps: int | None = None  # None = 3% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    ttt_steps: int = 7
    ttt_decay: float = 0.8  # loss weight of step k is ttt_decay ** k
    ttt_warmup: float = 0.0  # share of the steps over which the TTT depth grows from 1 to ttt_steps
    head_init: str = "target"  # lm_head and final norm from the target's (draft vocabulary rows), or random
    freeze_lm_head: bool = False  # keep lm_head at its initial value (EAGLE-1/2 froze the target's)
    layer_init: int | None = None  # a fresh head's decoder layer starts as this target layer's (None: random)
    # with --init: rebuild the draft vocabulary from this run's data at draft_vocab_size tokens, keeping the
    # init's tokens and rows (new rows mapped from the target's output embedding: heads.widen_vocab)
    widen_vocab: bool = False
    # A fresh head's fc starts scaled so its output (the draft layer's residual stream) has this RMS on the
    # first training sequences; 0 keeps nn.Linear's init. Why: the target's mid and high features have RMS
    # ~65 here, so the default fc makes a residual of RMS ~30 that swamps attention (the only way in for the
    # next token's embedding and for ConFu's f); see BENCHMARKS.md "What the draft reads".
    fc_rms: float = 1.0
    # Deviation from EAGLE-3 (1.0 = its soft labels): the draft loss's target distribution is softmax(target
    # logits / this). Below 1 the labels sharpen toward the target's argmax, the one token that greedy (T=0)
    # verification accepts, at the price of matching the rest of the distribution less (sampled decoding).
    label_temperature: float = 1.0
    feature_cache: bool = True  # EAGLE-3: run the target once per data set (see confu.training.features)
    seed: int = 0
    draft_vocab_size: int = 8192
    eval_fraction: float = 0.05
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 500  # 0 = no intermediate checkpoints
    resume: bool = False
    save_fp16: bool = False
    # ConFu
    anchors: int = 16
    replicate: int = 4
    soft_prompt_len: int = 16
    n_expert: int = 8  # 1 = static [con] / [f] embeddings (the paper's -MoE ablation)
    top_k_expert: int = 2
    # Deviation from the paper (`DraftConfig.future_bias`): a learned per-head logit offset of the future key,
    # starting at this value; None = the paper's plain attention
    future_bias: float | None = None
    future_residual: bool = False  # deviation (`DraftConfig.future_residual`): f also added to the residual
    future_logits: bool = False  # deviation (`DraftConfig.future_logits`): gate_k * lm_head(f) added to the logits
    # Deviation from the paper: weight of an auxiliary loss that teaches f to hold x_{a+2} as the target's own
    # output layer reads it (`confu.training.ttt.future_prediction_ce`); 0 = the paper's draft loss only
    future_loss: float = 0.0
    # the tokens x_{a+k} that loss reads f against (`future_prediction_ce`); (2,): the token draft step 0 guesses
    future_ahead: list[int] = field(default_factory=lambda: [2])
    # "draft" (the paper) or "future": train only TARGET_SIDE_PARTS on the future loss (see STAGES)
    stage: str = "draft"
    zero_future: bool = False  # ConFu probe for `confu evaluate`: the draft gets f = 0 (does it use f?)
    # ConFu plumbing probe: f is the target's own final hidden state this many positions after the anchor
    # (a future prediction that certainly holds the future), instead of the contemplate token's; 0 = off
    oracle_future: int = 0
    # run control
    device: str = "auto"
    stop_after: int | None = None  # end this run after this global step (with a checkpoint); resume later
    progress: bool = True
    command: str = ""  # provenance only

    def __post_init__(self) -> None:
        self.data = [str(p) for p in _as_list(self.data)]
        self.future_ahead = [int(k) for k in self.future_ahead]
        if self.method not in HEAD_METHODS:
            raise InputError(f"--method must be one of {', '.join(HEAD_METHODS)}, got {self.method!r}")
        reads_future = head_method(self.method).reads_future
        if self.stage == "future" and (not reads_future or not self.future_loss or self.oracle_future):
            raise InputError("--stage future trains a ConFu head's f on the future loss: it needs --method confu, "
                             "--future-loss > 0 and no --oracle-future")
        checks = {
            "--data (at least one file)": len(self.data) >= 1,
            "--batch-tokens (must be >= --max-len)": self.batch_tokens >= self.max_len,
            "--max-len": self.max_len >= 3,
            "--lr": self.lr > 0,
            "--ttt-steps": self.ttt_steps >= 1,
            "--anchors": self.anchors >= 1,
            "--replicate": self.replicate >= 0,
            "--n-expert": self.n_expert >= 1,
            "--eval-fraction": 0 <= self.eval_fraction < 1,
            "--steps": self.steps is None or self.steps >= 1,
            "--epochs": self.epochs > 0,
            "--grad-clip": self.grad_clip > 0,
            "--ttt-warmup": 0 <= self.ttt_warmup < 1,
            "--head-init": self.head_init in HEAD_INITS,
            "--oracle-future": self.oracle_future >= 0,
            "--fc-rms": self.fc_rms >= 0,
            "--future-loss": self.future_loss >= 0,
            "--label-temperature (must be > 0)": self.label_temperature > 0,
            "--stage": self.stage in STAGES,
            "--future-ahead (distinct k >= 1)": len(set(self.future_ahead)) == len(self.future_ahead) >= 1
            and min(self.future_ahead) >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InputError(f"invalid value for {', '.join(bad)}")

    def ttt_depth(self, step: int, total: int) -> int:
        """TTT depth of optimizer step `step`: the curriculum grows it linearly from 1 during `ttt_warmup`."""
        ramp = self.ttt_warmup * total
        if step >= ramp:
            return self.ttt_steps
        return min(self.ttt_steps, 1 + int(step / ramp * self.ttt_steps))


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class _Dist:
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


def _setup(device: str) -> _Dist:
    """Pick the device; join the process group only when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world <= 1:
        return _Dist(0, 1, dev)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), dev)


# --------------------------------------------------------------------------------------------------- data


Seq = tuple[list[int], list[int]]  # (input_ids, loss_mask)


def _as_list(data: str | Sequence[str] | None) -> Sequence[str] | None:
    """`--data` as a list: one path was a plain string (and is one in checkpoints written before several)."""
    return [data] if isinstance(data, str) else data


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


# ------------------------------------------------------------------------------------------- forward pass


@dataclass
class TargetSource:
    """Where a batch's target outputs come from: the stored pass (`store`, EAGLE-3) or a live forward.

    ConFu always runs the target live: its contemplate pass needs each sequence's KV cache, which is far
    larger than the stored features, and it backpropagates through the target into the soft prompt.
    """

    target: Any
    seqs: Sequence[Seq]  # the whole data set; batches name dataset indices
    store: Any = None  # FeatureStore or StoreSet over `seqs`
    labels: Any = None  # DraftLabels of the head's vocabulary

    def batch(self, head, indices: Sequence[int], keep_kv: bool):
        from confu.training.ttt import collate, run_target, stored_target_batch

        device = head.fc.weight.device
        if self.store is not None and not keep_kv:
            return stored_target_batch(self.store, self.labels, head, self.seqs, indices, device)
        input_ids, lengths, loss_mask = collate([self.seqs[i] for i in indices], device)
        # transformers' own linear layers: the quantized kernels are built for a decoding step's few rows
        with self.target.reference_numerics():
            return run_target(self.target.model, head.cfg.feature_layers, head, input_ids, lengths, loss_mask,
                              keep_kv)


def _needs_kv(head, cfg: TrainConfig) -> bool:
    """The contemplate pass needs the sequence's KV cache (it runs unless the oracle replaces f)."""
    return method_of(head).reads_future and not cfg.oracle_future


def open_source(target, head, parts: Sequence[Sequence[Seq]], cfg: TrainConfig, d: _Dist) -> TargetSource:
    """The source `cfg` asks for: with `feature_cache`, heads that need no KV read the stored target pass.

    parts: the sequences of each file of `cfg.data` (`load_parts`); each file has its own store.
    """
    from confu.training.features import DraftLabels, StoreSet, feature_store, store_key

    seqs = [s for part in parts for s in part]
    labels = DraftLabels(target, torch.arange(len(head.d2t)) + head.d2t.cpu())
    if not cfg.feature_cache or _needs_kv(head, cfg):
        return TargetSource(target, seqs, labels=labels)
    layers = head.cfg.feature_layers
    stores = [feature_store(target, part, layers, store_key(path, cfg.max_len, target, layers), d.rank, d.world,
                            progress=cfg.progress and d.main) for path, part in zip(cfg.data, parts, strict=True)]
    return TargetSource(target, seqs, StoreSet(stores), labels)


def batch_forward(source: TargetSource, head, indices: Sequence[int], keys: Sequence[str], cfg: TrainConfig,
                  evaluation: bool, depth: int | None = None):
    """Target outputs + (ConFu: anchors and contemplate pass) + train-time test for one local batch.

    indices: dataset indices of the batch's sequences. keys: one string per sequence that seeds its anchors
    (training), so anchors depend on the sample and the step only, never on which rank runs it. Evaluation
    uses every row with loss as an anchor and no replication: the setting of inference with a contemplate
    slot on every node. depth: TTT steps to run (the curriculum's; default all).
    """
    from confu.training.ttt import (
        TTTResult,
        assign_anchor_rows,
        contemplate_futures,
        eagle3_rows,
        future_prediction_ce,
        loss_rows,
        oracle_futures,
        plan_anchors,
        sample_anchors,
        step_validity,
        ttt_forward,
    )

    depth = depth or cfg.ttt_steps
    tb = source.batch(head, indices, _needs_kv(head, cfg))
    valid = step_validity(tb, depth)
    if not method_of(head).reads_future:
        rows, row_ok = eagle3_rows(valid)
        return ttt_forward(head, tb, valid, rows, row_ok, depth, label_temperature=cfg.label_temperature)
    per_seq = []
    for i, key in zip(indices, keys, strict=True):
        ids, mask = source.seqs[i]
        with_loss = loss_rows(len(ids), mask)
        if evaluation:
            anchors = [i for i, ok in enumerate(with_loss) if ok]
            per_seq.append((anchors, assign_anchor_rows(with_loss, anchors, 0)))
        else:
            anchors = sample_anchors(with_loss, cfg.anchors, random.Random(key))
            per_seq.append((anchors, assign_anchor_rows(with_loss, anchors, cfg.replicate)))
    device = head.fc.weight.device
    plan = plan_anchors(per_seq, device)
    if cfg.oracle_future:
        f = oracle_futures(tb, plan.anchors, cfg.oracle_future)
    else:
        f = contemplate_futures(source.target.model, head, tb, plan.anchors)
    aux = None
    if cfg.future_loss and not cfg.oracle_future:
        aux = future_prediction_ce(f, tb, plan.anchors, plan.anchor_ok, source.labels, cfg.future_ahead)
    if cfg.stage == "future":
        res = TTTResult.empty(depth, device)
    else:
        if cfg.zero_future:
            f = torch.zeros_like(f)
        future = f[torch.arange(len(indices), device=device)[:, None], plan.row_slot]
        res = ttt_forward(head, tb, valid, plan.rows, plan.row_ok, depth, future, cfg.label_temperature)
    if aux is not None:
        res.future_ce_sum, res.future_count, res.future_correct = aux
    return res


def _autocast(device: torch.device):
    # bf16 only on CUDA: on CPU it is several times slower than fp32 (NOTES section 4).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _stats_vector(res, cfg: TrainConfig) -> Tensor:
    """Per-step sums padded to `ttt_steps` (a curriculum step runs fewer), tau's two sums, then the future
    loss's sum, and its counts and hits per k of `future_ahead` (zeros without it)."""
    pad = cfg.ttt_steps - len(res.count)
    per_step = [torch.nn.functional.pad(x, (0, pad)) for x in (res.ce_sum.detach().float(), res.count, res.correct)]
    zero = res.tau_sum.new_zeros(())
    future = [res.future_ce_sum.detach().float().reshape(1), res.future_count, res.future_correct] \
        if res.future_ce_sum is not None else [zero.new_zeros(1 + 2 * len(cfg.future_ahead))]
    return torch.cat([*per_step, torch.stack([res.tau_sum, res.tau_rows]), *future])


def _stats_size(cfg: TrainConfig) -> int:
    return 3 * cfg.ttt_steps + 3 + 2 * len(cfg.future_ahead)


def _metrics(stats: Tensor, cfg: TrainConfig) -> dict[str, Any]:
    steps = cfg.ttt_steps
    ce, count, correct = stats[:steps], stats[steps : 2 * steps], stats[2 * steps : 3 * steps]
    tau_sum, tau_rows, future_ce = stats[3 * steps : 3 * steps + 3]
    future_count, future_correct = stats[3 * steps + 3 :].chunk(2)
    safe = count.clamp(min=1)
    weights = torch.tensor([cfg.ttt_decay**k for k in range(steps)], dtype=stats.dtype, device=stats.device)
    metrics = {
        "loss": float((weights * ce / safe).sum()),
        "acc": [round(float(a), 4) for a in correct / safe],
        "tau": float(tau_sum / tau_rows.clamp(min=1)),
        "rows": int(tau_rows),
    }
    if future_count.sum() > 0:
        metrics["future_ce"] = round(float(future_ce / future_count.sum()), 4)
        metrics["future_acc"] = {k: round(float(c / n), 4) for k, c, n in
                                 zip(cfg.future_ahead, future_correct, future_count.clamp(min=1), strict=True)}
    return metrics


def _local_part(global_ids: list[int], d: _Dist) -> list[int]:
    return global_ids[d.rank :: d.world]


@torch.no_grad()
def evaluate(source: TargetSource, head, indices: Sequence[int], cfg: TrainConfig,
             d: _Dist | None = None) -> dict[str, Any]:
    """Held-out loss, per-step accuracy and simulated tau over dataset `indices` (summed over ranks when
    data-parallel)."""
    d = d or _Dist(device=head.fc.weight.device)
    stats = torch.zeros(_stats_size(cfg), device=head.fc.weight.device)
    lengths = [len(source.seqs[i][0]) for i in indices]
    batches = LengthBatches(lengths, cfg.batch_tokens, cfg.seed).epoch(0, shuffle=False)
    was_training = head.training
    head.eval()
    for batch in _local_part(batches, d):
        chunk = [indices[j] for j in batch]
        with _autocast(head.fc.weight.device):
            res = batch_forward(source, head, chunk, [f"eval:{i}" for i in chunk], cfg, evaluation=True)
        stats += _stats_vector(res, cfg)
    head.train(was_training)
    return _metrics(d.all_sum(stats), cfg)


def make_optimizer(head, cfg: TrainConfig, total_steps: int):
    main, aux = [], []  # aux: ConFu's own parts, at lr x aux_lr_mult
    for name, p in head.named_parameters():
        if p.requires_grad:
            (aux if name.split(".")[0] in ConFuHead.NEW_PARTS else main).append(p)
    groups = [{"params": main, "lr": cfg.lr}]
    if aux:
        groups.append({"params": aux, "lr": cfg.lr * cfg.aux_lr_mult})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.03 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ------------------------------------------------------------------------------------------- checkpoints


def _save_checkpoint(out: Path, head, opt, sched, step: int, elapsed: float, tokens: int, run_keys: dict,
                     provenance: dict) -> None:
    """Draft + trainer state into OUT/checkpoint, swapped in as a whole so a crash never leaves a mix."""
    from confu.engine.checkpoint import save_draft

    final, tmp, old = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".tmp"), out / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_draft(head, tmp)
    state = {
        "step": step,
        "provenance": provenance,  # how the head began (init, vocabulary, fc scale): the draft's config gets it at the end
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "elapsed_s": elapsed,
        "tokens": tokens,
        "run": run_keys,
    }
    torch.save(state, tmp / TRAINER_STATE)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old: a crash between the two renames
        path = out / name
        if (path / TRAINER_STATE).is_file():
            return path
    return None


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines of steps a crashed run did after its last checkpoint (they are redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> Path:
    """Train a draft head; returns OUT (the final fp32 draft). `on_step(step, metrics)` runs after every
    optimizer step (tests raise from it to simulate a crash)."""
    from confu.engine.checkpoint import load_draft, save_draft
    from confu.engine.target import Target

    d = _setup(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    parts = load_parts(cfg.data, cfg.max_len)
    seqs = [s for part in parts for s in part]
    train_idx, eval_idx = split_indices(len(seqs), cfg.eval_fraction, cfg.seed)
    train_seqs = [seqs[i] for i in train_idx]
    order = LengthBatches([len(ids) for ids, _ in train_seqs], cfg.batch_tokens, cfg.seed, min_size=d.world)
    total = cfg.steps or max(1, math.floor(cfg.epochs * order.per_epoch))
    run_keys = {k: (asdict(cfg) | {"total_steps": total})[k] for k in RESUME_KEYS}

    target = Target.load(cfg.target)
    ckpt = _find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = torch.load(ckpt / TRAINER_STATE, weights_only=False)
        # one path before --data took several; keys added since take the value such runs had
        was = RESUME_DEFAULTS | state["run"] | {"data": _as_list(state["run"].get("data"))}
        diff = [f"{k}: checkpoint {was.get(k)!r}, now {v!r}" for k, v in run_keys.items() if was.get(k) != v]
        if diff:
            raise InputError(f"--resume with different settings than {ckpt}: " + "; ".join(diff))
        head = load_draft(ckpt, target).train()
        # Checkpoints before the trainer state kept it: the head's own record (right for fresh heads only).
        provenance = state.get("provenance", dict(head.cfg.extra.get("training", {})))
    else:
        if cfg.resume and d.main:
            print(f"no checkpoint in {out}; starting from scratch", file=sys.stderr)
        state = None
        head, provenance = build_head(cfg, target, train_seqs)
        if "vocab_coverage" in provenance and d.main:
            print(f"draft vocabulary: {provenance['draft_vocab_size']} tokens, "
                  f"{provenance['vocab_coverage']:.2%} of response tokens")
    target.model.to(d.device)
    head.to(d.device)
    if d.world > 1:  # every rank starts from rank 0's weights, whatever its own init did
        import torch.distributed as dist

        for t in head.state_dict().values():
            dist.broadcast(t, 0)
    if cfg.freeze_lm_head:
        head.lm_head.weight.requires_grad_(False)
    if cfg.stage == "future":
        for name, p in head.named_parameters():
            p.requires_grad_(name.split(".")[0] in TARGET_SIDE_PARTS)
    source = open_source(target, head, parts, cfg, d)
    if state is None and not cfg.init and cfg.fc_rms:
        factor = scale_fc_to_rms(head, source, train_idx[:FC_RMS_SEQS], cfg.fc_rms, d)
        provenance |= {"fc_rms": cfg.fc_rms, "fc_init_factor": round(factor, 6)}
    opt, sched = make_optimizer(head, cfg, total)
    step, elapsed, tokens = 0, 0.0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        step, elapsed, tokens = state["step"], state["elapsed_s"], state["tokens"]

    log_path = out / LOG_NAME
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            log_path.write_text("")
        else:
            _trim_log(log_path, step)

    def log(record: dict[str, Any]) -> None:
        if d.main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    params = [p for p in head.parameters() if p.requires_grad]
    weights = [cfg.ttt_decay**k for k in range(cfg.ttt_steps)]
    last_eval: dict[str, Any] | None = None
    if eval_idx and cfg.eval_every and step == 0:
        last_eval = evaluate(source, head, eval_idx, cfg, d)
        log({"step": 0, "tokens": 0, "eval": last_eval})
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=f"train {cfg.method}", disable=not (d.main and cfg.progress),
               dynamic_ncols=True)
    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    while step < stop:
        tic = time.perf_counter()
        global_ids = order.batch(step)
        local = [train_idx[i] for i in _local_part(global_ids, d)]
        depth = cfg.ttt_depth(step, total)
        with _autocast(d.device):
            res = batch_forward(source, head, local, [f"{cfg.seed}:{step}:{i}" for i in local], cfg, False, depth)
        stats = d.all_sum(_stats_vector(res, cfg))
        counts = stats[cfg.ttt_steps : 2 * cfg.ttt_steps].clamp(min=1)
        # Normalised by the global counts, so summing the ranks' gradients gives the single-process gradient.
        loss = sum(w * res.ce_sum[k] / counts[k] for k, w in enumerate(weights[:depth]))
        if res.future_ce_sum is not None:
            future_count = stats[3 * cfg.ttt_steps + 3 :].chunk(2)[0].sum().clamp(min=1)  # global, as the draft's
            loss = loss + cfg.future_loss * res.future_ce_sum / future_count
        loss.backward()
        if d.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = d.all_sum(torch.cat([g.reshape(-1) for g in grads]))
            for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = g.view_as(p).clone()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - tic
        elapsed += seconds
        batch_tokens = sum(len(train_seqs[i][0]) for i in global_ids)
        tokens += batch_tokens
        metrics = _metrics(stats, cfg)
        record = {"step": step, "tokens": tokens, "depth": depth, "loss": round(metrics["loss"], 5),
                  "acc": metrics["acc"], "tau": round(metrics["tau"], 4), "lr": sched.get_last_lr()[0],
                  "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(batch_tokens / seconds, 1),
                  "elapsed_s": round(elapsed, 2)} | {k: metrics[k] for k in ("future_ce", "future_acc")
                                                     if k in metrics}
        log(record)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc'][0]:.3f}",
                        tau=f"{metrics['tau']:.2f}")
        bar.update(1)
        if eval_idx and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            last_eval = evaluate(source, head, eval_idx, cfg, d)
            log({"step": step, "tokens": tokens, "eval": last_eval})
            future = f" future ce {last_eval['future_ce']:.4f} acc {last_eval['future_acc']}" \
                if "future_ce" in last_eval else ""
            draft = "" if cfg.stage == "future" else \
                f" loss {last_eval['loss']:.4f} acc {last_eval['acc'][0]:.3f} tau {last_eval['tau']:.3f}"
            bar.write(f"step {step}: eval{draft}{future}")
        if d.main and ((cfg.save_every and step % cfg.save_every == 0) or (step == stop < total)):
            _save_checkpoint(out, head, opt, sched, step, elapsed, tokens, run_keys, provenance)
        d.barrier()
        if on_step is not None:
            on_step(step, record)
    bar.close()

    if step >= total and d.main:
        head.cfg.extra = {**head.cfg.extra, "training": {
            **provenance,
            "method": cfg.method,
            "target": cfg.target,
            "data": cfg.data,
            "data_samples": len(train_seqs),
            "data_tokens": sum(len(ids) for ids, _ in train_seqs),
            "loss_tokens": sum(sum(m) for _, m in train_seqs),
            "steps": total,
            "batch_tokens": cfg.batch_tokens,
            "tokens_seen": tokens,
            **({"oracle_future": cfg.oracle_future} if cfg.oracle_future else {}),
            "world_size": d.world,
            "train_time_s": round(elapsed, 1),
            "final_eval": last_eval,
            "command": cfg.command,
        }}
        save_draft(head, out)
        if cfg.save_fp16:
            save_draft(head, out / "fp16", torch.float16)
        print(f"wrote the {cfg.method} draft to {out} ({step} steps, {elapsed:.0f} s)")
    d.barrier()
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


def evaluate_draft(draft_dir: str, cfg: TrainConfig, whole: bool = False) -> dict[str, Any]:
    """Held-out metrics of a saved draft, on the split `confu train` holds out with the same data, max length,
    eval fraction and seed; with `whole`, on every sequence of the data (files no training run has read)."""
    from confu.engine.checkpoint import load_draft
    from confu.engine.target import Target

    d = _setup(cfg.device)
    parts = load_parts(cfg.data, cfg.max_len)
    n = sum(len(p) for p in parts)
    eval_idx = list(range(n)) if whole else split_indices(n, cfg.eval_fraction, cfg.seed)[1]
    if not eval_idx:
        raise InputError(f"--eval-fraction {cfg.eval_fraction} holds out no sequence of {' '.join(cfg.data)}")
    target = Target.load(cfg.target)
    head = load_draft(draft_dir, target).float()
    if (cfg.zero_future or cfg.oracle_future) and not method_of(head).reads_future:
        raise InputError("--zero-future and --oracle-future need a ConFu draft")
    target.model.to(d.device)
    head.to(d.device)
    return evaluate(open_source(target, head, parts, cfg, d), head, eval_idx, cfg, d)
