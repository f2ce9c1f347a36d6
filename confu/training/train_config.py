"""`TrainConfig`: what a training run is asked to do (`confu train`'s options), checked on construction, and the
settings a resumed run must share with the run it continues."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from confu.engine.registry import HEAD_METHODS, head_method
from confu.errors import InputError

HEAD_INITS = ("target", "random")

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
        self.data = [str(p) for p in as_list(self.data)]
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


def as_list(data: str | Sequence[str] | None) -> Sequence[str] | None:
    """`--data` as a list: one path was a plain string (and is one in checkpoints written before several)."""
    return [data] if isinstance(data, str) else data
