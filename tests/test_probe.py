"""The future-prediction probes on inputs whose answers are known."""

from __future__ import annotations

import torch

from confu.training.probe import ceiling_probe, diversity, future_attention_share, ridge_probe
from confu.training.ttt import StepView


def test_diversity_of_constant_orthogonal_and_one_dimensional_rows() -> None:
    same = torch.ones(50, 8) + 0 * torch.randn(50, 8)
    assert diversity(same)["mean_pairwise_cosine"] == 1.0
    eye = torch.eye(8)
    assert diversity(eye) == {"mean_pairwise_cosine": 0.0, "top_dim_energy": 0.125}
    spike = torch.randn(400, 8, generator=torch.Generator().manual_seed(0)) * 0.01
    spike[:, 3] = 10.0  # nearly all energy in one dimension, rows nearly parallel
    d = diversity(spike)
    assert d["top_dim_energy"] > 0.99 and d["mean_pairwise_cosine"] > 0.99


def test_ridge_probe_reads_a_linear_code_and_not_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    classes = 20
    codes = torch.randn(classes, 16, generator=gen)
    y = torch.randint(0, classes, (2000,), generator=gen)
    x = codes[y] + 0.05 * torch.randn(2000, 16, generator=gen)
    assert ridge_probe(x[:1000], y[:1000], x[1000:], y[1000:], classes)["accuracy"] > 0.95
    noise = torch.randn(2000, 16, generator=gen)
    assert ridge_probe(noise[:1000], y[:1000], noise[1000:], y[1000:], classes)["accuracy"] < 0.15


def test_ceiling_probe_gains_only_when_x_holds_the_label() -> None:
    gen = torch.Generator().manual_seed(2)
    classes, n = 10, 3000
    y = torch.randint(0, classes, (n,), generator=gen)
    base = torch.randn(n, classes, generator=gen)  # a draft that knows nothing
    base[torch.arange(n // 2), y[: n // 2]] += 5.0  # ... except on the first half of the rows
    codes = torch.randn(classes, 32, generator=gen)
    informative = codes[y] + 0.1 * torch.randn(n, 32, generator=gen)
    tr, te = torch.arange(0, n, 2), torch.arange(1, n, 2)
    hit = ceiling_probe(informative[tr], y[tr], informative[te], y[te], base[tr], base[te])
    assert 0.5 < hit["base_accuracy"] < 0.65  # half the rows known, a tenth of the rest by chance
    assert hit["gain"] > 0.3
    useless = torch.randn(n, 32, generator=gen)
    miss = ceiling_probe(useless[tr], y[tr], useless[te], y[te], base[tr], base[te])
    assert miss["base_accuracy"] == hit["base_accuracy"] and abs(miss["gain"]) < 0.05


def test_future_attention_share_uniform_and_focused() -> None:
    """Queries of zeros attend uniformly: the share is 1 / keys seen and the ratio 1. A query aligned with its
    future key puts almost all its mass there."""
    b, heads, kv_heads, m, d = 1, 4, 2, 3, 8
    seq_keys = torch.randn(b, kv_heads, 5, d)
    future_keys = torch.randn(b, kv_heads, m, d)
    keys = torch.cat([seq_keys, future_keys], 2)
    mask = torch.zeros(b, 1, m, 5 + m, dtype=torch.bool)
    for j in range(m):
        mask[0, 0, j, : 2 + j] = True  # a causal prefix
        mask[0, 0, j, 5 + j] = True  # its own future key
    valid = torch.ones(b, m, dtype=torch.bool)
    view = StepView(0, torch.zeros(b, heads, m, d), keys, mask, torch.zeros(b, m, 4), valid, torch.zeros(b, m))
    share, ratio = future_attention_share(view)
    torch.testing.assert_close(share, torch.tensor([1 / 3, 1 / 4, 1 / 5]))
    torch.testing.assert_close(ratio, torch.ones(3))
    focused = future_keys.repeat_interleave(heads // kv_heads, 1) * 50
    share, _ = future_attention_share(StepView(0, focused, keys, mask, torch.zeros(b, m, 4), valid, torch.zeros(b, m)))
    assert (share > 0.99).all()


def test_probe_future_reports_every_section_on_a_tiny_confu_draft(tiny_llama_dir) -> None:
    """The whole probe on the tiny target: each section present, accuracies in [0, 1], the zero-f tau that of a
    draft given f = 0, the oracle read through the target's output layer naming x_{a+2} at step 0's rows."""
    from confu.engine.checkpoint import new_draft
    from confu.engine.target import Target
    from confu.training.features import DraftLabels
    from confu.training.forward import TargetSource
    from confu.training.probe import probe_future
    from confu.training.train_config import TrainConfig

    target = Target.load(str(tiny_llama_dir))
    head = new_draft(target, "confu", draft_vocab_size=512, seed=1)
    gen = torch.Generator().manual_seed(3)
    seqs = [(torch.randint(3, 500, (40,), generator=gen).tolist(), [0] * 8 + [1] * 32) for _ in range(4)]
    source = TargetSource(target, seqs, labels=DraftLabels(target, torch.arange(512) + head.d2t))
    cfg = TrainConfig(data=["x"], out="", method="confu", batch_tokens=128, max_len=64, ttt_steps=2)
    report = probe_future(source, head, list(range(4)), cfg)
    assert set(report) == {"rows", "diversity", "lm_head_accuracy", "linear_probe", "attention_share", "tau",
                           "ceiling"}
    assert report["rows"] == 4 * 32  # every row a whose x_{a+2} is a response token (a = 6..37) is an anchor
    assert all(0 <= a <= 1 for a in report["lm_head_accuracy"].values())
    assert set(report["attention_share"]) == {0, 1} and set(report["ceiling"]) == {0, 1}
    assert set(report["ceiling"][0]) == {"real", "oracle", "constant"}
    assert all(t >= 1 for t in report["tau"].values())
