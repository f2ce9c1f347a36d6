"""What one generation asks of the decoding loop (`GenerationConfig`) and the `--tree-nodes N|auto` setting.

Apart from the loop (`confu.engine.generate`), so the methods it is handed (`confu.engine.methods`,
`confu.engine.matcher`) read the configuration without importing the loop that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from confu.engine.sampling import SamplingConfig
from confu.engine.tree import TreeConfig
from confu.errors import InputError

BULK_PREFILL_TOKENS = 96  # measured crossover: kernels 185 ms vs dense 172 + 27 ms at 64 rows; dense wins at 128


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    # auto: `tree` gives upper bounds and each round picks its depth and node count from measured costs and
    # observed acceptance (`confu.engine.sizing`), drafting nothing where plain decoding is faster
    auto_tree: bool = True
    contemplate: int | None = None  # ConFu: None = a slot on every node, N = the N likeliest round ends
    # ConFu probe: the draft gets f = 0 every round (the contemplate rows still run), so decoding measures what
    # f adds to acceptance
    zero_future: bool = False
    # a decoder built with a matcher proposes matches in the text so far for this sequence (False: not, and its
    # text is not kept for later sequences either)
    match: bool = True
    seed: int | None = None
    stop_at_eos: bool = True
    # prompts of at least this many tokens prefill their first n - 1 rows in one dense pass (0: never)
    bulk_prefill: int = BULK_PREFILL_TOKENS

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.bulk_prefill < 0:
            raise InputError(f"bulk_prefill must be >= 0 (got {self.bulk_prefill})")
        if self.contemplate is not None and self.contemplate < 0:
            raise InputError(f"--contemplate must be 'all' or a count >= 0 (got {self.contemplate})")


AUTO_MAX_NODES = 60  # under auto sizing: the most nodes a round may verify (EAGLE-2's default tree)


def tree_setting(nodes: int | str, depth: int, topk: int) -> tuple[TreeConfig, bool]:
    """`--tree-nodes N|auto` -> (tree bounds, auto_tree): a fixed tree of N nodes, or per-round sizing under
    AUTO_MAX_NODES nodes and `depth` levels."""
    if nodes == "auto":
        return TreeConfig(total_nodes=AUTO_MAX_NODES, depth=depth, topk=topk), True
    return TreeConfig(total_nodes=int(nodes), depth=depth, topk=topk), False
