"""Shared fixtures: a tiny ChatML tokenizer, tiny random Llama / Qwen2 targets, the embedded target.

The tiny models are built once per session (a few seconds on CPU) so unit tests across the suite can
run real HF forward passes without network access or large downloads.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

# Token names the whole suite relies on; the ChatML template below uses the same strings.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 512
# Chosen so random logits have clear top-1/top-2 gaps (no near-ties that flip greedy decoding on
# float noise) while generations still vary rather than repeating one token; checked by
# tests/test_hub.py::test_tiny_models_decode_without_ties.
TINY_INIT_RANGE = 0.15
TINY_SEED = 1234


def _training_corpus() -> list[str]:
    """A few hundred deterministic English lines: enough for BPE merges on common words and for
    chat-shaped text, without shipping a data file."""
    subjects = [
        "the cat",
        "a small robot",
        "my friend",
        "the teacher",
        "our team",
        "the old man",
        "a young girl",
        "the computer",
        "this model",
        "the river",
    ]
    verbs = [
        "writes",
        "reads",
        "finds",
        "builds",
        "answers",
        "explains",
        "watches",
        "solves",
        "remembers",
        "carries",
    ]
    objects = [
        "a short story",
        "the hard problem",
        "a long letter",
        "the question",
        "three apples",
        "the new plan",
        "a simple program",
        "the answer",
        "many books",
        "the map",
    ]
    endings = [
        "in the morning.",
        "before dinner.",
        "with great care.",
        "very quickly.",
        "every day.",
        "at school.",
        "near the window.",
        "without help.",
    ]
    rng = random.Random(0)
    lines = []
    for s, v, o in itertools.product(subjects, verbs, objects):
        lines.append(f"{s.capitalize()} {v} {o} {rng.choice(endings)}")
    rng.shuffle(lines)
    lines = lines[:300]
    questions = [
        "What is the capital of France?",
        "How do I sort a list in Python?",
        "Explain speculative decoding in one sentence.",
        "Write a haiku about the sea.",
        "What is two plus three?",
        "Why is the sky blue?",
        "Name three prime numbers.",
    ]
    answers = [
        "The capital of France is Paris.",
        "Use the sorted function or list.sort().",
        "A small model drafts tokens and a large model verifies them.",
        "Waves fold and unfold, salt wind carries gull voices, the tide keeps its time.",
        "Two plus three is five.",
        "Air scatters blue light more than red light.",
        "Two, three and five are prime numbers.",
    ]
    for q, a in zip(questions, answers, strict=True):
        for _ in range(4):
            lines.append(f"{IM_START}user\n{q}{IM_END}\n{IM_START}assistant\n{a}{IM_END}")
    for i in range(60):
        lines.append(f"def f{i}(x):\n    return x * {i} + {i % 7}")
        lines.append(f"Number {i} plus {i + 1} equals {2 * i + 1}.")
    return lines


@pytest.fixture(scope="session", autouse=True)
def _feature_stores_in_tmp(tmp_path_factory: pytest.TempPathFactory):
    """Training runs of the suite store their target passes in a temporary directory, not the user's cache
    (the embedded target's conversion stays in the cache: converting it again would cost every run ~35 s)."""
    from confu.training import features

    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("features")
        mp.setattr(features, "store_root", lambda: root)
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a ~512-token byte-level BPE ``PreTrainedTokenizerFast`` and a ChatML template.

    Special tokens: ``<|im_start|>``, ``<|im_end|>`` (eos), ``<|endoftext|>`` (pad); no bos token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        # The full byte alphabet keeps every string encodable (no unknown tokens).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START],
    )
    fast.chat_template = CHATML_TEMPLATE
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(out)
    return out


def _build_tiny_model(kind: str, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        initializer_range=TINY_INIT_RANGE,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    # Same seed for both architectures so failures reproduce across runs and machines.
    torch.manual_seed(TINY_SEED)
    model = cls(config).to(torch.float32).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """HF directory (config, safetensors, tokenizer) of a random 8-layer, hidden-64 ``LlamaForCausalLM``."""
    return _build_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """HF directory (config, safetensors, tokenizer) of a random 8-layer, hidden-64 ``Qwen2ForCausalLM``."""
    return _build_tiny_model("qwen2", tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dirs(request: pytest.FixtureRequest) -> Path:
    """Each tiny model directory in turn (the test runs once per architecture)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """Converted safetensors directory of the embedded SmolLM2-135M-Instruct target.

    Converts on the first-ever run (~35 s) and hits the ``$CONFU_CACHE`` cache afterwards. Any failure
    propagates: a missing embedded model must fail the suite, never skip it.
    """
    from confu.hub import resolve_target

    return resolve_target("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_drafts(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained EAGLE-3 and ConFu draft of the tiny Llama (e3, cf), saved once."""
    from confu.engine.checkpoint import new_draft, save_draft
    from confu.engine.target import Target

    target = Target.load(str(tiny_llama_dir))
    out = tmp_path_factory.mktemp("drafts")
    save_draft(new_draft(target, "eagle3", draft_vocab_size=256, seed=1), out / "e3")
    save_draft(new_draft(target, "confu", draft_vocab_size=256, seed=2, soft_prompt_len=4), out / "cf")
    return out / "e3", out / "cf"
