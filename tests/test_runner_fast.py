"""The fast path (packed projections, fused ops, CUDA graphs) computes what the dense reference
decoder (spec/reference.py) computes: logits of prefill, draft and verify passes, the K/V it writes, and
whole greedy generations.

On the CPU the fast path runs with plain torch ops; the Triton kernels run where triton
imports and either a GPU is present or TRITON_INTERPRET=1 (the interpreter, on the CPU).
CUDA-graph tests run on a GPU machine only (the GPU benchmark run executes this file).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine, build_runner
from orthrus_runtime.worker.fast_forward import FastForward, TorchOps
from orthrus_runtime.worker.kv_cache import KVCache
from orthrus_runtime.spec.reference import ar_logits, ar_logits_and_kv, draft_logits, greedy_ar
from orthrus_runtime.model.testing import tiny_model
from orthrus_runtime.types import GenerateRequest, SamplingParams

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNS = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
OPS = ["torch"] + (["triton"] if TRITON_RUNS else [])
SHAPES = {  # (arch, heads, kv_heads, head_dim): GQA groups of 2 and 3 (SmolLM2's), head sizes 16 and 64
    "qwen3-g2": ("qwen3", 4, 2, 16),
    "llama-g3": ("llama", 6, 2, 64),
}


def _ops(name):
    if name == "torch":
        return TorchOps()
    from orthrus_runtime.worker.fast_forward import TritonOps

    return TritonOps()


def _device_for(ops_name, device):
    # The Triton interpreter runs on CPU tensors; compiled Triton needs CUDA tensors.
    if ops_name == "triton" and not HAS_CUDA:
        return "cpu"
    return device


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("ops_name", OPS)
@pytest.mark.parametrize("device", DEVICES)
def test_fast_forward_matches_reference_runner(shape, ops_name, device):
    """Every op set's paged passes (ragged batch, scattered block tables) against the dense
    reference decoder, sequence by sequence: logits and the K/V written to the cache."""
    if ops_name == "triton" and HAS_CUDA and device == "cpu":
        pytest.skip("compiled Triton runs on CUDA tensors")
    dev = torch.device(_device_for(ops_name, device))
    arch, heads, kv_heads, head_dim = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    model = tiny_model(arch, seed=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim).to(dev)
    page, nblocks = 4, 64
    kv_fast = KVCache(model.cfg, nblocks, page, torch.float32, dev)
    fast = FastForward(model, kv_fast, _ops(ops_name))
    perm = torch.randperm(nblocks, generator=g).tolist()
    lens = [5, 13, 1, 9]  # scattered, non-contiguous block tables
    tables = [perm[i * 16:(i + 1) * 16] for i in range(len(lens))]
    bt = torch.tensor(tables, dtype=torch.int32, device=dev)
    bs = len(tables)

    def check(a, b, what):
        err = (a - b).abs().max().item()
        assert err < 2e-5, f"{what}: max |fast - reference| = {err}"

    def run_fast(ids, start, nvalid, diff):
        h = fast.forward(ids.to(dev), torch.tensor(start, dtype=torch.int32, device=dev),
                         torch.tensor(nvalid, dtype=torch.int32, device=dev), bt, diff=diff)
        return model.logits(h).view(bs, ids.shape[1], -1)

    def check_cache(i, ids, what):
        """Sequence i's cached K/V at positions 0..len(ids)-1 against the dense ones."""
        _, dense = ar_logits_and_kv(model, ids)
        slots = torch.tensor([tables[i][p // page] * page + p % page for p in range(len(ids))], device=dev)
        for layer, (k, v) in enumerate(dense):
            check(kv_fast.k[layer].reshape(-1, *k.shape[1:])[slots], k, f"{what} K, layer {layer}")
            check(kv_fast.v[layer].reshape(-1, *v.shape[1:])[slots], v, f"{what} V, layer {layer}")

    # 1. Prefill of ragged prompts (padding rows of the shorter ones).
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lens]
    T = max(lens)
    ids = torch.zeros(bs, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    got = run_fast(ids, [0] * bs, lens, diff=False)
    for i, n in enumerate(lens):
        check(got[i, :n], ar_logits(model, prompts[i]), "prefill logits")
        check_cache(i, prompts[i], "prefill")

    # 2. Draft pass: [anchor, MASK...] against the cached prefix; writes nothing.
    B = 6
    anchors = [7, 8, 9, 10]
    ids = torch.full((bs, B), 300)
    ids[:, 0] = torch.tensor(anchors)
    k_before = kv_fast.k.clone()
    got = run_fast(ids, lens, [B] * bs, diff=True)
    for i in range(bs):
        check(got[i], draft_logits(model, prompts[i], anchors[i], B, 300), "draft logits")
    assert torch.equal(kv_fast.k, k_before), "the draft pass wrote to the cache"

    # 3. Verify pass with a different number of real tokens per sequence.
    K = [6, 3, 6, 1]
    toks = [[a] + torch.randint(0, 300, (k - 1,), generator=g).tolist() for a, k in zip(anchors, K)]
    vids = torch.zeros(bs, 6, dtype=torch.long)
    for i, t in enumerate(toks):
        vids[i, : len(t)] = torch.tensor(t)
    got = run_fast(vids, lens, K, diff=False)
    for i, k in enumerate(K):
        check(got[i, :k], ar_logits(model, prompts[i] + toks[i])[lens[i]:], "verify logits")
        check_cache(i, prompts[i] + toks[i], "verify")


def _engine(model, B, device, cuda_graphs=None, policy="full", pipelined=None):
    cfg = EngineConfig(block_size=B, mask_token_id=300, max_model_len=256, num_kv_blocks=200,
                       kv_page_size=8, verify_policy=policy, async_scheduling=pipelined)
    return LLMEngine(model, cfg, runner=build_runner(model, cfg, cuda_graphs=cuda_graphs))


PROMPTS = [list(range(3, 8)), list(range(10, 27)), [42], [(7 * i) % 250 + 3 for i in range(40)]]


def _greedy(n, mode):
    return [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=n, temperature=0.0,
                                                                       ignore_eos=True), mode=mode) for p in PROMPTS]


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_fast_engine_greedy_orthrus_equals_ar(device, pipelined):
    """Whole generations through the fast path (CUDA graphs on a GPU) equal the dense greedy
    reference, in both modes, at several block sizes and with the adaptive policy, with and
    without pipelined decoding."""
    model = tiny_model("qwen3", diffusion="ar-copy", seed=1).to(device)
    ref = [greedy_ar(model, p, 40) for p in PROMPTS]
    eng = _engine(model, 4, device, pipelined=pipelined)
    assert [d.token_ids for d in eng.generate(_greedy(40, "ar"))] == ref
    for B, policy in ((4, "full"), (8, "full"), (8, "adaptive")):
        eng = _engine(model, B, device, policy=policy, pipelined=pipelined)
        res = eng.generate(_greedy(40, "orthrus"))
        assert [d.token_ids for d in res] == ref, f"block {B}, {policy}"
        assert eng.blocks.num_free == eng.blocks.num_blocks
        assert sum(d.stats.num_accepted_tokens for d in res) > 0  # the warm-started view drafts well
        assert (eng.num_chained_steps > 0) == pipelined
    if device == "cuda":
        assert eng.runner.graphs is not None and eng.runner.graphs.graphs, "no CUDA graph was used"


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_passes_equal_eager_fast_passes():
    """Replaying a captured graph (padded batch and length) gives the eager pass's logits."""
    model = tiny_model("qwen3", seed=4).to("cuda")
    outs = {}
    for graphs in (False, True):
        eng = _engine(model, 8, "cuda", cuda_graphs=graphs)
        reqs = [GenerateRequest(prompt_token_ids=p, params=SamplingParams(max_tokens=30, temperature=0.0,
                                                                          ignore_eos=True)) for p in PROMPTS[:3]]
        for r in reqs:
            eng.add_request(r)
        eng.step()  # prefill
        seqs = list(eng.scheduler.running)
        for s in seqs:
            eng.blocks.allocate(s, s.num_cached + 8)
        anchors = [s.output_token_ids[-1] for s in seqs]
        tables, starts = [s.block_table for s in seqs], [s.num_cached for s in seqs]
        d = eng.runner.run_draft(tables, starts, anchors, 7, 300, 6)  # D=7 runs in the T=8 graph
        ids = torch.cat([torch.tensor(anchors, device="cuda").unsqueeze(1), d.argmax(-1)[:, :4]], 1)
        v = eng.runner.run_verify(tables, starts, ids, [5, 3, 5])  # T=5 runs in the T=8 graph
        outs[graphs] = (d, v)
    (d0, v0), (d1, v1) = outs[False], outs[True]
    assert (d0 - d1).abs().max().item() < 1e-4
    for i, k in enumerate([5, 3, 5]):
        assert (v0[i, :k] - v1[i, :k]).abs().max().item() < 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_fast_engine_sampling_is_lossless(device):
    """Float32, seeded sampling with top-k and top-p through the fast path (CUDA graphs on a GPU):
    the joint distribution of the first three tokens in Orthrus mode is the AR model's (chi-square
    against exact enumeration), and AR mode samples it too."""
    from distribution_check import fit_to_exact

    from orthrus_runtime.spec.reference import exact_joint_distribution

    T, TOP_K, TOP_P, prompt = 0.7, 5, 0.9, [1, 4, 2]
    model = tiny_model("qwen3", seed=11, vocab_size=8, hidden=32, heads=2, kv_heads=1, head_dim=16)
    exact = exact_joint_distribution(model, prompt, 3, T, TOP_K, TOP_P)  # enumerated on the CPU
    model = model.to(device)
    n = 6000
    for mode in ("orthrus", "ar"):
        cfg = EngineConfig(block_size=4, mask_token_id=7, max_model_len=64, num_kv_blocks=4000,
                           kv_page_size=4, max_num_seqs=128, max_num_batched_tokens=4096)
        eng = LLMEngine(model, cfg)
        res = eng.generate([GenerateRequest(prompt_token_ids=prompt, mode=mode, params=SamplingParams(
            max_tokens=3, temperature=T, top_k=TOP_K, top_p=TOP_P, seed=500 + i, ignore_eos=True))
            for i in range(n)])
        pvalue, _ = fit_to_exact([tuple(d.token_ids) for d in res], exact, mode)
        assert pvalue > 1e-4, mode
        if mode == "orthrus":
            st = eng.spec["orthrus"]
            assert 0 < st.num_accepted_tokens < st.num_draft_tokens
        if device == "cuda":
            assert eng.runner.graphs is not None and eng.runner.graphs.graphs


@pytest.mark.skipif(not TRITON_RUNS, reason="the skinny Triton kernels need a GPU or Triton's interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_skinny_linear_matches_a_float64_product(dtype):
    """The few-row linear kernels (one row: CUDA cores; 2-32: tensor cores) against float64,
    on ragged shapes (N and K not multiples of the tiles) and the real ones. Without a GPU:
    Triton's interpreter, float16 only (it computes bfloat16 on raw bits), small shapes."""
    from orthrus_runtime.worker import triton_kernels as tk

    if not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 arithmetic")
    dev = "cuda" if HAS_CUDA else "cpu"
    shapes = ((6144, 4096), (4096, 12288), (960, 576), (49152, 576), (1000, 1536), (37, 100)) if HAS_CUDA \
        else ((37, 100), (130, 576), (64, 2048), (40, 4160))  # the last: several K tiles, ragged
    rows = (1, 2, 3, 5, 8, 16, 17, 31, 32) if HAS_CUDA else (1, 3, 17, 32)
    g = torch.Generator(device=dev).manual_seed(0)
    for N, K in shapes:
        w = torch.randn(N, K, device=dev, generator=g).to(dtype)
        for M in rows:
            x = torch.randn(M, K, device=dev, generator=g).to(dtype)
            assert tk.skinny_linear_applies(x, w)
            y = tk.skinny_linear(x, w)
            ref = x.double() @ w.double().T
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            assert y.shape == (M, N) and rel < 1e-2, (N, K, M, rel)
    x = torch.randn(33, 64, device=dev).to(dtype)
    w = torch.randn(32, 64, device=dev).to(dtype)
    assert not tk.skinny_linear_applies(x, w)  # too many rows: cuBLAS
    assert not tk.skinny_linear_applies(x[:4].float(), w.float())  # float32: cuBLAS
    assert not tk.skinny_linear_applies(x[:4].t().contiguous().t(), w)  # strided rows: cuBLAS
