"""A plain reference decoder: one sequence, dense K/V tensors, no paging, no
batching, no scheduler. It is the definition the fast engine is tested against.
"""
from __future__ import annotations


import torch

from orthrus_runtime.model.dual_view import DenseAR, DenseDraft, DualViewModel


@torch.inference_mode()
def ar_logits(model: DualViewModel, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of the AR view over a whole sequence, no cache."""
    t = torch.tensor([ids], device=model.lm_head.weight.device)
    pos = torch.arange(len(ids), device=t.device).unsqueeze(0)
    h = model.forward_hidden(t, pos, DenseAR(None, model.scale), diff=False)
    return model.logits(h[0])


@torch.inference_mode()
def ar_logits_and_kv(model: DualViewModel, ids: list[int]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Logits [T, V] of the AR view over a whole sequence, and per layer its K/V [T, Hkv, d]."""
    t = torch.tensor([ids], device=model.lm_head.weight.device)
    pos = torch.arange(len(ids), device=t.device).unsqueeze(0)
    attend = DenseAR(None, model.scale)
    h = model.forward_hidden(t, pos, attend, diff=False)
    return model.logits(h[0]), [(k[0], v[0]) for k, v in attend.new]


@torch.inference_mode()
def draft_logits(model: DualViewModel, prefix: list[int], anchor: int, block_size: int, mask_id: int) -> torch.Tensor:
    """Logits [B, V] of the diffusion view over [anchor, MASK x (B-1)] after the AR view's
    dense K/V of prefix (positions len(prefix)..len(prefix)+B-1)."""
    dev = model.lm_head.weight.device
    ar = DenseAR(None, model.scale)
    model.forward_hidden(torch.tensor([prefix], device=dev), torch.arange(len(prefix), device=dev)[None], ar, False)
    L = len(prefix)
    block = torch.tensor([[anchor] + [mask_id] * (block_size - 1)], device=dev)
    h = model.forward_hidden(block, torch.arange(L, L + block_size, device=dev)[None], DenseDraft(ar.new, model.scale),
                             diff=True)
    return model.logits(h[0])


@torch.inference_mode()
def greedy_ar(model: DualViewModel, prompt: list[int], max_tokens: int, eos: frozenset[int] = frozenset()) -> list[int]:
    """Plain greedy decoding with a dense growing cache."""
    dev = model.lm_head.weight.device
    attend = DenseAR(None, model.scale)
    ids = torch.tensor([prompt], device=dev)
    pos = torch.arange(len(prompt), device=dev).unsqueeze(0)
    out: list[int] = []
    while True:
        h = model.forward_hidden(ids, pos, attend, diff=False)
        tok = int(model.logits(h[0, -1]).argmax())
        out.append(tok)
        if tok in eos or len(out) >= max_tokens:
            return out
        n = len(prompt) + len(out) - 1
        attend = DenseAR(attend.new, model.scale)
        ids = torch.tensor([[tok]], device=dev)
        pos = torch.tensor([[n]], device=dev)


@torch.inference_mode()
def greedy_orthrus(model: DualViewModel, prompt: list[int], max_tokens: int, block_size: int, mask_id: int,
                   eos: frozenset[int] = frozenset()) -> tuple[list[int], list[int]]:
    """Greedy Orthrus cycles with a dense cache. Returns (tokens, accepted drafts per cycle)."""
    dev = model.lm_head.weight.device
    B = block_size
    ar = DenseAR(None, model.scale)
    h = model.forward_hidden(torch.tensor([prompt], device=dev), torch.arange(len(prompt), device=dev)[None], ar, False)
    past = ar.new
    out = [int(model.logits(h[0, -1]).argmax())]
    accepted: list[int] = []
    while out[-1] not in eos and len(out) < max_tokens:
        L = len(prompt) + len(out) - 1
        K = min(B, max_tokens - len(out))
        pos = torch.arange(L, L + B, device=dev)[None]
        block = torch.tensor([[out[-1]] + [mask_id] * (B - 1)], device=dev)
        dh = model.forward_hidden(block, pos, DenseDraft(past, model.scale), diff=True)
        drafts = model.logits(dh[0, : K - 1]).argmax(-1).tolist()
        ver = DenseAR(past, model.scale)
        vh = model.forward_hidden(torch.tensor([[out[-1]] + drafts], device=dev), pos[:, :K], ver, False)
        target = model.logits(vh[0]).argmax(-1).tolist()
        a = 0
        while a < K - 1 and drafts[a] == target[a]:
            a += 1
        accepted.append(a)
        keep = L + a + 1
        past = [(k[:, :keep], v[:, :keep]) for k, v in ver.new]
        for t in drafts[:a] + [target[a]]:
            out.append(t)
            if t in eos or len(out) >= max_tokens:
                return out, accepted
    return out, accepted


def exact_joint_distribution(model: DualViewModel, prompt: list[int], n: int, temperature: float, top_k: int,
                             top_p: float, max_cells: int = 4096) -> dict[tuple[int, ...], float]:
    """P(first n tokens) under AR sampling with the processed distribution, by enumeration."""
    from orthrus_runtime.spec.sampling import processed_probs

    def probs(ids: list[int]) -> torch.Tensor:
        lg = ar_logits(model, ids)[-1:].float()
        return processed_probs(lg, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]))[0]

    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt: dict[tuple[int, ...], float] = {}
        for seq, pr in dist.items():
            p = probs(prompt + list(seq))
            for t in torch.nonzero(p > 0).flatten().tolist():
                nxt[seq + (t,)] = pr * float(p[t])
        dist = nxt
        if len(dist) > max_cells:
            raise ValueError("too many cells to enumerate")
    return dist
