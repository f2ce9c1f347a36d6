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
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from confu.engine.draft import ConFuHead
from confu.training.batching import LengthBatches, load_parts, local_part, setup_distributed, split_indices
from confu.training.checkpoints import (
    LOG_NAME,
    find_checkpoint,
    load_trainer_state,
    restore_trainer_state,
    save_checkpoint,
    training_provenance,
    trim_log,
)
from confu.training.forward import autocast, batch_forward, evaluate, open_source, stats_vector, step_metrics
from confu.training.heads import FC_RMS_SEQS, build_head, scale_fc_to_rms
from confu.training.train_config import RESUME_KEYS, TARGET_SIDE_PARTS, TrainConfig


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


def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> Path:
    """Train a draft head; returns OUT (the final fp32 draft). `on_step(step, metrics)` runs after every
    optimizer step (tests raise from it to simulate a crash)."""
    from confu.engine.checkpoint import save_draft
    from confu.engine.convert import load_draft
    from confu.engine.target import Target

    d = setup_distributed(cfg.device)
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
    ckpt = find_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        state = load_trainer_state(ckpt, run_keys)
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
    target.to(d.device)
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
        step, elapsed, tokens = restore_trainer_state(state, opt, sched)

    log_path = out / LOG_NAME
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            log_path.write_text("")
        else:
            trim_log(log_path, step)

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
        local = [train_idx[i] for i in local_part(global_ids, d)]
        depth = cfg.ttt_depth(step, total)
        with autocast(d.device):
            res = batch_forward(source, head, local, [f"{cfg.seed}:{step}:{i}" for i in local], cfg, False, depth)
        stats = d.all_sum(stats_vector(res, cfg))
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
        metrics = step_metrics(stats, cfg)
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
            save_checkpoint(out, head, opt, sched, step, elapsed, tokens, run_keys, provenance)
        d.barrier()
        if on_step is not None:
            on_step(step, record)
    bar.close()

    if step >= total and d.main:
        head.cfg.extra = {**head.cfg.extra, "training": training_provenance(
            cfg, provenance, train_seqs, total, tokens, elapsed, last_eval, d)}
        save_draft(head, out)
        if cfg.save_fp16:
            save_draft(head, out / "fp16", torch.float16)
        print(f"wrote the {cfg.method} draft to {out} ({step} steps, {elapsed:.0f} s)")
    d.barrier()
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out
