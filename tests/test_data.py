"""Conversation loading, loss masks, tokenized datasets, regeneration and the offline prompt source."""

from __future__ import annotations

import argparse
import builtins
import gzip
import io
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from confu.cli.data import add_parser
from confu.errors import InputError
from confu.training import passages, prompts, self_written
from confu.training.data import (
    DatasetStats,
    generate_replies,
    load_conversations,
    load_dataset,
    prepare,
    regenerate,
    tokenize_conversation,
)

IM_END = "<|im_end|>"

SHAREGPT = {"id": "sg-1", "conversations": [
    {"from": "system", "value": "You answer in one sentence."},
    {"from": "human", "value": "Why is the sky blue?"},
    {"from": "gpt", "value": "Air scatters blue light more than red light."},
]}
OPENAI = {"messages": [
    {"role": "user", "content": "Name three prime numbers."},
    {"role": "assistant", "content": [{"type": "text", "text": "Two, three and five."}]},
    {"role": "user", "content": "And the next one?"},
    {"role": "assistant", "content": "Seven."},
]}
TURNS = {"question_id": 81, "category": "writing",
         "turns": ["Write a haiku about the sea.", "Now a limerick."]}


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


# ---------------------------------------------------------------------------------------------- loading


def test_each_input_format_is_parsed(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, "", OPENAI, TURNS])
    convs = load_conversations(path)
    assert len(convs) == 3
    assert convs[0] == [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Air scatters blue light more than red light."},
    ]
    assert [m["role"] for m in convs[1]] == ["user", "assistant", "user", "assistant"]
    assert convs[1][1]["content"] == "Two, three and five."  # multi-part content joined
    assert convs[2] == [{"role": "user", "content": "Write a haiku about the sea."},
                        {"role": "user", "content": "Now a limerick."}]
    gz = tmp_path / "mixed.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert load_conversations(gz) == convs


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [', "malformed JSON"),
    ('{"text": "no known keys"}', "unknown record format"),
    ('{"conversations": [{"from": "robot", "value": "hi"}]}', "unsupported role"),
    ('{"messages": [{"role": "user"}]}', "message without"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [SHAREGPT, OPENAI, bad])
    with pytest.raises(InputError, match=message) as err:
        load_conversations(path)
    assert f"{path}:3:" in str(err.value)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_conversations(tmp_path / "absent.jsonl")


# ------------------------------------------------------------------------------------------ tokenizing


def _spans(mask: list[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_loss_mask_covers_exactly_assistant_content_and_end_token(tokenizer) -> None:
    conv = load_conversations_from(SHAREGPT)
    ids, mask = tokenize_conversation(tokenizer, conv, max_len=512)
    assert ids == tokenizer(tokenizer.apply_chat_template(conv, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    (start, stop), = _spans(mask)
    assert tokenizer.decode(ids[start:stop]) == conv[2]["content"] + IM_END
    # The role header is not trained on; the newline the template adds after <|im_end|> is not either.
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[stop:]) == "\n"


def test_multi_turn_mask_has_one_span_per_assistant_turn(tokenizer) -> None:
    conv = load_conversations_from(OPENAI)
    ids, mask = tokenize_conversation(tokenizer, conv, max_len=512)
    spans = _spans(mask)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["Two, three and five." + IM_END,
                                                              "Seven." + IM_END]
    user_text = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "Name three prime numbers." in user_text and "And the next one?" in user_text


def test_truncation_keeps_a_prefix(tokenizer) -> None:
    conv = load_conversations_from(OPENAI)
    full_ids, full_mask = tokenize_conversation(tokenizer, conv, max_len=512)
    ids, mask = tokenize_conversation(tokenizer, conv, max_len=30)
    assert len(ids) == len(mask) == 30
    assert ids == full_ids[:30] and mask == full_mask[:30]


def test_template_breaking_the_prefix_property_fails_loudly(tiny_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Marks the final message differently, so a shorter conversation is not a prefix of the longer one.
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}LAST {% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}")
    with pytest.raises(InputError, match="prefix"):
        tokenize_conversation(tok, load_conversations_from(OPENAI), max_len=512)


def load_conversations_from(record: dict[str, Any]) -> list[dict[str, str]]:
    from confu.training.data import _parse_record

    return _parse_record(record, "test")


def test_prepare_and_load_round_trip(tmp_path: Path, tokenizer) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [SHAREGPT, TURNS])
    b = _write_jsonl(tmp_path / "b.jsonl", [OPENAI])
    stats = prepare([a, b], tokenizer, tmp_path / "out" / "data.jsonl", max_len=64)
    samples = load_dataset(tmp_path / "out" / "data.jsonl")
    expected = [tokenize_conversation(tokenizer, load_conversations_from(r), 64) for r in (SHAREGPT, OPENAI)]
    assert [(s.input_ids, s.loss_mask) for s in samples] == expected
    assert isinstance(stats, DatasetStats)
    assert stats.conversations == 3 and stats.samples == 2 and stats.skipped_no_assistant == 1
    assert stats.tokens == sum(len(s.input_ids) for s in samples)
    assert stats.loss_tokens == sum(sum(s.loss_mask) for s in samples) > 0
    assert stats.truncated == 1  # the ShareGPT conversation (70 tokens) is cut, the OpenAI one (58) is not
    assert not (tmp_path / "out" / "data.jsonl.tmp").exists()
    # At 30 tokens the ShareGPT answer (it starts at token 41) is cut away entirely: no sample, counted.
    short = prepare([a, b], tokenizer, tmp_path / "short.jsonl", max_len=30)
    assert (short.samples, short.skipped_truncated, short.skipped_no_assistant) == (1, 1, 1)


def test_load_dataset_rejects_a_broken_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1, 2], "loss_mask": [0, 1]},
                                               {"input_ids": [1, 2], "loss_mask": [0]}])
    with pytest.raises(InputError, match=":2:"):
        load_dataset(path)


# ---------------------------------------------------------------------------------------- regeneration


class _ScriptedModel(torch.nn.Module):
    """Stands in for an HF model: appends a fixed continuation so the EOS cut can be checked exactly."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any):
        self.calls.append((input_ids, attention_mask))
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_generate_replies_left_pads_and_stops_at_eos(tokenizer) -> None:
    words = tokenizer("Paris.", add_special_tokens=False)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    model = _ScriptedModel([*words, im_end, *words])
    convs = [[{"role": "user", "content": "Capital of France?"}],
             [{"role": "user", "content": "A much longer question about the capital of France?"}]]
    replies = generate_replies(model, tokenizer, convs, batch_size=2, max_new_tokens=8)
    assert replies == ["Paris.", "Paris."]
    (input_ids, attention), = model.calls
    assert attention[:, -1].all() and not attention[:, 0].all()  # left padding: the pad sits in front
    assert (input_ids[attention == 0] == tokenizer.pad_token_id).all()


def test_batched_greedy_replies_match_one_by_one(tiny_llama) -> None:
    # Left padding must be invisible to the model: a padded row decodes exactly as it does alone.
    model, tok = tiny_llama
    convs = [[{"role": "user", "content": "hello"}],
             [{"role": "user", "content": "a much longer hello there my good friend, how are you"}],
             [{"role": "user", "content": "What is two plus three?"}]]
    batched = generate_replies(model, tok, convs, batch_size=3, max_new_tokens=6)
    assert batched == generate_replies(model, tok, convs, batch_size=1, max_new_tokens=6)
    assert all(isinstance(r, str) for r in batched)
    too_long = generate_replies(model, tok, convs[:1], max_new_tokens=6, max_prompt_len=3)
    assert too_long == [None]


def _regen_input(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "in.jsonl", [TURNS, SHAREGPT, {"id": "oa", **OPENAI}])


def test_regenerate_answers_every_user_turn(tmp_path: Path, tiny_llama) -> None:
    model, tok = tiny_llama
    out = tmp_path / "regen.jsonl"
    assert regenerate(model, tok, _regen_input(tmp_path), out, batch_size=2, max_new_tokens=8) == 3
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"81", "sg-1", "oa"}
    assert records["81"]["category"] == "writing"
    roles = {k: [m["role"] for m in r["messages"]] for k, r in records.items()}
    assert roles == {"81": ["user", "assistant", "user", "assistant"],
                     "sg-1": ["system", "user", "assistant"],
                     "oa": ["user", "assistant", "user", "assistant"]}
    msgs = records["sg-1"]["messages"]
    assert msgs[1]["content"] == "Why is the sky blue?"
    assert msgs[2]["content"] != SHAREGPT["conversations"][2]["value"]  # the target's own answer
    for r in records.values():
        assert all(IM_END not in m["content"] for m in r["messages"])


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_interrupted_regeneration_resumes_without_duplicates(tmp_path: Path, tiny_llama_dir: Path) -> None:
    src, out = _regen_input(tmp_path), tmp_path / "regen.jsonl"
    base = ["data", "regenerate", "--target", str(tiny_llama_dir), "--input", str(src), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "8", "--device", "cpu"]
    _cli([*base, "--limit", "2"])  # the "interrupted" run: only the first batch got written
    assert len(out.read_text().splitlines()) == 2
    with out.open("a") as f:
        f.write('{"id": "oa", "ind')  # a torn write from a killed process
    _cli(base)
    indices = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert sorted(indices) == [0, 1, 2]
    _cli(base)  # nothing left to do
    _cli([*base, "--limit", "1"])  # a smaller limit after a longer run is fine too
    assert len(out.read_text().splitlines()) == 3


def test_resume_refuses_output_of_another_input(tmp_path: Path, tiny_llama) -> None:
    model, tok = tiny_llama
    out = _write_jsonl(tmp_path / "regen.jsonl", [{"id": "other", "index": 0, "messages": []}])
    with pytest.raises(InputError, match="different input"):
        regenerate(model, tok, _regen_input(tmp_path), out, batch_size=2, max_new_tokens=4)


def test_cli_prompts_and_prepare(tmp_path: Path, tiny_llama_dir: Path) -> None:
    prompts_path, regen, data = tmp_path / "p.jsonl", tmp_path / "r.jsonl", tmp_path / "d.jsonl"
    _cli(["data", "prompts", "--n", "4", "--seed", "3", "--out", str(prompts_path), "--no-man-pages",
          "--words", "3", "--target", str(tiny_llama_dir)])
    records = [json.loads(line) for line in prompts_path.read_text().splitlines()]
    assert len(load_conversations(prompts_path)) == 7 and sum(r["id"].startswith("words-3-") for r in records) == 3
    _write_jsonl(regen, [SHAREGPT, OPENAI])
    _cli(["data", "prepare", "--target", str(tiny_llama_dir), "--input", str(regen), str(prompts_path),
          "--out", str(data), "--max-len", "64"])
    assert len(load_dataset(data)) == 2


# --------------------------------------------------------------------------------------------- prompts


def test_offline_prompts_are_deterministic_and_balanced() -> None:
    a = prompts.offline_prompts(60, seed=7)
    assert a == prompts.offline_prompts(60, seed=7)
    assert a != prompts.offline_prompts(60, seed=8)
    counts = Counter(r["category"] for r in a)
    assert set(counts) == set(prompts.CATEGORIES) and len(prompts.CATEGORIES) == 11
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len({r["id"] for r in a}) == 60
    assert any(len(r["turns"]) == 2 for r in a) and all(1 <= len(r["turns"]) <= 2 for r in a)
    assert all(isinstance(t, str) and t.strip() for r in a for t in r["turns"])
    assert len({r["turns"][0] for r in a}) == 60
    rag = next(r for r in a if r["category"] == "rag")["turns"][0]
    assert "Passage (" in rag and "Question:" in rag


class _WordTokenizer:
    """The two things `vocabulary_words` asks of a tokenizer: its size and the text of one token."""

    pieces = [" the", "the", " Maps", " maps", " Basque", " cat", " ab", " naïve", " x2y2", "ing", " Lighthouse"]

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids: list[int]) -> str:
        return self.pieces[ids[0]]


def test_vocabulary_words_keeps_word_starts_of_letters() -> None:
    # Not word starts ("the", "ing"), too short (" cat", " ab"), not ASCII letters (" naïve", " x2y2") and a
    # capitalized duplicate (" Maps") go; a proper noun and a capitalized word without a lowercase twin stay.
    assert prompts.vocabulary_words(_WordTokenizer(), min_letters=3) == ["the", "maps", "Basque", "cat",
                                                                          "Lighthouse"]
    assert prompts.vocabulary_words(_WordTokenizer()) == ["maps", "Basque", "Lighthouse"]


def test_word_prompts_are_deterministic_and_use_the_words() -> None:
    words = [f"word{c}" for c in "abcdefghij"]
    a = prompts.word_prompts(words, 40, seed=2)
    assert a == prompts.word_prompts(words, 40, seed=2) and a != prompts.word_prompts(words, 40, seed=3)
    assert len({r["id"] for r in a}) == 40 and {r["category"] for r in a} <= set(prompts.CATEGORIES)
    assert all(any(w in r["turns"][0] for w in words) for r in a)
    assert "{" not in "".join(t for r in a for t in r["turns"])  # every slot filled
    assert any(len(r["turns"]) == 2 for r in a)
    with pytest.raises(InputError, match="at least 3 words"):
        prompts.word_prompts(words[:2], 1)


_FAKE_MAN_PAGE = r""".\" a comment that must vanish
.TH FROB 1 "2024" "frob 1.0"
.SH NAME
frob \- adjust the widgets
.SH DESCRIPTION
.B frob
reads every widget named on the command line and adjusts its
.IR tension ,
then writes a report to standard output.
Widgets that are already adjusted are left alone, and
.BR frob (1)
never changes a widget's colour.
.PP
With the \fB\-n\fR option, frob only prints what it would do.
This dry-run mode is useful before a large batch of changes, because adjustments cannot be undone
once they are written.
Errors are reported on standard error with the widget's name and the reason, and the exit status is non-zero.
.SH OPTIONS
.TP
.B \-n
Dry run.
"""


def test_prompt_source_never_reads_spec_bench_and_uses_man_pages(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "frob.1.gz").write_bytes(gzip.compress(_FAKE_MAN_PAGE.encode()))
    monkeypatch.setattr(passages, "MAN_DIR", tmp_path)
    passages._man_files.cache_clear()
    passages.stdlib_passages.cache_clear()
    opened: list[str] = []
    real_open, real_scandir = builtins.open, os.scandir

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_scandir(path: Any = ".") -> Any:
        opened.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "scandir", spy_scandir)
    try:
        records = prompts.offline_prompts(44, seed=1)
    finally:
        passages._man_files.cache_clear()
    assert len(records) == 44
    assert any("frob.1.gz" in p for p in opened)  # the spy sees the reads
    assert not any("spec_bench" in p.lower() for p in opened)
    found = passages.man_passages(3, random.Random(0))
    assert [p.title for p in found] == ["frob(1)"]
    texts = found[0].text
    assert "frob reads every widget named on the command line and adjusts its tension, then" in texts
    assert "frob(1) never changes" in texts and "With the -n option" in texts
    assert "a comment that must vanish" not in texts and ".B" not in texts and "Dry run" not in texts


def test_self_written_prompts(tiny_llama) -> None:
    model, tok = tiny_llama
    records = self_written.self_written_prompts(model, tok, n=3, seed=0, batch_size=2, max_new_tokens=12)
    assert len(records) <= 3
    for r in records:
        assert r["category"] in prompts.CATEGORIES and len(r["turns"]) == 1 and len(r["turns"][0]) >= 10


def test_magpie_prompts_sample_the_user_turn_and_keep_only_finished_new_messages(tiny_llama) -> None:
    import torch

    model, tok = tiny_llama
    prefix = self_written.user_turn_prefix(tok)
    assert prefix.endswith("<|im_start|>user\n") and "<|im_end|>" not in prefix.split("<|im_start|>user")[-1]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    message = tok("Please plan a garden for me.", add_special_tokens=False).input_ids
    # What the sampler "writes" per row, in order: a finished message, the same again (a duplicate), one too short,
    # one cut off by max_new_tokens (no end of turn), and a second finished message.
    other = tok("How do tides work, exactly?", add_special_tokens=False).input_ids
    scripted = [message + [end], message + [end], message[:2] + [end], message * 4, other + [end]]
    seen_inputs = []

    def fake_generate(input_ids, attention_mask, generation_config):
        seen_inputs.append(input_ids)
        rows = [scripted.pop(0) for _ in range(input_ids.shape[0])]
        width = max(map(len, rows))
        new = torch.tensor([r + [end] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    model.generate = fake_generate  # the instance attribute shadows the method for this test only
    try:
        records = self_written.magpie_prompts(model, tok, n=5, seed=3, batch_size=3, max_new_tokens=8)
    finally:
        del model.generate
    assert [r["turns"] for r in records] == [["Please plan a garden for me."], ["How do tides work, exactly?"]]
    assert [r["id"] for r in records] == ["magpie-3-000000", "magpie-3-000004"]
    assert [x.shape[0] for x in seen_inputs] == [3, 2]  # n = 5 in batches of 3
    assert tok.decode(seen_inputs[0][0]) == prefix


def test_magpie_needs_a_chat_template(tiny_llama) -> None:
    import copy

    _, tok = tiny_llama
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(InputError, match="chat template"):
        self_written.user_turn_prefix(bare)
