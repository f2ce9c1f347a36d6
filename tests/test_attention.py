"""Row-invariant attention: a row's output depends only on the keys it sees, so a tree node's logits are the
one-token step's bits, and speculative decoding stays token-identical to plain decoding even under numerics
that round activations (q8)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from confu.engine.attention import row_invariant_attention, row_invariant_attention_built
from confu.engine.quant import kernel_status
from tests.helpers import PROMPTS, chat_ids, quantized_tiny_target, require_kernels


def require_attention_kernel() -> None:
    require_kernels()
    if not row_invariant_attention_built():
        pytest.skip("an AVX2-only build: ordinary rows take SDPA")


def tree_mask(parents: list[int], committed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """(n, committed + n) bool: every node sees the committed keys, its ancestors and itself."""
    n = len(parents)
    mask = torch.zeros(n, committed + n, dtype=torch.bool)
    mask[:, :committed] = True
    paths: list[list[int]] = []
    for i, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [i])
        mask[i, [committed + j for j in paths[i]]] = True
    return mask, paths


@pytest.mark.parametrize("heads,kv_heads,dim,committed", [(9, 3, 64, 37), (4, 4, 32, 16), (4, 2, 16, 5)])
def test_each_row_is_its_own_one_row_call_and_close_to_sdpa(heads, kv_heads, dim, committed):
    require_attention_kernel()
    gen = torch.Generator().manual_seed(4)
    parents = [-1, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 18 rows: key counts cross 16
    mask, paths = tree_mask(parents, committed)
    n, total = mask.shape
    capacity = total + 7  # keys are views of a longer buffer, as the cache hands them over
    key = torch.randn(1, kv_heads, capacity, dim, generator=gen)[:, :, :total]
    value = torch.randn(1, kv_heads, capacity, dim, generator=gen)[:, :, :total]
    query = torch.randn(1, n, heads, dim, generator=gen).transpose(1, 2)  # strided, as HF passes it
    out = row_invariant_attention(query, key, value, mask[None, None], None)
    assert out.shape == (1, n, heads, dim)
    sdpa = F.scaled_dot_product_attention(query, key, value, mask[None, None], enable_gqa=heads != kv_heads)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=2e-6, rtol=1e-5)
    for i, path in enumerate(paths):
        seen = list(range(committed)) + [committed + j for j in path]  # what a one-token step holds in its cache
        one = row_invariant_attention(query[:, :, i : i + 1], key[:, :, seen], value[:, :, seen],
                                      torch.ones(1, 1, 1, len(seen), dtype=torch.bool), None)
        assert torch.equal(one[0, 0], out[0, i]), f"row {i} differs from its one-row call"


def test_tree_rows_are_bit_identical_to_one_token_steps(tiny_llama_dir):
    """The whole target: logits and features of every tree node equal those of one-token steps down its path
    (the linear layers on the row-independent kernels: weights snapped to GGUF blocks), in both numerics."""
    require_attention_kernel()
    for numerics in ("auto", "q8") if kernel_status().int8 else ("auto",):
        check_tree_against_steps(quantized_tiny_target(tiny_llama_dir, numerics))


def check_tree_against_steps(target) -> None:
    assert "row-invariant attention" in target.numerics
    prompt = torch.tensor(chat_ids(target, PROMPTS[2]))
    parents = [-1, 0, 0, 1, 1, 2, 3, 3, 4, 6]
    tokens = torch.tensor([prompt[-1]] + [5 + 3 * i for i in range(len(parents) - 1)])
    n_prompt = len(prompt) - 1
    mask, paths = tree_mask(parents, 0)
    mask = mask[:, : len(parents)]
    depth = torch.tensor([len(p) - 1 for p in paths])
    with torch.no_grad():
        def prefilled():
            cache = target.new_cache()
            target.forward(cache, torch.arange(n_prompt), torch.ones(n_prompt, n_prompt, dtype=torch.bool).tril(),
                           input_ids=prompt[:-1])
            cache.commit(None)
            return cache

        tree = target.forward(prefilled(), n_prompt + depth, mask, input_ids=tokens)
        for i, path in enumerate(paths):
            cache = prefilled()
            for step, node in enumerate(path):
                one = target.forward(cache, torch.tensor([n_prompt + step]), torch.ones(1, 1, dtype=torch.bool),
                                     input_ids=tokens[node : node + 1])
                cache.commit(None)
            assert torch.equal(one.logits[0], tree.logits[i]), f"node {i}: logits"
            assert torch.equal(one.features[0], tree.features[i]), f"node {i}: features"
