"""Every decoder-only layout transformers ships, on tiny random models built here from each family's config.

For each family: plain decoding equals HF `generate`; untrained EAGLE-3 and ConFu heads (a contemplate slot on
every node, and a budget) and trees that contain the true continuation decode exactly like plain decoding;
training's contemplate pass gives the decoder's `f`; `confu train` runs a few steps of both methods. Prompts are
longer than the sliding window (WINDOW positions), so windows really slide. The sampling law is checked on two
hybrid sliding-window families, and unsupported architectures are refused with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.sampling import SamplingConfig
from confu.engine.target import AttentionLayout, Target, TargetCache
from confu.engine.tree import TreeConfig
from confu.errors import UnsupportedModelError
from confu.training.ttt import collate, contemplate_futures, run_target
from tests.conftest import TINY_INIT_RANGE, TINY_SEED
from tests.helpers import (
    PROMPTS,
    GreedyReport,
    OracleProposer,
    chat_ids,
    chi_square_p_value,
    compare_greedy,
    decoder_with,
    hf_greedy,
    load_target,
)
from tests.test_lossless_sampling import N, cell_counts, exact_law, speculative_samples

WINDOW = 8
HYBRID = ["sliding_attention", "sliding_attention", "full_attention"]


@dataclass
class Family:
    config: type
    model: type
    covers: str  # what the family adds to the matrix
    overrides: dict = field(default_factory=dict)


FAMILIES = {
    "llama": Family(tf.LlamaConfig, tf.LlamaForCausalLM, "GQA, untied output embedding"),
    "qwen2": Family(tf.Qwen2Config, tf.Qwen2ForCausalLM, "hybrid full + sliding layers, qkv biases",
                    dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": Family(tf.Qwen3Config, tf.Qwen3ForCausalLM, "qk-norm, head_dim != hidden / heads, tied embeddings",
                    dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": Family(tf.MistralConfig, tf.MistralForCausalLM, "every layer sliding, MQA",
                      dict(sliding_window=WINDOW, num_key_value_heads=1)),
    "gemma2": Family(tf.Gemma2Config, tf.Gemma2ForCausalLM,
                     "hybrid, attention and final logit soft-capping, sqrt(H)-scaled embeddings, tied",
                     dict(head_dim=32, sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=32,
                          attn_logit_softcapping=20.0, final_logit_softcapping=10.0)),
    "gemma3": Family(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, "hybrid, qk-norm, sqrt(H)-scaled embeddings",
                     dict(head_dim=32, sliding_window=WINDOW, layer_types=HYBRID, query_pre_attn_scalar=32)),
    "phi3": Family(tf.Phi3Config, tf.Phi3ForCausalLM, "partial rotary, fused qkv and gate-up projections",
                   dict(partial_rotary_factor=0.5)),
    "olmo2": Family(tf.Olmo2Config, tf.Olmo2ForCausalLM, "qk-norm over all heads, norms after the blocks"),
    "phi": Family(tf.PhiConfig, tf.PhiForCausalLM, "partial rotary, parallel attention and MLP, LayerNorm",
                  dict(partial_rotary_factor=0.5)),
    "cohere2": Family(tf.Cohere2Config, tf.Cohere2ForCausalLM, "hybrid, logit_scale, no RoPE on full layers",
                      dict(sliding_window=WINDOW, layer_types=HYBRID, logit_scale=0.5)),
    "granite": Family(tf.GraniteConfig, tf.GraniteForCausalLM, "embedding, residual, attention and logit multipliers",
                      dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1,
                           logits_scaling=2.0)),
    "smollm3": Family(tf.SmolLM3Config, tf.SmolLM3ForCausalLM, "layers without RoPE", dict(no_rope_layer_interval=2)),
    "starcoder2": Family(tf.Starcoder2Config, tf.Starcoder2ForCausalLM, "sliding, biased LayerNorm and MLP",
                         dict(sliding_window=WINDOW)),
}


def _config(family: Family, tokenizer) -> tf.PretrainedConfig:
    common = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                  initializer_range=TINY_INIT_RANGE, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    return family.config(**{**common, **family.overrides})


def _save_tiny(model, tokenizer, out: Path) -> Path:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tiny_tokenizer_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    family = FAMILIES[request.param]
    torch.manual_seed(TINY_SEED)
    model = family.model(_config(family, tokenizer)).eval()
    return _save_tiny(model, tokenizer, tmp_path_factory.mktemp(request.param))


N_NEW = 16
TREE = TreeConfig(total_nodes=12, depth=4, topk=3)
# (method, contemplate budget, oracle trees): untrained heads are mostly rejected, oracle trees mostly accepted
VARIANTS = [("eagle3", None, False), ("confu", None, False), ("confu", 2, False), ("eagle3", None, True),
            ("confu", None, True), ("confu", 2, True)]


def test_greedy_decoding_equals_plain_decoding(family_dir: Path, record_property) -> None:
    target = load_target(family_dir)
    heads = {method: new_draft(target, method, draft_vocab_size=256) for method in ("eagle3", "confu")}
    report, accepted = GreedyReport(), 0
    for i, text in enumerate(PROMPTS[:2]):
        ids = chat_ids(target, text)
        assert len(ids) > 2 * WINDOW
        plain = Decoder(target).generate(ids, GenerationConfig(max_new_tokens=N_NEW)).tokens
        compare_greedy(target, ids, plain, hf_greedy(target, ids, N_NEW), i, report)
        OracleProposer.reference = ids + plain
        for method, budget, oracle in VARIANTS:
            decoder = decoder_with(target, heads[method], OracleProposer) if oracle else \
                Decoder.for_head(target, heads[method])
            cfg = GenerationConfig(max_new_tokens=N_NEW, tree=TREE, auto_tree=False, contemplate=budget)
            res = decoder.generate(ids, cfg)
            accepted += sum(s.accepted for s in res.steps) if oracle else 0
            compare_greedy(target, ids, res.tokens, plain, i, report)
    record_property("greedy_near_ties", len(report.near_ties))
    print(f"{family_dir.name}: {report.exact} exact, near-tie divergences {report.near_ties}")
    assert not report.failures, "\n".join(report.failures)
    assert accepted > N_NEW, "the oracle trees should have been accepted often"


def test_training_contemplate_pass_equals_the_decoders(family_dir: Path) -> None:
    """f from training's batched contemplate pass equals the decoder's, with anchors past the window."""
    target = load_target(family_dir)
    head = new_draft(target, "confu", draft_vocab_size=256, seed=1)
    gen = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(3, 500, (n,), generator=gen).tolist(), [1] * n) for n in (3 * WINDOW, 2 * WINDOW)]
    ids, lengths, mask = collate(seqs)
    tb = run_target(target.model, target.feature_layers, head, ids, lengths, mask, keep_kv=True)
    anchors = torch.tensor([[0, WINDOW + 3, 3 * WINDOW - 2], [2, WINDOW, 2 * WINDOW - 1]])
    with torch.no_grad():
        f = contemplate_futures(target.model, head, tb, anchors)
    for b in range(2):
        for j, a in enumerate(anchors[b].tolist()):
            torch.testing.assert_close(f[b, j], _decoder_future(target, head, seqs[b][0][: a + 1]),
                                       atol=1e-4, rtol=1e-4)


def _decoder_future(target: Target, head, prefix: list[int]) -> torch.Tensor:
    """The decoder's f for a [con] slot attached after the last token of `prefix` (as its prefill makes it)."""
    cache = TargetCache(target.model, head.soft_prompt_kv())
    a = len(prefix) - 1
    route = torch.zeros(3 * target.hidden_size)
    with torch.no_grad():
        if a > 0:
            out = target.forward(cache, torch.arange(a), torch.ones(a, a, dtype=torch.bool).tril(),
                                 input_ids=torch.tensor(prefix[:-1]))
            cache.commit(None)
            route = out.features[-1]
        embeds = torch.cat([target.embed(torch.tensor(prefix[-1:])), head.contemplate_embedding(route)[None]])
        out = target.forward(cache, torch.tensor([a, a + 1]), torch.ones(2, 2, dtype=torch.bool).tril(),
                             inputs_embeds=embeds, contemplate_rows=1)
    return out.last_hidden[1]


def _write_data(target: Target, path: Path, n_seq: int = 8, seq_len: int = 3 * WINDOW) -> Path:
    gen = torch.Generator().manual_seed(0)
    with path.open("w") as f:
        for _ in range(n_seq):
            ids = torch.randint(3, target.vocab_size, (seq_len,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 4 + [1] * (seq_len - 4)}) + "\n")
    return path


def test_confu_train_runs_both_methods(family_dir: Path, tmp_path: Path) -> None:
    from confu.cli import main

    data = _write_data(load_target(family_dir), tmp_path / "data.jsonl")
    for method in ("eagle3", "confu"):
        out = tmp_path / method
        assert main(["train", "--target", str(family_dir), "--data", str(data), "--method", method, "--out",
                     str(out), "--steps", "2", "--ttt-steps", "2", "--draft-vocab-size", "256",
                     "--anchors", "4", "--eval-fraction", "0", "--eval-every", "0", "--save-every", "0",
                     "--no-progress"]) == 0
        losses = [r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
        assert len(losses) == 2 and all(loss == loss for loss in losses), losses  # logged, and not NaN


# -- the window and its rules -------------------------------------------------------------------------------


def test_sliding_masks_follow_positions_and_keep_the_soft_prompt() -> None:
    """Keys `window` or more positions behind a query are hidden in sliding layers, by position (tree siblings share
    one); soft-prompt entries have no position and stay visible to the rows that may see them."""
    layout = AttentionLayout({"full_attention": None, "sliding_attention": 2})
    # [soft | tokens at positions 0 1 2 | root (3), siblings A and B (4), A's [con] (5)]
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0],
                         [0, 1, 1, 1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 1, 0, 1, 0],
                         [1, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    query_pos = torch.tensor([3, 4, 4, 5])
    key_pos = torch.cat([torch.tensor([-1, 0, 1, 2]), query_pos])
    masks = layout.masks(mask, query_pos, key_pos, prefix=1)
    assert set(masks) == {"full_attention", "sliding_attention"} and torch.equal(masks["full_attention"], mask)
    assert masks["sliding_attention"].int().tolist() == [[0, 0, 0, 1, 1, 0, 0, 0],
                                                         [0, 0, 0, 0, 1, 1, 0, 0],
                                                         [0, 0, 0, 0, 1, 0, 1, 0],
                                                         [1, 0, 0, 0, 0, 1, 0, 1]]
    single = AttentionLayout({"sliding_attention": 2}).masks(mask, query_pos, key_pos, prefix=1)
    assert torch.equal(single, masks["sliding_attention"])  # a model with one layer type takes a tensor


def test_the_window_matters(tiny_tokenizer_dir: Path) -> None:
    """The test prompts are long enough that a target without its window would give other logits."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(TINY_SEED)
    family = FAMILIES["mistral"]
    target = Target(family.model(_config(family, tokenizer)).eval(), tokenizer)
    ids = torch.tensor(chat_ids(target, PROMPTS[0]))
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()

    def last_logits() -> torch.Tensor:
        return target.forward(target.new_cache(), torch.arange(len(ids)), causal, input_ids=ids).logits[-1]

    with torch.no_grad():
        windowed = last_logits()
        torch.testing.assert_close(windowed, target.model(ids[None]).logits[0, -1], atol=1e-5, rtol=1e-5)
        target.layout = AttentionLayout({"sliding_attention": None})
        assert (last_logits() - windowed).abs().max() > 1e-3


# -- the sampling law on non-Llama families ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "method", "sampling"), [
    ("gemma3", "confu", SamplingConfig(temperature=1.0, top_p=0.9, top_k=20)),
    ("qwen2", "eagle3", SamplingConfig(temperature=0.7, top_p=0.9)),
])
def test_speculative_sampling_law(name: str, method: str, sampling: SamplingConfig, tiny_tokenizer_dir: Path,
                                  record_property) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(TINY_SEED)
    family = FAMILIES[name]
    target = Target(family.model(_config(family, tokenizer)).eval(), tokenizer)
    with torch.no_grad():
        target.model.get_output_embeddings().weight.mul_(4.0)  # sharper than the random init (see that test)
    prompt = chat_ids(target, PROMPTS[5])
    assert len(prompt) > 2 * WINDOW
    samples = speculative_samples(target, new_draft(target, method, draft_vocab_size=256), prompt, sampling)
    law = exact_law(target, prompt, sampling, N)
    p_value = chi_square_p_value(*cell_counts(samples, law))
    record_property("p_value", p_value)
    assert len(law) >= 10 and p_value > 1e-3, (len(law), p_value)


# -- unsupported architectures ------------------------------------------------------------------------------


def _t5(tokenizer) -> tf.PreTrainedModel:
    return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64,
                                                     num_layers=1, num_heads=4, decoder_start_token_id=0))


UNSUPPORTED = {
    "encoder-decoder": _t5,
    "no KV cache": lambda tok: tf.RwkvForCausalLM(tf.RwkvConfig(vocab_size=len(tok), hidden_size=32,
                                                                num_hidden_layers=2)),
    "'linear_attention' are not supported": lambda tok: tf.MambaForCausalLM(tf.MambaConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, state_size=4)),
    "AttentionInterface": lambda tok: tf.GPTNeoForCausalLM(tf.GPTNeoConfig(
        vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=WINDOW, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)),
    "not supported": lambda tok: tf.GptOssForCausalLM(tf.GptOssConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1, sliding_window=WINDOW,
        layer_types=HYBRID, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0})),
}


@pytest.mark.parametrize("what", list(UNSUPPORTED))
def test_unsupported_models_are_refused_by_name(what: str, tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = UNSUPPORTED[what](tokenizer).eval()
    with pytest.raises(UnsupportedModelError, match=what) as err:
        Target(model, tokenizer)
    assert "\n" not in str(err.value) and type(model).__name__ in str(err.value)


def test_cli_refuses_an_encoder_decoder_in_one_line(tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    from confu.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    target_dir = _save_tiny(_t5(tokenizer), tokenizer, tmp_path / "t5")
    capsys.readouterr()
    assert main(["generate", "--target", str(target_dir), "--prompt", "hello", "--draft", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "encoder-decoder models are not supported" in err, err


def test_cli_decodes_a_hybrid_window_target_like_draft_none(tiny_tokenizer_dir: Path, tmp_path: Path, capsys) -> None:
    """The issue's report, end to end: `confu generate --draft DIR` on a Gemma-3 target with a prompt longer than
    its window gives what `--draft none` gives (it used to fail on the first verify round)."""
    from confu.cli import main

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(TINY_SEED)
    family = FAMILIES["gemma3"]
    target_dir = _save_tiny(family.model(_config(family, tokenizer)).eval(), tokenizer, tmp_path / "gemma3")
    common = ["generate", "--target", str(target_dir), "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--json"]
    runs = {"none": []}
    for method in ("eagle3", "confu"):
        assert main(["init-draft", "--target", str(target_dir), "--method", method, "--out", str(tmp_path / method),
                     "--draft-vocab-size", "256"]) == 0
        runs[method] = ["--draft", str(tmp_path / method), "--tree-nodes", "8"]
    runs["confu budget"] = [*runs["confu"], "--contemplate", "2"]
    capsys.readouterr()
    texts = {}
    for name, extra in runs.items():
        assert main([*common, *extra]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        texts[name] = (record["text"], record["new_tokens"])
    assert texts["none"][1] == 24 and all(t == texts["none"] for t in texts.values()), texts
