"""A `Target` rewires a model of its own: the caller's model keeps its modules, mode, attention and gradient
flags, and importing confu registers nothing in transformers."""

from __future__ import annotations

import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from confu.engine.checkpoint import new_draft
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.target import Target
from confu.training.forward import TargetSource
from tests.helpers import PROMPTS, chat_ids, gguf_q4_1, quantized_tiny_target


def _state(model) -> tuple:
    return (model.training, model.config._attn_implementation,
            [(name, type(m)) for name, m in model.named_modules()],
            [(name, p.requires_grad) for name, p in model.named_parameters()])


def test_the_caller_s_model_is_left_as_it_was(tiny_llama_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).train()
    before = _state(model)
    target = Target(model, AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert _state(model) == before
    assert target.model is not model and not target.model.training
    assert not any(p.requires_grad for p in target.model.parameters())
    ours = dict(target.model.named_parameters())
    assert all(ours[name].data_ptr() == p.data_ptr() for name, p in model.named_parameters() if name in ours)


def test_the_kernel_swap_happens_on_the_target_s_model_only(tiny_llama_dir) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():  # weights the kernels take: every linear weight snapped to Q4_1 values
        for module in list(model.modules()):
            if type(module) is torch.nn.Linear:
                module.weight.copy_(gguf_q4_1(module.weight))
    before = _state(model)
    target = Target(model, AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert _state(model) == before
    ours = {type(m) for m in target.model.modules()}
    assert all(type(new) in ours for *_, new in target._swaps + target._fused)  # swapped in on its own modules


def test_importing_confu_registers_no_attention() -> None:
    code = ("import confu.engine.target, confu.engine.generate\n"
            "from transformers import AttentionInterface\n"
            "assert 'confu_split' not in AttentionInterface._global_mapping\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bulk_prefill_and_training_passes_swap_no_module(tiny_llama_dir) -> None:
    """A long prompt's bulk rows and training's target pass run `reference_model` while the decoding path keeps
    every module it has: nothing is swapped in and out around them."""
    target = quantized_tiny_target(tiny_llama_dir)

    def modules(model) -> list[tuple[str, int]]:
        return [(name, id(m)) for name, m in model.named_modules()]

    decoding = modules(target.model)
    seen = []
    hook = target.reference_model.get_decoder().layers[0].register_forward_hook(
        lambda *_: seen.append(modules(target.model)))
    prompt = chat_ids(target, PROMPTS[1])
    Decoder(target).generate(prompt, GenerationConfig(max_new_tokens=4, bulk_prefill=8))
    TargetSource(target, [(prompt, [1] * len(prompt))]).batch(new_draft(target, "eagle3", draft_vocab_size=64), [0],
                                                                keep_kv=False)
    hook.remove()
    assert len(seen) == 2 and all(tree == decoding for tree in seen)
