"""One-process GPU run of the whole distillation recipe for the embedded default
model, inside a fixed time budget: self-distilled data, training, export of the
int8 view, and the acceptance evaluation of the result (int8 at every block size,
then the uncompressed trained view and the AR-copy baseline at the default block
size), all on one loaded model.

The recipe of the view shipped before issue 18; benchmarks/distill_curve.py is the chained,
resumable run that measures the curve. Results are written to --out as they are produced (a run cut short still leaves
what it finished): data.safetensors, train_log.jsonl, the view file (also split
into parts of at most --part-mb MB for transports with a per-file limit) and
acceptance-*.json. Used by benchmarks/distill_gpu.sh.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orthrus_runtime.tools import distill as D  # noqa: E402
from orthrus_runtime.tools import eval_acceptance as E  # noqa: E402
from orthrus_runtime.model.loader import load_model, read_diffusion_view, save_diffusion_view  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def eval_args(block_sizes: str, a: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    E.add_arguments(p)
    return p.parse_args(["--block-sizes", block_sizes, "--max-tokens", str(a.eval_max_tokens),
                         "--max-num-seqs", str(a.eval_max_num_seqs), "--limit", str(a.eval_limit)])


def set_view(model, tensors: dict[str, torch.Tensor]) -> None:
    params = D.trainable_parameters(model)
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="results to keep (at most 8 files)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/distill-work"), help="data and scratch files")
    ap.add_argument("--extra-data", type=Path, default=None, help="folder of earlier data shards to train on too")
    ap.add_argument("--prompt-offset", type=int, default=0, help="skip the first N prompts (used by --extra-data)")
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2); a tiny one for dry runs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--eval-block-sizes", default="8,16,32")
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--gen-seconds", type=float, default=100)
    ap.add_argument("--train-minutes", type=float, default=5.0)
    ap.add_argument("--num-prompts", type=int, default=0)
    ap.add_argument("--gen-max-new-tokens", type=int, default=320)
    ap.add_argument("--gen-max-num-seqs", type=int, default=D.GEN_MAX_NUM_SEQS)
    ap.add_argument("--gen-greedy-fraction", type=float, default=0.6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blocks-per-seq", type=int, default=24)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--loss-decay", type=float, default=7.0)
    ap.add_argument("--eval-max-tokens", type=int, default=256)
    ap.add_argument("--eval-max-num-seqs", type=int, default=256)
    ap.add_argument("--part-mb", type=float, default=15.0)
    ap.add_argument("--skip-ar-copy", action="store_true", help="no AR-copy baseline evaluation")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    t_all = time.monotonic()

    loaded = load_model(a.model, "float32", a.device, None, None, None)  # diffusion view: AR copy
    cuda = loaded.model.lm_head.weight.device.type == "cuda"
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    log(f"loaded {loaded.model_id} on {device_name}; block size {loaded.block_size}")

    a.work.mkdir(parents=True, exist_ok=True)
    prompts = D.load_prompts(D.DEFAULT_PROMPTS)[a.prompt_offset :]
    if a.num_prompts:
        prompts = prompts[: a.num_prompts]
    parts = [D.load_shards(a.extra_data)] if a.extra_data else []
    gen_s, gen_tokens = 0.0, 0
    if a.gen_seconds > 0:
        stream = D.PromptStream(loaded.tokenizer, prompts, greedy_fraction=a.gen_greedy_fraction)
        new = D.generate_data(loaded, stream, max_new_tokens=a.gen_max_new_tokens, seconds=a.gen_seconds,
                              max_num_seqs=a.gen_max_num_seqs, on_shard=D.ShardWriter(a.work / "data"), log=log)
        gen_s, gen_tokens = float(new.meta["seconds"]), new.response_tokens
        log(f"new data: {len(new)} sequences, {new.response_tokens} response tokens in {gen_s} s")
        parts.append(new)
    # Held-out sequences come from the end of the newest part (split below).
    data = parts[0] if len(parts) == 1 else D.DistillData.concat(parts)
    log(f"data: {len(data)} sequences, {data.response_tokens} response tokens, {int(data.tokens.numel())} in all")

    train_data, val_data = data.split(0.02)
    cfg = D.TrainConfig(block_size=loaded.block_size, batch_size=a.batch_size, blocks_per_seq=a.blocks_per_seq,
                        lr=a.lr, warmup_steps=a.warmup_steps, loss_decay=a.loss_decay, max_steps=0)
    # (This script's defaults are the shipped view's recipe; `orthrus distill` defaults to the paper's.)
    trainer = D.Trainer(loaded.model, train_data, loaded.mask_token_id, cfg, amp=torch.bfloat16 if cuda else None)
    before = trainer.evaluate(val_data)
    log(f"held-out before training: loss {before.loss:.4f}, top-1 agreement {before.accuracy:.4f}")
    t0 = time.monotonic()
    D.train(trainer, out_dir=a.work, val=val_data, minutes=a.train_minutes, save_every=0, log_every=20,
            progress=False, log=log)
    train_min = (time.monotonic() - t0) / 60
    (a.out / "train_log.jsonl").write_bytes((a.work / "train_log.jsonl").read_bytes())
    summary = {"device": device_name, "steps": trainer.step_num, "train_minutes": round(train_min, 2),
               "train_sequences": len(train_data), "train_response_tokens": train_data.response_tokens,
               "new_data_seconds": gen_s, "new_data_response_tokens": gen_tokens,
               "extra_data": str(a.extra_data) if a.extra_data else None, "data_response_tokens": data.response_tokens,
               "heldout_before": dataclasses.asdict(before), "config": dataclasses.asdict(cfg)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))

    view = a.out / "smollm2-135m-diffusion-view.safetensors"
    meta = {"trained_steps": str(trainer.step_num), "train_minutes": f"{train_min:.2f}",
            "train_sequences": str(len(train_data)), "train_response_tokens": str(train_data.response_tokens),
            "base_model": loaded.model_id, "recipe": "orthrus distill (benchmarks/distill_gpu.py)"}
    trained = {k: p.detach().clone() for k, p in D.trainable_parameters(loaded.model).items()}
    save_diffusion_view(loaded.model, view, loaded.block_size, loaded.mask_token_id, extra_metadata=meta,
                        quantize="int8")
    raw = view.read_bytes()
    part = int(a.part_mb * 1e6)
    for i in range(0, len(raw), part):
        (a.out / f"view.part{i // part}").write_bytes(raw[i : i + part])
    log(f"exported {view.name}: {len(raw) / 1e6:.2f} MB in {-(-len(raw) // part)} part(s)")
    view.unlink()

    # Acceptance: the shipped (int8) view first, at every block size.
    tensors, _ = read_diffusion_view_bytes(raw, a.out)
    set_view(loaded.model, tensors)
    loaded.diffusion_source = "int8 view (trained here)"
    rep = E.evaluate(loaded, eval_args(a.eval_block_sizes, a), log=log)
    (a.out / "acceptance-int8.json").write_text(json.dumps(rep, indent=2))
    set_view(loaded.model, trained)
    loaded.diffusion_source = "uncompressed float32 view (trained here)"
    rep = E.evaluate(loaded, eval_args(str(loaded.block_size), a), log=log)
    (a.out / "acceptance-uncompressed.json").write_text(json.dumps(rep, indent=2))
    if not a.skip_ar_copy:
        ar = {}
        sd = loaded.model.state_dict()
        for k in trained:
            ar[k] = sd[k.replace("_diff", "")] if k != "model.mask_embedding" else \
                sd["model.embed_tokens.weight"].float().mean(0, keepdim=True)
        set_view(loaded.model, ar)
        loaded.diffusion_source = "ar-copy"
        rep = E.evaluate(loaded, eval_args(str(loaded.block_size), a), log=log)
        (a.out / "acceptance-ar-copy.json").write_text(json.dumps(rep, indent=2))
    log(f"all done in {(time.monotonic() - t_all) / 60:.1f} min")
    return 0


def read_diffusion_view_bytes(raw: bytes, folder: Path):
    tmp = folder / "_view_check.safetensors"
    tmp.write_bytes(raw)
    try:
        return read_diffusion_view(tmp)
    finally:
        tmp.unlink()


if __name__ == "__main__":
    sys.exit(main())
