"""The training-time computations: the frozen target's pass, ConFu's contemplate pass and the train-time test.

Row convention (the same as `confu.engine.drafter`): draft row i pairs the target's features F_i with the embedding
of token x_{i+1} and sits at RoPE position i. Its step-0 output predicts x_{i+2}; train-time-test step k feeds
the ground-truth token x_{i+1+k} and the row's own step k-1 output at position i+k, and predicts x_{i+2+k}
against softmax(target logits at position i+1+k), restricted to the draft vocabulary.

A query at step k sees the step-0 keys of rows <= i, its own keys of steps 1..k and, for ConFu, its own future
key: exactly what a tree node at depth k sees at inference (the committed rows, its ancestors, the round's
future key). Everything here takes a leading batch dimension of right-padded sequences.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from confu.engine.draft import ConFuHead, Eagle3Head
from confu.engine.target import AttentionLayout, cache_keyword


@dataclass
class TargetBatch:
    """What the frozen target gives one batch of right-padded sequences (no gradients anywhere)."""

    input_ids: Tensor  # (B, N) long, padded with 0
    lengths: Tensor  # (B,) long, real tokens per sequence
    loss_mask: Tensor  # (B, N) bool, response tokens
    features: Tensor  # (B, N, 3H) EAGLE-3 features F_i
    logits: Tensor  # (B, N, Vd) target logits of position i over the draft vocabulary (predicts x_{i+1})
    argmax: Tensor  # (B, N) target id of the target's argmax over its full vocabulary
    in_vocab: Tensor  # (B, N) bool, that argmax is a draft-vocabulary token
    last_hidden: Tensor  # (B, N, H) the target's final-norm hidden states (the oracle future of ConFu's probe)
    kv: list[tuple[Tensor, Tensor]] | None  # per target layer (keys, values) of the sequence (ConFu only)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]


@dataclass
class TTTResult:
    """Per-step sums over the batch. Sums (not means) so data-parallel ranks can add them up exactly."""

    ce_sum: Tensor  # (L,) soft cross-entropy summed over valid rows, with gradients
    count: Tensor  # (L,) valid rows per step
    correct: Tensor  # (L,) valid rows whose draft argmax equals the target argmax
    tau_sum: Tensor  # () sum over rows valid at step 0 of the simulated acceptance length
    tau_rows: Tensor  # () rows valid at step 0
    future_ce_sum: Tensor | None = None  # () ConFu `--future-loss`: `future_prediction_ce`, with gradients
    future_count: Tensor | None = None  # (len(ahead),) anchors scored for each k
    future_correct: Tensor | None = None  # (len(ahead),) anchors whose f names the token k ahead

    @classmethod
    def empty(cls, steps: int, device: torch.device | str) -> TTTResult:
        """No draft rows (`--stage future` runs no train-time test)."""
        zeros = torch.zeros(steps, device=device)
        return cls(ce_sum=zeros, count=zeros, correct=zeros, tau_sum=zeros.new_zeros(()), tau_rows=zeros.new_zeros(()))


@dataclass
class StepView:
    """What one train-time-test step computed, for probes (`ttt_forward(..., observe=...)`)."""

    step: int
    query: Tensor  # (B, heads, M, d) rotated queries
    keys: Tensor  # (B, kv_heads, K, d) every key the step attends; for ConFu the last M are the rows' future keys
    mask: Tensor  # (B, 1 or heads, M, K) bool (True = attend) or float logit offsets
    logits: Tensor  # (B, M, Vd) draft logits
    valid: Tensor  # (B, M) rows with a loss target at this step
    label_rows: Tensor  # (B, M) sequence row whose target logits are this step's labels


def collate(samples: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device | str = "cpu"):
    """(ids, loss_mask) pairs -> right-padded (input_ids, lengths, loss_mask) tensors."""
    n = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), n, dtype=torch.long)
    loss_mask = torch.zeros(len(samples), n, dtype=torch.bool)
    for b, (ids, mask) in enumerate(samples):
        input_ids[b, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        loss_mask[b, : len(mask)] = torch.as_tensor(list(mask), dtype=torch.bool)
    lengths = torch.tensor([len(ids) for ids, _ in samples], dtype=torch.long)
    return input_ids.to(device), lengths.to(device), loss_mask.to(device)


@torch.no_grad()
def run_target(model, feature_layers: Sequence[int], head: Eagle3Head, input_ids: Tensor, lengths: Tensor,
               loss_mask: Tensor, keep_kv: bool = False) -> TargetBatch:
    """One plain causal forward of the frozen target over the batch.

    No attention mask is needed: with right padding no real token can see a pad, and pad rows get no loss.
    For ConFu the sequence's KV entries are kept for the contemplate pass, every layer's in full (a cache
    built without the config: a sliding-window layer of transformers' own cache would evict all but its
    window). Running this pass without the soft prompt is exact: ordinary rows never attend the soft prompt,
    so neither their outputs nor their KV entries depend on it (the property that makes ConFu lossless).
    """
    cache_arg = cache_keyword(model)
    out = model(input_ids=input_ids, **{cache_arg: DynamicCache() if keep_kv else None},
                use_cache=keep_kv, output_hidden_states=True)
    hidden = out.hidden_states
    features = torch.cat([hidden[i] for i in feature_layers], dim=-1)
    logits = out.logits
    argmax = logits.argmax(-1)
    draft_ids = torch.arange(len(head.d2t), device=logits.device) + head.d2t
    kv = None
    if keep_kv:
        kv = [(layer.keys, layer.values) for layer in out[cache_arg].layers]
    return TargetBatch(
        input_ids=input_ids,
        lengths=lengths,
        loss_mask=loss_mask,
        features=features,
        last_hidden=hidden[-1],
        logits=logits.index_select(-1, draft_ids),
        argmax=argmax,
        in_vocab=head.t2d[argmax],
        kv=kv,
    )


def stored_target_batch(store, labels, head: Eagle3Head, seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
                        indices: Sequence[int], device: torch.device | str = "cpu") -> TargetBatch:
    """`run_target`'s batch read back from a `FeatureStore` or `StoreSet` (dataset indices `indices` of `seqs`).

    labels: a `DraftLabels` for the head's draft vocabulary (soft labels from the stored hidden states).
    """
    input_ids, lengths, loss_mask = collate([seqs[i] for i in indices], device)
    b, n = input_ids.shape
    h = store.hidden_size
    features = torch.zeros(b, n, 3 * h)
    last = torch.zeros(b, n, h)
    argmax = torch.zeros(b, n, dtype=torch.long)
    for r, i in enumerate(indices):
        feats, hidden, top = store.sequence(i)
        m = len(top)
        features[r, :m] = torch.from_numpy(feats)
        last[r, :m] = torch.from_numpy(hidden)
        argmax[r, :m] = torch.from_numpy(top)
    argmax = argmax.to(device)
    last = last.to(device)
    return TargetBatch(input_ids=input_ids, lengths=lengths, loss_mask=loss_mask, features=features.to(device),
                       last_hidden=last, logits=labels(last), argmax=argmax, in_vocab=head.t2d[argmax], kv=None)


def step_validity(tb: TargetBatch, ttt_steps: int) -> Tensor:
    """(B, N, L) bool: row i has a loss target at step k.

    The predicted token x_{i+2+k} must exist and be a response token, and the target's argmax at position
    i+1+k must be a draft-vocabulary token (the draft could never match it otherwise).
    """
    b, n = tb.shape
    rows = torch.arange(n, device=tb.input_ids.device)
    bidx = torch.arange(b, device=rows.device)[:, None]
    steps = []
    for k in range(ttt_steps):
        pred = rows + 2 + k
        exists = pred[None] < tb.lengths[:, None]
        pred_c = pred.clamp(max=n - 1)
        logit_pos = (rows + 1 + k).clamp(max=n - 1)
        steps.append(exists & tb.loss_mask[bidx, pred_c[None]] & tb.in_vocab[bidx, logit_pos[None]])
    return torch.stack(steps, dim=-1)


def loss_rows(lengths: int, loss_mask: Sequence[int] | Tensor) -> list[bool]:
    """Rows whose step-0 prediction x_{i+2} is a response token: where anchors may sit."""
    mask = [bool(m) for m in loss_mask]
    return [i + 2 < lengths and mask[i + 2] for i in range(lengths)]


def every_anchor(rows_with_loss: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Evaluation's anchors: every row with loss, each using its own f (no replication), the setting of
    inference with a contemplate slot on every node. Returns (anchors, anchor of each row)."""
    anchors = [i for i, ok in enumerate(rows_with_loss) if ok]
    return anchors, assign_anchor_rows(rows_with_loss, anchors, 0)


def sample_anchors(rows_with_loss: Sequence[bool], k: int, rng: random.Random) -> list[int]:
    """Up to k distinct anchor rows among the rows with loss, ascending."""
    candidates = [i for i, ok in enumerate(rows_with_loss) if ok]
    return sorted(rng.sample(candidates, min(k, len(candidates))))


def assign_anchor_rows(rows_with_loss: Sequence[bool], anchors: Sequence[int], replicate: int) -> list[int]:
    """Anchor used by each row (-1: none, and then the row gets no loss).

    Future-prediction replication: f_a serves rows a, a+1, ..., a+replicate that are rows with loss. Where
    windows overlap, a row takes the nearest anchor before it (the freshest f, as at inference).
    """
    n = len(rows_with_loss)
    anchor_of = [-1] * n
    for a in sorted(anchors):  # ascending, so a later (nearer) anchor overwrites an earlier one
        for i in range(a, min(a + replicate + 1, n)):
            if rows_with_loss[i]:
                anchor_of[i] = a
    return anchor_of


@dataclass
class AnchorPlan:
    """ConFu's anchors for one batch, padded to rectangles."""

    anchors: Tensor  # (B, K) long anchor rows (0 where padded)
    anchor_ok: Tensor  # (B, K) bool
    rows: Tensor  # (B, M) long draft rows that get loss (0 where padded)
    row_ok: Tensor  # (B, M) bool
    row_slot: Tensor  # (B, M) long index into the K anchors of the anchor each row uses


def plan_anchors(per_seq: Sequence[tuple[list[int], list[int]]],
                 device: torch.device | str = "cpu") -> AnchorPlan:
    """per_seq: (anchors, anchor_of_row) for each sequence -> padded tensors."""
    b = len(per_seq)
    k = max(1, max(len(a) for a, _ in per_seq))
    m = max(1, max(sum(1 for x in rows if x >= 0) for _, rows in per_seq))
    anchors = torch.zeros(b, k, dtype=torch.long)
    anchor_ok = torch.zeros(b, k, dtype=torch.bool)
    rows = torch.zeros(b, m, dtype=torch.long)
    row_ok = torch.zeros(b, m, dtype=torch.bool)
    row_slot = torch.zeros(b, m, dtype=torch.long)
    for s, (anc, anchor_of) in enumerate(per_seq):
        slot = {a: j for j, a in enumerate(anc)}
        anchors[s, : len(anc)] = torch.tensor(anc, dtype=torch.long)
        anchor_ok[s, : len(anc)] = True
        used = [(i, slot[a]) for i, a in enumerate(anchor_of) if a >= 0]
        if used:
            rows[s, : len(used)] = torch.tensor([i for i, _ in used])
            row_slot[s, : len(used)] = torch.tensor([j for _, j in used])
            row_ok[s, : len(used)] = True
    return AnchorPlan(anchors.to(device), anchor_ok.to(device), rows.to(device), row_ok.to(device),
                      row_slot.to(device))


def contemplate_futures(model, head: ConFuHead, tb: TargetBatch, anchors: Tensor) -> Tensor:
    """f_a for each anchor: the final-norm hidden state of a [con] token placed after x_a.

    The [con] row sits at position a+1 and sees the soft prompt, x_0..x_a and itself (in sliding-window layers
    the soft prompt and the x_j with a+1 - j < window); its embedding is routed on F_{a-1} (zeros for a = 0),
    as in the decoder's prefill and verify passes. Only these K rows per
    sequence run, against a cache of [soft prompt | the sequence's KV from `run_target`]: the soft-prompt
    entries are the parameter itself (through `soft_prompt_kv`), so gradients reach it and the [con] MoE
    through the frozen target.
    """
    assert tb.kv is not None, "run_target(..., keep_kv=True) keeps the sequence's KV for ConFu"
    b, n = tb.shape
    k = anchors.shape[1]
    s = head.cfg.soft_prompt_len
    dtype = tb.kv[0][0].dtype
    soft = [(sk.to(dtype), sv.to(dtype)) for sk, sv in head.soft_prompt_kv(b)]
    cache = DynamicCache()  # full layers: the sliding-window ones hold the whole sequence too (`run_target`)
    for layer_idx, ((sk, sv), (keys, values)) in enumerate(zip(soft, tb.kv, strict=True)):
        # concatenation keeps the soft prompt's autograd link (the decoder's cache writes in place)
        cache.update(torch.cat([sk, keys], dim=-2), torch.cat([sv, values], dim=-2), layer_idx)
    bidx = torch.arange(b, device=anchors.device)[:, None]
    route = tb.features[bidx, (anchors - 1).clamp(min=0)] * (anchors > 0)[..., None].to(tb.features.dtype)
    con = head.contemplate_embedding(route.to(head.fc.weight.dtype))
    mask = torch.zeros(b, k, s + n + k, dtype=torch.bool, device=anchors.device)
    mask[:, :, :s] = True
    cols = torch.arange(n, device=anchors.device)
    real = cols[None, None] < tb.lengths[:, None, None]
    mask[:, :, s : s + n] = (cols[None, None] <= anchors[..., None]) & real
    mask[:, :, s + n :] = torch.eye(k, dtype=torch.bool, device=anchors.device)
    key_pos = torch.cat([torch.zeros(b, s, dtype=torch.long, device=anchors.device), cols.expand(b, n), anchors + 1], 1)
    out = model(
        inputs_embeds=con.to(dtype),
        position_ids=anchors + 1,
        attention_mask=AttentionLayout.of(model).masks(mask[:, None], anchors[:, None] + 1, key_pos[:, None], s),
        **{cache_keyword(model): cache},
        use_cache=True,
        output_hidden_states=True,
        logits_to_keep=1,  # the [con] rows need no logits
    )
    return out.hidden_states[-1]


def oracle_futures(tb: TargetBatch, anchors: Tensor, ahead: int) -> Tensor:
    """A future prediction that certainly holds the future, for probing the path from f to the loss: the
    target's own final-norm hidden state `ahead` positions after each anchor (clamped to the sequence)."""
    pos = torch.minimum(anchors + ahead, tb.lengths[:, None] - 1)
    return gather_rows(tb.last_hidden, pos)


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Cross-entropy of `logits` against softmax(`target_logits`) over the last dimension, in float32."""
    target_p = torch.softmax(target_logits.float(), dim=-1)
    return -(target_p * torch.log_softmax(logits.float(), dim=-1)).sum(-1)


def future_prediction_ce(f: Tensor, tb: TargetBatch, anchors: Tensor, anchor_ok: Tensor, labels,
                         ahead: Sequence[int] = (2,)) -> tuple[Tensor, Tensor, Tensor]:
    """How well the target's own output layer reads the tokens `ahead` of each anchor out of f: the auxiliary
    loss of `--future-loss` (a deviation from the paper, which trains f through the draft's loss only).

    For each k in `ahead`: soft cross-entropy of `labels(f_a)` (the target's logits over the draft vocabulary
    of a final-norm hidden state, `DraftLabels`) against the target's own distribution at row a+k-1, which
    predicts x_{a+k}. k = 2 is the token the draft's step 0 must guess at anchor row a; larger k make f a
    summary of the next few tokens. Returns the cross-entropy summed over every (anchor, k) whose row exists
    (with gradients), and per k (len(ahead),) the anchors scored and those whose argmax names the target's
    argmax at that row.
    """
    n = tb.shape[1]
    logits = labels(f)  # (B, K, Vd)
    guess = logits.argmax(-1)
    ce_sum = logits.new_zeros(())
    count, correct = [], []
    for k in ahead:
        rows = anchors + (k - 1)
        ok = anchor_ok & (rows < tb.lengths[:, None])
        target_logits = gather_rows(tb.logits, rows.clamp(max=n - 1))  # (B, K, Vd): they predict x_{a+k}
        ce = soft_cross_entropy(logits, target_logits)  # (B, K)
        ce_sum = ce_sum + torch.where(ok, ce, torch.zeros_like(ce)).sum()
        count.append(ok.sum())
        correct.append((ok & (guess == target_logits.argmax(-1))).sum())
    return ce_sum, torch.stack(count).float(), torch.stack(correct).float()


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, N, ...) at rows (B, M) -> (B, M, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], rows]


def _gather_heads(x: Tensor, rows: Tensor) -> Tensor:
    """x (B, heads, N, d) at rows (B, M) -> (B, heads, M, d)."""
    return gather_rows(x.transpose(1, 2), rows).transpose(1, 2)


def ttt_forward(head: Eagle3Head, tb: TargetBatch, valid: Tensor, rows: Tensor, row_ok: Tensor,
                ttt_steps: int, future: Tensor | None = None, label_temperature: float = 1.0,
                observe: Callable[[StepView], None] | None = None) -> TTTResult:
    """The train-time test for the query rows `rows` (B, M) (all keys of every row are always present).

    valid: (B, N, L) from `step_validity`. future: (B, M, H) f used by each query row (ConFu), or None.
    label_temperature: the soft labels are softmax(target logits / it) (`TrainConfig.label_temperature`).
    observe: called with each step's `StepView` (the probes of `confu.training.probe` read them).
    """
    layer = head.layer
    b, n = tb.shape
    m = rows.shape[1]
    dev = rows.device
    bidx = torch.arange(b, device=dev)[:, None]
    positions = torch.arange(n, device=dev).expand(b, n)
    next_ids = torch.cat([tb.input_ids[:, 1:], torch.zeros_like(tb.input_ids[:, :1])], dim=1)

    h = head.project_features(tb.features.to(head.fc.weight.dtype))  # (B, N, H)
    q0, k0, v0 = layer.qkv(head.embed(next_ids), h, positions)
    q = _gather_heads(q0, rows)
    hidden = gather_rows(h, rows)
    causal = rows[..., None] >= torch.arange(n, device=dev)  # (B, M, N): step-0 keys of rows <= i
    eye = torch.eye(m, dtype=torch.bool, device=dev).expand(b, m, m)
    keys, values, blocks = [k0], [v0], [causal]
    tail_k: list[Tensor] = []
    tail_v: list[Tensor] = []
    tail_mask: list[Tensor] = []
    shift = future_read = None
    if future is not None:
        shift = head.future_shift(future.to(hidden.dtype))
        future_read = head.future_logits(future.to(hidden.dtype))
        # One key per row at position i+1: [f] routed on h_i, hidden half f; seen by the row at every step.
        _, fk, fv = layer.qkv(head.future_embedding(hidden), future.to(hidden.dtype), rows + 1)
        tail_k, tail_v, tail_mask = [fk], [fv], [eye & row_ok[:, :, None]]

    # soft labels at the requested temperature, scaled once for every step (not at all at 1, the default)
    label_logits = tb.logits if label_temperature == 1.0 else tb.logits / label_temperature
    step_valid = valid[bidx, rows] & row_ok[..., None]  # (B, M, L)
    ce_sum, count, correct = [], [], []
    alive = step_valid[..., 0]
    accepted = torch.zeros(b, m, dtype=torch.long, device=dev)
    n_steps = min(ttt_steps, valid.shape[-1])
    for k in range(n_steps):
        if k > 0:
            ids_k = tb.input_ids[bidx, (rows + 1 + k).clamp(max=n - 1)]
            q, kk, vk = layer.qkv(head.embed(ids_k), hidden, rows + k)
            keys.append(kk)
            values.append(vk)
            blocks.append(eye)
        mask = torch.cat(blocks + tail_mask, dim=-1)[:, None]
        if future is not None:  # the last m columns are the rows' future keys
            mask = head.future_mask(mask, slice(mask.shape[-1] - m, None))
        out = layer.attend(hidden, q, torch.cat(keys + tail_k, 2), torch.cat(values + tail_v, 2), mask, shift)
        logits = head.logits(out).float()
        if future_read is not None:
            logits = logits + head.future_gate_at(k) * future_read
        logit_pos = (rows + 1 + k).clamp(max=n - 1)
        ce = soft_cross_entropy(logits, label_logits[bidx, logit_pos])  # (B, M)
        ok = step_valid[..., k]
        if observe is not None:
            observe(StepView(k, q, torch.cat(keys + tail_k, 2), mask, logits, ok, logit_pos))
        ce_sum.append(torch.where(ok, ce, torch.zeros_like(ce)).sum())
        count.append(ok.sum())
        hit = (head.to_target_ids(logits.argmax(-1)) == tb.argmax[bidx, logit_pos]) & ok
        correct.append(hit.sum())
        alive = alive & hit
        accepted = accepted + alive.long()
        hidden = out  # the next step feeds the draft's own output back (no detach: EAGLE-3 trains through it)
    first = step_valid[..., 0]
    return TTTResult(
        ce_sum=torch.stack(ce_sum),
        count=torch.stack(count).float(),
        correct=torch.stack(correct).float(),
        tau_sum=((accepted + 1) * first).sum().float(),
        tau_rows=first.sum().float(),
    )


def eagle3_rows(valid: Tensor) -> tuple[Tensor, Tensor]:
    """EAGLE-3 query rows: every row with a loss target at some step (prompt rows cost nothing)."""
    has = valid.any(-1)  # (B, N)
    m = max(1, int(has.sum(-1).max()))
    # Rows with loss first, each group ascending.
    order = torch.argsort((~has).to(torch.int8), dim=-1, stable=True)[:, :m]
    rows = order
    row_ok = torch.gather(has, 1, rows)
    return torch.where(row_ok, rows, torch.zeros_like(rows)), row_ok
