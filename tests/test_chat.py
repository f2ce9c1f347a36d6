"""The one end-of-turn policy (`confu.chat.end_of_turn_ids`) and its two users: data preparation's loss mask
and `Target.eos_ids`."""

from __future__ import annotations

from pathlib import Path

from confu.chat import end_of_turn_ids
from confu.engine.target import Target
from confu.training.data import tokenize_conversation

END_OF_TURN = "<end_of_turn>"
# Gemma's turn layout: a turn ends with <end_of_turn>, then a newline the model never has to predict.
GEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>assistant\n' }}{% endif %}"
)


def _gemma_style(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", END_OF_TURN]})
    tok.chat_template = GEMMA_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(len(tok))
    return model, tok


def test_end_of_turn_counted_by_data_and_target(tiny_llama_dir: Path) -> None:
    model, tok = _gemma_style(tiny_llama_dir)
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    ids = end_of_turn_ids(tok, model.generation_config)
    assert eot in ids and tok.eos_token_id in ids and ids[0] == tok.eos_token_id

    # Data preparation: the assistant span's mask stops right after <end_of_turn>, not at the newline.
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    input_ids, mask = tokenize_conversation(tok, conv, max_len=256)
    last = max(i for i, m in enumerate(mask) if m)
    assert input_ids[last] == eot and input_ids[last + 1:] and not any(mask[last + 1:])

    # Target: the same token ends decoding.
    assert eot in Target(model, tok).eos_ids
    assert Target(model, tok).eos_ids == set(ids)
