"""`confu convert` and reading EAGLE-3 heads in other layouts: layout detection, exact round trips, imported
heads drafting exactly like the originals, the official layer semantics, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from confu.cli import main
from confu.engine.checkpoint import new_draft, save_draft
from confu.engine.convert import CONFU_TO_EAGLE3, TargetInfo, convert, detect_layout, load_draft, public_name
from confu.engine.generate import Decoder, GenerationConfig
from confu.engine.tree import TreeConfig
from confu.errors import CheckpointError, DraftMismatchError, InputError
from tests.helpers import chat_ids, load_target

DRAFT_VOCAB = 200


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_target(tiny_llama_dir)


@pytest.fixture(scope="module")
def info(tiny_llama_dir) -> TargetInfo:
    return TargetInfo.load(str(tiny_llama_dir))


def random_head(target, method: str = "eagle3", seed: int = 0):
    """A head whose every tensor is random (norm weights too) and whose vocabulary is a permutation subset,
    so any mix-up of names or mapping shows in the logits."""
    head = new_draft(target, method, draft_vocab_size=DRAFT_VOCAB, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        ids = torch.randperm(target.vocab_size, generator=gen)[:DRAFT_VOCAB].sort().values
        t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        head.set_vocab(ids - torch.arange(DRAFT_VOCAB), t2d)
    return head


def draft_logits(head, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One causal pass of the draft layer over rows (features of token t, embedding of token t + 1)."""
    hidden = head.project_features(features)
    n = ids.shape[1]
    q, k, v = head.layer.qkv(head.embed(ids), hidden, torch.arange(n)[None])
    out = head.layer.attend(hidden, q, k, v, torch.ones(n, n, dtype=torch.bool).tril()[None, None])
    return head.logits(out)


def reference_logits(w: dict[str, torch.Tensor], c: dict, embed: torch.Tensor, features: torch.Tensor,
                     ids: torch.Tensor) -> torch.Tensor:
    """The official EAGLE-3 layer (SafeAILab/EAGLE eagle/model/cnets.py, LlamaDecoderLayeremb + Model) written
    from its source over the official tensor names: residual = hidden before hidden_norm, q / k / v read
    cat[input_layernorm(emb), hidden_norm(hidden)], post_attention_layernorm before the MLP, norm before lm_head."""

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    hidden = features @ w["fc.weight"].T
    residual = hidden
    x = torch.cat([rms(embed[ids], w["midlayer.input_layernorm.weight"]),
                   rms(hidden, w["midlayer.hidden_norm.weight"])], dim=-1)
    b, n, _ = x.shape
    nh, nkv, d = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(b, n, nh, d).transpose(1, 2)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(b, n, nkv, d).transpose(1, 2)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(b, n, nkv, d).transpose(1, 2)
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(n).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    q = q * emb.cos() + rotate_half(q) * emb.sin()
    k = k * emb.cos() + rotate_half(k) * emb.sin()
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    scores = (q @ k.transpose(2, 3)) / math.sqrt(d) + torch.full((n, n), -torch.inf).triu(1)
    attn = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, n, nh * d)
    h = residual + attn @ w["midlayer.self_attn.o_proj.weight"].T
    y = rms(h, w["midlayer.post_attention_layernorm.weight"])
    mlp = F.silu(y @ w["midlayer.mlp.gate_proj.weight"].T) * (y @ w["midlayer.mlp.up_proj.weight"].T)
    h = h + mlp @ w["midlayer.mlp.down_proj.weight"].T
    return rms(h, w["norm.weight"]) @ w["lm_head.weight"].T


def official_dir(head, path: Path, pickle: bool = False) -> Path:
    """The head as the official EAGLE repo ships one, written here by hand: LlamaConfig + draft_vocab_size
    (no architectures, no norm_before_residual), midlayer.* names, a copy of the embedding,
    pytorch_model.bin or model.safetensors."""
    cfg = head.cfg
    tensors = {CONFU_TO_EAGLE3[k]: v.clone() for k, v in head.trainable_state_dict().items()}
    tensors["embed_tokens.weight"] = head.embed.weight.detach().clone()
    path.mkdir(parents=True)
    if pickle:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, str(path / "model.safetensors"))
    config = {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "intermediate_size": cfg.intermediate_size,
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "max_position_embeddings": 2048,
              "num_hidden_layers": 1, "vocab_size": cfg.vocab_size, "draft_vocab_size": cfg.draft_vocab_size,
              "hidden_act": "silu", "model_type": "llama", "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def inputs(target, n: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(1, n, 3 * target.hidden_size, generator=gen)
    return features, torch.randint(0, target.vocab_size, (1, n), generator=gen)


# -- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_is_exact(target, info, tmp_path, layout, dtype):
    src = save_draft(random_head(target), tmp_path / "confu", dtype=dtype)
    convert(src, info, layout, tmp_path / layout)
    assert detect_layout(tmp_path / layout) == layout
    back = convert(tmp_path / layout, info, "confu", tmp_path / "back")
    assert back.source_layout == layout
    assert json.loads((tmp_path / "back/config.json").read_text()) == json.loads((src / "config.json").read_text())
    original, returned = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "back/model.safetensors"))
    assert original.keys() == returned.keys()
    for key, value in original.items():
        assert returned[key].dtype == value.dtype and torch.equal(returned[key], value), key


def test_exported_configs_and_names(target, info, tmp_path):
    src = save_draft(random_head(target), tmp_path / "confu")
    convert(src, info, "eagle3", tmp_path / "eagle3")
    convert(src, info, "speculators", tmp_path / "spec", )
    cfg = json.loads((tmp_path / "eagle3/config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] == target.vocab_size and cfg["draft_vocab_size"] == DRAFT_VOCAB
    assert cfg["norm_before_residual"] is False and "target_hidden_size" not in cfg
    assert "eagle_config" not in cfg  # default feature layers: every engine derives them itself
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                "rope_theta", "max_position_embeddings"):
        assert key in cfg
    names = set(load_file(str(tmp_path / "eagle3/model.safetensors")))
    assert names == set(CONFU_TO_EAGLE3.values()) and not any("embed" in k for k in names)

    spec = json.loads((tmp_path / "spec/config.json").read_text())
    assert spec["speculators_model_type"] == "eagle3" and spec["architectures"] == ["Eagle3Speculator"]
    assert spec["norm_before_residual"] is False and spec["draft_vocab_size"] == DRAFT_VOCAB
    assert spec["transformer_layer_config"]["vocab_size"] == target.vocab_size
    sc = spec["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0]["speculative_tokens"] == 3
    # a name another machine can use: the model directory's, not its local path
    assert sc["verifier"]["name_or_path"] == Path(target.name).resolve().name
    spec_names = set(load_file(str(tmp_path / "spec/model.safetensors")))
    assert spec_names == {k.replace("midlayer.", "layers.0.") for k in CONFU_TO_EAGLE3.values()}


def test_non_default_feature_layers_use_each_engines_convention(target, info, tmp_path):
    head = random_head(target)
    head.cfg.feature_layers = [1, 4, 6]
    src = save_draft(head, tmp_path / "confu")
    convert(src, info, "eagle3", tmp_path / "eagle3")
    convert(src, info, "speculators", tmp_path / "spec")
    # SpecForge / SGLang count outputs of a layer, vLLM inputs.
    assert json.loads((tmp_path / "eagle3/config.json").read_text())["eagle_config"][
        "eagle_aux_hidden_state_layer_ids"] == [0, 3, 5]
    assert json.loads((tmp_path / "spec/config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [1, 4, 6]
    for layout in ("eagle3", "spec"):
        convert(tmp_path / layout, info, "confu", tmp_path / f"{layout}-back")
        assert json.loads((tmp_path / f"{layout}-back/config.json").read_text())["feature_layers"] == [1, 4, 6]


# -- imported heads draft like the original -------------------------------------------------------------------


@pytest.mark.parametrize("pickle", [False, True])
def test_official_head_imports_with_identical_logits(target, tmp_path, pickle):
    head = random_head(target)
    src = official_dir(head, tmp_path / "official", pickle=pickle)
    assert detect_layout(src) == "eagle3"
    imported = load_draft(src, target)
    features, ids = inputs(target)
    with torch.no_grad():
        assert torch.equal(draft_logits(imported, features, ids), draft_logits(head, features, ids))
        assert torch.equal(imported.d2t, head.d2t) and torch.equal(imported.t2d, head.t2d)


def test_confu_layer_matches_the_official_layer(target, tmp_path):
    head = random_head(target)
    src = official_dir(head, tmp_path / "official")
    weights = load_file(str(src / "model.safetensors"))
    config = {**json.loads((src / "config.json").read_text()), "head_dim": head.cfg.head_dim}
    features, ids = inputs(target)
    with torch.no_grad():
        ours = draft_logits(load_draft(src, target), features, ids)
        ref = reference_logits(weights, config, weights["embed_tokens.weight"], features, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["eagle3", "speculators"])
def test_exported_dir_decodes_like_the_original(target, info, tmp_path, layout):
    head = random_head(target)
    src = save_draft(head, tmp_path / "confu")
    convert(src, info, layout, tmp_path / layout)
    cfg = GenerationConfig(max_new_tokens=12, tree=TreeConfig(total_nodes=8, depth=3, topk=3), auto_tree=False)
    prompt = chat_ids(target, "Why is the sky blue?")
    ref = Decoder.for_head(target, load_draft(src, target)).generate(prompt, cfg)
    got = Decoder.for_head(target, load_draft(tmp_path / layout, target)).generate(prompt, cfg)
    assert got.tokens == ref.tokens and got.accept_lengths == ref.accept_lengths


def test_train_init_accepts_an_official_head(target, tiny_llama_dir, tmp_path):
    from confu.training.heads import build_head
    from confu.training.train import TrainConfig

    head = random_head(target)
    src = official_dir(head, tmp_path / "official")
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "out"), target=str(tiny_llama_dir), method="confu",
                      init=str(src))
    confu_head, note = build_head(cfg, target, [])
    assert confu_head.cfg.method == "confu" and note["init_method"] == "eagle3"
    for key, value in head.trainable_state_dict().items():
        assert torch.equal(confu_head.state_dict()[key], value), key


# -- ConFu drafts ---------------------------------------------------------------------------------------------


def test_confu_draft_exports_its_eagle3_part_with_a_note(target, tmp_path, tiny_llama_dir, capsys):
    src = save_draft(random_head(target, "confu"), tmp_path / "confu")
    assert main(["convert", str(src), "--target", str(tiny_llama_dir), "--to", "eagle3",
                 "--out", str(tmp_path / "eagle3")]) == 0
    out = capsys.readouterr().out
    assert "contemplate path needs confu's engine" in out
    names = set(load_file(str(tmp_path / "eagle3/model.safetensors")))
    assert not any(k.startswith(("soft_prompt", "con_moe", "future_moe")) for k in names)
    assert main(["convert", str(src), "--target", str(tiny_llama_dir), "--to", "confu",
                 "--out", str(tmp_path / "copy")]) == 0
    assert json.loads((tmp_path / "copy/config.json").read_text())["method"] == "confu"


# -- detection and bad inputs ---------------------------------------------------------------------------------


def test_layout_detection(target, tmp_path):
    head = random_head(target)
    src = official_dir(head, tmp_path / "official")  # no architectures: draft_vocab_size + midlayer.* keys
    assert detect_layout(src) == "eagle3"
    assert detect_layout(save_draft(head, tmp_path / "confu")) == "confu"
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)}, str(tmp_path / "other/model.safetensors"))
    with pytest.raises(CheckpointError, match="not a confu, official"):
        detect_layout(tmp_path / "other")
    with pytest.raises(CheckpointError, match="not found"):
        detect_layout(tmp_path / "missing")


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def cli_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": 32}, "hidden size draft 32, target 64"),
    ({"vocab_size": 1000}, "vocabulary size draft 1000"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"norm_before_residual": True}, "norm_before_residual: true"),
    ({"target_hidden_size": 128}, "target_hidden_size 128"),
    ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 4, 20]}}, "feature layers"),
])
def test_mismatched_or_unsupported_heads_are_one_line_errors(target, tmp_path, tiny_llama_dir, capsys, change,
                                                             message):
    src = official_dir(random_head(target), tmp_path / "official")
    edit_config(src, **change)
    err = cli_error(capsys, ["convert", str(src), "--target", str(tiny_llama_dir), "--to", "confu",
                             "--out", str(tmp_path / "out")])
    assert message in err


def test_speculators_without_norm_before_residual_is_refused(target, info, tmp_path):
    src = save_draft(random_head(target), tmp_path / "confu")
    convert(src, info, "speculators", tmp_path / "spec")
    cfg = json.loads((tmp_path / "spec/config.json").read_text())
    del cfg["norm_before_residual"]  # vLLM reads a missing flag as true
    (tmp_path / "spec/config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config lacks norm_before_residual, which vLLM then takes as true"):
        convert(tmp_path / "spec", info, "confu", tmp_path / "back")


def test_a_file_as_source_is_called_a_file(target, tmp_path, tiny_llama_dir, capsys):
    src = save_draft(random_head(target), tmp_path / "confu")
    err = cli_error(capsys, ["convert", str(src / "model.safetensors"), "--target", str(tiny_llama_dir), "--to",
                             "eagle3", "--out", str(tmp_path / "out")])
    assert "model.safetensors is a file; a draft is a directory holding config.json" in err


def test_a_non_empty_out_is_refused_unless_forced(target, info, tmp_path, tiny_llama_dir, capsys):
    src = save_draft(random_head(target), tmp_path / "confu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["convert", str(src), "--target", str(tiny_llama_dir), "--to", "eagle3", "--out", str(out)]
    err = cli_error(capsys, args)
    assert "is not empty" in err and "--force" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "nothing written"
    assert main(args + ["--force"]) == 0 and detect_layout(out) == "eagle3"
    with pytest.raises(InputError, match="is a file"):
        convert(src, info, "eagle3", out / "notes.txt")


def test_a_target_too_shallow_for_the_default_feature_layers_is_refused(target, tmp_path):
    """A target of the draft's hidden and vocabulary sizes but 4 layers: EAGLE-3's default layers for it would be
    (2, 2, 1), which no draft was trained on."""
    shallow = tmp_path / "shallow"
    shallow.mkdir()
    config = json.loads((Path(target.name) / "config.json").read_text())
    (shallow / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    src = official_dir(random_head(target), tmp_path / "official")
    with pytest.raises(DraftMismatchError, match=r"feature layers \[2, 2, 1\] \(from EAGLE-3's default"):
        convert(src, TargetInfo.load(str(shallow)), "confu", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_speculators_draft_for_another_architecture_is_refused(target, info, tmp_path):
    convert(save_draft(random_head(target), tmp_path / "confu"), info, "speculators", tmp_path / "spec")
    cfg = json.loads((tmp_path / "spec/config.json").read_text())
    cfg["speculators_config"]["verifier"] = {"name_or_path": "Qwen/Qwen3-8B", "architectures": ["Qwen3ForCausalLM"]}
    (tmp_path / "spec/config.json").write_text(json.dumps(cfg))
    with pytest.raises(DraftMismatchError, match="drafts for a Qwen3ForCausalLM verifier"):
        convert(tmp_path / "spec", info, "confu", tmp_path / "back")


def test_public_name_is_never_a_local_path(tmp_path):
    assert public_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name(str(tmp_path / "models" / "Llama-3.1-8B-Instruct")) == "Llama-3.1-8B-Instruct"
    assert public_name(str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")) == "SmolLM2-135M-Instruct.Q4_1"


def test_broken_weights_are_one_line_errors(target, tmp_path, tiny_llama_dir, capsys):
    src = official_dir(random_head(target), tmp_path / "official")
    weights = load_file(str(src / "model.safetensors"))
    args = ["convert", str(src), "--target", str(tiny_llama_dir), "--to", "confu", "--out", str(tmp_path / "o")]
    save_file({k: v for k, v in weights.items() if k != "fc.weight"}, str(src / "model.safetensors"))
    assert "missing ['fc.weight']" in cli_error(capsys, args)
    save_file({**weights, "midlayer.self_attn.q_proj.bias": torch.zeros(4)}, str(src / "model.safetensors"))
    assert "no place for" in cli_error(capsys, args)
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "corrupt or unreadable" in cli_error(capsys, args)
    (src / "model.safetensors").unlink()
    assert "neither model.safetensors nor pytorch_model.bin" in cli_error(capsys, args)


def test_confu_draft_for_another_target_is_refused(target, tmp_path, tiny_llama_dir, capsys):
    src = save_draft(random_head(target), tmp_path / "confu")
    edit_config(src, target={**json.loads((src / "config.json").read_text())["target"], "num_hidden_layers": 30})
    err = cli_error(capsys, ["convert", str(src), "--target", str(tiny_llama_dir), "--to", "eagle3",
                             "--out", str(tmp_path / "out")])
    assert "number of layers: draft 30, target 8" in err


def test_out_must_differ_from_src(target, info, tmp_path):
    src = save_draft(random_head(target), tmp_path / "confu")
    with pytest.raises(Exception, match="--out must differ"):
        convert(src, info, "eagle3", src)


def test_draft_mismatch_is_a_draft_mismatch_error(target, info, tmp_path):
    src = official_dir(random_head(target), tmp_path / "official")
    edit_config(src, vocab_size=1000)
    with pytest.raises(DraftMismatchError):
        convert(src, info, "confu", tmp_path / "out")


def test_shipped_eagle3_draft_exports_and_decodes_identically(embedded_dir, tmp_path):
    """The shipped draft, exported to both layouts, decodes token- and round-identically, and converts back to
    bit-identical tensors."""
    shipped = Path(__file__).parent.parent / "drafts" / "smollm2-135m-eagle3"
    target = load_target(embedded_dir)
    info = TargetInfo.of(target)
    cfg = GenerationConfig(max_new_tokens=16, tree=TreeConfig(16, 6, 8), auto_tree=False)
    prompt = chat_ids(target, "Write a haiku about rain on a tin roof.")
    ref = Decoder.for_head(target, load_draft(shipped, target)).generate(prompt, cfg)
    for layout in ("eagle3", "speculators"):
        convert(shipped, info, layout, tmp_path / layout)
        convert(tmp_path / layout, info, "confu", tmp_path / f"{layout}-back")
        original = load_file(str(shipped / "model.safetensors"))
        returned = load_file(str(tmp_path / f"{layout}-back/model.safetensors"))
        assert all(torch.equal(returned[k], v) for k, v in original.items()) and original.keys() == returned.keys()
        got = Decoder.for_head(target, load_draft(tmp_path / layout, target)).generate(prompt, cfg)  # read in place
        assert got.tokens == ref.tokens and got.accept_lengths == ref.accept_lengths, layout
