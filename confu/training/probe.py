"""`confu probe-future`: does a ConFu draft's future prediction `f` carry signal, and does its draft read it?

Every number comes from one teacher-forced pass over held-out sequences, with a contemplate token after every
response row (the inference setting with a slot on every node, `batch_forward(..., evaluation=True)`):

- **diversity**: mean pairwise cosine of f over rows, and the share of its energy (sum of squares) in its
  largest dimension; the same for the target's own final hidden states, for scale. A constant f says nothing.
- **lm_head accuracy**: how often the target's own output layer, reading f, names x_{a+k}, the token k
  positions after the contemplate's anchor a (k = 1: the token the target emits next; 2: the one the draft's
  first step guesses).
- **linear probe**: a linear map fitted (softmax cross-entropy, `fit_probe`) on half of the held-out sequences
  and scored on the other half, from f, and for comparison from the target's final hidden state at the anchor
  (what the target knows without contemplating), to x_{a+k} in the draft vocabulary.
- **attention share**: per draft depth, the attention mass each row's query puts on its own future key, and
  that mass over uniform attention (1 / keys attended).
- **tau** of the train-time test with the real f, with f = 0, and with an oracle f (the target's final hidden
  state at a+1, which holds x_{a+2}).
- **ceiling**: with the draft frozen, `logits + norm(f) W` fitted on one half and scored on the other, for
  draft steps 0 and 1: the accuracy f could add if the draft read all of it, for the real and the oracle f,
  and for a constant in place of f (what a learned logit bias alone adds: a real f's own share is its gain
  above that).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from confu.engine.registry import method_of
from confu.errors import InputError

AHEAD = (1, 2, 3)
CEILING_STEPS = (0, 1)
DIVERSITY_ROWS = 2000  # rows sampled for the pairwise cosine
RIDGE = 1e-3  # the linear probe's ridge, per row
CEILING_EPOCHS = 8
CEILING_BATCH = 256
CEILING_LR = 3e-3
CEILING_ROWS = 6000  # rows per half for the ceiling probe (each carries the draft's logits over its vocabulary)


@dataclass
class _Rows:
    """Per-row tensors gathered over batches, one list entry per batch."""

    parts: dict[str, list[Tensor]] = field(default_factory=dict)

    def add(self, name: str, x: Tensor) -> None:
        self.parts.setdefault(name, []).append(x.detach().float().cpu() if x.is_floating_point() else x.cpu())

    def get(self, name: str) -> Tensor:
        return torch.cat(self.parts[name])


def diversity(x: Tensor, rows: int = DIVERSITY_ROWS, seed: int = 0) -> dict[str, float]:
    """Mean pairwise cosine (off-diagonal) of up to `rows` sampled rows of x (N, H), and the share of x's
    energy in its largest dimension."""
    if len(x) < 2:
        raise InputError("diversity needs at least two rows")
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:rows]
    u = F.normalize(x[pick].double(), dim=-1)
    n = len(u)
    cosine = ((u @ u.T).sum() - n) / (n * (n - 1))
    energy = x.double().pow(2).sum(0)
    return {"mean_pairwise_cosine": round(float(cosine), 4), "top_dim_energy": round(float(energy.max() / energy.sum()), 4)}


def ridge_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, classes: int,
                ridge: float = RIDGE) -> dict[str, Any]:
    """Held-out top-1 accuracy of a least-squares linear classifier: `[rms_norm(x), 1] W` fitted in closed form
    to one-hot labels (ridge `ridge` times the row count). x: (N, H) features, y: (N,) ids in [0, classes)."""
    def design(x: Tensor) -> Tensor:
        return torch.cat([F.rms_norm(x.double(), x.shape[-1:]), torch.ones(len(x), 1, dtype=torch.double)], 1)

    a = design(x_train)
    rhs = torch.zeros(a.shape[1], classes, dtype=torch.double).index_add_(1, y_train, a.T.contiguous())
    gram = a.T @ a + ridge * len(a) * torch.eye(a.shape[1], dtype=torch.double)
    weight = torch.linalg.solve(gram, rhs)
    acc = float((design(x_test) @ weight).argmax(-1).eq(y_test).double().mean())
    return {"accuracy": round(acc, 4), "train_rows": len(y_train), "test_rows": len(y_test)}


def ceiling_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, base_train: Tensor,
                  base_test: Tensor, epochs: int = CEILING_EPOCHS, seed: int = 0) -> dict[str, Any]:
    """What a frozen draft could gain from reading x: `base + rms_norm(x) W` (W from zero, so the fit starts at
    the base's own accuracy) fitted by minibatch Adam on softmax cross-entropy; held-out top-1 accuracy of the
    base and of the fit. base: (N, classes) the draft's logits; y: (N,) ids in [0, classes)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [F.rms_norm(x, x.shape[-1:]) for x in (x_train, x_test)]
    weight = torch.zeros(x_train.shape[1], base_train.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight], lr=CEILING_LR)
    for _ in range(epochs):
        for idx in torch.randperm(len(y_train), generator=gen).split(CEILING_BATCH):
            opt.zero_grad()
            F.cross_entropy(base_train[idx] + xs[0][idx] @ weight, y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((base_test + xs[1] @ weight).argmax(-1).eq(y_test).float().mean())
    base_acc = float(base_test.argmax(-1).eq(y_test).float().mean())
    return {"base_accuracy": round(base_acc, 4), "accuracy": round(acc, 4), "gain": round(acc - base_acc, 4),
            "train_rows": len(y_train), "test_rows": len(y_test)}


def future_attention_share(view) -> tuple[Tensor, Tensor]:
    """Per valid row of a `StepView` whose last M keys are the rows' future keys: the attention mass on the row's
    own future key (mean over heads), and that mass times the number of keys the row attends."""
    q, keys, mask = view.query, view.keys, view.mask
    b, heads, m, d = q.shape
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
    scores = q.float() @ keys.float().transpose(-1, -2) / d**0.5  # (B, heads, M, K)
    seen = torch.isfinite(mask) if mask.is_floating_point() else mask
    scores = scores + mask.float() if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, -1)
    k_total = scores.shape[-1]
    own = torch.arange(m)
    share = probs[:, :, own, k_total - m + own].mean(1)  # (B, M)
    attended = seen.expand(b, heads, m, k_total)[:, 0].sum(-1).float()  # (B, M)
    return share[view.valid], (share * attended)[view.valid]


def probe_future(source, head, indices: list[int], cfg, seed: int = 0) -> dict[str, Any]:
    """The report of the module docstring for the held-out dataset `indices` of `source` (a `TargetSource` with
    KV); `cfg` a `TrainConfig` for batching and the TTT depth."""
    from confu.training.batching import LengthBatches
    from confu.training.ttt import (
        contemplate_futures,
        every_anchor,
        gather_rows,
        loss_rows,
        oracle_futures,
        plan_anchors,
        step_validity,
        ttt_forward,
    )

    if not method_of(head).reads_future:
        raise InputError("probe-future needs a ConFu draft (an EAGLE-3 head has no future prediction)")
    if len(indices) < 2:
        raise InputError("probe-future needs at least two held-out sequences (half fit the probes, half score)")
    fit_half = set(random.Random(f"probe:{seed}").sample(indices, len(indices) // 2))
    rows = _Rows()
    tau = {"real": [0.0, 0.0], "zero": [0.0, 0.0], "oracle": [0.0, 0.0]}
    attention: dict[int, list[Tensor]] = {}
    lengths = [len(source.seqs[i][0]) for i in indices]
    head.eval()
    for batch in LengthBatches(lengths, cfg.batch_tokens, cfg.seed).epoch(0, shuffle=False):
        chunk = [indices[j] for j in batch]
        with torch.no_grad():
            tb = source.batch(head, chunk, keep_kv=True)
            per_seq = [every_anchor(loss_rows(len(source.seqs[i][0]), source.seqs[i][1])) for i in chunk]
            plan = plan_anchors(per_seq, tb.input_ids.device)
            f = contemplate_futures(source.target.model, head, tb, plan.anchors)
            oracle = oracle_futures(tb, plan.anchors, 1)
            valid = step_validity(tb, cfg.ttt_steps)
        ok = plan.anchor_ok
        in_fit_half = torch.tensor([i in fit_half for i in chunk])[:, None]
        rows.add("f", f[ok])
        rows.add("own", gather_rows(tb.last_hidden, plan.anchors)[ok])
        rows.add("fit", in_fit_half.expand_as(ok)[ok])
        for k in AHEAD:
            at = plan.anchors + (k - 1)
            label = gather_rows(tb.argmax, at.clamp(max=tb.shape[1] - 1))
            rows.add(f"label{k}", torch.where(at < tb.lengths[:, None], label, torch.full_like(at, -1))[ok])
        bidx = torch.arange(len(chunk))[:, None]
        row_f, row_oracle = f[bidx, plan.row_slot], oracle[bidx, plan.row_slot]
        for name, fut in (("real", row_f), ("zero", torch.zeros_like(row_f)), ("oracle", row_oracle)):
            views = []
            with torch.no_grad():
                res = ttt_forward(head, tb, valid, plan.rows, plan.row_ok, cfg.ttt_steps, fut, observe=views.append)
            tau[name][0] += float(res.tau_sum)
            tau[name][1] += float(res.tau_rows)
            if name != "real":
                continue
            for view in views:
                share, ratio = future_attention_share(view)
                attention.setdefault(view.step, []).append(torch.stack([share, ratio], -1))
                if view.step in CEILING_STEPS:
                    label = gather_rows(tb.argmax, view.label_rows)
                    keep = view.valid & head.t2d[label]
                    rows.add(f"c{view.step}_logits", view.logits[keep])
                    rows.add(f"c{view.step}_label", _target_to_draft(head, label)[keep])
                    rows.add(f"c{view.step}_fit", in_fit_half.expand_as(keep)[keep])
                    rows.add(f"c{view.step}_f", row_f[keep])
                    rows.add(f"c{view.step}_oracle", row_oracle[keep])
    return _report(source, head, rows, tau, attention)


def _target_to_draft(head, target_ids: Tensor) -> Tensor:
    """Draft ids of target ids (those outside the draft vocabulary map to 0; callers mask them)."""
    lookup = torch.zeros(len(head.t2d), dtype=torch.long, device=target_ids.device)
    draft_targets = torch.arange(len(head.d2t), device=target_ids.device) + head.d2t
    lookup[draft_targets] = torch.arange(len(head.d2t), device=target_ids.device)
    return lookup[target_ids]


def _lm_head_accuracy(source, f: Tensor, labels: Tensor, chunk: int = 1024) -> float:
    """Share of rows whose target output layer, reading f (final-norm hidden states), names the label."""
    from confu.training.features import DraftLabels

    target = source.target
    full = DraftLabels(target, torch.arange(target.vocab_size))
    keep = labels >= 0
    f, labels = f[keep], labels[keep]
    hits = sum(int((full(f[i:i + chunk]).argmax(-1) == labels[i:i + chunk]).sum()) for i in range(0, len(f), chunk))
    return round(hits / max(1, len(f)), 4)


def _report(source, head, rows: _Rows, tau: dict, attention: dict[int, list[Tensor]]) -> dict[str, Any]:
    f, own, fit = rows.get("f"), rows.get("own"), rows.get("fit")
    vd = len(head.d2t)
    report: dict[str, Any] = {"rows": len(f), "diversity": {"f": diversity(f), "target_final_hidden": diversity(own)}}
    report["lm_head_accuracy"] = {k: _lm_head_accuracy(source, f, rows.get(f"label{k}")) for k in AHEAD}
    probe: dict[str, Any] = {}
    for k in AHEAD:
        label = rows.get(f"label{k}")
        in_vocab = (label >= 0) & head.t2d.cpu()[label.clamp(min=0)]
        y = _target_to_draft(head, label.clamp(min=0).to(head.d2t.device)).cpu()
        train, test = in_vocab & fit, in_vocab & ~fit
        probe[k] = {name: ridge_probe(x[train], y[train], x[test], y[test], vd)
                    for name, x in (("f", f), ("target_final_hidden", own))}
    report["linear_probe"] = probe
    report["attention_share"] = {}
    for step, parts in sorted(attention.items()):
        share, ratio = torch.cat(parts).mean(0).tolist()
        report["attention_share"][step] = {"mass": round(share, 5), "over_uniform": round(ratio, 3)}
    report["tau"] = {name: round(s / max(1.0, n), 4) for name, (s, n) in tau.items()}
    ceiling: dict[str, Any] = {}
    for step in CEILING_STEPS:
        if f"c{step}_logits" not in rows.parts:
            continue
        base, y, cfit = rows.get(f"c{step}_logits"), rows.get(f"c{step}_label"), rows.get(f"c{step}_fit")
        tr = cfit.nonzero()[:, 0][:CEILING_ROWS]
        te = (~cfit).nonzero()[:, 0][:CEILING_ROWS]
        real = rows.get(f"c{step}_f")
        ceiling[step] = {name: ceiling_probe(x[tr], y[tr], x[te], y[te], base[tr], base[te])
                         for name, x in (("real", real), ("oracle", rows.get(f"c{step}_oracle")),
                                         ("constant", torch.ones_like(real)))}
    report["ceiling"] = ceiling
    return report


def probe_draft(draft_dir: str, cfg, whole: bool = False, max_seqs: int | None = None) -> dict[str, Any]:
    """`probe_future` for a saved draft on the split `confu train` holds out of `cfg.data` (or all of it with
    `whole`), at most `max_seqs` sequences of it."""
    from confu.engine.convert import load_draft
    from confu.engine.target import Target
    from confu.training.batching import load_parts, setup_distributed, split_indices
    from confu.training.forward import open_source

    d = setup_distributed(cfg.device)
    parts = load_parts(cfg.data, cfg.max_len)
    n = sum(len(p) for p in parts)
    indices = list(range(n)) if whole else split_indices(n, cfg.eval_fraction, cfg.seed)[1]
    indices = indices[:max_seqs] if max_seqs else indices
    target = Target.load(cfg.target)
    head = load_draft(draft_dir, target).float()
    target.to(d.device)
    head.to(d.device)
    report = probe_future(open_source(target, head, parts, cfg, d), head, indices, cfg, cfg.seed)
    return {"draft": draft_dir, "sequences": len(indices)} | report
