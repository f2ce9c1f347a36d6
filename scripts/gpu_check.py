"""GPU check: lossless greedy decoding of EAGLE-3 and ConFu against plain decoding on CUDA, and tokens/s.

    python scripts/gpu_check.py [--target smollm2-135m|HF_DIR|FILE.gguf] [--prompts 8] [--max-new-tokens 64]

On a machine without CUDA it says so and exits 0 (`--device cpu` runs the same checks on the CPU, to try the
script). What it needs besides the target: this package and the two shipped drafts it reads,
`drafts/smollm2-135m-eagle3` and `drafts/smollm2-135m-confu` (39 MB together), and `data/eval_prompts.txt`.

A CUDA target runs transformers' own modules (confu's kernels are CPU-only) under SDPA, whose rounding may
change with the rows of a pass: a tree node's logits then differ from the one-token step's by an ulp or so,
and an exact near-tie between the two best tokens can flip. So each mismatch is judged by plain decoding's
top-2 logit gap where the two outputs part: a gap within `--tie` of the largest logit is a near-tie, anything
wider is a failure (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from confu.chat import encode_prompt, read_prompts_file
from confu.engine.convert import load_draft
from confu.engine.generate import Decoder
from confu.engine.generation_config import GenerationConfig, tree_setting
from confu.engine.target import Target
from confu.hub import load_target_model

ROOT = Path(__file__).resolve().parent.parent
DRAFTS = {"EAGLE-3": ROOT / "drafts" / "smollm2-135m-eagle3", "ConFu": ROOT / "drafts" / "smollm2-135m-confu"}
TIE_TOLERANCE = 1e-3  # of the largest logit: the load-time probe's tolerance for fp32 (confu.engine.target)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m", help="the drafts' target: smollm2-135m, an HF dir, a .gguf")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu, to try the script without a GPU")
    p.add_argument("--prompts", type=int, default=8, help="the first N prompts of data/eval_prompts.txt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tree-nodes", default="60,auto", help="comma-separated node counts and/or 'auto'")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tie", type=float, default=TIE_TOLERANCE, help="near-tie tolerance, share of the largest logit")
    return p.parse_args(argv)


def timed_generate(decoder: Decoder, ids: list[int], cfg: GenerationConfig, device: torch.device):
    """One generation, synchronised so that the clock sees the GPU's work: (result, seconds)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    res = decoder.generate(ids, cfg)
    sync()
    return res, time.perf_counter() - start


def top2_gap(target: Target, ids: list[int]) -> tuple[float, float]:
    """(top-1 minus top-2 logit, largest |logit|) of the target's next-token logits after `ids`."""
    n = len(ids)
    with torch.no_grad():
        out = target.forward(target.new_cache(), torch.arange(n, device=target.device),
                             torch.ones(n, n, dtype=torch.bool, device=target.device).tril(),
                             input_ids=torch.tensor(ids, device=target.device))
    logits = out.logits[n - 1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1]), float(logits.abs().max())


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): "
              "nothing to check; run this on a machine with a GPU (or try it with --device cpu)")
        return 0
    missing = [str(d) for d in DRAFTS.values() if not d.is_dir()]
    if missing:
        print(f"the shipped drafts are missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    model, tokenizer = load_target_model(args.target)
    target = Target(model.to(device), tokenizer, name=args.target)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"target {args.target} on {where}; numerics: {target.numerics}; torch {torch.__version__}")
    decoders = {"plain": Decoder(target)}
    for label, path in DRAFTS.items():
        decoders[label] = Decoder.for_head(target, load_draft(path, target).to(device))
    prompts = read_prompts_file(str(ROOT / "data" / "eval_prompts.txt"))[: args.prompts]
    prompt_ids = [encode_prompt(tokenizer, p, raw=False) for p in prompts]

    settings = [("plain", None)] + [(label, n) for label in DRAFTS for n in args.tree_nodes.split(",")]
    rows, failures = [], 0
    plain_tokens: list[list[int]] = []
    for label, nodes in settings:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
        if nodes is not None:
            cfg.tree, cfg.auto_tree = tree_setting(nodes, args.depth, args.topk)
        decoder = decoders[label]
        timed_generate(decoder, prompt_ids[0], cfg, device)  # warm-up: allocator, kernels, the cost curve
        tokens = seconds = 0.0
        taus, identical, near_ties = [], 0, 0
        for i, ids in enumerate(prompt_ids):
            res, s = timed_generate(decoder, ids, cfg, device)
            tokens += len(res.tokens)
            seconds += s
            taus.append(res.tau)
            if label == "plain":
                plain_tokens.append(res.tokens)
                continue
            if res.tokens == plain_tokens[i]:
                identical += 1
                continue
            at = first_difference(res.tokens, plain_tokens[i])
            gap, scale = top2_gap(target, ids + plain_tokens[i][:at])
            tie = gap <= args.tie * scale
            near_ties += tie
            failures += not tie
            print(f"  {label} nodes={nodes} prompt {i + 1}: parts from plain decoding at token {at} "
                  f"(plain's top-2 gap {gap:.2e} of {scale:.1f}: {'a near-tie' if tie else 'NOT a near-tie'})")
        same = "-" if label == "plain" else f"{identical}/{len(prompt_ids)} (+{near_ties} near-ties)"
        rows.append([label, nodes or "-", f"{tokens / seconds:.1f}", f"{sum(taus) / len(taus):.2f}", same])
    plain_rate = float(rows[0][2])
    header = ["method", "nodes", "tok/s", "tau", "identical to plain", "x plain"]
    rows = [r + [f"{float(r[2]) / plain_rate:.2f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(f"{str(x):>{w}}" for x, w in zip(line, widths, strict=True)))
    print(f"greedy, {len(prompt_ids)} prompts, {args.max_new_tokens} new tokens max, batch 1, after one warm-up")
    if failures:
        print(f"FAILED: {failures} generation(s) parted from plain decoding where it had no near-tie")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
