"""orthrus distill / eval-acceptance on tiny models (CPU, float32)."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from orthrus_runtime.tools import distill as D
from orthrus_runtime.tools import eval_acceptance as E
from orthrus_runtime.model.config import CheckpointError
from orthrus_runtime.model.loader import load_model, read_diffusion_view, save_diffusion_view
from orthrus_runtime.model.dual_view import DenseAR, DenseDraft
from orthrus_runtime.model.testing import tiny_checkpoint, tiny_model


def _random_data(seed: int = 0, n: int = 6, vocab: int = 300) -> D.DistillData:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        p = int(torch.randint(2, 7, (1,), generator=g))
        r = int(torch.randint(6, 20, (1,), generator=g))
        seqs.append((torch.randint(0, vocab, (p,), generator=g).tolist(),
                     torch.randint(0, vocab, (r,), generator=g).tolist()))
    return D.DistillData.from_sequences(seqs)


def _parse(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_many_blocks_pass_equals_per_block_dense_draft(arch):
    """The batched block-mask pass == the engine's draft semantics block by block:
    AR over the dense prefix strictly before the anchor, then DenseDraft over the block."""
    model = tiny_model(arch, seed=1)
    mask_id = model.add_mask_embedding()
    B = 4
    data = _random_data(seed=3, n=3)
    batch = D.make_batch(data, [0, 1, 2], blocks_per_seq=5, gen=torch.Generator().manual_seed(0))
    assert batch.anchor_valid.any(dim=1).all()
    bs, N = batch.ids.shape
    M = batch.anchors.shape[1]
    with torch.no_grad():
        teacher = D.TeacherAttend(model.scale)
        model.forward_hidden(batch.ids, torch.arange(N).expand(bs, N), teacher, diff=False)
        d_ids = torch.full((bs, M, B), mask_id)
        d_ids[:, :, 0] = batch.ids.gather(1, batch.anchors)
        d_pos = batch.anchors.unsqueeze(-1) + torch.arange(B)
        got = model.forward_hidden(d_ids.view(bs, -1), d_pos.view(bs, -1),
                                   D.BlockDraftAttend(teacher.kv, batch.anchors, B, model.scale), diff=True)
        got = got.view(bs, M, B, -1)
        checked = 0
        for b in range(bs):
            for j in range(M):
                if not batch.anchor_valid[b, j]:
                    continue
                a = int(batch.anchors[b, j])
                assert int(batch.prompt_lens[b]) <= a <= int(batch.lengths[b]) - 2
                ar = DenseAR(None, model.scale)
                model.forward_hidden(batch.ids[b : b + 1, :a], torch.arange(a)[None], ar, diff=False)
                ref = model.forward_hidden(d_ids[b : b + 1, j], d_pos[b : b + 1, j], DenseDraft(ar.new, model.scale),
                                           diff=True)
                torch.testing.assert_close(got[b, j], ref[0], atol=2e-5, rtol=1e-5)
                checked += 1
    assert checked >= 10


def test_padding_to_a_multiple_changes_no_loss():
    """Batches are padded to a multiple of 64 (few shapes); the padding is never attended."""
    model = tiny_model("qwen3", seed=2)
    mask_id = model.add_mask_embedding()
    data = _random_data(seed=4, n=4)
    losses = []
    for pad_to in (1, 64):
        batch = D.make_batch(data, [0, 1, 2, 3], blocks_per_seq=4, gen=torch.Generator().manual_seed(0), pad_to=pad_to)
        assert batch.ids.shape[1] % pad_to == 0 and batch.ids.shape[1] >= int(batch.lengths.max())
        with torch.no_grad():
            loss, st = D.distill_loss(model, batch, 4, mask_id, decay=3.0)
        losses.append((loss.item(), st.targets, st.context_tokens))
    assert losses[0][1:] == losses[1][1:] and losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert D.make_batch(data, [0], 4, torch.Generator()).ids.shape[1] == 64  # the default


def test_chunked_block_kl_equals_the_whole_logits_formula():
    """BlockKL (row chunks, gradient formed in the forward pass) gives the loss, the argmax
    agreement and the gradient of the plain formula over whole [rows, vocab] logits."""
    model = tiny_model("qwen3", seed=3)
    g = torch.Generator().manual_seed(0)
    R, dim = 23, model.lm_head.weight.shape[1]
    t_h = torch.randn(R, dim, generator=g)
    s0 = torch.randn(R, dim, generator=g)
    w = torch.rand(R, generator=g) + 0.1

    ref_h = s0.clone().requires_grad_(True)
    t_logp = F.log_softmax(model.logits(t_h), dim=-1).detach()
    s_logp = F.log_softmax(model.logits(ref_h), dim=-1)
    ref = ((t_logp.exp() * (t_logp - s_logp)).sum(-1) * w).sum() / w.sum()
    ref.backward()
    ref_agree = s_logp.argmax(-1) == t_logp.argmax(-1)
    for chunk in (5, 23, 4096):
        s_h = s0.clone().requires_grad_(True)
        loss, agree = D.BlockKL.apply(s_h, t_h, w, model, D.kl_rows, chunk)
        (2 * loss).backward()  # the upstream gradient scales the kept one
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.equal(agree, ref_agree)
        torch.testing.assert_close(s_h.grad, 2 * ref_h.grad, atol=1e-6, rtol=1e-4)
    assert not any(p.grad is not None for p in model.parameters())  # the head is not trained


def test_distill_loss_chunks_change_nothing():
    """distill_loss with a few rows a chunk: the loss and the view's gradients equal those
    computed in one chunk."""
    model = tiny_model("qwen3", seed=2)
    mask_id = model.add_mask_embedding()
    params = D.trainable_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    batch = D.make_batch(_random_data(seed=4, n=4), [0, 1, 2, 3], blocks_per_seq=4,
                         gen=torch.Generator().manual_seed(0))
    runs = []
    for chunk in (7, 10**6):
        model.zero_grad(set_to_none=True)
        loss, st = D.distill_loss(model, batch, 4, mask_id, decay=3.0, chunk_rows=chunk)
        loss.backward()
        runs.append((loss.item(), st, {k: p.grad.clone() for k, p in params.items()}))
    assert runs[0][1].targets > 7 and runs[0][1].accuracy == runs[1][1].accuracy
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for k in params:
        torch.testing.assert_close(runs[0][2][k], runs[1][2][k], atol=1e-7, rtol=1e-5)


def test_compiled_training_steps_equal_eager_ones():
    """Trainer(compile=True) runs both passes through torch.compile: the same loss and the
    same update as eager steps (float32, CPU), and the model's own forward is untouched."""
    import copy

    base = tiny_model("qwen3", seed=5)
    mask_id = base.add_mask_embedding()
    data = _random_data(seed=6, n=8)
    cfg = D.TrainConfig(block_size=4, batch_size=4, blocks_per_seq=4, lr=1e-2, warmup_steps=1, max_steps=4)
    runs = []
    for compile in (False, True):
        model = copy.deepcopy(base)
        tr = D.Trainer(model, data, mask_id, dataclasses.replace(cfg), compile=compile)
        stats = [tr.train_step() for _ in range(2)]
        runs.append((stats, {k: p.detach().clone() for k, p in tr.params.items()}, tr.evaluate(data)))
    (eager, w_eager, v_eager), (comp, w_comp, v_comp) = runs
    for a, b in zip(eager, comp):
        assert b.loss == pytest.approx(a.loss, rel=1e-4) and b.targets == a.targets
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], atol=1e-4, rtol=1e-4)
    assert v_comp.loss == pytest.approx(v_eager.loss, rel=1e-4)
    assert D.Trainer(base, data, mask_id, cfg).forward is None  # eager: model.forward_hidden itself


def test_block_mask_shape_and_rule():
    anchors = torch.tensor([[2, 5]])
    m = D.block_draft_mask(anchors, block_size=3, ctx_len=8)
    assert m.shape == (1, 6, 8 + 6)
    assert m[0, 0, :8].tolist() == [True, True] + [False] * 6  # strictly before anchor 2
    assert m[0, 4, :8].tolist() == [True] * 5 + [False] * 3
    assert m[0, 1, 8:].tolist() == [True] * 3 + [False] * 3  # own block only
    assert m[0, 5, 8:].tolist() == [False] * 3 + [True] * 3


def test_a_few_steps_lower_the_kl():
    model = tiny_model("qwen3", seed=0)  # random diffusion view: far from the AR view
    mask_id = model.add_mask_embedding()
    data = _random_data(seed=1, n=8)
    cfg = D.TrainConfig(block_size=4, batch_size=4, blocks_per_seq=4, lr=1e-2, warmup_steps=2, max_steps=25,
                        loss_decay=0.0)
    tr = D.Trainer(model, data, mask_id, cfg)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "_diff" not in k and "mask_embedding" not in k}
    before = tr.evaluate(data)
    for _ in range(cfg.max_steps):
        tr.train_step()
    after = tr.evaluate(data)
    assert after.loss < 0.7 * before.loss
    for k, v in model.state_dict().items():  # the AR view and shared weights never move
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_checkpoint_resume_continues_identically(tmp_path):
    def fresh(**kw):
        m = tiny_model("llama", seed=2)
        mid = m.add_mask_embedding()
        cfg = D.TrainConfig(**{"block_size": 4, "batch_size": 3, "blocks_per_seq": 3, "lr": 5e-3, "warmup_steps": 2,
                               "max_steps": 6, **kw})
        return D.Trainer(m, _random_data(seed=4, n=5), mid, cfg)

    straight = fresh()
    for _ in range(6):
        straight.train_step()
    first = fresh()
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "ck.pt")
    resumed = fresh(loss_decay=0.0, lr=1e-3)  # other settings now: the checkpoint's recipe wins
    resumed.load(tmp_path / "ck.pt")
    assert resumed.step_num == 3 and resumed.cfg == first.cfg
    for _ in range(3):
        resumed.train_step()
    for k, p in straight.params.items():
        assert torch.equal(p, resumed.params[k]), k


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_view_file_round_trips_and_loads(tmp_path, quantize):
    ck = tiny_checkpoint(tmp_path / "ck", arch="qwen3", block_size=4)
    loaded = load_model(str(ck), "float32", "cpu")
    with torch.no_grad():
        for k, p in D.trainable_parameters(loaded.model).items():
            p.add_(0.05 * torch.randn_like(p))
    want = {k: p.detach().clone() for k, p in D.trainable_parameters(loaded.model).items()}
    f = tmp_path / "view.safetensors"
    save_diffusion_view(loaded.model, f, 4, loaded.mask_token_id, extra_metadata={"note": "x"}, quantize=quantize)
    tensors, meta = read_diffusion_view(f)
    assert meta["note"] == "x" and meta["block_size"] == "4"
    assert meta.get("quantization") == (None if quantize is None else "int8-rowwise-symmetric")
    again = load_model(str(ck), "float32", "cpu", diffusion_weights=str(f))
    got = D.trainable_parameters(again.model)
    assert set(got) == set(want)
    for k, w in want.items():
        if quantize is None or w.dim() == 1:
            assert torch.equal(got[k], w), k
        else:  # within half a quantization step of each row
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert ((got[k] - w).abs() <= step / 2 + 1e-7).all(), k
    assert again.diffusion_source == str(f)


def test_int8_view_errors(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "bad.safetensors"
    meta = {"format": "orthrus-diffusion-view-v1", "block_size": "4", "mask_token_id": "3",
            "quantization": "int8-rowwise-symmetric"}
    save_file({"model.layers.0.self_attn.q_proj_diff.weight": torch.zeros(4, 4, dtype=torch.int8)}, str(f), metadata=meta)
    with pytest.raises(CheckpointError, match="_scale"):
        read_diffusion_view(f)
    save_file({"x": torch.zeros(2)}, str(f), metadata={**meta, "quantization": "int4"})
    with pytest.raises(CheckpointError, match="unknown quantization"):
        read_diffusion_view(f)


def test_data_file_round_trip_and_split(tmp_path):
    data = _random_data(n=5)
    data.meta["k"] = "v"
    data.save(tmp_path / "d.safetensors")
    back = D.DistillData.load(tmp_path / "d.safetensors")
    assert torch.equal(back.tokens, data.tokens) and back.meta["k"] == "v" and len(back) == 5
    train, held = back.split(0.2)  # uid multiples of 5 are held out
    assert len(train) == 4 and len(held) == 1
    assert torch.equal(held.sequence(0), data.sequence(0)) and held.uids.tolist() == [0]
    assert torch.equal(train.sequence(3), data.sequence(4)) and train.uids.tolist() == [1, 2, 3, 4]
    both = D.DistillData.concat([train, held])
    assert sorted(both.uids.tolist()) == list(range(5)) and both.response_tokens == data.response_tokens
    assert torch.equal(both.sequence(4), data.sequence(0))
    # The greedy flag survives the round trip; a shard without it (older) reads as sampled.
    g = D.DistillData(data.tokens, data.offsets, data.prompt_lens, data.uids, {}, torch.tensor([1, 0, 1, 0, 0]).bool())
    g.save(tmp_path / "g.safetensors")
    assert D.DistillData.load(tmp_path / "g.safetensors").greedy.tolist() == [True, False, True, False, False]
    assert g.greedy_only().uids.tolist() == [0, 2] and not back.greedy.any()
    # Answers of later passes (uid = pass x prompts + i) to a held-out prompt are held out too.
    wrapped = D.DistillData(data.tokens, data.offsets, data.prompt_lens, torch.tensor([0, 3, 6, 7, 9]), {})
    assert wrapped.split(0.5, prompts=3)[1].uids.tolist() == [0, 3, 6, 9]  # prompt 0, in every pass
    assert wrapped.split(0.5)[1].uids.tolist() == [0, 6]  # by uid: prompt 0's answers 3 and 9 would train


def test_load_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("hello\n\nworld\n")
    assert [m[0]["content"] for m in D.load_prompts(tmp_path / "p.txt")] == ["hello", "world"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert len(D.load_prompts(tmp_path / "p.jsonl")) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        D.load_prompts(tmp_path / "bad.jsonl")
    shipped = D.load_prompts(D.DEFAULT_PROMPTS)
    assert len(shipped) > 5000


def test_distill_cli_end_to_end_and_resume(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ck", arch="qwen3", block_size=4)
    (tmp_path / "p.txt").write_text("\n".join(f"Tell me about the fox number {i}." for i in range(10)))
    data = tmp_path / "data"

    def argv(out, *extra):
        return ["--model", str(ck), "--out", str(tmp_path / out), "--data", str(data), "--prompts",
                str(tmp_path / "p.txt"), "--gen-max-new-tokens", "12", "--gen-max-prompt-tokens", "64",
                "--batch-size", "3", "--blocks-per-seq", "3", "--warmup-steps", "2", "--max-steps", "5",
                "--save-every", "2", "--log-every", "1", "--no-progress", "--val-fraction", "0.2", *extra]

    # One run straight to the end (it also makes the self-distilled data).
    assert D.run(_parse(D, argv("straight", "--warmup-steps", "0"))) == 0
    assert D.shard_paths(data) and (tmp_path / "straight" / D.CHECKPOINT_NAME).exists()
    assert json.loads((data / "generation.json").read_text())["complete"] is True
    assert len(D.load_shards(data)) == 10  # every prompt answered once
    view = tmp_path / "straight" / "diffusion-view.safetensors"
    straight, meta = read_diffusion_view(view)
    assert meta["quantization"] == "int8-rowwise-symmetric" and meta["trained_steps"] == "5"
    assert int(meta["tokens_seen"]) > 0 and float(meta["train_minutes"]) > 0 and meta["init"] == "ar-copy"
    recipe = json.loads(meta["recipe"])
    assert recipe["lr"] == 2e-4 and recipe["warmup_fraction"] == 0.05 and recipe["data"]["complete"] is True
    assert recipe["loss_decay"] == 3.0 and recipe["data"]["greedy_fraction"] == 1.0  # measured better on SmolLM2
    assert E.view_metadata(str(view))["tokens_seen"] == meta["tokens_seen"]
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert any("val_loss" in r for r in log)
    # The same run interrupted at step 3 and resumed ends with the same weights.
    assert D.run(_parse(D, argv("split", "--stop-at-step", "3", "--warmup-steps", "0"))) == 0
    assert D.run(_parse(D, argv("split", "--resume", "--warmup-steps", "0"))) == 0
    resumed, meta2 = read_diffusion_view(tmp_path / "split" / "diffusion-view.safetensors")
    assert meta2["trained_steps"] == "5" and meta2["tokens_seen"] == meta["tokens_seen"]
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    loaded = load_model(str(ck), "float32", "cpu", diffusion_weights=str(view))
    assert loaded.diffusion_source == str(view)
    # Greedy answers only (half the data here), answered in bfloat16.
    g_data = tmp_path / "g_data"
    gargs = argv("greedy", "--train-on", "greedy", "--gen-dtype", "bfloat16", "--gen-greedy-fraction", "0.5")
    gargs[gargs.index("--data") + 1] = str(g_data)
    assert D.run(_parse(D, gargs)) == 0
    _, gmeta = read_diffusion_view(tmp_path / "greedy" / "diffusion-view.safetensors")
    grecipe = json.loads(gmeta["recipe"])
    assert grecipe["train_on"] == "greedy" and grecipe["data"]["gen_dtype"] == "bfloat16"
    g_all = D.load_shards(g_data)
    assert int(gmeta["train_sequences"]) == int(g_all.greedy.sum()) - int((g_all.greedy & (g_all.uids % 5 == 0)).sum())
    # Bad input: a clear error, no traceback.
    assert D.run(_parse(D, ["--out", str(tmp_path / "x"), "--lr", "-1", "--max-steps", "1"])) == 2
    assert "--lr must be > 0" in capsys.readouterr().err
    assert D.run(_parse(D, ["--out", str(tmp_path / "x"), "--data-only", "--no-generate"])) == 2
    assert D.run(_parse(D, ["--out", str(tmp_path / "nothing"), "--resume", "--max-steps", "1"])) == 2
    assert "--resume: neither" in capsys.readouterr().err


def test_eval_acceptance_writes_consistent_json(tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4, diffusion="ar-copy")
    out = tmp_path / "acc.json"
    args = _parse(E, ["--model", str(ck), "--block-sizes", "2,4", "--limit", "3", "--max-tokens", "10",
                      "--device", "cpu", "--out", str(out)])
    assert E.run(args) == 0
    rep = json.loads(out.read_text())
    assert rep["decoding"] == "greedy" and rep["diffusion_view"] == "checkpoint"
    assert set(rep["results"]) == {"mt-bench", "humaneval"}
    for name, per_b in rep["results"].items():
        assert set(per_b) == {"2", "4"}
        for b, r in per_b.items():
            assert r["requests"] == (6 if name == "mt-bench" else 3)  # MT-bench: two turns each
            assert len(r["acceptance_by_position"]) == int(b) - 1
            assert r["tokens_per_cycle"] == pytest.approx((r["num_accepted_tokens"] + r["num_cycles"]) / r["num_cycles"])
            assert 1.0 <= r["tokens_per_cycle"] <= int(b)
            passes = r["requests"] + 2 * r["num_cycles"]
            assert r["tokens_per_forward_pass"] == pytest.approx(r["completion_tokens"] / passes)
            acc = r["acceptance_by_position"]
            assert all(x >= y for x, y in zip(acc, acc[1:]))  # accepting draft i needs all before it
            assert sum(r["accepted_per_position"]) == r["num_accepted_tokens"]
            if name == "mt-bench":  # each turn and each category: the cycles add up to the whole
                g = r["by_group"]
                cats = {q["category"] for q in E.mt_bench_questions()[:3]}
                assert set(g) == {"turn 1", "turn 2"} | {f"category {c}" for c in cats}
                for prefix in ("turn ", "category "):
                    part = [v for k, v in g.items() if k.startswith(prefix)]
                    assert sum(v["num_cycles"] for v in part) == r["num_cycles"]
            else:
                assert "by_group" not in r


def test_eval_acceptance_rejects_bad_arguments(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    assert E.run(_parse(E, ["--model", str(ck), "--device", "cpu", "--block-sizes", "1"])) == 2
    assert "--block-sizes" in capsys.readouterr().err
    assert E.run(_parse(E, ["--model", str(ck), "--device", "cpu", "--datasets", "gsm8k"])) == 2


def test_eval_sets_load():
    qs = E.mt_bench_questions()
    assert len(qs) == 80 and all(len(q["turns"]) == 2 for q in qs)
    he = E.humaneval_prompts()
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0"


def test_time_budget_sets_the_schedule_and_uses_the_budget(monkeypatch):
    """A simulated clock: start-up steps take 1 s, the rest of the warmup 0.3 s (caches
    filling), then 0.1 s a step. The schedule must come from the steady step time, so the
    run fills the budget instead of stopping early."""
    model = tiny_model("llama", seed=5)
    mask_id = model.add_mask_embedding()
    cfg = D.TrainConfig(block_size=4, batch_size=2, blocks_per_seq=2, lr=1e-3, warmup_steps=12, max_steps=0)
    tr = D.Trainer(model, _random_data(seed=6, n=6), mask_id, cfg)
    clock = [1000.0]
    monkeypatch.setattr(D.time, "monotonic", lambda: clock[0])
    real_step = tr.train_step

    def step():
        st = real_step()
        clock[0] += 1.0 if tr.step_num <= 5 else 0.3 if tr.step_num <= 12 else 0.1
        return st

    monkeypatch.setattr(tr, "train_step", step)
    budget_s = 12.0
    D.train(tr, minutes=budget_s / 60, progress=False, log=lambda s: None)
    elapsed = clock[0] - 1000.0
    assert tr.step_num == cfg.max_steps  # the schedule ran to its end ...
    assert 0.95 * budget_s <= elapsed <= budget_s + 0.1  # ... which is where the budget ends
    assert cfg.max_steps > 50
    with pytest.raises(ValueError, match="warmup_steps must exceed"):
        D.train(D.Trainer(model, _random_data(n=3), mask_id, D.TrainConfig(block_size=4, warmup_steps=4, max_steps=0)),
                minutes=0.01, progress=False)


def test_budget_with_a_warmup_fraction_probes_then_fills_the_budget(monkeypatch):
    """A warmup given as a fraction of a schedule sized by the budget: probe steps (no
    update) fix the warmup first; the run still fills the budget and prints an ETA."""
    model = tiny_model("llama", seed=5)
    mask_id = model.add_mask_embedding()
    cfg = D.TrainConfig(block_size=4, batch_size=2, blocks_per_seq=2, lr=1e-3, warmup_steps=0, warmup_fraction=0.1,
                        max_steps=0)
    tr = D.Trainer(model, _random_data(seed=6, n=6), mask_id, cfg)
    before = {k: p.detach().clone() for k, p in tr.params.items()}
    clock = [1000.0]
    monkeypatch.setattr(D.time, "monotonic", lambda: clock[0])
    real_step, real_probe = tr.train_step, tr.probe_step
    probes = []

    def probe():
        real_probe()
        probes.append(1)
        clock[0] += 1.0 if len(probes) <= 3 else 0.1

    def step():
        st = real_step()
        clock[0] += 0.1
        return st

    monkeypatch.setattr(tr, "probe_step", probe)
    monkeypatch.setattr(tr, "train_step", step)
    logs: list[str] = []
    budget_s = 20.0
    D.train(tr, minutes=budget_s / 60, progress=False, log=logs.append, log_every_s=2.0)
    assert len(probes) == 8
    assert tr.step_num == cfg.max_steps and 0.95 * budget_s <= clock[0] - 1000.0 <= budget_s + 0.1
    # About 165 steps fit after the probes: a 10 % warmup.
    assert abs(cfg.warmup_steps - 0.1 * cfg.max_steps) <= 2, (cfg.warmup_steps, cfg.max_steps)
    assert any("ETA" in line for line in logs) and any(line.startswith("probe:") for line in logs)
    assert tr.tokens_seen > 0 and tr.targets_seen > 0
    assert any(not torch.equal(before[k], p) for k, p in tr.params.items())


def test_probe_step_changes_nothing():
    model = tiny_model("qwen3", seed=7)
    mask_id = model.add_mask_embedding()
    tr = D.Trainer(model, _random_data(seed=8, n=4), mask_id, D.TrainConfig(block_size=4, batch_size=2, max_steps=4))
    before = {k: p.detach().clone() for k, p in tr.params.items()}
    tr.probe_step()
    assert tr.step_num == 0 and tr.tokens_seen == 0 and not tr.opt.state
    assert all(torch.equal(before[k], p) and p.grad is None for k, p in tr.params.items())


def test_generation_writes_shards_and_continues_where_it_stopped(tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    loaded = load_model(str(ck), "float32", "cpu")
    prompts = [[{"role": "user", "content": f"Count the sheep in field {i}."}] for i in range(6)]
    stream = D.PromptStream(loaded.tokenizer, prompts, passes=2, greedy_fraction=0.5, seed=3)
    items = list(stream.items())
    assert [it.uid for it in items] == list(range(12))
    assert [it.greedy for it in items[:6]] == [False, True] * 3 and not any(it.greedy for it in items[6:])
    assert items[7].prompt_ids == items[1].prompt_ids and len({it.seed for it in items}) == 12
    folder = tmp_path / "data"
    kw = dict(max_new_tokens=6, min_response_tokens=1, max_num_seqs=4, log=lambda s: None)
    # A deadline already past: nothing written, the stream is not complete.
    cut = D.generate_data(loaded, stream, seconds=1e-9, on_shard=D.ShardWriter(folder), **kw)
    assert len(cut) == 0 and cut.meta["complete"] == "False" and not D.shard_paths(folder)
    # The prompts submitted before the deadline were dropped unanswered: a later call resumes at the first.
    assert int(cut.meta["next_uid"]) > 0 and D.resume_skip(cut) == (0, [])
    assert D.resume_skip(D.generate_data(loaded, stream, skip={0, 1}, seconds=1e-9, **kw), [0, 1]) == (2, [])
    # A first run that only got to uid 4, handing shards over after every step ...
    first = D.generate_data(loaded, stream, skip=set(range(5, 12)), shard_seconds=1e-9,
                            on_shard=D.ShardWriter(folder), **kw)
    n_first = len(D.shard_paths(folder))
    assert n_first >= 2 and sorted(first.uids.tolist()) == list(range(5))
    # ... and the run that continues it: new shards after the old ones, each uid once.
    done = set(D.load_shards(folder).uids.tolist())
    rest = D.generate_data(loaded, stream, skip=done, on_shard=D.ShardWriter(folder), **kw)
    assert rest.meta["complete"] == "True" and rest.meta["next_uid"] == "12"
    paths = D.shard_paths(folder)
    assert len(paths) == n_first + 1 and paths[-1].name == f"shard-{n_first:05d}.safetensors"
    all_data = D.load_shards(folder)
    assert sorted(all_data.uids.tolist()) == list(range(12))
    for i in range(len(all_data)):
        uid = int(all_data.uids[i])
        s = all_data.sequence(i).tolist()
        p = int(all_data.prompt_lens[i])
        assert s[:p] == stream.item(uid).prompt_ids and len(s) > p


@pytest.mark.slow
def test_shipped_view_is_the_default_lossless_and_better_than_the_ar_copy(startup_cache_dir):
    """The committed int8 view loads by default for SmolLM2, keeps greedy output identical
    to AR decoding, and drafts better than the untrained AR copy."""
    from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
    from orthrus_runtime.model.loader import DEFAULT_DIFFUSION_VIEW
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    assert DEFAULT_DIFFUSION_VIEW.exists() and DEFAULT_DIFFUSION_VIEW.stat().st_size <= 30_000_000
    lm = load_model(None, dtype="float32", device="cpu", cache_dir=startup_cache_dir)
    assert lm.diffusion_source == str(DEFAULT_DIFFUSION_VIEW) and lm.block_size == 16
    eng = LLMEngine(lm.model, EngineConfig(block_size=16, mask_token_id=lm.mask_token_id, max_model_len=512,
                                           num_kv_blocks=200), lm.tokenizer)
    msgs = [{"role": "user", "content": "Write a Python function that returns the squares of a list of numbers."}]

    def run(mode):
        (d,) = eng.generate([GenerateRequest(messages=msgs, mode=mode, params=SamplingParams(max_tokens=48, temperature=0))])
        return d

    trained, ar = run("orthrus"), run("ar")
    assert trained.token_ids == ar.token_ids
    params = D.trainable_parameters(lm.model)
    sd = lm.model.state_dict()
    with torch.no_grad():  # back to the AR-copy warm start
        for k, p in params.items():
            if k != "model.mask_embedding":
                p.copy_(sd[k.replace("_diff", "")])
    copy = run("orthrus")
    assert copy.token_ids == ar.token_ids
    assert trained.stats.mean_accepted_length > copy.stats.mean_accepted_length + 0.3


def test_replay_cycles_walks_the_accepted_prefixes():
    # 6 response tokens (token 0 from prefill). Anchor 0 accepts 2: tokens 1, 2 drafted, 3 from AR;
    # anchor 3 accepts 5, but only tokens 4 and 5 are left: 4 drafted, 5 from AR.
    assert D.replay_cycles([2, 0, 0, 5, 0, 9], 6) == (2, 3, [2, 1, 0, 0, 0, 0, 0, 0, 0])
    assert D.replay_cycles([0, 0, 0], 3) == (2, 0, [])
    assert D.replay_cycles([1, 1, 1, 1], 4) == (2, 1, [1])  # 0 -> 2 (one accepted), then 2 -> 3
    assert D.replay_cycles([], 1) == (0, 0, [])


def test_greedy_cycles_equal_the_engines_greedy_orthrus_decoding(tmp_path):
    """The teacher-forced replay on greedy answers gives the engine's own cycle counts."""
    from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
    from orthrus_runtime.types import GenerateRequest, SamplingParams

    ck = tiny_checkpoint(tmp_path / "ck", arch="qwen3", block_size=4)
    lm = load_model(str(ck), "float32", "cpu")
    prompts = [[{"role": "user", "content": f"List the birds of island {i}."}] for i in range(8)]
    stream = D.PromptStream(lm.tokenizer, prompts, greedy_fraction=1.0)
    data = D.generate_data(lm, stream, max_new_tokens=24, max_num_seqs=8, log=lambda s: None)
    # A few training steps, so that drafts are accepted at several rows, not none.
    tr = D.Trainer(lm.model, data, lm.mask_token_id,
                   D.TrainConfig(block_size=4, batch_size=4, blocks_per_seq=8, lr=3e-3, warmup_steps=1, max_steps=30))
    for _ in range(30):
        tr.train_step()
    assert bool(data.greedy.all()) and len(data) == 8
    got = D.greedy_cycles(lm.model, data, 4, lm.mask_token_id, seqs_per_pass=3, anchors_per_pass=5)

    eng = LLMEngine(lm.model, EngineConfig(block_size=4, mask_token_id=lm.mask_token_id, max_model_len=512,
                                           num_kv_blocks=200), None)
    stop = [int(lm.tokenizer.eos_token_id)]
    reqs = [GenerateRequest(prompt_token_ids=data.sequence(i)[: int(data.prompt_lens[i])].tolist(), mode="orthrus",
                            params=SamplingParams(max_tokens=24, temperature=0, stop_token_ids=stop))
            for i in range(len(data))]
    outs = eng.generate(reqs)
    cycles = sum(o.stats.num_cycles for o in outs)
    accepted = sum(o.stats.num_accepted_tokens for o in outs)
    for i, o in enumerate(outs):  # lossless: the same answers
        assert o.token_ids == data.sequence(i)[int(data.prompt_lens[i]):].tolist()
    assert accepted > 0 and max(o.stats.accepted_per_position[1] for o in outs) > 0  # beyond row 0 too
    assert (got.cycles, got.sequences) == (cycles, 8)
    assert got.tokens_per_cycle == pytest.approx(1 + accepted / cycles)
    per_row = [sum(o.stats.accepted_per_position[i] for o in outs) / cycles for i in range(3)]
    assert got.acceptance_by_position == pytest.approx(per_row)

    # Answers that end at a stop token: the same cycles; the engine also counts drafts that
    # verification accepted past the stop (the answer cannot show them), so the replay is at most it.
    stops = [o.token_ids[len(o.token_ids) // 2] for o in outs]
    cut = eng.generate([GenerateRequest(prompt_token_ids=r.prompt_token_ids, mode="orthrus",
                                        params=SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[t]))
                        for r, t in zip(reqs, stops)])
    assert any(o.finish_reason == "stop" for o in cut)
    for r, o in zip(reqs, cut):
        one = D.greedy_cycles(lm.model, D.DistillData.from_sequences([(r.prompt_token_ids, o.token_ids)], greedy=[True]),
                              4, lm.mask_token_id)
        accepted_replay = round((one.tokens_per_cycle - 1) * one.cycles)
        assert one.cycles == o.stats.num_cycles and accepted_replay <= o.stats.num_accepted_tokens
        assert accepted_replay + one.cycles == len(o.token_ids) - 1  # the replay counts emitted tokens


def test_resume_skip_starts_at_the_first_dropped_prompt_and_skips_those_answered_past_it():
    data = D.DistillData.from_sequences([([1, 2], [3, 4])] * 3, uids=[1, 4, 5], meta={"resume_uid": "3"})
    assert D.resume_skip(data, [2, 7]) == (3, [4, 5, 7])
