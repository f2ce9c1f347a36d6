"""The training pipeline's throughput parts on the tiny random Llama: the stored target pass equals the live one,
its build resumes, several data files read as one (a store each), length-bucketed batches cover every sequence
once per epoch within the token budget, a fresh head's output layer is the target's own, and the TTT-depth
curriculum."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from confu.engine.checkpoint import new_draft
from confu.engine.target import Target
from confu.errors import InputError
from confu.training import features
from confu.training.batching import LengthBatches
from confu.training.features import (
    DraftLabels,
    FeatureStore,
    StoreSet,
    build_feature_store,
    feature_store,
    store_key,
)
from confu.training.heads import build_head, init_layer_from_target, init_output_from_target, widen_vocab
from confu.training.train import TrainConfig, train
from confu.training.ttt import collate, run_target, stored_target_batch


@pytest.fixture(scope="module")
def target(tiny_llama_dir: Path) -> Target:
    return Target.load(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def seqs() -> list[tuple[list[int], list[int]]]:
    rng = random.Random(0)
    out = []
    for _ in range(14):
        n = rng.randint(8, 60)
        out.append(([rng.randrange(3, 500) for _ in range(n)], [0] * 4 + [1] * (n - 4)))
    return out


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh store root per test (the parent of `features/`)."""
    monkeypatch.setattr(features, "store_root", lambda: tmp_path / "cache" / "features")
    return tmp_path / "cache"


def _head(target: Target):
    gen = torch.Generator().manual_seed(0)
    t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
    t2d[torch.randperm(target.vocab_size, generator=gen)[:200]] = True
    ids = t2d.nonzero().flatten()
    return new_draft(target, "eagle3", ids - torch.arange(len(ids)), t2d)


def test_stored_batch_is_the_live_target_pass(target, seqs, cache):
    head = _head(target)
    store = feature_store(target, seqs, target.feature_layers, "k", progress=False)
    labels = DraftLabels(target, torch.arange(len(head.d2t)) + head.d2t)
    batch = [3, 0, 7]
    stored = stored_target_batch(store, labels, head, seqs, batch)
    live = run_target(target.model, target.feature_layers, head, *collate([seqs[i] for i in batch]))
    real = torch.arange(stored.shape[1])[None] < stored.lengths[:, None]  # padding rows are not stored
    assert torch.equal(stored.input_ids, live.input_ids) and torch.equal(stored.loss_mask, live.loss_mask)
    torch.testing.assert_close(stored.features[real], live.features[real], atol=2e-3, rtol=1e-3)  # fp16
    torch.testing.assert_close(stored.logits[real], live.logits[real], atol=1e-4, rtol=1e-4)
    assert torch.equal(stored.argmax[real], live.argmax[real]) and torch.equal(stored.in_vocab[real],
                                                                               live.in_vocab[real])


def test_an_interrupted_build_resumes(target, seqs, cache, monkeypatch):
    monkeypatch.setattr(features, "CHUNK_TOKENS", 128)  # several chunks
    root = cache / "features" / "interrupted"
    calls = []
    decoder = target.reference_model.get_decoder()  # the build runs transformers' own modules
    original = decoder.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        build_feature_store(target, seqs, target.feature_layers, root, progress=False)
    assert json.loads((root / "world1-rank0" / "progress.json").read_text())["chunks_done"] == 2
    monkeypatch.setattr(decoder, "forward", original)
    resumed = feature_store(target, seqs, target.feature_layers, "interrupted", progress=False)
    monkeypatch.setattr(features, "CHUNK_TOKENS", 1 << 20)
    whole = feature_store(target, seqs, target.feature_layers, "whole", progress=False)
    assert (root / "complete").is_file()
    # other chunks, other padding: equal up to the batched GEMM's rounding
    assert np.allclose(resumed.features, whole.features, atol=2e-3, rtol=1e-3)
    assert np.allclose(resumed.last_hidden, whole.last_hidden, atol=1e-4, rtol=1e-4)
    assert (resumed.argmax == whole.argmax).all()
    reopened = FeatureStore.open(root)
    assert reopened.rows(len(seqs) - 1).stop == sum(len(ids) for ids, _ in seqs)


def test_a_store_set_reads_several_stores_as_one_data_set(target, seqs, cache):
    whole = feature_store(target, seqs, target.feature_layers, "whole", progress=False)
    split = StoreSet([feature_store(target, seqs[:5], target.feature_layers, "a", progress=False),
                      feature_store(target, seqs[5:], target.feature_layers, "b", progress=False)])
    assert split.sequences == len(seqs) and split.hidden_size == whole.hidden_size
    for i in range(len(seqs)):
        for got, want in zip(split.sequence(i), whole.sequence(i), strict=True):
            assert got.shape == want.shape and np.allclose(got, want, atol=2e-3, rtol=1e-3)  # other chunks
    with pytest.raises(IndexError):
        split.sequence(len(seqs))


def test_store_key_follows_the_data_and_the_layers(target, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}\n')
    key = store_key(str(data), 64, target, (1, 2, 3))
    assert key == store_key(str(data), 64, target, (1, 2, 3))
    assert key != store_key(str(data), 32, target, (1, 2, 3)) != store_key(str(data), 64, target, (0, 2, 3))
    data.write_text('{"input_ids": [1, 2, 4], "loss_mask": [0, 1, 1]}\n')
    assert key != store_key(str(data), 64, target, (1, 2, 3))


def test_length_batches_cover_each_sequence_once_within_the_budget():
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    order = LengthBatches(lengths, 1024, seed=3, min_size=2)
    for epoch in range(2):
        batches = order.epoch(epoch)
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(len(b) >= 2 for b in batches)
        padded = [max(lengths[i] for i in b) * len(b) for b in batches]
        real = sum(lengths)
        assert all(p <= 1024 for p, b in zip(padded, batches, strict=True) if len(b) > 2)
        assert sum(padded) < 1.15 * real  # far less padding than random batches
    assert order.epoch(0) != order.epoch(1)  # another composition each epoch
    assert LengthBatches(lengths, 1024, seed=3, min_size=2).epoch(1) == order.epoch(1)  # seeded
    n0 = len(order.epoch(0))
    assert order.batch(n0) == order.epoch(1)[0] and order.batch(n0 - 1) == order.epoch(0)[-1]


def test_fresh_head_reads_hidden_states_like_the_target(target):
    head = _head(target)
    init_output_from_target(head, target)
    x = torch.randn(5, target.hidden_size) * 3
    final_norm = target.model.get_decoder().norm
    draft_ids = torch.arange(len(head.d2t)) + head.d2t
    with torch.no_grad():
        torch.testing.assert_close(head.logits(x), target.logits(final_norm(x))[:, draft_ids], atol=1e-4,
                                   rtol=1e-4)


def test_widen_vocab_keeps_the_old_rows_and_maps_the_new_ones(target, seqs):
    """--widen-vocab: the old tokens keep their rows and every other weight; a new token's row is the target's
    output row through the linear map that takes the target's rows of the old tokens onto the head's."""
    src = _head(target)
    out_emb = target.model.get_output_embeddings().weight
    mapping = torch.randn(target.hidden_size, target.hidden_size, generator=torch.Generator().manual_seed(1))
    old_ids = torch.arange(len(src.d2t)) + src.d2t
    with torch.no_grad():
        src.lm_head.weight.copy_(out_emb[old_ids] @ mapping)  # a head whose output space moved by `mapping`
    head, note = widen_vocab(src, target, seqs, 300)
    new_ids = torch.arange(len(head.d2t)) + head.d2t
    assert len(new_ids) == 300 and head.cfg.draft_vocab_size == 300 and bool(head.t2d[old_ids].all())
    assert note["widened_vocab"] == [200, 300] and note["widen_fit_residual"] < 1e-3
    x = torch.randn(4, target.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(head.logits(x)[:, src.t2d[new_ids]], src.logits(x))  # old rows unchanged
        torch.testing.assert_close(head.lm_head.weight, out_emb[new_ids] @ mapping, atol=1e-3, rtol=1e-3)
    same = {k for k in src.state_dict() if k not in ("lm_head.weight", "d2t", "t2d")}
    assert all(torch.equal(head.state_dict()[k], src.state_dict()[k]) for k in same)
    with pytest.raises(InputError, match="smaller"):
        widen_vocab(src, target, seqs, 100)
    with pytest.raises(InputError, match="--widen-vocab grows the vocabulary of an --init head"):
        build_head(TrainConfig(data="d", out="o", widen_vocab=True), target, seqs)


def test_fresh_layer_starts_as_a_target_layer(target):
    """--layer-init K: with a zero embedding, the draft layer's q / k / v are the target layer K's on the same
    hidden state, and its MLP block is the target's; an index past the target's layers is refused."""
    head = _head(target)
    assert init_layer_from_target(head, target, -1) == len(target.model.get_decoder().layers) - 1
    src, dst = target.model.get_decoder().layers[-1], head.layer
    x = torch.randn(5, target.hidden_size) * 3
    with torch.no_grad():
        both = torch.cat([dst.embed_norm(torch.zeros_like(x)), dst.hidden_norm(x)], dim=-1)
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(dst, name)(both),
                                       getattr(src.self_attn, name)(src.input_layernorm(x)), atol=1e-5, rtol=1e-4)
        y = dst.post_norm(x)
        torch.testing.assert_close(dst.down_proj(torch.nn.functional.silu(dst.gate_proj(y)) * dst.up_proj(y)),
                                   src.mlp(src.post_attention_layernorm(x)), atol=1e-5, rtol=1e-4)
    with pytest.raises(InputError, match="layers"):
        init_layer_from_target(head, target, len(target.model.get_decoder().layers))


def test_ttt_curriculum():
    cfg = TrainConfig(data="d", out="o", ttt_steps=6, ttt_warmup=0.5)
    depths = [cfg.ttt_depth(s, 100) for s in range(100)]
    assert depths[0] == 1 and depths[49] == 6 and depths[50:] == [6] * 50
    assert depths == sorted(depths) and set(depths) == set(range(1, 7))
    assert TrainConfig(data="d", out="o", ttt_steps=6).ttt_depth(0, 100) == 6


def _random_data(path: Path) -> Path:
    gen = torch.Generator().manual_seed(1)
    with path.open("w") as f:
        for _ in range(24):
            n = int(torch.randint(20, 50, (1,), generator=gen))
            ids = torch.randint(3, 500, (n,), generator=gen).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (n - 5)}) + "\n")
    return path


def test_training_from_the_store_equals_training_live(tiny_llama_dir, tmp_path, cache):
    """EAGLE-3 steps on the stored pass follow the live run (up to the fp16 features) and write the store once."""
    data = _random_data(tmp_path / "data.jsonl")
    logs = {}
    for name, stored in (("stored", True), ("live", False)):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / name), target=str(tiny_llama_dir), batch_tokens=200,
                          max_len=64, lr=1e-3, draft_vocab_size=256, eval_fraction=0.2, eval_every=3, save_every=0,
                          ttt_steps=3, ttt_warmup=0.4, steps=6, progress=False, feature_cache=stored)
        train(cfg)
        logs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("depth") for r in logs["stored"]] == [r.get("depth") for r in logs["live"]]
    assert [r.get("depth") for r in logs["stored"] if "depth" in r] == [1, 2, 3, 3, 3, 3]
    for a, b in zip(logs["stored"], logs["live"], strict=True):
        assert a["tokens"] == b["tokens"]
        la, lb = a.get("loss", a.get("eval", {}).get("loss")), b.get("loss", b.get("eval", {}).get("loss"))
        assert la == pytest.approx(lb, rel=2e-3)
    assert len(list((cache / "features").iterdir())) == 1


def test_two_data_files_train_as_their_concatenation_and_resume_old_checkpoints(tiny_llama_dir, tmp_path, cache):
    """--data A B: the same split, batches and losses as one file holding A then B; a store per file. A
    checkpoint written when --data took one path (a string in its run keys) still resumes."""
    data = _random_data(tmp_path / "data.jsonl")
    lines = data.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:10]))
    (tmp_path / "b.jsonl").write_text("".join(lines[10:]))
    logs = {}
    for name, files in (("one", [str(data)]), ("two", [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])):
        cfg = TrainConfig(data=files, out=str(tmp_path / name), target=str(tiny_llama_dir), batch_tokens=200,
                          max_len=64, lr=1e-3, draft_vocab_size=256, eval_fraction=0.2, eval_every=2, save_every=2,
                          ttt_steps=2, steps=4, progress=False, stop_after=2)
        train(cfg)
        if name == "one":  # as written before --data took several files
            state_path = tmp_path / name / "checkpoint" / "trainer_state.pt"
            state = torch.load(state_path, weights_only=False)
            state["run"]["data"] = str(data)
            torch.save(state, state_path)
        train(TrainConfig(**{**cfg.__dict__, "resume": True, "stop_after": None}))
        logs[name] = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs["one"]] == [r["step"] for r in logs["two"]] == [0, 1, 2, 2, 3, 4, 4]
    for a, b in zip(logs["one"], logs["two"], strict=True):
        assert a["tokens"] == b["tokens"]
        la, lb = a.get("loss", a.get("eval", {}).get("loss")), b.get("loss", b.get("eval", {}).get("loss"))
        assert la == pytest.approx(lb, rel=2e-3)
    assert len(list((cache / "features").iterdir())) == 3
    provenance = json.loads((tmp_path / "two" / "config.json").read_text())["extra"]["training"]
    assert provenance["data"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_oracle_future_reads_the_target_ahead_and_needs_no_kv(target, seqs, cache):
    """The plumbing probe: f is the target's final hidden state K rows after each anchor, from the store."""
    from confu.training.forward import TargetSource, batch_forward
    from confu.training.ttt import oracle_futures

    head = new_draft(target, "confu", draft_vocab_size=256)
    store = feature_store(target, seqs, target.feature_layers, "oracle", progress=False)
    source = TargetSource(target, seqs, store, DraftLabels(target, torch.arange(256)))
    tb = source.batch(head, [1, 2], keep_kv=False)
    assert tb.kv is None
    f = oracle_futures(tb, torch.tensor([[0, 3], [5, 6]]), 2)
    torch.testing.assert_close(f[1, 0], tb.last_hidden[1, 7])
    last = int(tb.lengths[0]) - 1
    torch.testing.assert_close(oracle_futures(tb, torch.tensor([[last], [0]]), 2)[0, 0], tb.last_hidden[0, last])
    cfg = TrainConfig(data="d", out="o", ttt_steps=3, oracle_future=2)
    real = batch_forward(source, head, [1, 2], ["a", "b"], cfg, evaluation=True)
    zero = batch_forward(source, head, [1, 2], ["a", "b"], TrainConfig(data="d", out="o", ttt_steps=3,
                                                                      oracle_future=2, zero_future=True), True)
    assert not torch.allclose(real.ce_sum, zero.ce_sum)


def test_oracle_confu_trains_from_scratch_on_the_store(tiny_llama_dir, tmp_path, cache, monkeypatch):
    """The probe's recipe end to end: a fresh ConFu head, every row an anchor, no target forward per batch."""
    from confu.training import ttt

    data = _random_data(tmp_path / "data.jsonl")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "oracle"), target=str(tiny_llama_dir), method="confu",
                      oracle_future=2, anchors=1000, replicate=0, batch_tokens=200, max_len=64, lr=1e-3,
                      draft_vocab_size=256, eval_fraction=0.2, eval_every=0, save_every=0, ttt_steps=3, steps=3,
                      progress=False)

    def no_live_pass(*args, **kwargs):
        raise AssertionError("the oracle probe reads the stored target pass")

    monkeypatch.setattr(ttt, "run_target", no_live_pass)
    monkeypatch.setattr(ttt, "contemplate_futures", no_live_pass)
    train(cfg)
    provenance = json.loads((tmp_path / "oracle" / "config.json").read_text())["extra"]["training"]
    assert provenance["oracle_future"] == 2 and provenance["final_eval"]["rows"] > 0


def test_draft_labels_are_the_targets_logits_over_the_draft_vocabulary(target, monkeypatch):
    """Output rows of the draft ids, then the model's own post-processing (scaling, soft-capping)."""
    monkeypatch.setattr(target.model.config, "logits_scaling", 2.0, raising=False)
    monkeypatch.setattr(target.model.config, "final_logit_softcapping", 3.0, raising=False)
    draft_ids = torch.tensor([5, 17, 3, 400])
    hidden = torch.randn(6, target.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        full = target.logits(hidden)
        assert full.abs().max() < 3.0  # the cap is in effect, so the check below covers it
        torch.testing.assert_close(DraftLabels(target, draft_ids)(hidden), full[:, draft_ids])


def test_fresh_fc_starts_at_the_asked_output_rms(target, seqs):
    """--fc-rms: the draft layer's residual stream starts at a set scale, whatever the target's feature scale."""
    from confu.training.batching import Dist
    from confu.training.forward import TargetSource
    from confu.training.heads import scale_fc_to_rms

    head = new_draft(target, "eagle3", draft_vocab_size=256)
    source = TargetSource(target, seqs)
    before = head.fc.weight.clone()
    factor = scale_fc_to_rms(head, source, [0, 3, 5], 2.0, Dist())
    torch.testing.assert_close(head.fc.weight, before * factor)
    tb = source.batch(head, [0, 3, 5], keep_kv=False)
    real = torch.arange(tb.shape[1])[None] < tb.lengths[:, None]
    with torch.no_grad():
        rms = head.project_features(tb.features)[real].pow(2).mean().sqrt()
    assert abs(float(rms) - 2.0) < 1e-3


@pytest.mark.parametrize("fc_rms", [0.0, 1.0])
def test_train_scales_only_fresh_heads_and_records_it(tiny_llama_dir, tmp_path, cache, fc_rms):
    data = _random_data(tmp_path / "data.jsonl")
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), target=str(tiny_llama_dir), batch_tokens=200,
                      max_len=64, lr=1e-3, draft_vocab_size=256, eval_fraction=0.2, eval_every=0, save_every=0,
                      ttt_steps=2, steps=1, progress=False, fc_rms=fc_rms)
    train(cfg)
    provenance = json.loads((tmp_path / "run" / "config.json").read_text())["extra"]["training"]
    assert ("fc_init_factor" in provenance) == (fc_rms > 0)
    # a continuation (--init) keeps the weights it starts from
    cont = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "cont"), "init": str(tmp_path / "run"), "steps": 1})
    train(cont)
    assert "fc_init_factor" not in json.loads((tmp_path / "cont" / "config.json").read_text())["extra"]["training"]
