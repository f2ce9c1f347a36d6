"""One batch through the frozen target and the draft (`TargetSource`, `batch_forward`: EAGLE-3's train-time test,
ConFu's anchors and contemplate pass), what a batch's results add up to (`stats_vector`, `step_metrics`), and
held-out evaluation (`evaluate`, `evaluate_draft`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from confu.engine.registry import method_of
from confu.errors import InputError
from confu.training.batching import Dist, LengthBatches, Seq, load_parts, local_part, setup_distributed, split_indices
from confu.training.train_config import TrainConfig


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
        return run_target(self.target.reference_model, head.cfg.feature_layers, head, input_ids, lengths, loss_mask,
                          keep_kv)


def needs_kv(head, cfg: TrainConfig) -> bool:
    """The contemplate pass needs the sequence's KV cache (it runs unless the oracle replaces f)."""
    return method_of(head).reads_future and not cfg.oracle_future


def open_source(target, head, parts: Sequence[Sequence[Seq]], cfg: TrainConfig, d: Dist) -> TargetSource:
    """The source `cfg` asks for: with `feature_cache`, heads that need no KV read the stored target pass.

    parts: the sequences of each file of `cfg.data` (`load_parts`); each file has its own store.
    """
    from confu.training.features import DraftLabels, StoreSet, feature_store, store_key

    seqs = [s for part in parts for s in part]
    labels = DraftLabels(target, torch.arange(len(head.d2t)) + head.d2t.cpu())
    if not cfg.feature_cache or needs_kv(head, cfg):
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
        every_anchor,
        future_prediction_ce,
        loss_rows,
        oracle_futures,
        plan_anchors,
        sample_anchors,
        step_validity,
        ttt_forward,
    )

    depth = depth or cfg.ttt_steps
    tb = source.batch(head, indices, needs_kv(head, cfg))
    valid = step_validity(tb, depth)
    if not method_of(head).reads_future:
        rows, row_ok = eagle3_rows(valid)
        return ttt_forward(head, tb, valid, rows, row_ok, depth, label_temperature=cfg.label_temperature)
    per_seq = []
    for i, key in zip(indices, keys, strict=True):
        ids, mask = source.seqs[i]
        with_loss = loss_rows(len(ids), mask)
        if evaluation:
            per_seq.append(every_anchor(with_loss))
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


def autocast(device: torch.device):
    # bf16 only on CUDA: on CPU it is several times slower than fp32 (NOTES section 4).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def stats_vector(res, cfg: TrainConfig) -> Tensor:
    """Per-step sums padded to `ttt_steps` (a curriculum step runs fewer), tau's two sums, then the future
    loss's sum, and its counts and hits per k of `future_ahead` (zeros without it)."""
    pad = cfg.ttt_steps - len(res.count)
    per_step = [torch.nn.functional.pad(x, (0, pad)) for x in (res.ce_sum.detach().float(), res.count, res.correct)]
    zero = res.tau_sum.new_zeros(())
    future = [res.future_ce_sum.detach().float().reshape(1), res.future_count, res.future_correct] \
        if res.future_ce_sum is not None else [zero.new_zeros(1 + 2 * len(cfg.future_ahead))]
    return torch.cat([*per_step, torch.stack([res.tau_sum, res.tau_rows]), *future])


def stats_size(cfg: TrainConfig) -> int:
    return 3 * cfg.ttt_steps + 3 + 2 * len(cfg.future_ahead)


def step_metrics(stats: Tensor, cfg: TrainConfig) -> dict[str, Any]:
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


@torch.no_grad()
def evaluate(source: TargetSource, head, indices: Sequence[int], cfg: TrainConfig,
             d: Dist | None = None) -> dict[str, Any]:
    """Held-out loss, per-step accuracy and simulated tau over dataset `indices` (summed over ranks when
    data-parallel)."""
    d = d or Dist(device=head.fc.weight.device)
    stats = torch.zeros(stats_size(cfg), device=head.fc.weight.device)
    lengths = [len(source.seqs[i][0]) for i in indices]
    batches = LengthBatches(lengths, cfg.batch_tokens, cfg.seed).epoch(0, shuffle=False)
    was_training = head.training
    head.eval()
    for batch in local_part(batches, d):
        chunk = [indices[j] for j in batch]
        with autocast(head.fc.weight.device):
            res = batch_forward(source, head, chunk, [f"eval:{i}" for i in chunk], cfg, evaluation=True)
        stats += stats_vector(res, cfg)
    head.train(was_training)
    return step_metrics(d.all_sum(stats), cfg)


def evaluate_draft(draft_dir: str, cfg: TrainConfig, whole: bool = False) -> dict[str, Any]:
    """Held-out metrics of a saved draft, on the split `confu train` holds out with the same data, max length,
    eval fraction and seed; with `whole`, on every sequence of the data (files no training run has read)."""
    from confu.engine.convert import load_draft
    from confu.engine.target import Target

    d = setup_distributed(cfg.device)
    parts = load_parts(cfg.data, cfg.max_len)
    n = sum(len(p) for p in parts)
    eval_idx = list(range(n)) if whole else split_indices(n, cfg.eval_fraction, cfg.seed)[1]
    if not eval_idx:
        raise InputError(f"--eval-fraction {cfg.eval_fraction} holds out no sequence of {' '.join(cfg.data)}")
    target = Target.load(cfg.target)
    head = load_draft(draft_dir, target).float()
    if (cfg.zero_future or cfg.oracle_future) and not method_of(head).reads_future:
        raise InputError("--zero-future and --oracle-future need a ConFu draft")
    target.to(d.device)
    head.to(d.device)
    return evaluate(open_source(target, head, parts, cfg, d), head, eval_idx, cfg, d)
