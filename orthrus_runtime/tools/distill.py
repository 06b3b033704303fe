"""`orthrus distill`: train the diffusion view of a frozen base model by self-distillation.

Only the diffusion projections (q/k/v/o_proj_diff, plus q/k_norm_diff on Qwen3)
and the diffusion view's mask embedding row, if the model has one, are trained;
embeddings, MLPs, norms, lm_head and the AR projections stay frozen, so the AR
view, and with it every output the engine emits, is unchanged.

1. Data (self-distilled): prompts (default: orthrus_runtime/data/distill_prompts.jsonl.gz,
   chat, code and math 1:1:1) are answered by the base model itself through this engine
   in AR mode at large batch, a mix of greedy and sampled responses (later passes over the
   prompts sample only). Responses are written as numbered data shards while they come;
   an interrupted or budget-limited generation continues with --resume (each response is
   keyed by its prompt-stream id, so nothing is asked twice).
2. Training (defaults: the paper's recipe): for each sequence, the AR view runs once over
   the whole text (no gradient) giving the clean K/V of every layer and the AR next-token
   distribution at every position. Blocks [x_a, MASK x (B-1)] at random anchors a inside
   the response are then drafted in one diffusion pass, many blocks per sequence: every
   block sees the clean K/V strictly before its anchor plus its own block
   (bidirectional), exactly what the engine's draft pass sees. Block row i is trained
   towards the AR distribution of the token after position a+i with the forward KL,
   KL(p_AR || q_draft), every masked row alike (or weighted towards early rows).
   AdamW (0.9, 0.95), linear warmup then cosine decay to a floor, bfloat16 autocast on
   CUDA; the schedule's length comes from --epochs, --max-steps or a time budget;
   checkpoints (weights, optimizer state, totals) resume bit-for-bit (batches and
   anchors are a function of seed and step).
3. Export: the trained view as one diffusion-view file (int8 per-row weights by
   default) that `load_model` lays over the base, with its totals and recipe in the
   safetensors metadata (tokens_seen, train_minutes, recipe, ...).
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

from orthrus_runtime.defaults import BATCH_BUCKETS
from orthrus_runtime.model.loader import DATA_DIR, DIFF_SUFFIXES, save_diffusion_view
from orthrus_runtime.model.dual_view import DualViewModel

DEFAULT_PROMPTS = DATA_DIR / "distill_prompts.jsonl.gz"
DATA_FORMAT = "orthrus-distill-data-v1"
CHECKPOINT_NAME = "checkpoint.pt"
SHARD_PREFIX = "shard-"
# Sequences the engine answers at once: the largest batch its decode CUDA graphs are captured
# for (larger batches decode eager). Measured on an H100: 10.3k response tokens/s at 128
# against 9.4k at 384 (bfloat16, 2026-12-07).
GEN_MAX_NUM_SEQS = max(BATCH_BUCKETS)


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
    tokens[offsets[i]:offsets[i+1]], its first prompt_lens[i] ids being the prompt;
    uids[i] is the prompt-stream id that made it (see PromptStream); greedy[i] says
    whether its response is the base model's greedy answer (False: sampled, or not known
    for shards written before the flag existed)."""

    tokens: torch.Tensor  # int32 [total]
    offsets: torch.Tensor  # int64 [n + 1]
    prompt_lens: torch.Tensor  # int32 [n]
    uids: torch.Tensor  # int64 [n]
    meta: dict[str, str] = dataclasses.field(default_factory=dict)
    greedy: Optional[torch.Tensor] = None  # bool [n]; None: all False

    def __post_init__(self):
        if self.greedy is None:
            self.greedy = torch.zeros(self.prompt_lens.numel(), dtype=torch.bool)

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
    def from_sequences(cls, seqs: list[tuple[list[int], list[int]]], meta: Optional[dict[str, str]] = None,
                       uids: Optional[list[int]] = None, greedy: Optional[list[bool]] = None):
        """seqs: [(prompt ids, response ids)]; uids default to 0..n-1, greedy to all False."""
        flat: list[int] = []
        offsets = [0]
        plens = []
        for p, r in seqs:
            flat += p + r
            offsets.append(len(flat))
            plens.append(len(p))
        return cls(torch.tensor(flat, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64),
                   torch.tensor(plens, dtype=torch.int32),
                   torch.tensor(uids if uids is not None else range(len(seqs)), dtype=torch.int64), dict(meta or {}),
                   torch.tensor(greedy, dtype=torch.bool) if greedy is not None else None)

    @classmethod
    def concat(cls, parts: list["DistillData"]) -> "DistillData":
        parts = [d for d in parts if len(d)]
        if not parts:
            return cls.from_sequences([])
        shift = torch.tensor([0] + [int(d.offsets[-1]) for d in parts[:-1]]).cumsum(0)
        offsets = torch.cat([parts[0].offsets[:1]] + [d.offsets[1:] + s for d, s in zip(parts, shift)])
        out = cls(torch.cat([d.tokens for d in parts]), offsets, torch.cat([d.prompt_lens for d in parts]),
                  torch.cat([d.uids for d in parts]), dict(parts[0].meta), torch.cat([d.greedy for d in parts]))
        out.meta["response_tokens"] = str(out.response_tokens)
        return out

    def split(self, fraction: float, prompts: int = 0) -> tuple["DistillData", "DistillData"]:
        """(train, held-out): sequences whose prompt index (uid modulo prompts, the stream's
        prompts per pass; 0: the uid itself) is a multiple of round(1 / fraction) are held
        out, so the held-out set stays the same as shards are added, and a held-out prompt's
        later answers (passes after the first) are held out too; at least one is held out
        when fraction > 0 and there are two or more sequences."""
        n = len(self)
        if fraction <= 0 or n < 2:
            return self, self.subset([])
        every = max(2, round(1 / fraction))
        index = self.uids % prompts if prompts > 0 else self.uids
        held = (index % every == 0).nonzero().flatten().tolist() or [n - 1]
        hs = set(held)
        return self.subset([i for i in range(n) if i not in hs]), self.subset(held)

    def subset(self, idx: Iterable[int]) -> "DistillData":
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        lens = self.lengths()[idx]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        if idx.numel():
            starts = self.offsets[idx]
            pos = torch.arange(int(offsets[-1])) - offsets[:-1].repeat_interleave(lens) + starts.repeat_interleave(lens)
            tokens = self.tokens[pos]
        else:
            tokens = self.tokens[:0]
        return DistillData(tokens, offsets, self.prompt_lens[idx], self.uids[idx], dict(self.meta), self.greedy[idx])

    def first_of_each_uid(self) -> "DistillData":
        """Each uid's first sequence: a command that failed after writing its answers leaves
        them to be answered again by the next one."""
        seen: set[int] = set()
        keep = [i for i, u in enumerate(self.uids.tolist()) if not (u in seen or seen.add(u))]
        return self if len(keep) == len(self) else self.subset(keep)

    def greedy_only(self) -> "DistillData":
        """The sequences whose response is a greedy answer."""
        return self.subset(self.greedy.nonzero().flatten().tolist())

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        meta = {"format": DATA_FORMAT, **{k: str(v) for k, v in self.meta.items()}}
        tmp = Path(str(path) + ".tmp")
        save_file({"tokens": self.tokens.contiguous(), "offsets": self.offsets.contiguous(),
                   "prompt_lens": self.prompt_lens.contiguous(), "uids": self.uids.contiguous(),
                   "greedy": self.greedy.contiguous()}, str(tmp),
                  metadata=meta)
        os.replace(tmp, path)  # a shard is there whole or not at all

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
            missing = {"tokens", "offsets", "prompt_lens", "uids"} - set(f.keys())
            if missing:
                raise ValueError(f"{p}: missing tensor(s) {sorted(missing)}")
            t = {k: f.get_tensor(k) for k in ("tokens", "offsets", "prompt_lens", "uids")}
            greedy = f.get_tensor("greedy") if "greedy" in f.keys() else None  # older shards: not recorded
        meta.pop("format")
        return cls(t["tokens"], t["offsets"], t["prompt_lens"], t["uids"], meta, greedy)


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).glob(f"{SHARD_PREFIX}*.safetensors"))


def load_shards(folder: str | os.PathLike) -> DistillData:
    """Every shard in folder, in name order, as one data set (empty if there are none)."""
    return DistillData.concat([DistillData.load(p) for p in shard_paths(folder)])


class ShardWriter:
    """Writes finished responses as numbered shards (shard-00000.safetensors, ...) in folder,
    continuing after the shards already there."""

    def __init__(self, folder: str | os.PathLike, meta: Optional[dict[str, str]] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        have = shard_paths(self.folder)
        self.next = int(have[-1].stem[len(SHARD_PREFIX):]) + 1 if have else 0
        self.meta = dict(meta or {})

    def __call__(self, data: DistillData) -> Path:
        data.meta.update(self.meta)
        p = self.folder / f"{SHARD_PREFIX}{self.next:05d}.safetensors"
        data.save(p)
        self.next += 1
        return p


@dataclass
class StreamItem:
    uid: int
    prompt_ids: list[int]
    greedy: bool
    seed: int


class PromptStream:
    """The generation work list: item uid = pass * len(prompts) + i asks prompt i again.

    Pass 0 answers greedy_fraction of the prompts greedily (interleaved), later passes
    only sample (a greedy answer would repeat pass 0's). Prompts longer than
    max_prompt_tokens are skipped. Items are a function of (uid, seed) alone, so a run
    that stops can continue later by skipping the uids it has."""

    def __init__(self, tokenizer: Any, prompts: list[list[dict[str, str]]], *, passes: int = 1,
                 greedy_fraction: float = 0.5, max_prompt_tokens: int = 256, seed: int = 0):
        if not prompts:
            raise ValueError("no prompts")
        self.tokenizer, self.prompts, self.passes = tokenizer, prompts, passes
        self.greedy_fraction, self.max_prompt_tokens, self.seed = greedy_fraction, max_prompt_tokens, seed
        self._cache: dict[int, Optional[list[int]]] = {}

    def __len__(self) -> int:
        return self.passes * len(self.prompts)

    def _ids(self, i: int) -> Optional[list[int]]:
        if i not in self._cache:
            ids = encode_prompt(self.tokenizer, self.prompts[i])
            self._cache[i] = ids if 0 < len(ids) <= self.max_prompt_tokens else None
        return self._cache[i]

    def item(self, uid: int) -> Optional[StreamItem]:
        ps, i = divmod(uid, len(self.prompts))
        ids = self._ids(i)
        if ids is None:
            return None
        f = self.greedy_fraction
        greedy = ps == 0 and math.floor((i + 1) * f) > math.floor(i * f)  # greedy_fraction of them, spread out
        return StreamItem(uid, ids, greedy, self.seed * 1_000_003 + uid)

    def items(self, start: int = 0, skip: Optional[set[int]] = None):
        for uid in range(start, len(self)):
            if skip and uid in skip:
                continue
            it = self.item(uid)
            if it is not None:
                yield it


def resume_skip(data: "DistillData", skip: Iterable[int] = ()) -> tuple[int, list[int]]:
    """(start, skip) for the call after generate_data returned data (called with skip):
    it starts at the first prompt dropped at the deadline and skips those answered past it."""
    start = int(data.meta["resume_uid"])
    return start, sorted(u for u in set(skip) | set(data.uids.tolist()) if u >= start)


def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def generate_data(loaded: Any, stream: PromptStream, *, start: int = 0, skip: Optional[set[int]] = None,
                  max_new_tokens: int = 320, temperature: float = 0.8, top_p: float = 0.95, seconds: float = 0.0,
                  max_num_seqs: int = GEN_MAX_NUM_SEQS, max_num_batched_tokens: int = 8192, min_response_tokens: int = 16,
                  shard_seconds: float = 0.0, on_shard: Optional[Callable[[DistillData], Any]] = None,
                  kv_cache_bytes: Optional[int] = None, max_prompts: int = 0,
                  log_every_s: float = 10.0, log: Callable[[str], None] = print) -> DistillData:
    """Answer the stream's prompts (from uid start, skipping uids in skip) with the base
    model through the engine in AR mode, keeping the engine's queue full.

    With seconds > 0 generation stops at that deadline; responses cut there are kept
    when they have min_response_tokens (a cut response is still text the model wrote).
    With on_shard, finished responses are handed over every shard_seconds (and at the
    end) as they come, so an interrupted run keeps them. Returns all of them; meta
    "next_uid" is the first uid not yet submitted, "resume_uid" the first one submitted but
    dropped at the deadline (else next_uid): a later call that starts there, skipping the
    uids answered (resume_skip), loses no prompt. kv_cache_bytes: the KV cache on a CPU
    (default 256 MiB: about 14 SmolLM2 answers at once; a batch of 128 needs about 4 GB,
    else the scheduler keeps most of it waiting); on CUDA the engine sizes it. max_prompts > 0:
    ask at most that many prompts, then finish their answers (meta "complete" stays False)."""
    from orthrus_runtime.engine.setup import engine_config_from_args
    from orthrus_runtime.engine.llm_engine import LLMEngine
    from orthrus_runtime.engine.args import EngineArgs
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    tok = loaded.tokenizer
    if tok is None:
        raise ValueError("self-distillation needs the model's tokenizer")
    dev = loaded.model.lm_head.weight.device
    eargs = EngineArgs(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       max_model_len=stream.max_prompt_tokens + max_new_tokens + 1, seed=stream.seed,
                       kv_cache_bytes=None if dev.type == "cuda" else kv_cache_bytes or 256 * 2**20)
    # No tokenizer inside the engine: ids in, ids out, no per-token detokenizing.
    engine = LLMEngine(loaded.model, engine_config_from_args(eargs, loaded), tokenizer=None)
    stop_ids = [int(tok.eos_token_id)] if tok.eos_token_id is not None else []
    items = stream.items(start, skip)
    live: dict[str, tuple[StreamItem, list[int]]] = {}
    finished: list[tuple[StreamItem, list[int]]] = []  # (item, response) not yet handed over
    kept: list[DistillData] = []
    next_uid, exhausted = start, False
    total_items = max(1, len(stream) - start - len(skip or ()))
    if max_prompts > 0:
        total_items = min(total_items, max_prompts)
    t0 = time.monotonic()
    deadline = t0 + seconds if seconds > 0 else float("inf")
    t_log = t_shard = t0
    n_tokens = n_done = n_asked = 0

    def refill() -> None:
        nonlocal next_uid, exhausted, n_asked
        while not exhausted and len(live) < 2 * max_num_seqs and (max_prompts <= 0 or n_asked < max_prompts):
            it = next(items, None)
            if it is None:
                exhausted = True
                next_uid = len(stream)
                return
            params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0 if it.greedy else temperature,
                                    top_p=1.0 if it.greedy else top_p, seed=None if it.greedy else it.seed,
                                    stop_token_ids=stop_ids)
            rid = engine.add_request(GenerateRequest(prompt_token_ids=it.prompt_ids, params=params, mode="ar",
                                                     request_id=f"u{it.uid}"))
            live[rid] = (it, [])
            next_uid = it.uid + 1
            n_asked += 1

    def hand_over() -> None:
        if not finished:
            return
        d = DistillData.from_sequences([(it.prompt_ids, r) for it, r in finished], uids=[it.uid for it, _ in finished],
                                       greedy=[it.greedy for it, _ in finished])
        finished.clear()
        kept.append(d)
        if on_shard is not None:
            on_shard(d)

    refill()
    while engine.has_work() and time.monotonic() < deadline:
        for d in engine.step():
            it, out = live[d.request_id]
            out += d.token_ids
            n_tokens += len(d.token_ids)
            if d.finished:
                del live[d.request_id]
                n_done += 1
                if len(out) >= 2:
                    finished.append((it, out))
        refill()
        now = time.monotonic()
        if on_shard is not None and shard_seconds > 0 and now - t_shard >= shard_seconds:
            hand_over()
            t_shard = now
        if log_every_s > 0 and now - t_log >= log_every_s:
            el = now - t0
            eta = min(deadline - now, (total_items - n_done) * el / max(n_done, 1))
            log(f"generate: {n_done} responses ({100 * n_done / total_items:.1f} % of the stream), {n_tokens} tokens, "
                f"{n_tokens / el:.0f} tok/s, {_fmt_s(el)} elapsed, ETA {_fmt_s(eta)}"
                + (" (budget)" if eta == deadline - now else ""))
            t_log = now
    complete = exhausted and not live
    dropped: list[int] = []  # uids cut at the deadline with too little written: not answered
    for rid in list(live):  # the deadline: keep what was written so far
        it, out = live.pop(rid)
        d = engine.abort(rid)
        if d is not None:
            out += d.token_ids
        if len(out) >= min_response_tokens:
            finished.append((it, out))
        else:
            dropped.append(it.uid)
    hand_over()
    el = time.monotonic() - t0
    # The engine holds reference cycles (scheduler -> bound method -> engine): collect them
    # so its KV cache goes back to the allocator before training needs the memory.
    del engine
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    data = DistillData.concat(kept)
    data.meta.update({"model": loaded.model_id, "responses": str(len(data)), "seconds": f"{el:.1f}",
                      "next_uid": str(next_uid), "complete": str(complete),
                      # where a later call resumes without losing the prompts dropped at the deadline
                      # (the answers kept past it are then skipped: resume_skip)
                      "resume_uid": str(min(dropped, default=next_uid)),
                      "max_new_tokens": str(max_new_tokens), "greedy_fraction": str(stream.greedy_fraction),
                      "temperature": str(temperature), "top_p": str(top_p), "response_tokens": str(data.response_tokens)})
    log(f"generate: {len(data)} responses, {data.response_tokens} response tokens in {_fmt_s(el)} "
        f"({data.response_tokens / max(el, 1e-9):.0f} tok/s)")
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
               pad_id: int = 0, pad_to: int = 64) -> Batch:
    """Pad sequences idx and draw up to blocks_per_seq distinct anchors in each response.

    An anchor is a response token at position a with a + 1 < length (at least one target):
    the engine's first anchor is the first response token, whose K/V are not cached yet.
    The padded length is a multiple of pad_to: a handful of shapes instead of one per
    length, so that cuDNN's attention plans (built once a shape, in each process) and the
    allocator's blocks are reused from the first steps on (a command's first minute ran at
    twice the steady step time on an H100, 2026-12-07). Padding is never attended: the
    teacher is causal and a block sees only positions before its anchor."""
    seqs = [data.sequence(i).long() for i in idx]
    N = -(-max(s.numel() for s in seqs) // pad_to) * pad_to
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


def draft_blocks(model: DualViewModel, ids: torch.Tensor, anchors: torch.Tensor,
                 teacher_kv: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, mask_id: int,
                 forward: Optional[Callable[..., torch.Tensor]] = None) -> torch.Tensor:
    """The diffusion pass over blocks [x_a, MASK x (B-1)] at anchors [bs, M] of the sequences
    ids [bs, N], each block seeing the clean K/V before its anchor: hidden [bs, M, B, D].
    forward: model.forward_hidden, or a compiled copy of it (Trainer's compile)."""
    bs, M = anchors.shape
    B = block_size
    d_ids = torch.full((bs, M, B), mask_id, dtype=torch.long, device=ids.device)
    d_ids[:, :, 0] = ids.gather(1, anchors)
    d_pos = anchors.unsqueeze(-1) + torch.arange(B, device=ids.device)
    hd = (forward or model.forward_hidden)(d_ids.view(bs, M * B), d_pos.view(bs, M * B),
                                           BlockDraftAttend(teacher_kv, anchors, B, model.scale), diff=True)
    return hd.view(bs, M, B, -1)


@dataclass
class StepStats:
    loss: float
    accuracy: float  # top-1 draft == top-1 AR, over target rows
    targets: int
    context_tokens: int


def kl_rows(t_logits: torch.Tensor, s_logits: torch.Tensor,
            coef: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of float32 logits [R, V] (teacher t, draft s) and row coefficients [R] ->
    KL(p_t || q_s) [R], whether the two argmaxes agree [R], and the loss's gradient with
    respect to s_logits [R, V] when the loss is sum(coef * KL): coef * (softmax(s) - p_t)
    (the log-softmax's backward with sum(p_t) = 1). Element-wise work and row reductions
    only, which Trainer's compile fuses."""
    t = F.log_softmax(t_logits, dim=-1)
    s = F.log_softmax(s_logits, dim=-1)
    p = t.exp()
    kl = (p * (t - s)).sum(-1)
    agree = s.argmax(-1) == t.argmax(-1)
    return kl, agree, (s.exp() - p) * coef.unsqueeze(-1)


class BlockKL(torch.autograd.Function):
    """sum_r w_r KL(p_AR,r || q_draft,r) / sum_r w_r from the rows' final hidden states,
    computed `chunk` rows at a time (KL_CHUNK_ROWS in distill_loss): the [rows, vocab] logits (3 GB each in float32
    for a SmolLM2 batch of 15k target rows) never exist whole, and the gradient with
    respect to the draft's hidden states is formed in the same pass and kept ([rows,
    hidden], small) for backward. Under autocast the head's matmuls run in its dtype, as
    model.logits does, the gradient's matmul included."""

    @staticmethod
    def forward(ctx, s_h: torch.Tensor, t_h: torch.Tensor, w: torch.Tensor, model: DualViewModel,
                rows_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], chunk: int):
        # s_h, t_h [R, D] draft / AR final hidden states; w [R] row weights
        R = s_h.shape[0]
        coef = w / w.sum().clamp(min=1e-9)
        kl = torch.zeros(R, device=s_h.device)
        agree = torch.zeros(R, dtype=torch.bool, device=s_h.device)
        grad = torch.empty_like(s_h)
        head: Optional[torch.Tensor] = None  # the head's weight in the logits' matmul dtype, cast once
        for c in range(0, R, chunk):
            e = min(R, c + chunk)
            t_logits = model.logits(t_h[c:e])
            raw = model.lm_head(s_h[c:e])  # the head's dtype under autocast (model.logits before .float())
            kl[c:e], agree[c:e], g = rows_fn(t_logits, raw.float(), coef[c:e])
            if head is None:
                head = model.lm_head.weight.to(raw.dtype)
            grad[c:e] = (g.to(raw.dtype) @ head).to(grad.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(agree)
        return (kl * coef).sum(), agree

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, _g_agree: Optional[torch.Tensor]):
        (grad,) = ctx.saved_tensors
        return g_loss * grad, None, None, None, None, None


KL_CHUNK_ROWS = 4096  # 800 MB of float32 logits a chunk on SmolLM2's 49k vocabulary


def distill_loss(model: DualViewModel, batch: Batch, block_size: int, mask_id: int, decay: float = 0.0,
                 amp: Optional[torch.dtype] = None,
                 forward: Optional[Callable[..., torch.Tensor]] = None,
                 rows_fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = kl_rows,
                 chunk_rows: int = KL_CHUNK_ROWS) -> tuple[torch.Tensor, StepStats]:
    """Forward KL(p_AR || q_draft) over every target row of every block of the batch.
    forward: how both passes run the layers (default model.forward_hidden); rows_fn: the
    KL's element-wise part (kl_rows, or a compiled copy of it)."""
    forward = forward or model.forward_hidden
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
        h = forward(ids, pos, teacher, diff=False)
        th = h.gather(1, tpos.clamp(max=N - 1).reshape(bs, -1, 1).expand(-1, -1, h.shape[-1]))
        t_h = th.reshape(-1, h.shape[-1])[sel]  # [R, D]
        kv = [(k.detach(), v.detach()) for k, v in teacher.kv]
        del teacher, h, th

    with autocast:
        hd = draft_blocks(model, ids, anchors, kv, B, mask_id, forward)[:, :, : B - 1]
        loss, agree = BlockKL.apply(hd.reshape(-1, hd.shape[-1])[sel], t_h, w, model, rows_fn, chunk_rows)
    acc = agree.float().mean().item() if agree.numel() else 0.0
    return loss, StepStats(loss.item(), acc, int(sel.sum()), int(batch.lengths.sum()))


@dataclass
class CycleStats:
    """Greedy decode cycles replayed on greedy answers (see greedy_cycles)."""

    tokens_per_cycle: float  # 1 + accepted drafts per cycle, as eval-acceptance counts it
    acceptance_by_position: list[float]  # share of cycles whose draft row i was accepted
    cycles: int
    sequences: int

    def report(self) -> dict[str, Any]:
        """Rounded, for JSON results."""
        return {"tokens_per_cycle": round(self.tokens_per_cycle, 4),
                "acceptance_by_position": [round(x, 4) for x in self.acceptance_by_position],
                "cycles": self.cycles, "sequences": self.sequences}


def replay_cycles(accepted_at: list[int], response_len: int) -> tuple[int, int, list[int]]:
    """Greedy Orthrus decoding of a response whose every token is the AR view's greedy
    choice: accepted_at[j] is how many leading draft rows of a block anchored at response
    token j match the response (what verification accepts there). Token 0 comes from
    prefill; each cycle at anchor j emits its accepted drafts plus the AR token after them
    (k + 1, fewer at the end) and the next cycle is anchored at the last token emitted.
    Returns (cycles, accepted drafts, cycles accepting row i for each row)."""
    j, cycles, accepted = 0, 0, 0
    rows = [0] * (max(accepted_at) if accepted_at else 0)
    while j < response_len - 1:
        k = min(accepted_at[j], response_len - 1 - j - 1)  # the last token left is the AR token
        cycles += 1
        accepted += k
        for i in range(k):
            rows[i] += 1
        j += k + 1
    return cycles, accepted, rows


@torch.no_grad()
def greedy_cycles(model: DualViewModel, data: DistillData, block_size: int, mask_id: int,
                  amp: Optional[torch.dtype] = None, max_seqs: int = 64, seqs_per_pass: int = 8,
                  anchors_per_pass: int = 64) -> CycleStats:
    """Tokens per cycle that greedy Orthrus decoding would reach on the greedy answers of
    `data` (the first max_seqs of them), without decoding: a greedy answer is the path
    greedy decoding takes, so drafting a block at every response token (teacher-forced,
    the batched pass training uses) tells how many rows verification would accept there,
    and replay_cycles walks the cycles. Up to bfloat16 near-ties this is what
    `orthrus eval-acceptance` measures on those prompts, but for the last cycle of an
    answer that ends at a stop token: the engine also counts drafts that verification
    accepted past the stop, which the answer cannot show (so the replay is at most the
    engine's count). It needs no engine, so it is cheap enough to compare training
    recipes on held-out answers (never the eval sets)."""
    dev = model.lm_head.weight.device
    B = block_size
    autocast = torch.autocast(dev.type, dtype=amp) if amp is not None else _null()
    g = data.greedy_only()
    n = min(len(g), max_seqs)
    cycles = accepted = 0
    rows = [0] * (B - 1)
    for s0 in range(0, n, seqs_per_pass):
        idx = list(range(s0, min(n, s0 + seqs_per_pass)))
        seqs = [g.sequence(i).long() for i in idx]
        plens = [int(g.prompt_lens[i]) for i in idx]
        N = max(x.numel() for x in seqs)
        ids = torch.zeros(len(idx), N, dtype=torch.long)
        for b, x in enumerate(seqs):
            ids[b, : x.numel()] = x
        ids = ids.to(dev)
        bs = len(idx)
        with autocast:
            teacher = TeacherAttend(model.scale)
            model.forward_hidden(ids, torch.arange(N, device=dev).expand(bs, N), teacher, diff=False)
        n_anchor = [x.numel() - 1 - p for x, p in zip(seqs, plens)]  # anchors: response tokens but the last
        hits = [torch.zeros(max(c, 0), B - 1, dtype=torch.bool) for c in n_anchor]
        for c0 in range(0, max(n_anchor), anchors_per_pass):
            off = torch.arange(c0, c0 + anchors_per_pass)
            valid = off.view(1, -1) < torch.tensor(n_anchor).view(-1, 1)  # [bs, G]
            anchors = (torch.tensor(plens).view(-1, 1) + torch.where(valid, off.view(1, -1), 0)).to(dev)
            G = anchors.shape[1]
            with autocast:
                hd = draft_blocks(model, ids, anchors, teacher.kv, B, mask_id)
                draft = model.logits(hd[:, :, : B - 1]).argmax(-1)  # [bs, G, B-1]
            tpos = (anchors.unsqueeze(-1) + torch.arange(1, B, device=dev)).clamp(max=N - 1)  # what row i predicts
            hit = (draft == ids.gather(1, tpos.view(bs, -1)).view(bs, G, B - 1)).cpu()
            for b in range(bs):
                m = int(valid[b].sum())
                hits[b][c0 : c0 + m] = hit[b, :m]
        for b, h in enumerate(hits):
            # Leading matches per anchor (rows past the response's end never count: replay caps them).
            k = h.to(torch.int64).cumprod(dim=1).sum(dim=1).tolist()
            c, a, r = replay_cycles(k, n_anchor[b] + 1)
            cycles += c
            accepted += a
            for i, v in enumerate(r):
                rows[i] += v
        del teacher
    return CycleStats(1 + accepted / max(cycles, 1), [v / max(cycles, 1) for v in rows], cycles, n)


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
    """Defaults: the paper's recipe (lr 2e-4, 5 % warmup, cosine to a 10 % floor, AdamW
    0.9/0.95, no weight decay, forward KL), except that block row i weighs exp(-i/3):
    a later row only counts when every row before it is accepted, and on SmolLM2 this
    drafted more tokens per cycle than rows weighted alike (docs/distillation.md)."""

    block_size: int
    batch_size: int = 32
    blocks_per_seq: int = 32
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # 0: warmup_fraction of max_steps
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_decay: float = 3.0
    max_steps: int = 1000
    seed: int = 0
    # Steps of a linear ramp at the start of a run that resumes without the optimizer's
    # moments (a view file instead of a checkpoint): Adam's first steps are large.
    rewarm_steps: int = 0

    def warmup(self) -> int:
        if self.warmup_steps > 0:
            return self.warmup_steps
        if self.max_steps <= 0:
            raise ValueError("warmup_fraction needs the schedule's length (max_steps) first")
        return max(1, round(self.warmup_fraction * self.max_steps))


class Trainer:
    """Owns the optimizer and the step counter; batches depend only on (seed, step)."""

    def __init__(self, model: DualViewModel, data: DistillData, mask_id: int, cfg: TrainConfig,
                 amp: Optional[torch.dtype] = None, compile: bool = False):
        if len(data) == 0:
            raise ValueError("no training sequences")
        self.model, self.data, self.mask_id, self.cfg, self.amp = model, data, mask_id, cfg, amp
        # compile: the layers' passes through torch.compile (sequence length dynamic), for
        # training and its held-out loss only; the engine keeps its own path. A step's kernels
        # were mostly unfused element-wise work (norms, rotary, SiLU, casts: over half of them
        # on an H100, 2026-12-07), which compiling fuses.
        self.forward = torch.compile(model.forward_hidden, dynamic=True) if compile else None
        # and the KL's element-wise part (log-softmaxes, KL, gradient) over a chunk of rows
        self.rows_fn = torch.compile(kl_rows, dynamic=True) if compile else kl_rows
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
        # Running totals, kept across resumes: sequence tokens through the teacher, target
        # rows trained, seconds in train_step.
        self.tokens_seen = 0
        self.targets_seen = 0
        self.train_seconds = 0.0
        self.steps_before = 0  # steps trained into the starting view by earlier runs
        self._rewarm_from: Optional[int] = None

    def carry_totals(self, view_meta: dict[str, str]) -> None:
        """Start the running totals where a trained view's metadata left them, so that a
        view trained from another one reports the totals of its whole lineage."""
        self.tokens_seen = int(view_meta.get("tokens_seen", 0))
        self.targets_seen = int(view_meta.get("target_rows_seen", 0))
        self.train_seconds = 60 * float(view_meta.get("train_minutes", 0))
        self.steps_before = int(view_meta.get("trained_steps", 0))

    def totals(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "targets_seen": self.targets_seen,
                "train_seconds": self.train_seconds, "steps_before": self.steps_before}

    def set_totals(self, t: dict[str, Any]) -> None:
        self.tokens_seen, self.targets_seen = int(t.get("tokens_seen", 0)), int(t.get("targets_seen", 0))
        self.train_seconds, self.steps_before = float(t.get("train_seconds", 0)), int(t.get("steps_before", 0))

    def lr_at(self, step: int) -> float:
        c = self.cfg
        w = c.warmup()
        if step < w:
            lr = c.lr * (step + 1) / w
        else:
            prog = min(1.0, (step - w) / max(1, c.max_steps - w))
            lr = c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))
        if self._rewarm_from is not None and c.rewarm_steps > 0 and step - self._rewarm_from < c.rewarm_steps:
            lr *= (step - self._rewarm_from + 1) / c.rewarm_steps
        return lr

    def start_rewarm(self) -> None:
        """Ramp the learning rate up again from the current step (cfg.rewarm_steps long)."""
        self._rewarm_from = self.step_num

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

    def _forward_backward(self, step: int) -> StepStats:
        batch = self.make_step_batch(step)
        loss, st = distill_loss(self.model, batch, self.cfg.block_size, self.mask_id, self.cfg.loss_decay, self.amp,
                                self.forward, self.rows_fn)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return st

    def train_step(self) -> StepStats:
        t0 = time.perf_counter()
        self.model.train()
        lr = self.lr_at(self.step_num)
        for grp in self.opt.param_groups:
            grp["lr"] = lr
        st = self._forward_backward(self.step_num)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.opt.step()
        self.step_num += 1
        self.model.eval()
        self.tokens_seen += st.context_tokens
        self.targets_seen += st.targets
        self.train_seconds += time.perf_counter() - t0
        return st

    def probe_step(self) -> None:
        """A training step's work without its update (gradients dropped): for timing."""
        self.model.train()
        self._forward_backward(self.step_num)
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()

    @torch.no_grad()
    def evaluate(self, data: DistillData, max_seqs: int = 64, decay: Optional[float] = None) -> StepStats:
        """Loss/accuracy on held-out sequences with fixed anchors (comparable across steps);
        rows weighted as in training unless decay is given (0: every row alike)."""
        n = min(len(data), max_seqs)
        tot_loss, tot_acc, tot_t, ctx = 0.0, 0.0, 0, 0
        for s in range(0, n, self.cfg.batch_size):
            idx = list(range(s, min(n, s + self.cfg.batch_size)))
            g = torch.Generator().manual_seed(12345 + s)
            b = make_batch(data, idx, self.cfg.blocks_per_seq, g)
            _, st = distill_loss(self.model, b, self.cfg.block_size, self.mask_id,
                                 self.cfg.loss_decay if decay is None else decay, self.amp, self.forward, self.rows_fn)
            tot_loss += st.loss * st.targets
            tot_acc += st.accuracy * st.targets
            tot_t += st.targets
            ctx += st.context_tokens
        return StepStats(tot_loss / max(tot_t, 1), tot_acc / max(tot_t, 1), tot_t, ctx)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_num, "max_steps": self.cfg.max_steps, "warmup_steps": self.cfg.warmup_steps,
                **self.totals(),
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
        # The run's own recipe, whatever the defaults are now: a resumed run continues bit for bit.
        for k, v in sd.get("config", {}).items():
            if hasattr(self.cfg, k):
                setattr(self.cfg, k, v)
        self.cfg.max_steps = int(sd["max_steps"])
        self.cfg.warmup_steps = int(sd["warmup_steps"])
        self.set_totals(sd)

    def save(self, path: str | os.PathLike) -> None:
        tmp = Path(str(path) + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # never a half-written checkpoint

    def load(self, path: str | os.PathLike) -> None:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(sd)


def train(trainer: Trainer, *, out_dir: Optional[Path] = None, val: Optional[DistillData] = None,
          minutes: float = 0.0, calib_skip: int = 3, calib_steps: int = 5, fix_fraction: float = 0.5,
          save_every: int = 200, log_every: int = 10, log_every_s: float = 30.0, stop_at: int = 0,
          progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run to cfg.max_steps (or to step stop_at, if given, leaving the schedule as it is:
    a later --resume continues it), or until the time budget (minutes) is spent.

    With minutes > 0 and no fixed schedule yet (cfg.max_steps <= 0) the schedule's length
    comes from the budget: max_steps is re-estimated from the measured step time after
    every step until fix_fraction of the budget has gone, then fixed. The first
    calib_skip steps (CUDA's one-time set-up) are not timed, and the window restarts when
    the warmup ends (early steps run slower while the allocator's cache fills), so the
    run ends close to the budget, not early. A warmup given as a fraction of the schedule
    is fixed first, from a few untimed-then-timed probe steps that update nothing.
    Every log_every_s seconds a line with the progress and the ETA goes to log."""
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
        if cfg.warmup_steps <= 0:  # the warmup is a fraction of a schedule not known yet: probe
            for i in range(calib_skip + calib_steps):
                if i == calib_skip:
                    t_probe = time.monotonic()
                trainer.probe_step()
            now = time.monotonic()
            est = int((deadline - now) * 0.98 / ((now - t_probe) / calib_steps))
            cfg.warmup_steps = max(trainer.step_num + calib_skip + calib_steps + 1, round(cfg.warmup_fraction * est))
            log(f"probe: about {est} steps fit the budget -> warmup {cfg.warmup_steps} steps")
        if trainer.step_num + calib_skip + calib_steps >= cfg.warmup_steps:
            raise ValueError(f"a time-budgeted schedule is measured during the warmup: warmup_steps must exceed "
                             f"{calib_skip + calib_steps}")
    bar = tqdm(total=cfg.max_steps if cfg.max_steps > 0 else None, initial=trainer.step_num, desc="distilling",
               unit="step", disable=not progress, dynamic_ncols=True)
    t_last, targets_since, ctx_since = time.monotonic(), 0, 0
    t_eta, step0 = t_start, trainer.step_num
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
        now = time.monotonic()
        if calibrating:
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
            rate = targets_since / max(now - t_last, 1e-9)
            rec = {"step": trainer.step_num, "loss": round(st.loss, 5), "acc": round(st.accuracy, 4),
                   "lr": trainer.lr_at(trainer.step_num - 1), "target_tok_s": round(rate),
                   "context_tok_s": round(ctx_since / max(now - t_last, 1e-9)),
                   "tokens_seen": trainer.tokens_seen, "elapsed_s": round(now - t_start, 1)}
            history.append(rec)
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            t_last, targets_since, ctx_since = now, 0, 0
            bar.set_postfix(loss=f"{st.loss:.3f}", acc=f"{st.accuracy:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        if log_every_s > 0 and now - t_eta >= log_every_s and cfg.max_steps > 0:
            per = (now - t_start) / max(1, trainer.step_num - step0)
            eta = min(deadline - now, (cfg.max_steps - trainer.step_num) * per)
            log(f"train: step {trainer.step_num}/{cfg.max_steps} ({100 * trainer.step_num / cfg.max_steps:.1f} %), "
                f"loss {st.loss:.3f}, top-1 {st.accuracy:.3f}, {trainer.tokens_seen / 1e6:.2f} M tokens seen, "
                f"{per * 1000:.0f} ms/step, {_fmt_s(now - t_start)} elapsed, ETA {_fmt_s(eta)}"
                + (" (budget)" if eta == deadline - now else ""))
            t_eta = now
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
                   help="starting diffusion view: 'ar-copy' (the paper's warm start), 'default' (the shipped "
                        "view of the default model) or a diffusion-view file")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="storage of the frozen base (compute runs in bfloat16 autocast on CUDA)")
    g.add_argument("--block-size", type=int, default=None, help="draft block size B (default: the model's)")
    g = p.add_argument_group("data")
    g.add_argument("--out", required=True, help="folder for data, checkpoints, logs and the trained view")
    g.add_argument("--data", default=None, help="folder of data shards (default OUT/data; made if empty)")
    g.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help=".jsonl(.gz) with 'prompt'/'messages', or .txt")
    g.add_argument("--num-prompts", type=int, default=0, help="use the first N prompts (0: all)")
    g.add_argument("--gen-passes", type=int, default=1,
                   help="times through the prompts (the first mixes greedy and sampled answers, later ones sample)")
    g.add_argument("--gen-seconds", type=float, default=0.0, help="generation time budget (0: no limit)")
    g.add_argument("--gen-shard-seconds", type=float, default=60.0, help="write a data shard this often")
    g.add_argument("--gen-max-prompt-tokens", type=int, default=256)
    g.add_argument("--gen-max-new-tokens", type=int, default=320)
    g.add_argument("--gen-greedy-fraction", type=float, default=1.0,
                   help="share of the first pass answered greedily (the rest sampled; greedy answers drafted "
                        "better for greedy decoding, docs/distillation.md)")
    g.add_argument("--gen-temperature", type=float, default=0.8)
    g.add_argument("--gen-top-p", type=float, default=0.95)
    g.add_argument("--gen-max-num-seqs", type=int, default=GEN_MAX_NUM_SEQS)
    g.add_argument("--gen-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the model answering the prompts (default: --dtype); training keeps --dtype")
    g.add_argument("--train-on", default="all", choices=["all", "greedy"],
                   help="greedy: train on the greedy answers only (what greedy decoding is verified against)")
    g.add_argument("--data-only", action="store_true", help="stop after making the data")
    g.add_argument("--no-generate", action="store_true", help="train on the shards there, generate none")
    g = p.add_argument_group("training (defaults: the paper's recipe)")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    g.add_argument("--blocks-per-seq", type=int, default=32, help="draft blocks per sequence per step")
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--warmup-steps", type=int, default=0, help="0: --warmup-fraction of the schedule")
    g.add_argument("--warmup-fraction", type=float, default=0.05)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--loss-decay", type=float, default=3.0,
                   help="weight block row i by exp(-i/decay) (0: every masked row alike)")
    g.add_argument("--epochs", type=float, default=2.0,
                   help="schedule length in passes over the data, when neither --max-steps nor --train-minutes")
    g.add_argument("--max-steps", type=int, default=0, help="schedule length in steps")
    g.add_argument("--train-minutes", type=float, default=0.0,
                   help="time budget; without --max-steps the schedule is sized to fill it")
    g.add_argument("--val-fraction", type=float, default=0.02)
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--resume", action="store_true",
                   help=f"continue an unfinished generation and the training from OUT/{CHECKPOINT_NAME}")
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
        (args.warmup_steps >= 0, "--warmup-steps must be >= 0"),
        (0 < args.warmup_fraction < 1, "--warmup-fraction must be in (0, 1)"),
        (args.max_steps >= 0 and args.train_minutes >= 0, "--max-steps and --train-minutes must be >= 0"),
        (args.epochs > 0, "--epochs must be > 0"),
        (args.gen_passes >= 1, "--gen-passes must be >= 1"),
        (args.gen_seconds >= 0 and args.gen_shard_seconds >= 0, "--gen-seconds and --gen-shard-seconds must be >= 0"),
        (0 <= args.gen_greedy_fraction <= 1, "--gen-greedy-fraction must be in [0, 1]"),
        (0 <= args.val_fraction < 1, "--val-fraction must be in [0, 1)"),
        (args.block_size is None or args.block_size >= 2, "--block-size must be >= 2"),
        (not (args.data_only and args.no_generate), "--data-only and --no-generate exclude each other"),
    ]
    for ok, msg in checks:
        if not ok:
            return msg
    return None


def load_for_distill(args: argparse.Namespace):
    from orthrus_runtime.model.loader import load_model

    init = None if args.init == "ar-copy" else args.init
    return load_model(args.model, args.dtype, args.device, args.block_size, None, init)


def view_metadata(trainer: Trainer, loaded: Any, data: DistillData, init: str, recipe: dict[str, Any]) -> dict[str, str]:
    """What a trained view file records about itself (shown by `orthrus eval-acceptance`)."""
    return {"trained_steps": str(trainer.steps_before + trainer.step_num),
            "train_minutes": f"{trainer.train_seconds / 60:.6g}",
            "tokens_seen": str(trainer.tokens_seen), "target_rows_seen": str(trainer.targets_seen),
            "train_sequences": str(len(data)), "train_response_tokens": str(data.response_tokens),
            "base_model": loaded.model_id, "init": init,
            "recipe": json.dumps({**dataclasses.asdict(trainer.cfg), **recipe}, sort_keys=True)}


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
    data_dir = Path(args.data) if args.data else out / "data"
    ckpt = out / CHECKPOINT_NAME
    if args.resume and not args.data_only and not ckpt.exists() and not shard_paths(data_dir):
        raise FileNotFoundError(f"--resume: neither {ckpt} nor data shards in {data_dir} found")
    loaded = load_for_distill(args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    gen_state_path = data_dir / "generation.json"
    gen_state = json.loads(gen_state_path.read_text()) if gen_state_path.exists() else {}
    have = shard_paths(data_dir)
    if not args.no_generate and (not have or (args.resume and not gen_state.get("complete", True))):
        prompts = load_prompts(args.prompts)
        if args.num_prompts:
            prompts = prompts[: args.num_prompts]
        # An unfinished generation continues with the greedy share it started with.
        greedy_fraction = float(gen_state.get("greedy_fraction", args.gen_greedy_fraction)) if have \
            else args.gen_greedy_fraction
        stream = PromptStream(loaded.tokenizer, prompts, passes=args.gen_passes,
                              greedy_fraction=greedy_fraction, max_prompt_tokens=args.gen_max_prompt_tokens,
                              seed=args.seed)
        skip = set(load_shards(data_dir).uids.tolist()) if have else None
        if have:
            log(f"data: continuing the generation after {len(have)} shard(s) ({len(skip)} responses)")
        gen_loaded = loaded
        if args.gen_dtype and args.gen_dtype != args.dtype:
            from orthrus_runtime.model.loader import load_model

            gen_loaded = load_model(args.model, args.gen_dtype, args.device, args.block_size, None, None)
        new = generate_data(gen_loaded, stream, skip=skip, max_new_tokens=args.gen_max_new_tokens,
                            temperature=args.gen_temperature, top_p=args.gen_top_p, seconds=args.gen_seconds,
                            max_num_seqs=args.gen_max_num_seqs, shard_seconds=args.gen_shard_seconds,
                            on_shard=ShardWriter(data_dir, {"model": loaded.model_id, "prompts": str(args.prompts)}),
                            log=log)
        gen_state = {"complete": new.meta["complete"] == "True", "prompts": str(args.prompts),
                     "num_prompts": len(prompts), "passes": args.gen_passes,
                     "seconds": round(float(gen_state.get("seconds", 0)) + float(new.meta["seconds"]), 1),
                     "greedy_fraction": greedy_fraction, "temperature": args.gen_temperature,
                     "top_p": args.gen_top_p, "max_new_tokens": args.gen_max_new_tokens,
                     "gen_dtype": args.gen_dtype or args.dtype}
        gen_state_path.write_text(json.dumps(gen_state, indent=2) + "\n")
        del gen_loaded
    elif have and not gen_state.get("complete", True):
        log("data: the generation there is unfinished (--resume continues it); training on what there is")
    if args.data_only:
        return 0
    data = load_shards(data_dir)
    if not len(data):
        raise ValueError(f"{data_dir}: no distillation data")
    log(f"data: {len(data)} sequences, {data.response_tokens} response tokens in {len(shard_paths(data_dir))} shard(s)")

    train_data, val_data = data.split(args.val_fraction, int(gen_state.get("num_prompts", 0)))
    if args.train_on == "greedy":
        train_data = train_data.greedy_only()
        if not len(train_data):
            raise ValueError(f"{data_dir}: --train-on greedy, but no greedy answers (--gen-greedy-fraction)")
    max_steps = args.max_steps
    if not max_steps and not args.train_minutes:
        max_steps = max(1, math.ceil(args.epochs * len(train_data) / args.batch_size))
    cfg = TrainConfig(block_size=loaded.block_size, batch_size=args.batch_size, blocks_per_seq=args.blocks_per_seq,
                      lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps,
                      warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      loss_decay=args.loss_decay, max_steps=max_steps, seed=args.seed)
    trainer = Trainer(loaded.model, train_data, loaded.mask_token_id, cfg,
                      torch.bfloat16 if loaded.model.lm_head.weight.device.type == "cuda" else None)
    if args.resume and ckpt.exists():
        trainer.load(ckpt)
        log(f"resumed at step {trainer.step_num} of {trainer.cfg.max_steps}")
    elif loaded.diffusion_source not in ("ar-copy", "checkpoint"):
        # Continuing from a trained view: its totals carry on (the curve's x axis).
        from orthrus_runtime.model.loader import read_diffusion_view

        trainer.carry_totals(read_diffusion_view(loaded.diffusion_source)[1])
    train(trainer, out_dir=out, val=val_data, minutes=args.train_minutes, save_every=args.save_every,
          log_every=args.log_every, stop_at=args.stop_at_step, progress=not args.no_progress, log=log)
    export = Path(args.export) if args.export else out / "diffusion-view.safetensors"
    recipe = {"data": gen_state, "init": args.init, "tool": "orthrus distill", "train_on": args.train_on}
    save_diffusion_view(loaded.model, export, loaded.block_size, loaded.mask_token_id,
                        extra_metadata=view_metadata(trainer, loaded, train_data, args.init, recipe),
                        quantize=None if args.quantize == "none" else args.quantize)
    log(f"wrote {export} ({export.stat().st_size / 1e6:.1f} MB)")
    return 0
