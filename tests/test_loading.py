"""Checkpoint loading: upstream layout round trip, base + warm start, overlays, clear errors, SmolLM2."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from orthrus_runtime.model.config import CheckpointError
from orthrus_runtime.model.loader import load_model, save_diffusion_view
from orthrus_runtime.spec.reference import ar_logits
from orthrus_runtime.model.testing import tiny_checkpoint, tiny_model

IDS = [5, 9, 17, 33, 2, 250, 7]


def _draft_logits(model, ids):
    from orthrus_runtime.model.dual_view import DenseAR, DenseDraft

    ar = DenseAR(None, model.scale)
    t = torch.tensor([ids])
    model.forward_hidden(t, torch.arange(len(ids))[None], ar, False)
    block = torch.tensor([[ids[-1], 300, 300, 300]])
    h = model.forward_hidden(block, torch.arange(len(ids), len(ids) + 4)[None], DenseDraft(ar.new, model.scale), True)
    return model.logits(h[0])


@pytest.mark.parametrize("arch,tie,shard", [("qwen3", True, None), ("qwen3", False, 60_000), ("llama", False, 40_000)])
def test_upstream_checkpoint_round_trip(tmp_path, arch, tie, shard):
    folder = tiny_checkpoint(tmp_path / "ck", arch=arch, seed=7, tie=tie, max_shard_bytes=shard)
    if shard:
        idx = json.loads((folder / "model.safetensors.index.json").read_text())
        assert len(set(idx["weight_map"].values())) > 1
        assert any("q_proj_diff" in k for k in idx["weight_map"])
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == 300
    if arch == "qwen3":
        assert cfg["model_type"] == "orthrus"
    lm = load_model(str(folder), dtype="float32", device="cpu")
    ref = tiny_model(arch, seed=7, tie=tie, eos_token_ids=[lm.tokenizer.eos_token_id])
    assert lm.block_size == 4 and lm.mask_token_id == 300 and lm.diffusion_source == "checkpoint"
    assert torch.equal(ar_logits(lm.model, IDS), ar_logits(ref, IDS))
    assert torch.equal(_draft_logits(lm.model, IDS), _draft_logits(ref, IDS))
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr() if tie else True


def test_base_checkpoint_warm_start_and_overlay(tmp_path):
    folder = tiny_checkpoint(tmp_path / "base", arch="llama", seed=8, tie=False)
    # Strip the diffusion view: a plain Llama base folder.
    sd = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "_diff" not in k}, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("block_size", "mask_token_id"):
        cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))
    lm = load_model(str(folder), dtype="float32", device="cpu")
    assert lm.diffusion_source == "ar-copy" and lm.block_size == 16
    # The tokenizer has 300 ids, the table 320: the mask takes the first spare row.
    assert lm.mask_token_id == 300 and lm.model.model.mask_embedding is None
    attn = lm.model.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.weight, attn.q_proj_diff.weight)
    # Overlay a separately trained view.
    trained = tiny_model("llama", seed=9, tie=False)
    path = tmp_path / "view.safetensors"
    save_diffusion_view(trained, path, block_size=8, mask_token_id=300)
    lm2 = load_model(str(folder), dtype="float32", device="cpu", diffusion_weights=str(path))
    assert lm2.block_size == 8 and lm2.diffusion_source == str(path)
    assert torch.equal(lm2.model.model.layers[1].self_attn.v_proj_diff.weight,
                       trained.model.layers[1].self_attn.v_proj_diff.weight)
    assert torch.equal(ar_logits(lm2.model, IDS), ar_logits(lm.model, IDS))
    # Explicit arguments win; bfloat16 works.
    lm3 = load_model(str(folder), dtype="bfloat16", device="cpu", block_size=4, mask_token_id=7)
    assert lm3.block_size == 4 and lm3.mask_token_id == 7 and lm3.model.lm_head.weight.dtype == torch.bfloat16


def _expect(tmp_path, mutate, match, **kw):
    folder = tiny_checkpoint(tmp_path / "bad", seed=1)
    mutate(folder)
    with pytest.raises(CheckpointError, match=match):
        load_model(str(folder), dtype="float32", device="cpu", **kw)
    shutil.rmtree(folder)


def _edit_config(**changes):
    def f(folder):
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
    return f


def _edit_weights(fn):
    def f(folder):
        sd = load_file(str(folder / "model.safetensors"))
        save_file(fn(sd), str(folder / "model.safetensors"))
    return f


def test_bad_checkpoints_raise_clear_errors(tmp_path):
    _expect(tmp_path, lambda f: (f / "config.json").unlink(), r"config\.json: file not found")
    _expect(tmp_path, lambda f: (f / "model.safetensors").unlink(), r"no model\.safetensors")
    _expect(tmp_path, _edit_config(model_type="gpt2"), r"config\.json: field 'model_type' is 'gpt2'")
    _expect(tmp_path, _edit_config(hidden_size=None), r"config\.json: missing field 'hidden_size'")
    _expect(tmp_path, _edit_weights(lambda sd: {k: v for k, v in sd.items() if "_diff" not in k}),
            r"model_type is orthrus but no '\*_diff' weights")
    _expect(tmp_path, _edit_weights(lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.k_proj_diff" not in k}),
            r"missing diffusion-view weight 'model\.layers\.1\.self_attn\.k_proj_diff\.weight'")
    _expect(tmp_path, _edit_weights(lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}),
            r"weight 'model\.layers\.0\.mlp\.up_proj\.weight' has shape \(3, 3\)")
    _expect(tmp_path, _edit_config(mask_token_id=5000), r"config\.json: field 'mask_token_id' 5000 is outside")
    _expect(tmp_path, _edit_config(block_size=1), r"config\.json: field 'block_size' must be >= 2")
    _expect(tmp_path, _edit_config(block_size=None), r"config\.json: missing field 'block_size'")

    def drop_shard(folder):
        tiny = tiny_model("qwen3", seed=1)
        from orthrus_runtime.model.loader import save_checkpoint
        (folder / "model.safetensors").unlink()
        save_checkpoint(tiny, folder, 4, 300, max_shard_bytes=50_000)
        next(folder.glob("model-00002-*.safetensors")).unlink()
    _expect(tmp_path, drop_shard, r"shard file 'model-00002-of-\d+\.safetensors' is missing")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "nowhere"), dtype="float32", device="cpu")
    with pytest.raises(CheckpointError, match="diffusion-view file not found"):
        load_model(str(tiny_checkpoint(tmp_path / "ok")), dtype="float32", device="cpu",
                   diffusion_weights=str(tmp_path / "missing.safetensors"))


@pytest.mark.slow
def test_smollm2_gguf_greedy_same_text_in_both_modes(startup_cache_dir):
    from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    lm = load_model(None, dtype="float32", device="cpu", diffusion_weights=None, cache_dir=startup_cache_dir)
    assert lm.model.cfg.arch == "llama" and lm.model.cfg.vocab_size == 49152
    # Every id of SmolLM2's vocabulary is taken: the mask is one extra row of the diffusion view.
    assert lm.mask_token_id == 49152 and lm.model.model.mask_embedding is not None
    eng = LLMEngine(lm.model, EngineConfig(block_size=lm.block_size, mask_token_id=lm.mask_token_id,
                                           max_model_len=512, num_kv_blocks=200), lm.tokenizer)
    msgs = [{"role": "user", "content": "Name three primary colors."}]
    out = {}
    for mode in ("ar", "orthrus"):
        (d,) = eng.generate([GenerateRequest(messages=msgs, mode=mode, params=SamplingParams(max_tokens=24, temperature=0))])
        out[mode] = d
    assert out["ar"].token_ids == out["orthrus"].token_ids
    assert out["ar"].text == out["orthrus"].text and len(out["ar"].text) > 10
    assert out["orthrus"].stats.num_cycles < len(out["orthrus"].token_ids)  # some drafts accepted



def test_the_shipped_view_follows_the_default_ggufs_bytes(tmp_path):
    """A model path to a copy of the embedded default GGUF gets the view trained for it (a GPU
    machine holds the file elsewhere); a file of the same size with other bytes does not."""
    from orthrus_runtime.model.loader import (DEFAULT_DIFFUSION_VIEW, default_gguf_path, is_default_gguf,
                                              resolve_diffusion_weights as resolve)

    copy = tmp_path / "copy.gguf"
    copy.symlink_to(default_gguf_path())
    other = tmp_path / "other.gguf"
    with open(other, "wb") as f:
        f.truncate(copy.stat().st_size)  # same size, all zeros
    assert is_default_gguf(copy) and not is_default_gguf(other) and not is_default_gguf(tmp_path / "no.gguf")
    view = str(DEFAULT_DIFFUSION_VIEW)
    assert resolve(None, "default") == view and resolve(str(copy), "default") == view
    assert resolve(str(other), "default") is None and resolve(str(tmp_path), "default") is None
    assert resolve(str(copy), None) is None and resolve(str(copy), "my.safetensors") == "my.safetensors"


@pytest.mark.slow
def test_a_gguf_conversion_is_kept_and_read_back(startup_cache_dir):
    """With cache_dir, the first load keeps the dequantized weights and the tokenizer; the second
    reads them (not the GGUF) and gets the same weights, config and tokenization. The session's
    cache: the first load of the suite converted (this test's, when it runs first or alone)."""
    import time
    from pathlib import Path

    from orthrus_runtime.model.loader import default_gguf_path, read_gguf

    tmp_path = Path(startup_cache_dir)
    gguf = default_gguf_path()
    cfg1, state1, tok1 = read_gguf(gguf, str(tmp_path))
    (entry,) = (tmp_path / "gguf").iterdir()
    assert (entry / "complete").exists() and not [p for p in (tmp_path / "gguf").iterdir() if p != entry]
    t0 = time.perf_counter()
    cfg2, state2, tok2 = read_gguf(gguf, str(tmp_path))
    assert time.perf_counter() - t0 < 20
    assert cfg2 == json.loads(json.dumps(cfg1, default=str)) and state1.keys() == state2.keys()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    text = "Hello, world! Überprüfung 123 <|im_start|>user\n"
    assert tok1.encode(text) == tok2.encode(text) and tok2.chat_template == tok1.chat_template
    # An entry without its completion mark is not read, and writing the conversion replaces it
    # whole (what read_gguf does after converting the file again, which this test skips: 45 s).
    from orthrus_runtime.model.loader import _write_converted

    (entry / "complete").unlink()
    # A new file, not the old one truncated: models loaded earlier in the session map that one.
    (entry / "model.safetensors").unlink()
    (entry / "model.safetensors").write_bytes(b"broken")
    _write_converted(entry, cfg1, state1, tok1)
    assert (entry / "complete").exists()
    k = next(iter(state1))
    assert torch.equal(read_gguf(gguf, str(tmp_path))[1][k], state1[k])
