"""The decoding loop's stages are public and compose into its rounds (what benchmarks call instead of re-creating
the loop), and a verify extension keeps no state between a pass's rows and the future it reads from them."""

from __future__ import annotations

import torch

from confu.engine.checkpoint import new_draft
from confu.engine.contemplate import plan_contemplate_slots
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.methods import ContemplateSlots
from confu.engine.tree import DraftTree, TreeConfig
from tests.helpers import PROMPTS, chat_ids, load_target


def test_the_public_stages_make_the_loop_s_first_round(tiny_llama_dir) -> None:
    target = load_target(tiny_llama_dir)
    head = new_draft(target, "confu", draft_vocab_size=256)
    prompt = chat_ids(target, PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=32, tree=TreeConfig(12, 4, 3), auto_tree=False, stop_at_eos=False)
    (first, _, _), (round_tokens, record, _) = list(Decoder.for_head(target, head).rounds(prompt, cfg))[:2]

    decoder = Decoder.for_head(target, head)
    with torch.no_grad():
        cache, state = decoder.begin_sequence(torch.tensor(prompt), cfg, None)
        tree = decoder.proposer.propose(max_nodes=cfg.tree.total_nodes, depth=cfg.tree.depth)
        rows = decoder.verify_rows(tree, state, cache.num_tokens)
        out = decoder.run_verify(cache, rows)
        accepted, bonus = decoder.accept(tree, out.logits, cfg, None)
    assert [state.root] == first
    assert len(tree) == record.tree_nodes and len(rows.extra.positions) == record.contemplate_slots
    assert [int(tree.tokens[i]) for i in accepted] + [bonus] == round_tokens


def test_a_future_is_read_from_the_rows_it_is_handed(tiny_llama_dir) -> None:
    """Two passes' rows planned before either's future is read: each future comes from its own pass's slots."""
    target = load_target(tiny_llama_dir)
    extension = ContemplateSlots(new_draft(target, "confu", draft_vocab_size=256))
    extension.begin(GenerationConfig(contemplate=1))
    chain = DraftTree.from_parents([5, 6, 7], [-1, 0, 1], [-0.1, -0.2, -0.3])
    wide = DraftTree.from_parents([5, 6, 7], [-1, -1, -1], [-0.1, -0.2, -3.0])
    route = torch.zeros(3 * target.hidden_size)

    def planned(tree: DraftTree):
        n = len(tree) + 1
        positions = torch.arange(10, 10 + n)
        mask = torch.ones(n, n, dtype=torch.bool)
        return extension.extra_rows(tree, positions, mask, route)

    chain_rows, wide_rows = planned(chain), planned(wide)
    assert chain_rows.plan.slot_rows != wide_rows.plan.slot_rows  # one slot beside the root's: a different node
    for tree, extra in ((chain, chain_rows), (wide, wide_rows)):
        slots = len(extra.positions)
        last_hidden = torch.arange(len(tree) + 1 + slots, dtype=torch.float32)[:, None].expand(-1, 4)
        want = plan_contemplate_slots(tree, 1).future_of(last_hidden, [0])
        torch.testing.assert_close(extension.future(last_hidden, [0], extra), want)
