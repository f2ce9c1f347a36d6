"""What a training run leaves on disk: the resumable checkpoint (`OUT/checkpoint`: the draft and the trainer
state), the log (`train_log.jsonl`), and the provenance a finished draft carries in its config.

The trainer state is read as plain data (`torch.load(..., weights_only=True)`: tensors, numbers, strings, lists,
tuples and dicts), never by unpickling arbitrary objects, which would run whatever code a file names.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from confu.errors import CheckpointError, InputError
from confu.training.batching import Dist, Seq
from confu.training.train_config import RESUME_DEFAULTS, TrainConfig, as_list

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
LOG_NAME = "train_log.jsonl"


def save_checkpoint(out: Path, head, opt, sched, step: int, elapsed: float, tokens: int, run_keys: dict,
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


def find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):  # .old: a crash between the two renames
        path = out / name
        if (path / TRAINER_STATE).is_file():
            return path
    return None


def load_trainer_state(ckpt: Path, run_keys: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of the checkpoint `ckpt`, refused unless it was written with this run's `run_keys`."""
    path = ckpt / TRAINER_STATE
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds more than tensors and plain data, so it is not loaded (unpickling "
                              f"it could run any code it names); resume from a checkpoint confu wrote: {err}") from err
    # one path before --data took several; keys added since take the value such runs had
    was = RESUME_DEFAULTS | state["run"] | {"data": as_list(state["run"].get("data"))}
    diff = [f"{k}: checkpoint {was.get(k)!r}, now {v!r}" for k, v in run_keys.items() if was.get(k) != v]
    if diff:
        raise InputError(f"--resume with different settings than {ckpt}: " + "; ".join(diff))
    return state


def restore_trainer_state(state: dict[str, Any], opt, sched) -> tuple[int, float, int]:
    """Optimizer, schedule and random generators as the checkpoint left them; (step, elapsed s, tokens)."""
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"], state["elapsed_s"], state["tokens"]


def trim_log(path: Path, step: int) -> None:
    """Drop log lines of steps a crashed run did after its last checkpoint (they are redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def training_provenance(cfg: TrainConfig, provenance: dict[str, Any], train_seqs: list[Seq], total: int,
                        tokens: int, elapsed: float, last_eval: dict[str, Any] | None, d: Dist) -> dict[str, Any]:
    """What a finished draft's config records of the run that trained it (`DraftConfig.extra["training"]`)."""
    return {
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
    }
