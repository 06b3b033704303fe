"""`orthrus distill`: train the diffusion view of a frozen base model by self-distillation.

Only the diffusion projections (q/k/v/o_proj_diff, plus q/k_norm_diff on Qwen3)
and the diffusion view's mask embedding row, if the model has one, are trained;
embeddings, MLPs, norms, lm_head and the AR projections stay frozen, so the AR
view, and with it every output the engine emits, is unchanged.

1. Data (self-distilled): prompts (default: orthrus_runtime/data/distill_prompts.jsonl.gz)
   are answered by the base model itself through this engine in AR mode, a mix of
   greedy and sampled responses. Saved as a safetensors file and reused.
2. Training: for each sequence, the AR view runs once over the whole text (no
   gradient) giving the clean K/V of every layer and the AR next-token distribution
   at every position. Blocks [x_a, MASK x (B-1)] at random anchors a inside the
   response are then drafted in one diffusion pass, many blocks per sequence: every
   block sees the clean K/V strictly before its anchor plus its own block
   (bidirectional), exactly what the engine's draft pass sees. Block row i is
   trained towards the AR distribution of the token after position a+i with the
   forward KL, KL(p_AR || q_draft), optionally weighted towards early rows
   (acceptance needs the early drafts right first).
   AdamW, linear warmup then cosine decay, bfloat16 autocast on CUDA, checkpoints
   that resume bit-for-bit (batches and anchors are a function of seed and step).
3. Export: the trained view as one diffusion-view file (int8 per-row weights by
   default) that `load_model` lays over the base.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from orthrus_runtime.model.loader import DATA_DIR, DIFF_SUFFIXES, save_diffusion_view
from orthrus_runtime.model.dual_view import DualViewModel

DEFAULT_PROMPTS = DATA_DIR / "distill_prompts.jsonl.gz"
DATA_FORMAT = "orthrus-distill-data-v1"
CHECKPOINT_NAME = "checkpoint.pt"


# =============================================================================================
# Prompts


def load_prompts(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """Chat prompts as message lists. Accepts .jsonl / .jsonl.gz records with a string
    field 'prompt' (one user turn) or 'messages' (a list of {role, content}), or a .txt
    file with one prompt per line."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: prompt file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    out: list[list[dict[str, str]]] = []
    with opener(p, "rt", encoding="utf-8") as f:
        plain = not (p.name.endswith(".jsonl") or p.name.endswith(".jsonl.gz"))
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if plain:
                out.append([{"role": "user", "content": line}])
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e})") from e
            if isinstance(rec.get("prompt"), str):
                out.append([{"role": "user", "content": rec["prompt"]}])
            elif isinstance(rec.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]
            ):
                out.append(rec["messages"])
            else:
                raise ValueError(f"{p}:{n}: needs a string field 'prompt' or a list field 'messages'")
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids exactly as the engine builds them for a chat request."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode("\n\n".join(m["content"] for m in messages)))


# =============================================================================================
# Self-distilled data


@dataclass
class DistillData:
    """Sequences (prompt + response ids) stored flat: sequence i is
    tokens[offsets[i]:offsets[i+1]], its first prompt_lens[i] ids being the prompt."""

    tokens: torch.Tensor  # int32 [total]
    offsets: torch.Tensor  # int64 [n + 1]
    prompt_lens: torch.Tensor  # int32 [n]
    meta: dict[str, str] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return self.prompt_lens.numel()

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def response_tokens(self) -> int:
        return int((self.lengths() - self.prompt_lens.long()).sum())

    def sequence(self, i: int) -> torch.Tensor:
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    @classmethod
    def from_sequences(cls, seqs: list[tuple[list[int], list[int]]], meta: Optional[dict[str, str]] = None):
        """seqs: [(prompt ids, response ids)]."""
        flat: list[int] = []
        offsets = [0]
        plens = []
        for p, r in seqs:
            flat += p + r
            offsets.append(len(flat))
            plens.append(len(p))
        return cls(torch.tensor(flat, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64),
                   torch.tensor(plens, dtype=torch.int32), dict(meta or {}))

    @classmethod
    def concat(cls, parts: list["DistillData"]) -> "DistillData":
        seqs = []
        for d in parts:
            for i in range(len(d)):
                s, p = d.sequence(i).tolist(), int(d.prompt_lens[i])
                seqs.append((s[:p], s[p:]))
        out = cls.from_sequences(seqs, parts[0].meta if parts else {})
        out.meta["response_tokens"] = str(out.response_tokens)
        return out

    def split(self, fraction: float) -> tuple["DistillData", "DistillData"]:
        """(train, held-out): the last ceil(fraction * n) sequences are held out."""
        n = len(self)
        k = min(n - 1, math.ceil(fraction * n)) if fraction > 0 else 0
        return self.subset(range(n - k)), self.subset(range(n - k, n))

    def subset(self, idx: Iterable[int]) -> "DistillData":
        seqs = []
        for i in idx:
            s = self.sequence(i).tolist()
            p = int(self.prompt_lens[i])
            seqs.append((s[:p], s[p:]))
        return DistillData.from_sequences(seqs, self.meta)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {"format": DATA_FORMAT, **{k: str(v) for k, v in self.meta.items()}}
        save_file({"tokens": self.tokens.contiguous(), "offsets": self.offsets.contiguous(),
                   "prompt_lens": self.prompt_lens.contiguous()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistillData":
        from safetensors import safe_open

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: distillation data file not found")
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != DATA_FORMAT:
                raise ValueError(f"{p}: metadata 'format' is {meta.get('format')!r}, expected {DATA_FORMAT!r}")
            missing = {"tokens", "offsets", "prompt_lens"} - set(f.keys())
            if missing:
                raise ValueError(f"{p}: missing tensor(s) {sorted(missing)}")
            t = {k: f.get_tensor(k) for k in ("tokens", "offsets", "prompt_lens")}
        meta.pop("format")
        return cls(t["tokens"], t["offsets"], t["prompt_lens"], meta)


def generate_data(loaded: Any, prompts: list[list[dict[str, str]]], *, max_prompt_tokens: int = 256,
                  max_new_tokens: int = 320, greedy_fraction: float = 0.5, temperature: float = 0.8,
                  top_p: float = 0.95, seconds: float = 0.0, max_num_seqs: int = 256,
                  max_num_batched_tokens: int = 8192, min_response_tokens: int = 16, seed: int = 0,
                  progress: bool = True) -> DistillData:
    """Answer the prompts with the base model through the engine (AR mode).

    Greedy and sampled requests alternate so that greedy_fraction of them are greedy.
    With seconds > 0 generation stops at that deadline; responses cut there are kept
    when they have min_response_tokens (a cut response is still text the model wrote).
    """
    from tqdm import tqdm

    from orthrus_runtime.engine.setup import engine_config_from_args
    from orthrus_runtime.engine.llm_engine import LLMEngine
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    tok = loaded.tokenizer
    if tok is None:
        raise ValueError("self-distillation needs the model's tokenizer")
    dev = loaded.model.lm_head.weight.device
    eargs = EngineArgs(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=max_prompt_tokens + max_new_tokens + 1, seed=seed,
                       kv_cache_bytes=None if dev.type == "cuda" else 256 * 2**20)
    # No tokenizer inside the engine: ids in, ids out, no per-token detokenizing.
    engine = LLMEngine(loaded.model, engine_config_from_args(eargs, loaded), tokenizer=None)
    stop_ids = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    encoded: dict[str, list[int]] = {}
    order: list[str] = []
    n_greedy = 0
    for i, msgs in enumerate(prompts):
        ids = encode_prompt(tok, msgs)
        if not ids or len(ids) > max_prompt_tokens:
            continue
        greedy = (n_greedy + 1) <= greedy_fraction * (len(order) + 1)
        n_greedy += greedy
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, seed=None if greedy else seed * 1_000_003 + i,
                                stop_token_ids=stop_ids)
        rid = engine.add_request(GenerateRequest(prompt_token_ids=ids, params=params, mode="ar",
                                                 request_id=f"p{i}"))
        encoded[rid] = ids
        order.append(rid)
    if not order:
        raise ValueError(f"no prompt fits in {max_prompt_tokens} tokens")
    outputs: dict[str, list[int]] = {rid: [] for rid in order}
    done: set[str] = set()
    t0 = time.monotonic()
    deadline = t0 + seconds if seconds > 0 else float("inf")
    bar = tqdm(total=len(order), desc="self-distilling", unit="resp", disable=not progress, dynamic_ncols=True)
    n_tokens = 0
    while engine.has_work() and time.monotonic() < deadline:
        for d in engine.step():
            outputs[d.request_id] += d.token_ids
            n_tokens += len(d.token_ids)
            if d.finished:
                done.add(d.request_id)
                bar.update(1)
        el = time.monotonic() - t0
        bar.set_postfix(tokens=n_tokens, tok_s=f"{n_tokens / max(el, 1e-9):.0f}", refresh=False)
    for rid in list(engine.seqs):  # the deadline: keep what was written so far
        d = engine.abort(rid)
        if d is not None:
            outputs[rid] += d.token_ids
    bar.close()
    el = time.monotonic() - t0
    seqs = []
    for rid in order:
        r = outputs[rid]
        if len(r) >= min_response_tokens or (rid in done and len(r) >= 2):
            seqs.append((encoded[rid], r))
    # The engine holds reference cycles (scheduler -> bound method -> engine): collect them
    # so its KV cache goes back to the allocator before training needs the memory.
    del engine
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    meta = {"model": loaded.model_id, "prompts": str(len(order)), "finished": str(len(done)),
            "seconds": f"{el:.1f}", "max_new_tokens": str(max_new_tokens), "greedy_fraction": str(greedy_fraction),
            "temperature": str(temperature), "top_p": str(top_p)}
    data = DistillData.from_sequences(seqs, meta)
    data.meta["response_tokens"] = str(data.response_tokens)
    return data


# =============================================================================================
# The training pass


def _expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[bs, S, Hkv, d] -> [bs, heads, S, d] (GQA groups repeated)."""
    x = x.transpose(1, 2)
    rep = heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


class TeacherAttend:
    """AR view over right-padded whole sequences (causal); keeps every layer's K/V."""

    def __init__(self, scale: float):
        self.scale = scale
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer, q, k, v):
        self.kv.append((k, v))
        h = q.shape[2]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), _expand_kv(k, h), _expand_kv(v, h),
                                             is_causal=True, scale=self.scale)
        return out.transpose(1, 2)


def block_draft_mask(anchors: torch.Tensor, block_size: int, ctx_len: int) -> torch.Tensor:
    """The many-blocks-per-sequence mask: [bs, M*B, ctx_len + M*B] bool (True = visible).

    Query row r belongs to block j = r // B with anchor a_j: it sees the clean AR K/V of
    positions < a_j (strictly before the anchor) and the diffusion K/V of block j only."""
    bs, M = anchors.shape
    B = block_size
    dev = anchors.device
    a = anchors.repeat_interleave(B, dim=1)  # [bs, M*B] anchor of each query row
    ctx = torch.arange(ctx_len, device=dev).view(1, 1, ctx_len) < a.unsqueeze(-1)
    blk = torch.arange(M * B, device=dev) // B
    own = (blk.view(-1, 1) == blk.view(1, -1)).unsqueeze(0).expand(bs, -1, -1)
    return torch.cat([ctx, own], dim=-1)


class BlockDraftAttend:
    """Diffusion view over many blocks per sequence at once (see block_draft_mask)."""

    def __init__(self, teacher_kv: list[tuple[torch.Tensor, torch.Tensor]], anchors: torch.Tensor,
                 block_size: int, scale: float):
        self.kv = teacher_kv
        self.scale = scale
        self.mask = block_draft_mask(anchors, block_size, teacher_kv[0][0].shape[1]).unsqueeze(1)

    def __call__(self, layer, q, k, v):
        ck, cv = self.kv[layer]
        h = q.shape[2]
        K = _expand_kv(torch.cat([ck.to(k.dtype), k], dim=1), h)
        V = _expand_kv(torch.cat([cv.to(v.dtype), v], dim=1), h)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=self.mask, scale=self.scale)
        return out.transpose(1, 2)


@dataclass
class Batch:
    ids: torch.Tensor  # [bs, N] long, right-padded
    lengths: torch.Tensor  # [bs]
    prompt_lens: torch.Tensor  # [bs]
    anchors: torch.Tensor  # [bs, M] long
    anchor_valid: torch.Tensor  # [bs, M] bool


def make_batch(data: DistillData, idx: list[int], blocks_per_seq: int, gen: torch.Generator,
               pad_id: int = 0) -> Batch:
    """Pad sequences idx and draw up to blocks_per_seq distinct anchors in each response.

    An anchor is a response token at position a with a + 1 < length (at least one target):
    the engine's first anchor is the first response token, whose K/V are not cached yet."""
    seqs = [data.sequence(i).long() for i in idx]
    N = max(s.numel() for s in seqs)
    bs, M = len(idx), blocks_per_seq
    ids = torch.full((bs, N), pad_id, dtype=torch.long)
    anchors = torch.zeros(bs, M, dtype=torch.long)
    valid = torch.zeros(bs, M, dtype=torch.bool)
    lengths = torch.tensor([s.numel() for s in seqs])
    plens = torch.tensor([int(data.prompt_lens[i]) for i in idx])
    for b, s in enumerate(seqs):
        ids[b, : s.numel()] = s
        lo, hi = int(plens[b]), s.numel() - 2  # anchors in [lo, hi]
        count = hi - lo + 1
        if count <= 0:
            continue
        pick = torch.randperm(count, generator=gen)[:M] + lo
        k = pick.numel()
        anchors[b, :k] = pick.sort().values
        valid[b, :k] = True
    return Batch(ids, lengths, plens, anchors, valid)


@dataclass
class StepStats:
    loss: float
    accuracy: float  # top-1 draft == top-1 AR, over target rows
    targets: int
    context_tokens: int


def distill_loss(model: DualViewModel, batch: Batch, block_size: int, mask_id: int, decay: float = 0.0,
                 amp: Optional[torch.dtype] = None) -> tuple[torch.Tensor, StepStats]:
    """Forward KL(p_AR || q_draft) over every target row of every block of the batch."""
    dev = model.lm_head.weight.device
    B = block_size
    ids = batch.ids.to(dev)
    anchors = batch.anchors.to(dev)
    bs, N = ids.shape
    M = anchors.shape[1]
    lengths = batch.lengths.to(dev)
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else _null()

    # Target rows: block row i (0..B-2) predicts the token at a + i + 1, which must exist.
    rows = torch.arange(B - 1, device=dev)
    tpos = anchors.unsqueeze(-1) + rows  # [bs, M, B-1] positions whose AR distribution is the target
    tvalid = batch.anchor_valid.to(dev).unsqueeze(-1) & (tpos + 1 < lengths.view(bs, 1, 1))
    sel = tvalid.reshape(-1)
    weights = torch.exp(-rows.float() / decay) if decay > 0 else torch.ones(B - 1, device=dev)
    w = weights.expand(bs, M, B - 1).reshape(-1)[sel]

    with torch.no_grad(), autocast:
        pos = torch.arange(N, device=dev).expand(bs, N)
        teacher = TeacherAttend(model.scale)
        h = model.forward_hidden(ids, pos, teacher, diff=False)
        th = h.gather(1, tpos.clamp(max=N - 1).reshape(bs, -1, 1).expand(-1, -1, h.shape[-1]))
        t_logp = F.log_softmax(model.logits(th.reshape(-1, h.shape[-1])[sel]), dim=-1)
        kv = [(k.detach(), v.detach()) for k, v in teacher.kv]
        del teacher, h, th

    with autocast:
        d_ids = torch.full((bs, M, B), mask_id, dtype=torch.long, device=dev)
        d_ids[:, :, 0] = ids.gather(1, anchors)
        d_pos = anchors.unsqueeze(-1) + torch.arange(B, device=dev)
        hd = model.forward_hidden(d_ids.view(bs, M * B), d_pos.view(bs, M * B),
                                  BlockDraftAttend(kv, anchors, B, model.scale), diff=True)
        hd = hd.view(bs, M, B, -1)[:, :, : B - 1].reshape(-1, hd.shape[-1])[sel]
        s_logp = F.log_softmax(model.logits(hd), dim=-1)
    p = t_logp.exp()
    kl = (p * (t_logp - s_logp)).sum(-1)
    loss = (kl * w).sum() / w.sum().clamp(min=1e-9)
    with torch.no_grad():
        acc = (s_logp.argmax(-1) == t_logp.argmax(-1)).float().mean().item() if kl.numel() else 0.0
    return loss, StepStats(loss.item(), acc, int(sel.sum()), int(batch.lengths.sum()))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# =============================================================================================
# Trainer


def trainable_parameters(model: DualViewModel) -> dict[str, torch.nn.Parameter]:
    """The diffusion view: *_diff projections/norms and the mask embedding row, if any."""
    out = {k: p for k, p in model.named_parameters() if any(s in k for s in DIFF_SUFFIXES)}
    if model.model.mask_embedding is not None:
        out["model.mask_embedding"] = model.model.mask_embedding
    return out


@dataclass
class TrainConfig:
    block_size: int
    batch_size: int = 16
    blocks_per_seq: int = 16
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_decay: float = 7.0
    max_steps: int = 1000
    seed: int = 0


class Trainer:
    """Owns the optimizer and the step counter; batches depend only on (seed, step)."""

    def __init__(self, model: DualViewModel, data: DistillData, mask_id: int, cfg: TrainConfig,
                 amp: Optional[torch.dtype] = None):
        if len(data) == 0:
            raise ValueError("no training sequences")
        self.model, self.data, self.mask_id, self.cfg, self.amp = model, data, mask_id, cfg, amp
        self.params = trainable_parameters(model)
        # Master weights of the trained view in float32; the frozen base keeps its dtype.
        for p in self.params.values():
            p.data = p.data.float()
            p.requires_grad_(True)
        dev = model.lm_head.weight.device
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.95),
                                     weight_decay=cfg.weight_decay, eps=1e-8,
                                     fused=dev.type == "cuda")
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        c = self.cfg
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        prog = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))

    def batch_indices(self, step: int) -> list[int]:
        n, bs = len(self.data), self.cfg.batch_size
        out = []
        for g in range(step * bs, (step + 1) * bs):
            epoch, k = divmod(g, n)
            perm = self._perm(epoch)
            out.append(int(perm[k]))
        return out

    _perm_cache: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_033 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.data), generator=g))
        return self._perm_cache[1]

    def make_step_batch(self, step: int) -> Batch:
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + step * 104_729 + 1)
        return make_batch(self.data, self.batch_indices(step), self.cfg.blocks_per_seq, g)

    def train_step(self) -> StepStats:
        self.model.train()
        lr = self.lr_at(self.step_num)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        batch = self.make_step_batch(self.step_num)
        loss, st = distill_loss(self.model, batch, self.cfg.block_size, self.mask_id, self.cfg.loss_decay, self.amp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.opt.step()
        self.step_num += 1
        self.model.eval()
        return st

    @torch.no_grad()
    def evaluate(self, data: DistillData, max_seqs: int = 64) -> StepStats:
        """Loss/accuracy on held-out sequences with fixed anchors (comparable across steps)."""
        n = min(len(data), max_seqs)
        tot_loss, tot_acc, tot_t, ctx = 0.0, 0.0, 0, 0
        for s in range(0, n, self.cfg.batch_size):
            idx = list(range(s, min(n, s + self.cfg.batch_size)))
            g = torch.Generator().manual_seed(12345 + s)
            b = make_batch(data, idx, self.cfg.blocks_per_seq, g)
            _, st = distill_loss(self.model, b, self.cfg.block_size, self.mask_id, self.cfg.loss_decay, self.amp)
            tot_loss += st.loss * st.targets
            tot_acc += st.accuracy * st.targets
            tot_t += st.targets
            ctx += st.context_tokens
        return StepStats(tot_loss / max(tot_t, 1), tot_acc / max(tot_t, 1), tot_t, ctx)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_num, "max_steps": self.cfg.max_steps,
                "params": {k: p.detach().cpu().clone() for k, p in self.params.items()},
                "optimizer": self.opt.state_dict(), "config": dataclasses.asdict(self.cfg)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = set(self.params) - set(sd["params"])
        if missing:
            raise ValueError(f"checkpoint lacks trained weight(s) {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(sd["params"][k])
        self.opt.load_state_dict(sd["optimizer"])
        self.step_num = int(sd["step"])
        self.cfg.max_steps = int(sd["max_steps"])

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never a half-written checkpoint

    def load(self, path: str | os.PathLike) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(sd)


def train(trainer: Trainer, *, out_dir: Optional[Path] = None, val: Optional[DistillData] = None,
          minutes: float = 0.0, calib_skip: int = 3, calib_steps: int = 5, fix_fraction: float = 0.5,
          save_every: int = 200,
          log_every: int = 10, stop_at: int = 0, progress: bool = True,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run to cfg.max_steps (or to step stop_at, if given, leaving the schedule as it is:
    a later --resume continues it).

    With minutes > 0 and no fixed schedule yet (cfg.max_steps <= 0) the schedule's length
    comes from the budget: max_steps is re-estimated from the measured step time after
    every step until fix_fraction of the budget has gone, then fixed. The first
    calib_skip steps (CUDA's one-time set-up) are not timed, and the window restarts when
    the warmup ends (early steps run slower while the allocator's cache fills), so the
    run ends close to the budget, not early."""
    from tqdm import tqdm

    cfg = trainer.cfg
    history: list[dict[str, Any]] = []
    logf = open(out_dir / "train_log.jsonl", "a") if out_dir else None
    t_start = time.monotonic()
    deadline = t_start + minutes * 60 if minutes > 0 else float("inf")
    calibrating = cfg.max_steps <= 0
    if calibrating:
        if minutes <= 0:
            raise ValueError("give max_steps or a time budget in minutes")
        if trainer.step_num + calib_skip + calib_steps >= cfg.warmup_steps:
            raise ValueError(f"a time-budgeted schedule is measured during the warmup: warmup_steps must exceed "
                             f"{calib_skip + calib_steps}")
    bar = tqdm(total=cfg.max_steps if cfg.max_steps > 0 else None, initial=trainer.step_num, desc="distilling",
               unit="step", disable=not progress, dynamic_ncols=True)
    t_last, targets_since, ctx_since = time.monotonic(), 0, 0
    n_run, n_calib = 0, 0
    t_calib = t_start
    while cfg.max_steps <= 0 or trainer.step_num < cfg.max_steps or calibrating:
        if time.monotonic() > deadline:
            log(f"time budget reached at step {trainer.step_num}")
            break
        if stop_at and trainer.step_num >= stop_at:
            log(f"stopping at step {trainer.step_num} (--stop-at-step)")
            break
        st = trainer.train_step()
        n_run += 1
        targets_since += st.targets
        ctx_since += st.context_tokens
        if calibrating:
            now = time.monotonic()
            if n_run == calib_skip or trainer.step_num == cfg.warmup_steps:
                t_calib, n_calib = now, n_run  # (re)start the timing window
            elif n_run - n_calib >= calib_steps:
                per = (now - t_calib) / (n_run - n_calib)
                cfg.max_steps = trainer.step_num + max(1, int((deadline - now) * 0.98 / per))
                bar.total = cfg.max_steps
                if trainer.step_num >= cfg.warmup_steps and now - t_start >= fix_fraction * minutes * 60:
                    calibrating = False
                    log(f"schedule fixed at step {trainer.step_num}: {per * 1000:.0f} ms/step -> "
                        f"max_steps {cfg.max_steps}")
        if trainer.step_num % log_every == 0 or trainer.step_num == cfg.max_steps:
            now = time.monotonic()
            rate = targets_since / max(now - t_last, 1e-9)
            rec = {"step": trainer.step_num, "loss": round(st.loss, 5), "acc": round(st.accuracy, 4),
                   "lr": trainer.lr_at(trainer.step_num - 1), "target_tok_s": round(rate),
                   "context_tok_s": round(ctx_since / max(now - t_last, 1e-9)),
                   "elapsed_s": round(now - t_start, 1)}
            history.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            t_last, targets_since, ctx_since = now, 0, 0
            bar.set_postfix(loss=f"{st.loss:.3f}", acc=f"{st.accuracy:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if out_dir and save_every > 0 and trainer.step_num % save_every == 0:
            trainer.save(out_dir / CHECKPOINT_NAME)
    bar.close()
    if out_dir:
        trainer.save(out_dir / CHECKPOINT_NAME)
    if val is not None and len(val):
        vs = trainer.evaluate(val)
        rec = {"step": trainer.step_num, "val_loss": round(vs.loss, 5), "val_acc": round(vs.accuracy, 4)}
        history.append(rec)
        if logf:
            logf.write(json.dumps(rec) + "\n")
        log(f"held-out: loss {vs.loss:.4f}, top-1 agreement {vs.accuracy:.4f} ({vs.targets} targets)")
    if logf:
        logf.close()
    return history


# =============================================================================================
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="base: Qwen3/Llama folder, .gguf, or the embedded default")
    g.add_argument("--init", default="ar-copy",
                   help="starting diffusion view: 'ar-copy' (the paper's warm start) or a diffusion-view file")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage of the frozen base (compute runs in bfloat16 autocast on CUDA)")
    g.add_argument("--block-size", type=int, default=None, help="draft block size B (default: the model's)")
    g = p.add_argument_group("data")
    g.add_argument("--out", required=True, help="folder for data, checkpoints, logs and the trained view")
    g.add_argument("--data", default=None, help="distillation data file (default OUT/data.safetensors; made if missing)")
    g.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help=".jsonl(.gz) with 'prompt'/'messages', or .txt")
    g.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    g.add_argument("--gen-seconds", type=float, default=0.0, help="stop generating after this long (0: no limit)")
    g.add_argument("--gen-max-prompt-tokens", type=int, default=256)
    g.add_argument("--gen-max-new-tokens", type=int, default=320)
    g.add_argument("--gen-greedy-fraction", type=float, default=0.5)
    g.add_argument("--gen-temperature", type=float, default=0.8)
    g.add_argument("--gen-top-p", type=float, default=0.95)
    g.add_argument("--gen-max-num-seqs", type=int, default=256)
    g.add_argument("--data-only", action="store_true", help="stop after making the data")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    g.add_argument("--blocks-per-seq", type=int, default=16, help="draft blocks per sequence per step")
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--loss-decay", type=float, default=7.0,
                   help="weight block row i by exp(-i/decay) (0: uniform)")
    g.add_argument("--max-steps", type=int, default=0, help="schedule length (0: from --train-minutes)")
    g.add_argument("--train-minutes", type=float, default=0.0, help="time budget (sets max-steps when it is 0)")
    g.add_argument("--val-fraction", type=float, default=0.02)
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    g.add_argument("--stop-at-step", type=int, default=0,
                   help="end this run at that step, schedule unchanged (continue later with --resume)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("export")
    g.add_argument("--export", default=None, help="trained view file (default OUT/diffusion-view.safetensors)")
    g.add_argument("--quantize", choices=["int8", "none"], default="int8",
                   help="int8: per-row symmetric int8 weights (about half the bfloat16 size)")


def _validate(args: argparse.Namespace) -> Optional[str]:
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.blocks_per_seq >= 1, "--blocks-per-seq must be >= 1"),
        (args.lr > 0, "--lr must be > 0"),
        (0 <= args.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
        (args.warmup_steps >= 1, "--warmup-steps must be >= 1"),
        (args.max_steps >= 0 and args.train_minutes >= 0, "--max-steps and --train-minutes must be >= 0"),
        (0 <= args.gen_greedy_fraction <= 1, "--gen-greedy-fraction must be in [0, 1]"),
        (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (args.block_size is None or args.block_size >= 2, "--block-size must be >= 2"),
    ]
    for ok, msg in checks:
        if not ok:
            return msg
    if not args.data_only and args.max_steps == 0 and args.train_minutes == 0:
        return "give --max-steps or --train-minutes"
    return None


def load_for_distill(args: argparse.Namespace):
    from orthrus_runtime.model.loader import load_model

    init = None if args.init == "ar-copy" else args.init
    return load_model(args.model, args.dtype, args.device, args.block_size, None, init)


def run(args: argparse.Namespace) -> int:
    err = _validate(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:  # bad model, prompts, data or checkpoint (CheckpointError too)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_path = Path(args.data) if args.data else out / "data.safetensors"
    loaded = load_for_distill(args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    dev = loaded.model.lm_head.weight.device
    amp = torch.bfloat16 if dev.type == "cuda" else None

    if data_path.exists():
        data = DistillData.load(data_path)
        log(f"data: {len(data)} sequences, {data.response_tokens} response tokens from {data_path}")
    else:
        prompts = load_prompts(args.prompts)
        if args.num_prompts:
            prompts = prompts[: args.num_prompts]
        data = generate_data(loaded, prompts, max_prompt_tokens=args.gen_max_prompt_tokens,
                             max_new_tokens=args.gen_max_new_tokens, greedy_fraction=args.gen_greedy_fraction,
                             temperature=args.gen_temperature, top_p=args.gen_top_p, seconds=args.gen_seconds,
                             max_num_seqs=args.gen_max_num_seqs, seed=args.seed, progress=not args.no_progress)
        data.save(data_path)
        log(f"data: {len(data)} sequences, {data.response_tokens} response tokens in "
            f"{data.meta['seconds']}s -> {data_path}")
    if args.data_only:
        return 0

    train_data, val_data = data.split(args.val_fraction)
    cfg = TrainConfig(block_size=loaded.block_size, batch_size=args.batch_size, blocks_per_seq=args.blocks_per_seq,
                      lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, loss_decay=args.loss_decay,
                      max_steps=args.max_steps, seed=args.seed)
    trainer = Trainer(loaded.model, train_data, loaded.mask_token_id, cfg, amp)
    ckpt = out / CHECKPOINT_NAME
    if args.resume:
        if not ckpt.exists():
            print(f"error: --resume: {ckpt} not found", file=sys.stderr)
            return 2
        trainer.load(ckpt)
        log(f"resumed at step {trainer.step_num} of {trainer.cfg.max_steps}")
    t0 = time.monotonic()
    train(trainer, out_dir=out, val=val_data, minutes=args.train_minutes, save_every=args.save_every,
          log_every=args.log_every, stop_at=args.stop_at_step, progress=not args.no_progress, log=log)
    minutes = (time.monotonic() - t0) / 60
    export = Path(args.export) if args.export else out / "diffusion-view.safetensors"
    meta = {"trained_steps": str(trainer.step_num), "train_minutes": f"{minutes:.2f}",
            "train_sequences": str(len(train_data)), "train_response_tokens": str(train_data.response_tokens),
            "base_model": loaded.model_id}
    save_diffusion_view(loaded.model, export, loaded.block_size, loaded.mask_token_id, extra_metadata=meta,
                        quantize=None if args.quantize == "none" else args.quantize)
    log(f"wrote {export} ({export.stat().st_size / 1e6:.1f} MB)")
    return 0
