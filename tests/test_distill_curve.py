"""benchmarks/distill_curve.py on a tiny model (CPU): chained commands continue the
schedule, the totals and the prompt stream; a fresh machine continues from the returned
files alone; every command's returned folder fits the device's file limits."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from orthrus_runtime.model.testing import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_curve_commands_chain_and_resume_from_returned_files(tmp_path, capsys, monkeypatch):
    import distill_curve as C
    from orthrus_runtime.tools import distill as D

    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    (tmp_path / "p.txt").write_text("\n".join(f"Describe the colour of stone number {i}." for i in range(40)))
    state = tmp_path / "state"

    def argv(state_dir, out):
        return ["--state", str(state_dir), "--out", str(out), "--model", str(ck), "--device", "cpu",
                "--init", "ar-copy", "--prompts", str(tmp_path / "p.txt"), "--eval-dtypes", "float32",
                "--eval-block-size", "4", "--eval-max-tokens", "6", "--eval-limit", "1", "--eval-estimate-s", "1",
                "--gen-max-new-tokens", "10", "--gen-max-num-seqs", "8", "--batch-size", "4",
                "--blocks-per-seq", "3", "--budget-s", "10", "--chain", "3", "--part-mb", "0.005",
                "--out-files", "20"]  # (the tiny view's 5 KB parts are 3 or 4, with its metadata's length)

    def load(folder):
        return (json.loads((folder / "state.json").read_text()),
                json.loads((folder / "curve.json").read_text())["points"])

    assert C.main(argv(state, tmp_path / "out1")) == 0
    st1, pts1 = load(state)
    assert st1["commands"] == 1 and st1["next_uid"] > 0 and st1["step"] > 0
    assert pts1[0]["step"] == 0 and pts1[0]["tokens_seen"] == 0 and pts1[-1]["step"] == st1["step"]
    assert {"mt-bench", "humaneval"} <= set(pts1[-1]["acceptance"]["float32"])
    assert st1["eval_first_seconds"] > 0 and st1["eval_seconds"] > 0  # a start point, then one after training
    out1 = sorted(p.name for p in (tmp_path / "out1").iterdir())
    # Besides the view's parts (two of 15 MB for SmolLM2's 27 MB int8 view): five files, the
    # command's answers among them (with run.log under distill_gpu.sh: 8, the device's limit).
    assert [n for n in out1 if not n.startswith("view.part")] == ["curve.json", "curve.png", "heldout-greedy.safetensors",
                                                                  "shard-c0001.safetensors", "state.json"]
    parts = [p for p in (tmp_path / "out1").iterdir() if p.name.startswith("view.part")]
    assert len(parts) >= 2 and all(p.stat().st_size <= 5_000 for p in parts)
    schedule = st1["max_steps"]
    assert schedule > st1["step"]  # the schedule spans the chain

    kept1 = D.load_shards(state / "data")
    assert len(D.shard_paths(state / "data")) == 1 and len(kept1) > 0
    assert D.DistillData.load(tmp_path / "out1" / "shard-c0001.safetensors").uids.tolist() == kept1.uids.tolist()

    # Same machine: exact resume from the checkpoint kept in --state.
    assert C.main(argv(state, tmp_path / "out2")) == 0
    st2, pts2 = load(state)
    err = capsys.readouterr().err
    assert "resumed exactly" in err
    # The second command trains on its own answers and on the first's, kept in --state.
    kept2 = D.load_shards(state / "data")
    assert len(D.shard_paths(state / "data")) == 2 and kept2.uids[: len(kept1)].tolist() == kept1.uids.tolist()
    assert f"{len(kept2) - len(kept1)} new answers, {len(kept2)} kept" in err
    assert st2["commands"] == 2 and st2["max_steps"] == schedule
    assert st2["step"] > st1["step"] and st2["tokens_seen"] > st1["tokens_seen"] and st2["next_uid"] > st1["next_uid"]
    assert pts2[: len(pts1)] == pts1 and len(pts2) > len(pts1)

    # A fresh machine: only the returned files (no checkpoint): the int8 view, fresh moments;
    # the answers both commands returned come back as --data and train again.
    fresh, answers = tmp_path / "fresh", tmp_path / "answers"
    shutil.copytree(tmp_path / "out2", fresh, ignore=shutil.ignore_patterns("shard-*"))
    answers.mkdir()
    for out in ("out1", "out2"):
        for f in (tmp_path / out).glob("shard-c*.safetensors"):
            shutil.copy(f, answers / f.name)
    assert sorted(p.name for p in answers.iterdir()) == ["shard-c0001.safetensors", "shard-c0002.safetensors"]
    # Between machines, this one answers the next prompts ahead (--answer-only: the CPU while
    # no GPU is lent); its answers join the carried ones and the stream's cursor moves past them.
    before = json.loads((fresh / "state.json").read_text())
    start, skip0 = before["next_uid"], set(before["answered_ahead"])
    ahead_args = ["--state", str(fresh), "--out", str(answers), "--model", str(ck), "--device", "cpu",
                  "--prompts", str(tmp_path / "p.txt"), "--gen-dtype", "float32", "--gen-max-new-tokens", "10",
                  "--gen-max-num-seqs", "8", "--budget-s", "600", "--ahead-shard-s", "0.5", "--ahead-max-prompts", "24",
                  "--answer-only"]

    # First a run killed after its first shard: the state it left skips that shard's prompts.
    class Killed(Exception):
        pass

    real_generate = D.generate_data

    def killed_after_one_shard(*args, on_shard, **kw):
        def hand_over_then_die(d):
            on_shard(d)
            raise Killed
        return real_generate(*args, on_shard=hand_over_then_die, **kw)

    monkeypatch.setattr(D, "generate_data", killed_after_one_shard)
    with pytest.raises(Killed):
        C.main(ahead_args)
    monkeypatch.setattr(D, "generate_data", real_generate)
    st_k = json.loads((fresh / "state.json").read_text())
    assert json.loads((answers / "state.json").read_text()) == st_k
    first = D.DistillData.load(answers / "shard-a0000.safetensors")
    assert st_k["next_uid"] == start and st_k["ahead_shards"] == 1
    assert st_k["answered_ahead"] == sorted(skip0 | set(first.uids.tolist()))
    assert st_k["data_response_tokens"] == before["data_response_tokens"] + first.response_tokens

    # Then a whole run: it asks the 24 prompts after the cursor that were not answered yet.
    skip1 = set(st_k["answered_ahead"])
    assert C.main(ahead_args) == 0
    st_a = json.loads((fresh / "state.json").read_text())
    assert json.loads((answers / "state.json").read_text()) == st_a
    (answers / "state.json").unlink()
    shards = sorted(answers.glob("shard-a*.safetensors"))
    assert [f.name for f in shards[:2]] == ["shard-a0000.safetensors", "shard-a0001.safetensors"]
    assert st_a["ahead_shards"] == len(shards)  # (a later run names its shards on from there)
    ahead = [D.DistillData.load(f) for f in shards]
    assert all(d.meta["device"] == "cpu" and d.meta["gen_dtype"] == "float32" for d in ahead)
    second = [u for d in ahead[1:] for u in d.uids.tolist()]
    ahead_uids = first.uids.tolist() + second
    asked = [u for u in range(start, start + 24 + len(skip1)) if u not in skip1][:24]
    # (a tiny random model's one-token answers are not kept: a prompt asked may have none)
    assert len(ahead_uids) == len(set(ahead_uids)) and set(second) <= set(asked) and second
    # The cursor moved past the prompts asked; those answered past it stay skipped.
    assert st_a["next_uid"] == asked[-1] + 1
    assert st_a["answered_ahead"] == sorted(u for u in skip1 if u >= st_a["next_uid"])
    assert st_a["ahead"][-1]["responses"] == len(second) and st_a["step"] == before["step"]
    assert st_a["data_response_tokens"] == before["data_response_tokens"] + sum(d.response_tokens for d in ahead)
    assert C.main(ahead_args[:2] + ahead_args[4:]) == 2  # --out missing
    assert "--answer-only needs --out" in capsys.readouterr().err
    assert C.main(argv(fresh, tmp_path / "out3") + ["--data", str(answers), "--train-compile"]) == 0
    st3, pts3 = load(fresh)
    err = capsys.readouterr().err
    assert "resumed from the int8 view" in err and f"{len(kept2) + len(ahead_uids)} from --data" in err
    # The command answered on from the cursor: no prompt answered ahead is answered again.
    assert not set(D.load_shards(fresh / "data").uids.tolist()) & set(ahead_uids)
    assert len(D.shard_paths(fresh / "data")) == 1  # the answers kept stay on the machine that made them
    assert st3["commands"] == 3 and st3["step"] > st2["step"] and st3["tokens_seen"] > st2["tokens_seen"]
    assert [p["tokens_seen"] for p in pts3] == sorted(p["tokens_seen"] for p in pts3)
    # Every point's replay measured the first command's held-out greedy answers.
    assert len({json.dumps(p["heldout_greedy_replay"]["sequences"]) for p in pts3}) == 1
    assert pts3[0]["heldout_greedy_replay"]["sequences"] >= 1

    # Bad input: a clear error.
    assert C.main(["--state", str(state), "--split", "0.5,0.5"]) == 2
    assert "--split" in capsys.readouterr().err


def test_recipe_comparison_then_the_curve_continues_the_best(tmp_path, capsys):
    """distill_recipes.py: every variant the same steps on equal-sized data from the same
    view, measured on the same held-out greedy answers; the best view and its options
    then start a curve that trains on the recipe call's data and continues its stream."""
    import distill_curve as C
    import distill_recipes as R
    from orthrus_runtime.model.loader import read_diffusion_view
    from orthrus_runtime.tools import distill as D

    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    (tmp_path / "p.txt").write_text("\n".join(f"Describe the colour of stone number {i}." for i in range(160)))
    rs, out = tmp_path / "recipes", tmp_path / "out"
    assert R.main(["--out", str(out), "--state", str(rs), "--model", str(ck), "--device", "cpu", "--init", "ar-copy",
                   "--prompts", str(tmp_path / "p.txt"), "--gen-seconds", "30", "--gen-dtype", "float32",
                   "--gen-max-new-tokens", "10", "--gen-max-num-seqs", "16", "--batch-size", "4", "--steps", "6",
                   "--variants", "a:data=mixed;b:data=greedy,lr=1e-3,decay=2", "--part-mb", "0.005"]) == 0
    rep = json.loads((out / "recipes.json").read_text())
    assert [v["name"] for v in rep["variants"]] == ["a", "b"]
    assert all(v["steps"] == 6 for v in rep["variants"]) and rep["data"]["heldout_greedy_sequences"] >= 2
    for rp in [rep["before"]] + [v["replay"] for v in rep["variants"]]:
        assert 1.0 <= rp["tokens_per_cycle"] <= 4.0 and len(rp["acceptance_by_position"]) == 3
    best = json.loads((rs / "best.json").read_text())
    assert best["variant"]["name"] == rep["best"] == max(rep["variants"], key=lambda v: v["replay"]["tokens_per_cycle"])["name"]
    _, meta = read_diffusion_view(rs / "best-view.safetensors")
    assert json.loads(meta["recipe"])["variant"] == rep["best"] and int(meta["trained_steps"]) == 6
    shipped = tmp_path / "int8.safetensors"  # the int8 parts returned from the device: the same view
    shipped.write_bytes(b"".join((out / f"view.part{i}").read_bytes() for i in range(len(list(out.glob("view.part*"))))))
    q, qmeta = read_diffusion_view(shipped)
    full, _ = read_diffusion_view(rs / "best-view.safetensors")
    assert qmeta["recipe"] == meta["recipe"] and set(q) == set(full)
    assert all(torch.allclose(q[k], full[k].float(), atol=full[k].abs().max().item() / 100) for k in q)

    data = D.load_shards(rs / "data")
    mixed, greedy, held = R.split_data(data)
    assert len(mixed) == len(greedy) == rep["data"]["train_sequences_per_variant"]
    assert bool(greedy.greedy.all()) and 0 < int(mixed.greedy.sum()) < len(mixed)
    assert not set(held.uids.tolist()) & (set(mixed.uids.tolist()) | set(greedy.uids.tolist()))

    state = tmp_path / "curve"
    assert C.main(["--state", str(state), "--out", str(tmp_path / "cout"), "--model", str(ck), "--device", "cpu",
                   "--init", str(rs / "best-view.safetensors"), "--data", str(rs / "data"),
                   "--prompts", str(tmp_path / "p.txt"), "--eval-dtypes", "float32", "--gen-dtype", "float32",
                   "--eval-block-size", "4", "--eval-max-tokens", "6", "--eval-limit", "1", "--eval-estimate-s", "1",
                   "--gen-max-new-tokens", "10", "--gen-max-num-seqs", "8", "--batch-size", "4",
                   "--blocks-per-seq", "3", "--budget-s", "8", "--chain", "1", "--part-mb", "0.005",
                   "--max-points", "1"] + best["curve_args"].split() + ["--train-on", "greedy"]) == 0
    st = json.loads((state / "state.json").read_text())
    pts = json.loads((state / "curve.json").read_text())["points"]
    # The recipe run answered every prompt: no greedy answers are left, so no new data.
    assert int(data.uids.max()) + 1 == 160 and st["next_uid"] == 160 and st["train_on"] == "greedy"
    assert "every prompt has its greedy answer" in capsys.readouterr().err
    assert pts[0]["tokens_seen"] == int(meta["tokens_seen"]) and pts[-1]["tokens_seen"] > pts[0]["tokens_seen"]
    _, cmeta = C.read_view_parts(state)  # the lineage's totals: the recipe run's, then the curve's
    assert int(cmeta["trained_steps"]) == 6 + st["step"] and st["steps_before"] == 6
    assert int(cmeta["target_rows_seen"]) > int(meta["target_rows_seen"]) > 0
    assert float(cmeta["train_minutes"]) > float(meta["train_minutes"]) > 0
    crecipe = json.loads(cmeta["recipe"])
    assert crecipe["train_on"] == "greedy" and crecipe["preloaded_response_tokens"] == data.response_tokens
    assert all(1.0 <= p["heldout_greedy_replay"]["tokens_per_cycle"] <= 4.0 for p in pts)

    assert R.main(["--out", str(out), "--state", str(rs), "--variants", "a:data=sampled"]) == 2
    assert "mixed or greedy" in capsys.readouterr().err
    assert R.main(["--out", str(out), "--state", str(rs), "--eval-best"]) == 2
    assert "--reserve-s" in capsys.readouterr().err


def test_speedup_only_times_batch_1_on_every_chat_prompt_and_the_first_four(tmp_path, capsys):
    """`--speedup-only` times the state's view: at batch 1 the 16 chat prompts one by one,
    each timed, and the first 4 of them (the figure before 2026-12-07) from the same runs;
    every figure at batch 1 has the ms of a cycle."""
    import distill_curve as C
    from orthrus_runtime.model.loader import load_model

    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    state = tmp_path / "state"
    argv = ["--state", str(state), "--model", str(ck), "--speedup-only", "--speedup-quick"]
    assert C.main(argv) == 2 and "no state.json and view parts" in capsys.readouterr().err
    loaded = load_model(str(ck), "float32", "cpu", None, None, None)
    C.write_view_parts(loaded.model, loaded, state, {}, 5_000)
    (state / "state.json").write_text(json.dumps({"format": C.STATE_FORMAT, "step": 7, "tokens_seen": 99}))
    assert C.main(argv) == 0
    rep = json.loads((state / "speedup.json").read_text())
    assert (rep["step"], rep["tokens_seen"]) == (7, 99)
    sm = rep["smollm2"]
    for mode in ("ar", "orthrus-full", "orthrus-adaptive"):
        every, first = sm[f"{mode}/bs1"], sm[f"{mode}/bs1-first4"]
        assert (every["requests"], first["requests"]) == (16, 4) and 0 < first["tokens"] < every["tokens"]
        assert every["ms_per_cycle"] > 0 and first["ms_per_cycle"] > 0 and every["tokens_per_cycle"] >= 1.0
        assert sm[f"{mode}/bs16"]["requests"] == 16 and sm[f"{mode}/bs16"]["ms_per_cycle"] is None
        for r in (every, first):  # the figures of one run: its rate, and its ms over its steps
            assert r["tokens_per_s"] in r["runs_tokens_per_s"]
            steps = (r["tokens"] - r["requests"]) / r["tokens_per_cycle"] + r["requests"]
            assert abs(r["ms_per_cycle"] - 1000 * r["tokens"] / r["tokens_per_s"] / steps) < 1e-6 * r["ms_per_cycle"]
    for key in ("orthrus_vs_ar_bs1", "orthrus_vs_ar_bs1-first4"):
        assert rep[key]["full"] > 0 and rep[key]["adaptive"] > 0
    assert not (state / "_speedup_view.safetensors").exists()


def test_greedy_training_answers_each_prompt_once_and_stops_there(tmp_path, capsys):
    """--train-on greedy: the stream ends after the greedy pass, so no time goes to sampled
    answers nothing trains on; a later command trains on the answers kept."""
    import distill_curve as C
    from orthrus_runtime.tools import distill as D

    ck = tiny_checkpoint(tmp_path / "ck", arch="llama", block_size=4)
    (tmp_path / "p.txt").write_text("\n".join(f"Describe the colour of stone number {i}." for i in range(12)))
    state = tmp_path / "state"
    argv = ["--state", str(state), "--model", str(ck), "--device", "cpu", "--init", "ar-copy",
            "--prompts", str(tmp_path / "p.txt"), "--eval-dtypes", "float32", "--gen-dtype", "float32",
            "--eval-block-size", "4", "--eval-max-tokens", "6", "--eval-limit", "1", "--eval-estimate-s", "1",
            "--gen-max-new-tokens", "10", "--gen-max-num-seqs", "16", "--batch-size", "4", "--blocks-per-seq", "3",
            "--budget-s", "6", "--split", "0.5,0.4,0.1", "--chain", "2", "--part-mb", "0.005", "--max-points", "1",
            "--no-start-point", "--train-on", "greedy"]
    # An OUT that holds two files already (run.log, say): with the state's six, the device's 8, so the
    # command's answers are not returned, and the log says so.
    out = tmp_path / "out"
    out.mkdir()
    for name in ("run.log", "other.txt"):
        (out / name).write_text("x")
    assert C.main(argv + ["--out", str(out)]) == 0
    assert not list(out.glob("shard-*")) and "shard-c0001.safetensors not returned" in capsys.readouterr().err
    st = json.loads((state / "state.json").read_text())
    kept = D.load_shards(state / "data")
    assert st["next_uid"] == 12 and sorted(kept.uids.tolist()) == list(range(12)) and bool(kept.greedy.all())
    capsys.readouterr()
    # A command that failed after writing its answers leaves a second copy of them: each uid trains once.
    shard = D.shard_paths(state / "data")[0]
    shutil.copy(shard, shard.with_name("shard-00001.safetensors"))
    # Resumed without --train-on: the state's recipe (greedy) goes on, and no answers are left to make.
    # (With a profile of one training step: the table goes to the log.)
    assert C.main(argv[: argv.index("--train-on")] + ["--profile-steps", "1", "--profile-after-s", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "every prompt has its greedy answer" in err and "0 new answers, 12 kept" in err
    assert "profile of 1 training step(s)" in err and "aten::" in err
    st2 = json.loads((state / "state.json").read_text())
    assert st2["step"] > st["step"] and st2["train_on"] == "greedy"


def test_a_commands_first_evaluation_is_planned_at_its_own_cost(tmp_path):
    """The first evaluation of a process compiles and costs about twice a later one; a plan
    at the later cost overran a device call (2026-12-07)."""
    import argparse

    import distill_curve as C

    r = C.Run(argparse.Namespace(state=tmp_path, eval_estimate_s=90.0))
    assert r.eval_cost(0) == 0 and r.eval_cost(2) == 180  # nothing measured: the estimate
    r.state["eval_seconds"] = 45.0
    assert r.eval_cost(3) == 90 + 45 + 45  # measured later evaluations; the first not yet
    r.state["eval_first_seconds"] = 86.0
    assert r.eval_cost(2) == 90 + 45  # never below the estimate (an earlier command may have warmed caches)
    r.a.eval_estimate_s = 60.0
    assert r.eval_cost(2) == 86 + 45
    r.evals = 1  # this process has compiled
    assert r.eval_cost(2) == 90
