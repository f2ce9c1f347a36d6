"""`confu train` and `confu evaluate`: the command line of `confu.training.train`.

torch is imported inside the handlers (through `confu.training.train`): `confu --help` must stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from confu.cli.common import comma_list
from confu.engine.registry import HEAD_METHODS

if TYPE_CHECKING:
    from confu.training.train import TrainConfig


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from confu.training.train import TrainConfig

    return TrainConfig(
        data=args.data, out=args.out, target=args.target, method=args.method, init=args.init,
        steps=args.steps,
        epochs=args.epochs, batch_tokens=args.batch_tokens, max_len=args.max_len, lr=args.lr,
        aux_lr_mult=args.aux_lr_mult, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay, ttt_warmup=args.ttt_warmup,
        head_init=args.head_init, freeze_lm_head=args.freeze_lm_head, layer_init=args.layer_init, fc_rms=args.fc_rms,
        label_temperature=args.label_temperature, widen_vocab=args.widen_vocab,
        feature_cache=not args.no_feature_cache, oracle_future=args.oracle_future,
        seed=args.seed,
        draft_vocab_size=args.draft_vocab_size, eval_fraction=args.eval_fraction, eval_every=args.eval_every,
        save_every=args.save_every, resume=args.resume, save_fp16=args.save_fp16, anchors=args.anchors,
        replicate=0 if args.no_replicate else args.replicate, soft_prompt_len=args.soft_prompt_len,
        n_expert=1 if args.no_moe else args.n_expert, top_k_expert=args.top_k_expert,
        future_bias=args.future_bias, future_residual=args.future_residual, future_loss=args.future_loss,
        future_ahead=args.future_ahead, stage=args.stage, future_logits=args.future_logits, device=args.device,
        stop_after=args.stop_after, progress=not args.no_progress, command=" ".join(sys.argv),
    )


def cmd_train(args: argparse.Namespace) -> None:
    from confu.training.train import train

    train(config_from_args(args))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from confu.training.forward import evaluate_draft
    from confu.training.train import TrainConfig

    cfg = TrainConfig(data=args.data, out="", target=args.target, batch_tokens=args.batch_tokens,
                      max_len=args.max_len, ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay, seed=args.seed,
                      eval_fraction=args.eval_fraction, device=args.device, zero_future=args.zero_future,
                      feature_cache=not args.no_feature_cache, oracle_future=args.oracle_future)
    metrics = evaluate_draft(args.draft, cfg, whole=args.whole)
    print(json.dumps({"draft": args.draft, "zero_future": args.zero_future, "whole": args.whole} | metrics))


def cmd_probe_future(args: argparse.Namespace) -> None:
    from confu.training.probe import probe_draft
    from confu.training.train import TrainConfig

    cfg = TrainConfig(data=args.data, out="", target=args.target, batch_tokens=args.batch_tokens,
                      max_len=args.max_len, ttt_steps=args.ttt_steps, seed=args.seed,
                      eval_fraction=args.eval_fraction, device=args.device)
    report = probe_draft(args.draft, cfg, whole=args.whole, max_seqs=args.max_seqs)
    text = json.dumps(report, indent=1)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text + "\n")
    print(text)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """What `train` and `evaluate` share: the target, the data and its held-out split, the TTT depth."""
    p.add_argument("--target", default="smollm2-135m",
                   help="embedded name (smollm2-135m), a local HF model directory, or a .gguf file")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="prepared datasets (confu data prepare), read as one in the order given; each keeps "
                        "its own target-feature store, so a file added later costs only its own target pass")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded tokens per global batch of similar-length sequences (split across torchrun "
                        "processes); must be >= --max-len")
    p.add_argument("--max-len", type=int, default=1024, help="truncate sequences to this many tokens")
    p.add_argument("--ttt-steps", type=int, default=7, help="train-time-test steps")
    p.add_argument("--ttt-decay", type=float, default=0.8, help="loss weight of step k is decay**k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of the data")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--no-feature-cache", action="store_true",
                   help="EAGLE-3: run the target on every batch instead of once per data set")
    p.add_argument("--oracle-future", type=int, default=0, metavar="K",
                   help="ConFu probe: f = the target's own final hidden state K positions after the anchor, not "
                        "the contemplate token's (proves the path from f to the loss; 0 = off)")


def add_parser(subparsers: Any) -> None:
    """Add `confu train` (also runs under `torchrun --nproc_per_node N -m confu.cli train ...`)."""
    p = subparsers.add_parser("train", help="train an EAGLE-3 or ConFu draft head")
    _add_run_args(p)
    p.add_argument("--method", choices=HEAD_METHODS, default="eagle3")
    p.add_argument("--init", default=None,
                   help="draft directory to start from (ConFu: a trained EAGLE-3 head; EAGLE-3: continue it)")
    p.add_argument("--out", required=True, help="output directory (final draft, checkpoint, train_log.jsonl)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs passes)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--aux-lr-mult", type=float, default=10.0,
                   help="ConFu: lr multiplier of the soft prompt and the MoEs")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up (default 3%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.5)
    p.add_argument("--ttt-warmup", type=float, default=0.0,
                   help="share of the steps over which the TTT depth grows from 1 to --ttt-steps (cheaper early steps)")
    p.add_argument("--head-init", choices=["target", "random"], default="target",
                   help="a fresh head's lm_head and final norm: the target's (draft-vocabulary rows) or random")
    p.add_argument("--freeze-lm-head", action="store_true", help="keep lm_head at its initial value")
    p.add_argument("--layer-init", type=int, default=None, metavar="K",
                   help="a fresh head's decoder layer starts as the target's layer K (negative: from the end; "
                        "Llama-style layers); default random")
    p.add_argument("--fc-rms", type=float, default=1.0,
                   help="a fresh head's fc starts scaled to this output RMS on the data (0: nn.Linear's init)")
    p.add_argument("--label-temperature", type=float, default=1.0,
                   help="a deviation from EAGLE-3's soft labels: the draft learns softmax(target logits / T); "
                        "T < 1 sharpens them toward the target's argmax, what greedy verification accepts")
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="draft vocabulary built from the data (ignored with --init, unless --widen-vocab)")
    p.add_argument("--widen-vocab", action="store_true",
                   help="with --init: grow the head's draft vocabulary to --draft-vocab-size tokens by this run's "
                        "data, keeping its tokens and their rows (for data with new words)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between evaluations (0: only at the end)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--save-fp16", action="store_true", help="also write an fp16 copy to OUT/fp16")
    p.add_argument("--anchors", type=int, default=16, help="ConFu: anchor rows per sequence")
    p.add_argument("--replicate", type=int, default=4, help="ConFu: rows after an anchor that reuse its f")
    p.add_argument("--no-replicate", action="store_true", help="ConFu ablation: --replicate 0")
    p.add_argument("--no-moe", action="store_true", help="ConFu ablation: static [con] / [f] (one expert)")
    p.add_argument("--soft-prompt-len", type=int, default=16)
    p.add_argument("--n-expert", type=int, default=8)
    p.add_argument("--top-k-expert", type=int, default=2)
    p.add_argument("--future-bias", type=float, default=None,
                   help="ConFu, a deviation from the paper: a learned per-head offset on the attention logit "
                        "of the future key, starting at this value (the key is one among hundreds: without "
                        "it, f gets little attention and little gradient); default: none, as the paper")
    p.add_argument("--future-residual", action="store_true",
                   help="ConFu, a deviation from the paper: f is also added to every draft row's residual after "
                        "attention, through a learned linear map that starts at zero")
    p.add_argument("--future-loss", type=float, default=0.0,
                   help="ConFu, a deviation from the paper: weight of an auxiliary loss that teaches f to hold the "
                        "token after next, read by the target's own output layer (0: the paper's loss only)")
    p.add_argument("--future-logits", action="store_true",
                   help="ConFu, a deviation from the paper: each draft depth adds gate_k * lm_head(f) to its logits "
                        "(the draft's output layer reads f as a prediction; gates start at zero)")
    p.add_argument("--future-ahead", type=comma_list(int, "--future-ahead"), default=[2], metavar="K,K,...",
                   help="the tokens x_{a+k} after the anchor that --future-loss reads f against, through the "
                        "target's output layer (default 2: the token the draft's first step guesses)")
    p.add_argument("--stage", choices=("draft", "future"), default="draft",
                   help="ConFu, a deviation from the paper: 'future' trains only the soft prompt and the [con] "
                        "MoE on --future-loss (the draft is not run), to make f informative before the draft "
                        "learns to read it; 'draft' (default) trains the whole head as the paper does")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end this run after this global step, with a checkpoint (continue with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    e = subparsers.add_parser("evaluate", help="held-out loss, accuracy per TTT step and simulated tau of a draft")
    _add_run_args(e)
    e.add_argument("--draft", required=True, help="draft directory")
    e.add_argument("--whole", action="store_true",
                   help="evaluate on every sequence of --data (a file kept apart from training), not its split")
    e.add_argument("--zero-future", action="store_true",
                   help="ConFu probe: give the draft f = 0; a tau that does not drop means the draft ignores f")
    e.set_defaults(func=cmd_evaluate)

    f = subparsers.add_parser("probe-future", help="ConFu diagnostics: does f carry signal, does the draft read it "
                                                   "(diversity, accuracy ahead, linear and ceiling probes, "
                                                   "attention share, tau with real / zero / oracle f)")
    _add_run_args(f)
    f.add_argument("--draft", required=True, help="a ConFu draft directory")
    f.add_argument("--whole", action="store_true", help="probe every sequence of --data, not its held-out split")
    f.add_argument("--max-seqs", type=int, default=64, help="at most this many sequences (default: %(default)s)")
    f.add_argument("--out", default=None, help="also write the JSON report here")
    f.set_defaults(func=cmd_probe_future)
