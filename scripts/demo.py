"""`make demo`: plain decoding next to EAGLE-3, ConFu, matches in the text so far (no draft model), and EAGLE-3
with matches merged into its trees, on the embedded SmolLM2 target.

Uses the shipped drafts in `drafts/` when they exist, else untrained heads (which accept little: the point is
then that the output is token-identical and what each verify pass costs). Matches need no training: they pay
where the answer repeats itself or its prompt.
"""

from __future__ import annotations

from pathlib import Path

from confu.chat import encode_prompt
from confu.engine.checkpoint import new_draft
from confu.engine.convert import load_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.matcher import MATCH_SOURCE, MatchConfig
from confu.engine.sizing import load_verify_costs
from confu.engine.target import Target
from confu.engine.tree import TreeConfig

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is in two sentences.",
    "Give three tips for learning a new language.",
    "Correct the spelling in this sentence and write it out again: The quick brown fox jumpd over the lazzy dog "
    "while the farmer watched from his old wooden porch.",
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
    eagle3, kind = heads["eagle3"]
    methods = {f"{method} ({kind})": Decoder.for_head(target, head) for method, (head, kind) in heads.items()}
    methods["match (no draft)"] = Decoder.for_head(target, None, MatchConfig())
    methods[f"eagle3+match ({kind})"] = Decoder.for_head(target, eagle3, MatchConfig())
    # Tree sizing reads a verify-cost curve measured once per machine (then cached): measured inside the first timed
    # generation, it would make that method's first speed the setup's.
    print("tree sizing: this machine's verify-cost curve is measured once (a few seconds) and cached, before any "
          "timing", flush=True)
    load_verify_costs(target)
    for text in PROMPTS:
        ids = encode_prompt(target.tokenizer, text, raw=False)
        plain = plain_decoder.generate(ids, cfg)
        print(f"\n### {text}\n{target.tokenizer.decode(plain.tokens, skip_special_tokens=True)}")
        print(f"  {'plain':26s}: {plain.tokens_per_s:6.1f} tok/s")
        for name, decoder in methods.items():
            res = decoder.generate(ids, cfg)
            same = "identical" if res.tokens == plain.tokens else "DIFFERENT"
            from_matches = res.by_source().get(MATCH_SOURCE, {}).get("accepted", 0)
            print(f"  {name:26s}: {res.tokens_per_s:6.1f} tok/s  tau {res.tau:.2f}  output {same}  "
                  f"tokens from matches {from_matches}")


if __name__ == "__main__":
    main()
