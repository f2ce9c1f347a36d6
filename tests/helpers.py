"""Test doubles and checks shared by the engine tests."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from confu.engine.generate import Decoder
from confu.engine.methods import DraftHeadProposer
from confu.engine.quant import kernel_status
from confu.engine.registry import method_for_head
from confu.engine.target import Target
from confu.engine.tree import DraftTree


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


PROMPTS = [
    "Tell me about the moon.",
    "Write a haiku about rain on a tin roof.",
    "What is 17 times 23?",
    "List three uses for a paperclip.",
    "Explain recursion to a child.",
    "Translate 'good morning' into French.",
    "Summarize the water cycle in two sentences.",
    "Give me a recipe idea with lentils.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
    "What should I pack for a weekend hike?",
    "Describe a cat in five words.",
    "How do bees make honey?",
    "Name a famous bridge and where it is.",
    "What is the capital of Canada?",
    "Suggest a title for a mystery novel.",
    "How many legs does a spider have?",
    "Write one sentence about autumn leaves.",
    "What does a compiler do?",
    "Give two tips for better sleep.",
    "Compose a limerick about a goat.",
    "Define photosynthesis briefly.",
]


def load_target(model_dir) -> Target:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return Target(model, tok, name=str(model_dir))


def gguf_q4_1(w: torch.Tensor) -> torch.Tensor:
    """Quantize like llama.cpp's Q4_1 (fp16 scale and min per 32 weights) and dequantize like the GGUF loader."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    lo, hi = blocks.amin(-1), blocks.amax(-1)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    q = ((blocks - m[..., None]) / d[..., None]).round().clamp(0, 15)
    return (q * d[..., None] + m[..., None]).reshape(n, k)


def gguf_q8_0(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    d = (blocks.abs().amax(-1) / 127).half().float()
    q = (blocks / d[..., None]).round().clamp(-127, 127)
    return (q * d[..., None]).reshape(n, k)


def quantized_tiny_target(model_dir, numerics: str = "auto") -> Target:
    """The tiny Llama with every linear weight snapped to Q4_1 values, wrapped after the change."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for module in list(model.modules()):
            if type(module) is nn.Linear:
                module.weight.copy_(gguf_q4_1(module.weight))
    return Target(model, AutoTokenizer.from_pretrained(model_dir), name="quantized", numerics=numerics)


def require_kernels():
    """The CPU kernels' library; skips only on a CPU without AVX2 / FMA, fails if they did not build."""
    status = kernel_status()
    if status.library is None and "lacks AVX2" in status.reason:
        pytest.skip(f"no quantized kernels on this CPU: {status.reason}")
    assert status.library is not None, f"the quantized kernels failed to build: {status.reason}"
    return status.library


def chat_ids(target: Target, text: str) -> list[int]:
    from confu.chat import encode_prompt

    return encode_prompt(target.tokenizer, text, raw=False)


def hf_greedy(target: Target, prompt_ids: list[int], n: int) -> list[int]:
    out = target.model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
        eos_token_id=sorted(target.eos_ids), pad_token_id=sorted(target.eos_ids)[0],
    )
    return out[0, len(prompt_ids):].tolist()


@dataclass
class GreedyReport:
    exact: int = 0
    near_ties: list[tuple[int, float]] = field(default_factory=list)  # (prompt index, top-2 gap)
    failures: list[str] = field(default_factory=list)


def compare_greedy(target: Target, prompt_ids: list[int], ours: list[int], ref: list[int], idx: int,
                   report: GreedyReport) -> None:
    """Token-identical, or diverging only where the target's top two logits are within 1e-4."""
    n = min(len(ours), len(ref))
    if ours[:n] == ref[:n] and len(ours) == len(ref):
        report.exact += 1
        return
    j = next((i for i in range(n) if ours[i] != ref[i]), n)
    with torch.no_grad():
        logits = target.model(torch.tensor([prompt_ids + ref[:j]])).logits[0, -1]
    top2 = logits.topk(2).values
    gap = float(top2[0] - top2[1])
    if j < n and gap < 1e-4:
        report.near_ties.append((idx, gap))
    else:
        report.failures.append(f"prompt {idx}: diverged at token {j} (top-2 gap {gap:.2e}) ours={ours} ref={ref}")


class _TrackingProposer(DraftHeadProposer):
    """A draft-head proposer that remembers every token it observed (the prompt after its first token, then
    every emitted token), so test proposers know where the round's root sits."""

    def begin(self, cfg, max_len):
        super().begin(cfg, max_len)
        self.tree_cfg = cfg.tree
        self.seen: list[int] = []

    def observe(self, features, next_tokens, future):
        self.seen.extend(next_tokens.tolist())
        super().observe(features, next_tokens, future)


class OracleProposer(_TrackingProposer):
    """A proposer whose trees contain the reference continuation, cut short at random and padded with
    random siblings, so verification accepts long paths, partial paths and nothing at all."""

    reference: list[int] = []  # full token sequence the target will produce (prompt + greedy output)
    rng = random.Random(0)

    def propose(self, max_nodes, depth):
        cfg = self.tree_cfg
        pos = len(self.seen) + 1  # prompt[0] + everything caught up = tokens up to and including the root
        truth = self.reference[pos: pos + depth]
        vocab = self.head.cfg.vocab_size
        keep = self.rng.randint(0, len(truth))
        tokens, parents, scores = [], [], []
        parent = -1
        for d in range(depth):
            for _ in range(self.rng.randint(0, 2)):  # wrong siblings
                tokens.append(self.rng.randrange(vocab))
                parents.append(parent)
                scores.append(-float(d) - 2.0)
            if d < keep:
                tokens.append(truth[d])
            elif d < len(truth):
                tokens.append((truth[d] + 1) % vocab)  # a wrong token cuts the path here
            else:
                break
            parents.append(parent)
            scores.append(-float(d) - 1.0)
            parent = len(tokens) - 1
        limit = min(cfg.total_nodes, max_nodes)
        order = [i for i in range(len(tokens)) if i < limit]
        return DraftTree.from_parents([tokens[i] for i in order], [parents[i] for i in order],
                                      [scores[i] for i in order])


class TargetTopProposer(_TrackingProposer):
    """A proposer that proposes the target's own likeliest tokens: a greedy chain with its runner-up siblings.

    Under sampling such trees are accepted often and rejected often, so both sides of the rejection rule
    carry real weight in a distribution test (an untrained head's trees would almost always be rejected).
    """

    model = None  # the target's HF model, set by the test
    first_token: int = 0  # prompt[0]: observe only ever sees the tokens after it

    @torch.no_grad()
    def propose(self, max_nodes, depth):
        cfg = self.tree_cfg
        limit = min(cfg.total_nodes, max_nodes)
        seq = [self.first_token, *self.seen]  # up to and including the root
        tokens, parents, scores = [], [], []
        parent, path_logp = -1, 0.0
        for _ in range(depth):
            logp = torch.log_softmax(self.model(torch.tensor([seq])).logits[0, -1].float(), -1)
            top = logp.topk(2)
            chain = None
            for lp, tok in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if len(tokens) == limit:
                    break
                tokens.append(tok)
                parents.append(parent)
                scores.append(path_logp + lp)
                chain = len(tokens) - 1 if chain is None else chain
            if chain is None or len(tokens) == limit:
                break
            parent, path_logp = chain, scores[chain]
            seq.append(tokens[chain])
        return DraftTree.from_parents(tokens, parents, scores)


# -- statistics shared by the lossless-sampling tests ---------------------------------------------------


def biased_verify(tree: DraftTree, probs: torch.Tensor, gen: torch.Generator) -> tuple[list[int], int]:
    """A wrong verifier: accepts a candidate with min(1, 1.5 p(x)) instead of p(x)."""
    tokens = tree.tokens.tolist()
    accepted: list[int] = []
    node = -1
    while True:
        p = probs[node + 1].double().clone()
        chosen = -1
        for child in tree.children[node + 1]:
            x = tokens[child]
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if u < min(1.0, 1.5 * float(p[x] / p.sum())):
                chosen = child
                break
            p[x] = 0.0
        if chosen < 0:
            return accepted, int(torch.multinomial(p, 1, generator=gen))
        accepted.append(chosen)
        node = chosen


def chi_square_p_value(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells expecting < 5 draws are pooled, zero-probability cells must be empty."""
    assert counts[law == 0].sum() == 0, "a token sequence with target probability 0 was emitted"
    n = counts.sum()
    expected = law * n
    small = (expected < 5) & (law > 0)
    obs = torch.cat([counts[~small & (law > 0)], counts[small].sum()[None]])
    exp = torch.cat([expected[~small & (law > 0)], expected[small].sum()[None]])
    if exp[-1] < 5:  # pooled remainder still too thin to test on its own: fold it into the largest cell
        obs, exp = obs[:-1].clone(), exp[:-1].clone()
        obs[exp.argmax()] += counts[small].sum()
        exp[exp.argmax()] += expected[small].sum()
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    half = torch.tensor([dof / 2, stat / 2], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))


def decoder_with(target: Target, head, proposer_cls) -> Decoder:
    """The decoder `head` stands for, with its proposer replaced by a test proposer on the same head."""
    _, extension = method_for_head(head)
    return Decoder(target, proposer_cls(head), extension)
