"""`make demo`: plain decoding next to EAGLE-3 and ConFu decoding on the embedded SmolLM2 target.

Uses the shipped drafts in `drafts/` when they exist, else untrained heads (which accept little: the point is
then that the output is token-identical and what each verify pass costs).
"""

from __future__ import annotations

from pathlib import Path

from confu.chat import encode_prompt
from confu.engine.checkpoint import load_draft, new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.target import Target
from confu.engine.tree import TreeConfig

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give three tips for learning a new language.",
]
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    target = Target.load("smollm2-135m")
    heads = {}
    for method in ("eagle3", "confu"):
        shipped = ROOT / "drafts" / f"smollm2-135m-{method}"
        heads[method] = (load_draft(shipped, target), "trained") if shipped.is_dir() else (
            new_draft(target, method, draft_vocab_size=8192), "untrained")
    # Small trees: on a 2-core CPU every extra verified token costs time (BENCHMARKS.md).
    cfg = GenerationConfig(max_new_tokens=48, tree=TreeConfig(total_nodes=16, depth=6, topk=8), contemplate=4)
    # One decoder per method for all prompts, as a server keeps one: tree sizing carries what it measured
    # (acceptance, the clock) from one prompt to the next.
    plain_decoder = Decoder(target)
    decoders = {method: Decoder.for_head(target, head) for method, (head, _) in heads.items()}
    for text in PROMPTS:
        ids = encode_prompt(target.tokenizer, text, raw=False)
        plain = plain_decoder.generate(ids, cfg)
        print(f"\n### {text}\n{target.tokenizer.decode(plain.tokens, skip_special_tokens=True)}")
        print(f"  plain          : {plain.tokens_per_s:6.1f} tok/s")
        for method, (_, kind) in heads.items():
            res = decoders[method].generate(ids, cfg)
            same = "identical" if res.tokens == plain.tokens else "DIFFERENT"
            print(f"  {method:6s} ({kind}): {res.tokens_per_s:6.1f} tok/s  tau {res.tau:.2f}  output {same}")


if __name__ == "__main__":
    main()
