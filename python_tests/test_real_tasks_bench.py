"""bench/real_tasks.py's machinery on a tiny random LLaMA (the real model runs on a GPU): every job kind of the
smoke plan runs through run_job, the lr choice, the timing table, and the report with its tables and plots."""
import json
import os
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from mazo_kernels import finetune as F
from mazo_kernels import task_data as td
from mazo_kernels.tasks import load_task_file
from mazo_kernels.tiny import tiny_llama

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
DATA = os.path.join(BENCH, "data", "real_tasks")


@pytest.fixture(scope="module")
def rt():
    sys.path.insert(0, BENCH)
    try:
        import real_tasks
    finally:
        sys.path.remove(BENCH)
    return real_tasks


def _splits(n):
    return {s: {t: load_task_file(td.split_path(DATA, t, s))[:n] for t in td.TASKS} for s in td.SPLITS}


def test_plan_jobs(rt):
    plan = rt.PLANS["full"]
    a = rt.phase_a(plan)
    assert a[0]["method"] == "zeroshot" and all(j["group"] == "sweep" for j in a[1:])
    lrs = {m: plan["lr_grid"][m][0] for m in rt.ZO + ("adamw",)}
    b = rt.phase_b(plan, lrs)
    names = [j["name"] for j in b]
    assert len(names) == len(set(names))
    assert names[:4] == ["main_mezo_s0", "main_sparse-mezo_s0", "main_mazo_s0", "main_adamw_s0"]
    zo_steps = {j["steps"] for j in b if j["method"] in rt.ZO and j["group"] in ("main", "single", "ablation")}
    assert zo_steps == {plan["zo_steps"]}                    # the ZO methods get the same number of forwards
    assert {j["group"] for j in b} == {"main", "numerics", "ablation", "drift", "single"}
    assert sum(j["group"] == "single" for j in b) == 16 and sum(j["group"] == "main" for j in b) == 12


def test_jobs_timing_and_report(rt, tmp_path):
    model, tok = tiny_llama(seed=0)
    plan = rt.PLANS["smoke"]
    splits = _splits(6)
    rt._W.clear()
    rt._W.update(model=model, tok=tok, init={k: v.detach().clone() for k, v in model.state_dict().items()},
                 splits=splits, device=torch.device("cpu"), plan=plan)
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "jobs"))
    deadline = time.time() + 600
    for j in rt.phase_a(plan):
        name, status, _ = rt.run_job(j, out, deadline)
        assert status == "done", json.load(open(os.path.join(out, "jobs", name + ".json"))).get("traceback")
    results = {n[:-5]: json.load(open(os.path.join(out, "jobs", n))) for n in os.listdir(os.path.join(out, "jobs"))}
    lrs = rt.best_lrs(plan, results)
    assert set(lrs) == set(rt.ZO) | {"adamw"} and lrs["mazo"] in plan["lr_grid"]["mazo"]
    rt._write(os.path.join(out, "best_lrs.json"), lrs)
    for j in rt.phase_b(plan, lrs):
        name, status, _ = rt.run_job(j, out, deadline)
        assert status == "done", json.load(open(os.path.join(out, "jobs", name + ".json"))).get("traceback")
    drift = json.load(open(os.path.join(out, "jobs", "drift_ours_fp32.json")))
    assert drift["drift"]["rel_rms"] < 1e-6                  # fp32, lr = 0: only rounding ties move
    naive = json.load(open(os.path.join(out, "jobs", "drift_mezo-naive_bf16.json")))
    assert naive["drift"]["changed_fraction"] > 0            # MeZO-style bf16 drifts
    single = json.load(open(os.path.join(out, "jobs", "single_capital_mazo.json")))
    assert single["spec"]["train"] == ["capital"] and single["record"]["trainable_params"] > 0
    main = json.load(open(os.path.join(out, "jobs", "main_adamw_s0.json")))
    assert main["record"]["backwards"] == main["record"]["forwards"] == plan["adamw_steps"]
    # skipped after the deadline
    name, status, _ = rt.run_job(rt.phase_a(plan)[0], out, time.time() - 1)
    assert status == "skipped"
    rt.timing(model, tok, splits, torch.device("cpu"), plan, out, time.time())
    rows = json.load(open(os.path.join(out, "timing.json")))
    assert {r["method"] for r in rows} == set(rt.ZO) | {"adamw", "mezo-naive"}
    assert all("ms_per_step" in r for r in rows), rows
    rt._write(os.path.join(out, "env.json"), {"device": "CPU", "plan": "smoke", "plan_config": {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()}, "default_mazo": rt.DEFAULT_MAZO})
    md = os.path.join(out, "R.md")
    text = rt.report(out, md, out)
    assert "### Main table" in text and "MaZO" in text and "± " in text          # two seeds: mean ± std
    for t in td.TASKS:
        assert t in text
    assert "| ours, bf16 |" in text and "| MeZO-style, bf16 |" in text
    assert "density0.001" in text and "lr_x3" in text
    assert "Jobs not completed: `zeroshot` (skipped)" in text                  # the deadline test above
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.join(out, "real_tasks_curves.png")) > 10_000
    assert "real_tasks_curves.png" in open(md).read()


def test_evaluate_choice_ce_and_predictions():
    model, tok = tiny_llama(seed=1)
    exs = load_task_file(td.split_path(DATA, "capital", "dev"))[:5]
    r = F.evaluate(model, tok, exs, batch_size=3)
    assert r["n"] == 5 and len(r["predictions"]) == 5 and r["choice_ce"] > 0
    b = F.choice_batch(tok, exs)
    with torch.no_grad():
        ce = F.choice_loss(model, b)
    assert abs(float(ce) - r["choice_ce"]) < 1e-4                # the training loss is the evaluated cross-entropy
