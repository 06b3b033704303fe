"""The attention backends: which one `attention_backend` selects (and the clear errors when
one cannot run), and, on a GPU with flash-attn 4, that its paged attention computes what
the reference computes, inside CUDA graphs too.

flash-attn 4 computes in bf16/fp16 only, so its checks compare against the float32 torch
reference with a bf16 tolerance; the float32 losslessness tests run the Triton kernels
("auto" picks them for float32).
"""
from __future__ import annotations

import pytest
import torch

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.worker.fast_forward import (FlashAttnOps, TorchOps, TritonOps, flash_attn_unsupported,
                                          make_ops)
from orthrus_runtime.worker.runner import ModelRunner
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

HAS_CUDA = torch.cuda.is_available()
FA_WHY = flash_attn_unsupported(torch.device("cuda"), tiny_model("qwen3", head_dim=64).to(torch.bfloat16)) \
    if HAS_CUDA else "no GPU"
needs_fa = pytest.mark.skipif(FA_WHY is not None, reason=f"flash-attn 4 does not run here: {FA_WHY}")


# -- selection (any machine) ---------------------------------------------------------------------------


def test_cpu_selection_and_errors():
    model = tiny_model("qwen3")
    cpu = torch.device("cpu")
    assert isinstance(make_ops("auto", cpu, model), TorchOps)
    assert isinstance(make_ops("torch", cpu, model), TorchOps)
    with pytest.raises(ValueError, match="flash-attn needs CUDA"):
        make_ops("flash_attn", cpu, model)
    with pytest.raises(ValueError, match="'triton' needs CUDA"):
        make_ops("triton", cpu, model)
    with pytest.raises(ValueError, match="attention_backend must be one of auto, flash_attn, triton, torch"):
        make_ops("flash", cpu, model)


def test_engine_refuses_a_backend_it_cannot_run():
    model = tiny_model("qwen3")
    base = dict(block_size=4, mask_token_id=300, max_model_len=64, num_kv_blocks=40, kv_page_size=8)
    with pytest.raises(ValueError, match="flash-attn needs CUDA"):
        LLMEngine(model, EngineConfig(**base, async_scheduling=True, attention_backend="flash_attn"))
    with pytest.raises(ValueError, match="'triton' needs CUDA"):
        LLMEngine(model, EngineConfig(**base, attention_backend="triton"))
    with pytest.raises(ValueError, match="must be one of"):
        LLMEngine(model, EngineConfig(**base, async_scheduling=True, attention_backend="fa"))


def test_engine_args_carry_the_backend(tmp_path):
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.engine.setup import build_engine
    from orthrus_runtime.model.testing import tiny_checkpoint

    folder = tiny_checkpoint(str(tmp_path / "m"), block_size=4)
    with pytest.raises(ValueError, match="flash-attn needs CUDA"):
        build_engine(EngineArgs(model=str(folder), device="cpu", max_model_len=64, async_scheduling=True,
                                attention_backend="flash_attn"))
    eng = build_engine(EngineArgs(model=str(folder), device="cpu", max_model_len=64, attention_backend="torch"))
    assert eng.runner.backend == "torch"


@needs_fa
def test_auto_takes_flash_attn_for_prefill_passes_only():
    model = tiny_model("qwen3", head_dim=64).to("cuda").to(torch.bfloat16)
    ops = make_ops("auto", torch.device("cuda"), model)
    assert isinstance(ops, FlashAttnOps) and ops.min_tokens == 65
    z = torch.zeros(2, dtype=torch.int32, device="cuda")
    bt = torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    assert ops.pass_meta(z, z, bt, 64, False, 16) is None  # decode-sized: the Triton kernel
    assert ops.pass_meta(z, z, bt, 65, False, 16) is not None
    assert make_ops("flash_attn", torch.device("cuda"), model).min_tokens == 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_auto_takes_triton_for_float32():
    model = tiny_model("qwen3", head_dim=64).to("cuda")
    assert isinstance(make_ops("auto", torch.device("cuda"), model), TritonOps)
    assert "float32" in flash_attn_unsupported(torch.device("cuda"), model)


# -- flash-attn 4 on the GPU ---------------------------------------------------------------------------


def _case(H, HKV, D, T, starts, nvalid, page=16, nblocks=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bs = len(starts)
    kc = torch.randn(nblocks, page, HKV, D, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(nblocks, page, HKV, D, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(bs * T, H, D, device="cuda", generator=g).to(torch.bfloat16)
    kb = torch.randn(bs * T, HKV, D, device="cuda", generator=g).to(torch.bfloat16)
    # v as a strided view into a packed projection, as the fast path passes it
    qkv = torch.randn(bs * T, (H + 2 * HKV) * D, device="cuda", generator=g).to(torch.bfloat16)
    vb = qkv[:, (H + HKV) * D:].view(bs * T, HKV, D)
    W = 16
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(seed))[: bs * W]
    # The block table transposed out of a [rows, batch] staging buffer, as the CUDA graphs hold it.
    bt = perm.view(W, bs).to(torch.int32).cuda().t()
    st = torch.tensor(starts, dtype=torch.int32, device="cuda")
    nv = torch.tensor(nvalid, dtype=torch.int32, device="cuda")
    return q, kb, vb, kc, vc, bt, st, nv


@needs_fa
@pytest.mark.parametrize("heads", [(9, 3, 64), (32, 8, 128), (4, 4, 128)])
@pytest.mark.parametrize("T", [1, 5, 32])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_matches_the_reference(heads, T, causal):
    """Ragged prefixes (0 for a prefill, a page boundary, long), padding rows (nvalid < T) and an
    all-padding sequence of a padded batch; valid rows within bf16 rounding of float32."""
    H, HKV, D = heads
    starts, nvalid = [0, 16, 37, 200, 0], [T, T, max(1, T - 2), 1, 0]
    q, kb, vb, kc, vc, bt, st, nv = _case(H, HKV, D, T, starts, nvalid)
    if causal:  # the AR view has written this pass's valid K/V into the cache first
        for b, (s, n) in enumerate(zip(starts, nvalid)):
            for t in range(n):
                p = s + t
                kc[bt[b, p // 16], p % 16] = kb[b * T + t]
                vc[bt[b, p // 16], p % 16] = vb[b * T + t]
    fa = FlashAttnOps()
    meta = fa.pass_meta(st, nv, bt, T, not causal, 16)
    got = fa.attention(q, kb, vb, kc, vc, bt, st, nv, T, D ** -0.5, causal, meta=meta).float()
    f = [x.float() for x in (q, kb, vb, kc, vc)]
    want = TorchOps().attention(f[0], f[1], f[2], f[3], f[4], bt, st, nv, T, D ** -0.5, causal)
    assert torch.isfinite(got).all()
    for b, n in enumerate(nvalid):
        rows = slice(b * T, b * T + n)
        err = (got[rows] - want[rows]).abs().max().item() if n else 0.0
        assert err < 3e-2, f"sequence {b}: max |flash - reference| = {err}"
        if not causal:  # the merge zeroes padding rows, as the Triton kernel does
            assert not got[b * T + n: (b + 1) * T].any()


def _bf16_engine(backend, policy="full"):
    model = tiny_model("qwen3", diffusion="ar-copy", seed=1, head_dim=64).to("cuda").to(torch.bfloat16)
    eng = LLMEngine(model, EngineConfig(block_size=8, mask_token_id=300, max_model_len=256, num_kv_blocks=200,
                                        kv_page_size=16, verify_policy=policy, attention_backend=backend))
    return eng


# The last prompt is longer than AUTO_FLASH_MIN_TOKENS: "auto" prefills it with flash-attn.
PROMPTS = [list(range(3, 8)), list(range(10, 27)), [42], [(7 * i) % 250 + 3 for i in range(90)]]


def _greedy(mode, n=24):
    return [GenerateRequest(prompt_token_ids=p, mode=mode, params=SamplingParams(
        max_tokens=n, temperature=0.0, ignore_eos=True)) for p in PROMPTS]


@needs_fa
def test_flash_engine_in_cuda_graphs():
    """The engine on flash-attn 4 in CUDA graphs, pipelined: the graph replays give the eager
    passes' logits, generations finish and free their KV, and greedy AR agrees with the
    Triton engine (bf16: the two differ only by rounding; near-ties may flip late tokens)."""
    eng = _bf16_engine("flash_attn")
    assert eng.runner.backend == "flash-attn4+cuda-graphs" and eng.pipelined
    tri = _bf16_engine("triton")
    assert tri.runner.backend == "triton+cuda-graphs"
    auto = _bf16_engine("auto")
    assert auto.runner.backend == "flash-attn4(passes>=65)+triton+cuda-graphs"
    outs = {}
    for name, e in (("fa", eng), ("triton", tri), ("auto", auto)):
        for mode in ("ar", "orthrus"):
            res = e.generate(_greedy(mode))
            outs[name, mode] = [d.token_ids for d in res]
            assert all(len(t) == 24 for t in outs[name, mode])
            assert e.blocks.num_free == e.blocks.num_blocks
    assert eng.runner.graphs.graphs, "no CUDA graph was used"
    assert eng.spec["orthrus"].num_accepted_tokens > 0  # the ar-copy view drafts well
    for name in ("fa", "auto"):
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(outs[name, "ar"], outs["triton", "ar"])]
        assert all(x[0] == y[0] for x, y in zip(outs[name, "ar"], outs["triton", "ar"])), (name, same)
        assert sum(same) >= 0.75 * 24 * len(PROMPTS), (name, same)

    # Graph replay = eager pass, flash-attn in both.
    eager = ModelRunner(eng.model, eng.kv, torch.device("cuda"), cuda_graphs=False,
                        max_model_len=256, attention_backend="flash_attn")
    for r in [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=30, temperature=0.0))
              for p in PROMPTS[:3]]:
        eng.add_request(r)
    eng.step()  # prefill (no cycle is queued behind it)
    assert eng._inflight is None
    seqs = list(eng.scheduler.running)
    for s in seqs:
        eng.blocks.allocate(s, s.num_cached + 8)
    anchors = [s.output_token_ids[-1] for s in seqs]
    tables, starts = [s.block_table for s in seqs], [s.num_cached for s in seqs]
    d_g = eng.runner.run_draft(tables, starts, anchors, 7, 300, 6).clone()  # D=7 in the T=8 graph
    d_e = eager.run_draft(tables, starts, anchors, 7, 300, 6)
    assert (d_g.float() - d_e.float()).abs().max().item() < 1e-2
    ids = torch.cat([torch.tensor(anchors, device="cuda").unsqueeze(1), d_e.argmax(-1)[:, :4]], 1)
    v_g = eng.runner.run_verify(tables, starts, ids, [5, 3, 5]).clone()  # T=5 in the T=8 graph
    v_e = eager.run_verify(tables, starts, ids, [5, 3, 5])
    for i, k in enumerate([5, 3, 5]):
        assert (v_g[i, :k].float() - v_e[i, :k].float()).abs().max().item() < 1e-2
