"""EAGLE-3 and ConFu training on the tiny random Llama: learning, exact resume, anchors, gradients, DDP."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from confu.cli.train import add_parser
from confu.engine.checkpoint import new_draft
from confu.engine.convert import load_draft
from confu.engine.target import Target
from confu.errors import CheckpointError
from confu.training.batching import load_sequences, split_indices
from confu.training.forward import TargetSource, batch_forward, evaluate
from confu.training.train import TrainConfig, train
from confu.training.ttt import assign_anchor_rows, collate, contemplate_futures, loss_rows, run_target, sample_anchors

N_SEQ, SEQ_LEN, PROMPT_LEN = 40, 48, 6
ROOT = Path(__file__).resolve().parents[1]


def _load_target(model_dir: Path) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return Target(model, AutoTokenizer.from_pretrained(model_dir), name=str(model_dir))


@pytest.fixture(scope="module")
def tiny_target(tiny_llama_dir: Path) -> Target:
    return _load_target(tiny_llama_dir)


def _greedy(target: Target, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    ids = prompts
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.cat([ids, target.model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture(scope="module")
def tiny_data(tiny_target: Target, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random 6-token prompts and the target's own greedy continuations: something a draft can learn."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, tiny_target.vocab_size, (N_SEQ, PROMPT_LEN), generator=gen)
    seqs = _greedy(tiny_target, prompts, SEQ_LEN - PROMPT_LEN)
    path = tmp_path_factory.mktemp("train_data") / "data.jsonl"
    with path.open("w") as f:
        for row in seqs.tolist():
            mask = [0] * PROMPT_LEN + [1] * (SEQ_LEN - PROMPT_LEN)
            f.write(json.dumps({"input_ids": row, "loss_mask": mask}) + "\n")
    return path


def _cfg(data: Path, model_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), target=str(model_dir), batch_tokens=256, max_len=64, lr=3e-3,
                warmup_steps=2, draft_vocab_size=256, eval_fraction=0.2, eval_every=0, save_every=0,
                ttt_steps=4, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


EAGLE3_STEPS = 150


@pytest.fixture(scope="module")
def eagle3_run(tiny_data: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eagle3_run")
    train(_cfg(tiny_data, tiny_llama_dir, out, steps=EAGLE3_STEPS, lr=1e-2, eval_fraction=0.1, eval_every=75))
    return out


def _train_split(data: Path, eval_fraction: float = 0.1) -> list[tuple[list[int], list[int]]]:
    seqs = load_sequences(str(data), 64)
    train_idx, _ = split_indices(len(seqs), eval_fraction, 0)
    return [seqs[i] for i in train_idx]


# The tiny target is a random network: its continuations of held-out random prompts are close to
# unpredictable for a one-layer draft trained on 1.5k tokens, so learning is measured on the sequences the
# head was trained on (and on fresh generations from their prompts), against an untrained head.


def test_eagle3_learns(eagle3_run: Path, tiny_data: Path, tiny_target: Target) -> None:
    log = _log(eagle3_run)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == EAGLE3_STEPS
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0, losses
    assert [r["step"] for r in log if "eval" in r] == [0, 75, 150]  # untrained, then during training
    cfg = json.loads((eagle3_run / "config.json").read_text())
    prov = cfg["extra"]["training"]
    assert prov["steps"] == EAGLE3_STEPS and prov["data_tokens"] > 0
    last_step = [r for r in log if "loss" in r][-1]  # the provenance is the run's own account of its steps
    assert prov["tokens_seen"] == last_step["tokens"]
    assert prov["train_time_s"] == pytest.approx(last_step["elapsed_s"], abs=0.06)
    assert 0 < prov["vocab_coverage"] <= 1 and prov["final_eval"]["rows"] > 0

    trained = load_draft(eagle3_run, tiny_target)
    untrained = new_draft(tiny_target, "eagle3", trained.d2t, trained.t2d, seed=0)
    eval_cfg = _cfg(tiny_data, Path("unused"), Path("unused"))
    seqs = _train_split(tiny_data)
    after = evaluate(TargetSource(tiny_target, seqs), trained, range(len(seqs)), eval_cfg)
    before = evaluate(TargetSource(tiny_target, seqs), untrained, range(len(seqs)), eval_cfg)
    assert after["tau"] > before["tau"] + 0.15, (before, after)
    assert after["acc"][0] > 0.1 > before["acc"][0]
    assert after["loss"] < before["loss"]


def test_trained_head_drafts_longer(eagle3_run: Path, tiny_data: Path, tiny_target: Target) -> None:
    from confu.engine.generate import Decoder, GenerationConfig
    from confu.engine.sampling import SamplingConfig
    from confu.engine.tree import TreeConfig

    trained = load_draft(eagle3_run, tiny_target)
    untrained = new_draft(tiny_target, "eagle3", trained.d2t, trained.t2d, seed=0)
    cfg = GenerationConfig(max_new_tokens=32, sampling=SamplingConfig(), tree=TreeConfig(20, 5, 4),
                           auto_tree=False, stop_at_eos=False)
    prompts = [ids[:PROMPT_LEN] for ids, _ in _train_split(tiny_data)[:6]]
    taus = {name: sum(Decoder.for_head(tiny_target, head).generate(p, cfg).tau for p in prompts) / len(prompts)
            for name, head in (("trained", trained), ("untrained", untrained))}
    assert taus["trained"] > taus["untrained"] + 0.3, taus


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


class _Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["eagle3", "confu", "confu+deviations"])
def test_resume_is_exact(method: str, tiny_data: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Also for ConFu with the three deviations from the paper (`--future-bias/-residual/-loss`)."""
    deviations = dict(future_bias=2.0, future_residual=True, future_loss=0.5) if "+" in method else {}
    method = method.split("+")[0]
    kw = dict(steps=10, method=method, ttt_steps=3, anchors=4, replicate=2, eval_every=0, **deviations)
    full = train(_cfg(tiny_data, tiny_llama_dir, tmp_path / "full", **kw))

    def crash_at_7(step: int, _: dict) -> None:
        if step == 7:  # after the step-5 checkpoint: steps 6 and 7 are lost and redone
            raise _Crash

    parts = tmp_path / "parts"
    with pytest.raises(_Crash):
        train(_cfg(tiny_data, tiny_llama_dir, parts, save_every=5, **kw), on_step=crash_at_7)
    assert json.loads((parts / "checkpoint" / "config.json").read_text())["method"] == method
    assert not (parts / "model.safetensors").exists()
    train(_cfg(tiny_data, tiny_llama_dir, parts, save_every=5, resume=True, **kw))
    a, b = _weights(full), _weights(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in _log(parts) if "loss" in r] == list(range(1, 11))  # no step logged twice
    assert all(("future_ce" in r) == bool(deviations) for r in _log(parts) if "loss" in r)
    def losses(out: Path) -> list:
        return [r.get("loss", r.get("eval")) for r in _log(out)]

    assert losses(parts) == losses(full)

    def record(out: Path) -> dict:  # how the head began, as the final draft's config records it
        training = json.loads((out / "config.json").read_text())["extra"]["training"]
        return {k: training.get(k) for k in ("vocab_coverage", "draft_vocab_size", "fc_init_factor", "head_init")}

    assert record(parts) == record(full) and record(full)["vocab_coverage"] is not None


def test_resume_refuses_other_settings(tiny_data: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from confu.errors import InputError

    train(_cfg(tiny_data, tiny_llama_dir, tmp_path, steps=4, stop_after=2))
    assert (tmp_path / "checkpoint" / "trainer_state.pt").is_file()
    with pytest.raises(InputError, match="batch_tokens"):
        train(_cfg(tiny_data, tiny_llama_dir, tmp_path, steps=4, batch_tokens=512, resume=True))


def test_label_temperature_reaches_the_loss_and_fixes_the_run(tiny_data: Path, tiny_llama_dir: Path,
                                                              tmp_path: Path) -> None:
    """`--label-temperature` changes what the draft learns, and a run resumes only under its own value; a
    checkpoint written before the option existed resumes as the T = 1 it ran with."""
    from confu.errors import InputError

    def first_loss(out: Path) -> float:
        return next(r["loss"] for r in _log(out) if "loss" in r)

    train(_cfg(tiny_data, tiny_llama_dir, tmp_path / "t1", steps=1))
    train(_cfg(tiny_data, tiny_llama_dir, tmp_path / "sharp", steps=4, stop_after=2, label_temperature=0.25))
    assert first_loss(tmp_path / "sharp") != first_loss(tmp_path / "t1")  # same seed and data: only T differs
    with pytest.raises(InputError, match="label_temperature"):
        train(_cfg(tiny_data, tiny_llama_dir, tmp_path / "sharp", steps=4, resume=True))
    train(_cfg(tiny_data, tiny_llama_dir, tmp_path / "sharp", steps=4, resume=True, label_temperature=0.25))
    assert [r["step"] for r in _log(tmp_path / "sharp") if "loss" in r] == [1, 2, 3, 4]

    old = tmp_path / "old"
    train(_cfg(tiny_data, tiny_llama_dir, old, steps=4, stop_after=2))
    state_path = old / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=False)
    del state["run"]["label_temperature"]  # as written before the option existed
    torch.save(state, state_path)
    train(_cfg(tiny_data, tiny_llama_dir, old, steps=4, resume=True))
    assert (old / "model.safetensors").is_file()
    with pytest.raises(InputError):
        TrainConfig(data="d", out="o", label_temperature=0)


class _RunsCodeWhenUnpickled:
    """What a tampered trainer state could hold: an object whose unpickling calls a function of its choice."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


def test_resume_reads_the_trainer_state_as_plain_data(tiny_data: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The trainer state loads with weights_only: a state holding an object that runs code when unpickled is
    refused by name, and the code never runs."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    train(_cfg(tiny_data, tiny_llama_dir, out, steps=4, stop_after=2))
    state_path = out / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["provenance"] = _RunsCodeWhenUnpickled(marker)
    torch.save(state, state_path)
    with pytest.raises(CheckpointError, match="trainer_state.pt holds more than tensors and plain data"):
        train(_cfg(tiny_data, tiny_llama_dir, out, steps=4, resume=True))
    assert not marker.exists()


def test_anchor_assignment() -> None:
    with_loss = [False, False] + [True] * 10 + [False, True, True]
    # l = 0: only the anchor rows
    assert assign_anchor_rows(with_loss, [3, 7], 0) == [-1, -1, -1, 3, -1, -1, -1, 7] + [-1] * 7
    # windows a..a+l, the nearest earlier anchor wins where they overlap
    assert assign_anchor_rows(with_loss, [3, 5], 3) == [-1, -1, -1, 3, 3, 5, 5, 5, 5] + [-1] * 6
    # rows without loss inside a window get nothing; the window does not stretch past them
    assert assign_anchor_rows(with_loss, [10], 4) == [-1] * 10 + [10, 10, -1, 10, 10]
    # windows stop at the end of the sequence
    assert assign_anchor_rows(with_loss, [14], 4)[-1] == 14
    # anchors are distinct rows with loss, sorted, at most k
    rng = random.Random(0)
    anchors = sample_anchors(with_loss, 5, rng)
    assert anchors == sorted(set(anchors)) and len(anchors) == 5 and all(with_loss[a] for a in anchors)
    assert sample_anchors(with_loss, 100, rng) == [i for i, ok in enumerate(with_loss) if ok]
    # a row with loss predicts a response token at step 0
    assert loss_rows(6, [0, 0, 0, 1, 1, 1]) == [False, True, True, True, False, False]


def _pair_mask() -> torch.Tensor:
    return torch.ones(2, 2, dtype=torch.bool).tril()


def test_contemplate_pass_matches_inference(tiny_target: Target) -> None:
    """f from the training pass (batched, cache spliced with the soft prompt) equals the decoder's f."""
    from confu.engine.target import TargetCache

    head = new_draft(tiny_target, "confu", draft_vocab_size=256, seed=1)
    gen = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(3, 500, (n,), generator=gen).tolist(), [1] * n) for n in (20, 14)]
    ids, lengths, mask = collate(seqs)
    tb = run_target(tiny_target.model, tiny_target.feature_layers, head, ids, lengths, mask, keep_kv=True)
    anchors = torch.tensor([[0, 7, 12], [3, 9, 11]])
    with torch.no_grad():
        f = contemplate_futures(tiny_target.model, head, tb, anchors)
    for b in range(2):
        for j, a in enumerate(anchors[b].tolist()):
            cache = TargetCache(tiny_target.model, head.soft_prompt_kv())
            prefix = torch.tensor(seqs[b][0][: a + 1])
            route = torch.zeros(3 * tiny_target.hidden_size)
            with torch.no_grad():
                if a > 0:
                    causal = torch.ones(a, a, dtype=torch.bool).tril()
                    out = tiny_target.forward(cache, torch.arange(a), causal, input_ids=prefix[:-1])
                    cache.commit(None)
                    route = out.features[-1]
                embeds = torch.cat([tiny_target.embed(prefix[-1:]), head.contemplate_embedding(route)[None]])
                out = tiny_target.forward(cache, torch.tensor([a, a + 1]), _pair_mask(),
                                          inputs_embeds=embeds, contemplate_rows=1)
            torch.testing.assert_close(f[b, j], out.last_hidden[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", ["paper", "future_bias", "future_residual"])
def test_draft_rows_match_drafter(tiny_target: Target, option: str) -> None:
    """Step 0 of the train-time test with a future key equals the inference drafter's catch-up output, also
    with either deviation (a learned future-key logit offset; f in the residual), whose weights then get a
    gradient."""
    from confu.engine.drafter import Drafter
    from confu.engine.tree import TreeConfig
    from confu.training.ttt import step_validity, ttt_forward

    head = new_draft(tiny_target, "confu", draft_vocab_size=512, seed=2,
                     future_bias=1.0 if option == "future_bias" else None,
                     future_residual=option == "future_residual")
    with torch.no_grad():
        if option == "future_bias":  # one offset per head, unequal, so a head mix-up would show
            head.future_bias.copy_(torch.linspace(-2.0, 5.0, len(head.future_bias)))
        if option == "future_residual":  # it starts at zero (the paper's head), which would test nothing
            assert not head.future_proj.weight.any()
            torch.nn.init.normal_(head.future_proj.weight, std=0.1)
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 500, (1, 24), generator=gen)
    tb = run_target(tiny_target.model, tiny_target.feature_layers, head, ids, torch.tensor([24]),
                    torch.ones(1, 24, dtype=torch.bool), keep_kv=True)
    valid = step_validity(tb, 2)
    rows = torch.tensor([[5, 11, 17]])
    f = torch.randn(1, 3, tiny_target.hidden_size)
    captured = []
    orig = head.logits
    head.logits = lambda out: (captured.append(out), orig(out))[1]  # type: ignore[method-assign]
    with torch.no_grad():
        ttt_forward(head, tb, valid, rows, torch.ones(1, 3, dtype=torch.bool), 1, future=f)
    del head.logits
    for j, r in enumerate(rows[0].tolist()):
        drafter = Drafter(head, TreeConfig(), 64)
        root = drafter.catch_up(tb.features[0, : r + 1], ids[0, 1 : r + 2], f[0, j])
        torch.testing.assert_close(captured[0][0, j], root[0, 0], atol=1e-5, rtol=1e-5)
    if option != "paper":
        res = ttt_forward(head, tb, valid, rows, torch.ones(1, 3, dtype=torch.bool), 1, future=f)
        res.ce_sum.sum().backward()
        weight = head.future_bias if option == "future_bias" else head.future_proj.weight
        assert weight.grad is not None and (weight.grad != 0).all()


def test_future_logits_match_the_drafter_and_train_their_gates(tiny_target: Target, tmp_path: Path) -> None:
    """`--future-logits`: the train-time test's step-k logits are the drafter's at tree depth k (the same gate
    and the same read of f, so training and drafting agree); the gates get a gradient; a continued ConFu head
    gains them at zero, its every other weight kept, so it starts as the head it came from."""
    from confu.engine.checkpoint import save_draft
    from confu.engine.drafter import Drafter
    from confu.engine.tree import TreeConfig
    from confu.training.heads import with_deviations
    from confu.training.ttt import step_validity, ttt_forward

    plain = new_draft(tiny_target, "confu", draft_vocab_size=512, seed=2)
    save_draft(plain, tmp_path / "plain")
    head, added = with_deviations(load_draft(tmp_path / "plain", tiny_target), tiny_target,
                                  TrainConfig(data=["x"], out="", method="confu", future_logits=True))
    assert added == ["future_logits"] and not head.future_gate.any()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in head.state_dict().items() if k != "future_gate")
    with torch.no_grad():
        head.future_gate.copy_(torch.linspace(0.5, 2.0, len(head.future_gate)))
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(6))
    tb = run_target(tiny_target.model, tiny_target.feature_layers, head, ids, torch.tensor([24]),
                    torch.ones(1, 24, dtype=torch.bool), keep_kv=True)
    rows, f = torch.tensor([[5, 11, 17]]), torch.randn(1, 3, tiny_target.hidden_size)
    views = []
    with torch.no_grad():
        ttt_forward(head, tb, step_validity(tb, 2), rows, torch.ones(1, 3, dtype=torch.bool), 2, future=f,
                    observe=views.append)
    for j, r in enumerate(rows[0].tolist()):
        drafter = Drafter(head, TreeConfig(total_nodes=4, depth=2, topk=1), 64)
        root = drafter.catch_up(tb.features[0, : r + 1], ids[0, 1 : r + 2], f[0, j])
        tokens, logps = drafter._top_children(root[0], 0)
        top = torch.log_softmax(views[0].logits[0, j], -1).topk(1)
        assert int(tokens[0, 0]) == int(head.to_target_ids(top.indices)[0])
        torch.testing.assert_close(logps[0], top.values, atol=1e-4, rtol=1e-4)
        unbiased = torch.log_softmax(head.logits(root[0]).float(), -1).max()
        assert not torch.allclose(unbiased, top.values[0], atol=1e-3)  # the gate changed what is drafted
    res = ttt_forward(head, tb, step_validity(tb, 2), rows, torch.ones(1, 3, dtype=torch.bool), 2, future=f)
    res.ce_sum.sum().backward()
    assert head.future_gate.grad[:2].abs().min() > 0 and not head.future_gate.grad[2:].any()


def test_future_loss_reads_f_with_the_targets_output_layer(tiny_target: Target) -> None:
    """`--future-loss`: the oracle f (the target's final hidden state at a+1) scores exactly the entropy of the
    target's distribution of x_{a+2}, the least any f can; a contemplate f scores more, and its loss reaches
    the soft prompt. An anchor without a row a+1 is left out."""
    from confu.training.features import DraftLabels
    from confu.training.ttt import future_prediction_ce, oracle_futures

    head = new_draft(tiny_target, "confu", draft_vocab_size=512, seed=3)
    ids = torch.randint(3, 500, (1, 24), generator=torch.Generator().manual_seed(8))
    tb = run_target(tiny_target.model, tiny_target.feature_layers, head, ids, torch.tensor([24]),
                    torch.ones(1, 24, dtype=torch.bool), keep_kv=True)
    labels = DraftLabels(tiny_target, torch.arange(512) + head.d2t)
    anchors = torch.tensor([[3, 9, 20, 23]])
    ok = torch.ones(1, 4, dtype=torch.bool)
    best, count, correct = future_prediction_ce(oracle_futures(tb, anchors, 1), tb, anchors, ok, labels)
    p = torch.softmax(tb.logits[0, anchors[0, :3] + 1].float(), -1)
    assert count.tolist() == [3] and correct.tolist() == [3]  # the oracle names x_{a+2} wherever it exists
    torch.testing.assert_close(best, -(p * p.log()).sum(), rtol=1e-4, atol=1e-4)
    ce, _, _ = future_prediction_ce(contemplate_futures(tiny_target.model, head, tb, anchors), tb, anchors, ok,
                                    labels)
    assert ce > best
    ce.backward()
    # several k: the oracle two ahead names x_{a+3} and is scored on the rows a+2 that exist (20 + 2 < 24 only
    # for anchors 3, 9, 20); for k = 2 it is one row late, and names x_{a+2} only where the target repeats
    _, count, correct = future_prediction_ce(oracle_futures(tb, anchors, 2), tb, anchors, ok, labels, ahead=(2, 3))
    assert count.tolist() == [3, 3] and correct[1] == 3
    repeats = int((tb.logits[0, anchors[0, :3] + 1].argmax(-1) == tb.logits[0, anchors[0, :3] + 2].argmax(-1)).sum())
    assert correct[0] == repeats
    assert head.soft_prompt.grad is not None and head.soft_prompt.grad.abs().sum() > 0


def test_confu_gradients_and_learning(eagle3_run: Path, tiny_data: Path, tiny_llama_dir: Path,
                                      tiny_target: Target, tmp_path: Path) -> None:
    cfg = _cfg(tiny_data, tiny_llama_dir, tmp_path, method="confu", init=str(eagle3_run), steps=40, anchors=6,
               replicate=3, lr=3e-3, aux_lr_mult=10.0)
    # One batch by hand: every new ConFu part receives a gradient through the frozen target.
    from confu.training.heads import build_head

    head, note = build_head(cfg, tiny_target, [])
    assert note["init_method"] == "eagle3"
    eagle = load_draft(eagle3_run, tiny_target)
    assert torch.equal(head.lm_head.weight, eagle.lm_head.weight) and torch.equal(head.d2t, eagle.d2t)
    seqs = [(json.loads(line)["input_ids"], json.loads(line)["loss_mask"]) for line in tiny_data.open()][:3]
    res = batch_forward(TargetSource(tiny_target, seqs), head, [0, 1, 2], ["a", "b", "c"], cfg, evaluation=False)
    res.ce_sum.sum().backward()
    assert head.soft_prompt.grad is not None and head.soft_prompt.grad.abs().sum() > 0
    for name in ("experts", "router.weight"):
        for moe in (head.con_moe, head.future_moe):
            assert dict(moe.named_parameters())[name].grad.abs().sum() > 0, name
    assert all(p.grad is None for p in tiny_target.model.parameters())
    # A short ConFu run from the EAGLE-3 head lowers its loss (on the sequences it trains on, every loss row
    # an anchor: the deterministic evaluation setting).
    seqs = _train_split(tiny_data, cfg.eval_fraction)
    before = evaluate(TargetSource(tiny_target, seqs), build_head(cfg, tiny_target, [])[0], range(len(seqs)), cfg)
    train(cfg)
    assert len([r for r in _log(tmp_path) if "loss" in r]) == cfg.steps
    trained = load_draft(tmp_path, tiny_target)
    assert trained.cfg.method == "confu" and trained.cfg.n_expert == 8
    assert not torch.equal(trained.soft_prompt, head.soft_prompt)
    after = evaluate(TargetSource(tiny_target, seqs), trained, range(len(seqs)), cfg)
    # Most of the loss is the random target's own entropy, so the decrease is small but steady.
    assert after["loss"] < before["loss"] and after["tau"] > before["tau"], (before, after)


def test_ddp_matches_single_process(tiny_data: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--target", str(tiny_llama_dir), "--data", str(tiny_data), "--method", "confu",
            "--steps", "3", "--batch-tokens", "256", "--max-len", "64", "--lr", "1e-3", "--warmup-steps", "1",
            "--draft-vocab-size", "256", "--eval-fraction", "0.2", "--eval-every", "3", "--save-every", "0",
            "--ttt-steps", "3", "--anchors", "4", "--replicate", "2", "--n-expert", "4", "--no-progress",
            "--save-fp16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "confu.cli", *args, "--out", str(single)], check=True, env=env,
                   cwd=ROOT, timeout=300)
    ddp = tmp_path / "ddp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "confu.cli", *args, "--out", str(ddp)], check=True, env=env, cwd=ROOT, timeout=300)
    a, b = _weights(single), _weights(ddp)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    assert json.loads((ddp / "config.json").read_text())["extra"]["training"]["world_size"] == 2
    assert all(t.dtype == torch.float16 for t in _weights(ddp / "fp16").values() if t.is_floating_point())
    la, lb = _log(single), _log(ddp)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        ka = ra.get("loss", ra.get("eval", {}).get("loss"))
        kb = rb.get("loss", rb.get("eval", {}).get("loss"))
        assert ka == pytest.approx(kb, abs=1e-4)


def test_cli_options() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "d.jsonl", "--out", "o", "--method", "confu", "--no-moe",
                              "--no-replicate", "--anchors", "8", "--future-bias", "4",
                              "--future-residual", "--future-loss", "0.5", "--layer-init", "-1",
                              "--label-temperature", "0.5"])
    from confu.cli.train import config_from_args

    cfg = config_from_args(args)
    assert (cfg.n_expert, cfg.replicate, cfg.anchors, cfg.ttt_steps, cfg.lr) == (1, 0, 8, 7, 1e-4)
    assert cfg.future_bias == 4.0 and cfg.future_residual and cfg.future_loss == 0.5 and cfg.layer_init == -1
    assert cfg.label_temperature == 0.5
    assert cfg.data == ["d.jsonl"]
    paper = config_from_args(parser.parse_args(["train", "--data", "d", "e", "--out", "o"]))
    assert paper.future_bias is None and not paper.future_residual and paper.future_loss == 0
    assert paper.layer_init is None and paper.data == ["d", "e"] and paper.label_temperature == 1.0
    from confu.errors import InputError

    with pytest.raises(InputError):
        TrainConfig(data="d", out="o", method="medusa")


def test_evaluate_cli_reproduces_the_logged_eval_and_probes_f(eagle3_run: Path, tiny_data: Path,
                                                              tiny_llama_dir: Path, tiny_target: Target,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from confu.cli import main
    from confu.engine.checkpoint import save_draft

    common = ["evaluate", "--target", str(tiny_llama_dir), "--data", str(tiny_data), "--max-len", "64",
              "--ttt-steps", "4", "--eval-fraction", "0.1"]

    def run(*extra: str) -> dict:
        assert main([*common, *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # Same held-out split and metrics as the run's own final evaluation.
    got = run("--draft", str(eagle3_run))
    logged = [r["eval"] for r in _log(eagle3_run) if "eval" in r][-1]
    assert got["loss"] == pytest.approx(logged["loss"], rel=1e-5) and got["tau"] == pytest.approx(logged["tau"])
    # --whole reads every sequence of the file: more rows than the split's
    whole = run("--draft", str(eagle3_run), "--whole")
    assert whole["whole"] and whole["rows"] > got["rows"] and whole["tau"] != got["tau"]
    # The probe replaces f: a ConFu head's predictions change with it.
    torch.manual_seed(0)
    confu_dir = save_draft(new_draft(tiny_target, "confu", draft_vocab_size=256), tmp_path / "confu")
    real, zero = run("--draft", str(confu_dir)), run("--draft", str(confu_dir), "--zero-future")
    assert zero["zero_future"] and abs(zero["loss"] - real["loss"]) > 1e-4, (real, zero)
    assert main([*common, "--draft", str(eagle3_run), "--zero-future"]) == 2
    assert "need a ConFu draft" in capsys.readouterr().err


def test_future_stage_trains_only_the_target_side_and_makes_f_predict(eagle3_run: Path, tiny_data: Path,
                                                                     tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`--stage future`: only the soft prompt and the [con] MoE change, the future loss falls and f's accuracy
    on the tokens ahead (logged per k) rises on the sequences it trains on; it refuses an EAGLE-3 run."""
    cfg = _cfg(tiny_data, tiny_llama_dir, tmp_path / "confu", method="confu", init=str(eagle3_run), steps=1,
               anchors=6, lr=3e-3, aux_lr_mult=10.0)
    train(cfg)  # a ConFu head to continue: its soft prompt one step from the init
    start = load_draft(tmp_path / "confu", tiny_target := Target.load(str(tiny_llama_dir)))
    fut = _cfg(tiny_data, tiny_llama_dir, tmp_path / "future", method="confu", init=str(tmp_path / "confu"),
               steps=30, anchors=6, lr=1e-2, aux_lr_mult=1.0, stage="future", future_loss=1.0, future_ahead=[2, 3],
               eval_fraction=0.0)
    from confu.errors import InputError
    from confu.training.features import DraftLabels

    seqs = _train_split(tiny_data, 0.0)
    source = TargetSource(tiny_target, seqs, labels=DraftLabels(tiny_target, torch.arange(256) + start.d2t))
    before = evaluate(source, start, range(len(seqs)), fut)
    train(fut)
    trained = load_draft(tmp_path / "future", tiny_target)
    after = evaluate(source, trained, range(len(seqs)), fut)
    changed = {k.split(".")[0] for k, v in trained.state_dict().items() if not torch.equal(v, start.state_dict()[k])}
    assert changed == {"soft_prompt", "con_moe"}
    assert after["future_ce"] < before["future_ce"] and set(after["future_acc"]) == {2, 3}
    assert after["future_acc"][2] > before["future_acc"][2], (before, after)
    assert all("future_acc" in r for r in _log(tmp_path / "future") if "loss" in r)
    with pytest.raises(InputError, match="--stage future"):
        _cfg(tiny_data, tiny_llama_dir, tmp_path, stage="future", future_loss=1.0)
