"""Scale-out on torch.distributed (CPU, gloo): ZO data parallelism and FSDP2-sharded weights against one process.

The multi-process runs are python_tests/dist_worker.py, launched once per world size (1, 2, 4 processes) for the
whole module; each test then checks one claim against single-process references computed here:
- data parallel: bit-identical to one process that sums the same micro-batch losses in the same order; within the
  stated bound of one process on the whole batch; replicas bit-identical; seed-log replay reproduces the weights;
  a tampered replica is caught; a failing rank does not hang the others.
- FSDP2 (fully_shard works on CPU with gloo in torch 2.14): every element gets the noise of its global index (the
  perturbed weights the forward sees are checked against the reference noise) for 1, 2 and 4 ranks, including
  uneven and empty shards; weights bit-identical to the micro-batch reference, and equal across rank counts up to
  the loss rounding.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import mazo_kernels as mk
from mazo_kernels import distributed as mkd
from mazo_kernels import optim as O
from mazo_kernels import reference as ref

import dist_worker as W  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
Z_MAX = 5.27     # |z| <= sqrt(40 ln 2) for the spec's Gaussian (docs/NOISE_SPEC.md); 1 for Rademacher


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def launch(world, out, scenarios, script=WORKER, args=None, timeout=240, extra_env=None):
    """Start `world` processes of `script` with the torch.distributed environment torchrun would set."""
    port = _free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MAZO_SKIP_CUDA="1",
                   **(extra_env or {}))
        cmd = [sys.executable, script] + (args if args is not None else [str(out)] + scenarios)
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            o, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(o)
    for r, (p, o) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{o[-4000:]}"
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch(1, out, ["fsdp"])
    launch(2, out, ["dp", "tamper", "fail", "fsdp", "trainer"])
    launch(4, out, ["dp", "fsdp"])
    return out


def _load(out, name):
    return torch.load(os.path.join(out, name), weights_only=False)


# ---------------------------------------------------------------------------------------------------- references
def single_process(cfg, micro, steps=W.STEPS, fail_step=None):
    """One process over the same global batches: micro=None evaluates the whole batch at once, micro=n evaluates n
    micro-batches and combines their losses in order, as the ranks do."""
    model = W.Net(0, W.CONFIGS[cfg][0])
    opt = W.make_opt(model, cfg)
    for k in range(steps):
        x, y = W.global_batch(k)
        if k == fail_step:
            def closure():
                raise RuntimeError("injected failure")
        elif micro is None:
            closure = (lambda: model(x, y))
        else:
            mbs = [mkd.shard_batch((x, y), r, micro) for r in range(micro)]
            closure = mkd.micro_batch_closure(lambda mb: model(*mb), mbs)
        try:
            opt.step(closure)
        except RuntimeError:
            assert k == fail_step
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.state_dict()["seed_log"]


def _ulp(t: torch.Tensor, dtype: torch.dtype) -> float:
    """The storage ulp of the largest |value| in t (an upper bound for every element's ulp)."""
    m = float(t.detach().float().abs().max())
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    return 2.0 ** (math.floor(math.log2(max(m, 1e-30))) - mant)


def whole_batch_bound(log_a, log_b, weights, z_max=Z_MAX):
    """Per tensor: sum over steps of lr * z_max * mean_i |g_a,i - g_b,i| (the update difference the loss rounding
    can cause) plus 8 storage ulps per step (each rounding of two values that differ can add one), with weight decay
    carrying the previous difference (factor 1 + lr*wd)."""
    bound = {n: 0.0 for n in weights}
    for sa, sb in zip(log_a["steps"], log_b["steps"]):
        dg = [abs(x - y) for x, y in zip(mk.seed_log.bits_f32(sa["g_bits"]).tolist(),
                                         mk.seed_log.bits_f32(sb["g_bits"]).tolist())]
        lr, wd, eps = sa["lr"][0], sa["weight_decay"][0], sa["eps"][0]
        for n, w in weights.items():
            ulp = _ulp(w.float().abs() + eps * z_max, w.dtype)
            bound[n] = bound[n] * (1 + lr * wd) + lr * z_max * sum(dg) / len(dg) + 8 * ulp
    return bound


# ---------------------------------------------------------------------------------------------------- data parallel
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cfg", list(W.CONFIGS))
def test_dp_bit_identical_to_micro_batch_reference(runs, world, cfg):
    ranks = [_load(runs, f"dp_{cfg}_w{world}_r{r}.pt") for r in range(world)]
    for r in range(1, world):                                    # replicas bit-identical
        for n, t in ranks[0]["weights"].items():
            assert torch.equal(t, ranks[r]["weights"][n]), (r, n)
        assert ranks[r]["losses"] == ranks[0]["losses"]
    assert ranks[0]["checked"] == 2                              # the in-step replica check ran (check_every=2)
    expect, log = single_process(cfg, micro=world)
    for n, t in expect.items():
        assert torch.equal(ranks[0]["weights"][n], t), n
    dp_log = _load(runs, f"dp_{cfg}_w{world}_log.pt")
    assert [s["g_bits"] for s in dp_log["steps"]] == [s["g_bits"] for s in log["steps"]]
    assert any(not torch.equal(t, W.Net(0, t.dtype).state_dict()[n]) for n, t in expect.items())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("cfg", list(W.CONFIGS))
def test_dp_vs_whole_batch_within_loss_rounding_bound(runs, world, cfg):
    dp = _load(runs, f"dp_{cfg}_w{world}_r0.pt")["weights"]
    dp_log = _load(runs, f"dp_{cfg}_w{world}_log.pt")
    whole, whole_log = single_process(cfg, micro=None)
    z_max = 1.0 if W.CONFIGS[cfg][1].get("dist") == "rademacher" else Z_MAX
    bound = whole_batch_bound(dp_log, whole_log, whole, z_max)
    for n, t in whole.items():
        diff = float((dp[n].double() - t.double()).abs().max())
        assert diff <= bound[n], (n, diff, bound[n])


@pytest.mark.parametrize("world", [2, 4])
def test_dp_seed_log_replays_to_the_same_weights(runs, world):
    for cfg in W.CONFIGS:
        model = W.Net(0, W.CONFIGS[cfg][0])
        assert mk.replay(model, _load(runs, f"dp_{cfg}_w{world}_log.pt"), backend=W.BACKEND) == W.STEPS
        dp = _load(runs, f"dp_{cfg}_w{world}_r0.pt")["weights"]
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), dp[n]), (cfg, n)


def test_tampered_replica_is_caught_on_every_rank(runs):
    for r in range(2):
        d = _load(runs, f"tamper_w2_r{r}.pt")
        assert d["error"] is not None and "rank 1 differs" in d["error"] and "at step 1" in d["error"]
        assert d["skipped"] is True and d["log_error"].startswith("ReplicaDivergence")


def test_failing_rank_does_not_hang_the_others_and_replicas_stay_identical(runs):
    r0, r1 = _load(runs, "fail_w2_r0.pt"), _load(runs, "fail_w2_r1.pt")
    assert r0["raised"] is None and r1["raised"] == "injected failure"
    assert r0["skipped"] == r1["skipped"] == [False, True, False]
    expect, _ = single_process("fp32", micro=2, steps=3, fail_step=1)
    for n, t in expect.items():
        assert torch.equal(r0["weights"][n], t) and torch.equal(r1["weights"][n], t), n


# ---------------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_every_element_gets_the_noise_of_its_global_index(runs, world):
    d = _load(runs, f"fsdp_w{world}.pt")
    theta0 = dict(W.Net(0).named_parameters())
    seed = d["log"]["steps"][0]["seeds"][0]
    eps = torch.tensor(W.CONFIGS["fp32"][1]["eps"], dtype=torch.float32)
    for n, p in theta0.items():
        z = ref.noise(seed, mk.stable_tensor_id(n), torch.arange(p.numel()), ref.DIST_GAUSSIAN).view(p.shape)
        expect = p.detach() + eps * z            # fl32(w + fl32(eps*z)): the first in-place pass
        assert torch.equal(d["perturbed"][n], expect), n
    ref1 = _load(runs, "fsdp_w1.pt")["perturbed"]
    for n in theta0:
        assert torch.equal(d["perturbed"][n], ref1[n]), n


def test_fsdp_needs_the_sharded_parameters_and_the_module(runs):
    errors = _load(runs, "fsdp_w2.pt")["errors"]
    assert "not sharded DTensors" in errors["unsharded_list"]
    assert "pass module=model" in errors["no_module"]


def test_fsdp_shards_are_uneven_and_empty_where_the_rows_run_out(runs):
    shards = _load(runs, "fsdp_w4.pt")["shards"]
    assert [s["fc1.weight"] for s in shards] == [(0, 36, 120), (36, 36, 120), (72, 36, 120), (108, 12, 120)]
    assert [s["fc2.weight"][:2] for s in shards] == [(0, 10), (10, 10), (20, 10), (30, 0)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fsdp_weights_match_single_process_and_other_rank_counts(runs, world):
    d = _load(runs, f"fsdp_w{world}.pt")
    expect, log = single_process("fp32", micro=None if world == 1 else world)
    for n, t in expect.items():                     # bit-identical to the micro-batch reference
        assert torch.equal(d["weights"][n], t), n
    assert d["log"]["params"] == log["params"]      # full shapes in the log: it does not depend on the rank count
    one = _load(runs, "fsdp_w1.pt")                 # across rank counts: equal up to the loss rounding
    bound = whole_batch_bound(d["log"], one["log"], one["weights"])
    for n, t in one["weights"].items():
        assert float((d["weights"][n].double() - t.double()).abs().max()) <= bound[n], n
    model = W.Net(0)                                # the log of a sharded run replays on the unsharded model
    mk.replay(model, d["log"], backend=W.BACKEND)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), d["weights"][n]), n


# ---------------------------------------------------------------------------------------------------- ZOTrainer, CLI
def test_zo_trainer_under_distributed_launch_is_data_parallel_without_ddp(runs):
    from mazo_kernels.tiny import tiny_llama
    r0, r1 = _load(runs, "trainer_w2_r0.pt"), _load(runs, "trainer_w2_r1.pt")
    for d in (r0, r1):
        assert d["world"] == 2 and d["ddp"] is False and d["same_object"] is True
        assert d["wrapped"] == ["LlamaForCausalLM", "LlamaForCausalLM"]
        assert d["reduce"] == "LossAllGather" and d["checked"] == 2        # replica checks ran (every step)
    for n, t in r0["weights"].items():
        assert torch.equal(t, r1["weights"][n]), n
    assert all(s["g"][0] not in (0.0, None) for s in r0["log"]["steps"])   # the forwards saw the perturbations
    init, _ = tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    mk.replay(init, r0["log"], backend=W.BACKEND)
    for n, p in init.named_parameters():
        assert torch.equal(p.detach(), r0["weights"][n]), n


def test_zo_trainer_refuses_a_plan_that_no_longer_aliases_the_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mazo_kernels import tasks as T
    from mazo_kernels.tiny import tiny_llama
    from mazo_kernels.trainer import ZOArguments, ZOTrainer

    tasks = T.load_tasks([os.path.join(ROOT, "python_tests", "data", "task_echo.jsonl")])
    model, tok = tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    trainer = ZOTrainer(model=model, args=args, zo_args=ZOArguments(backend=W.BACKEND),
                        train_dataset=T.TaskDataset([e for exs in tasks.values() for e in exs]),
                        data_collator=T.TaskCollator(tok), processing_class=tok)
    trainer.create_optimizer()
    model.to(torch.float64).to(torch.float32)          # new storage for every weight
    with pytest.raises(RuntimeError, match="re-allocated"):
        trainer.train()
    with pytest.raises(ValueError, match="FSDP / DeepSpeed"):
        ZOTrainer(model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard",
                                                                   report_to=[], use_cpu=True))


def test_mazo_train_under_torchrun_matches_the_micro_batch_reference(tmp_path):
    pytest.importorskip("transformers")
    from mazo_kernels import cli
    from mazo_kernels.tasks import MultiTaskSampler, batch_loss, load_tasks, split_tasks, training_batch
    from mazo_kernels.tiny import tiny_llama
    from mazo_kernels.trainer import ZOArguments, make_zo_optimizer

    out = tmp_path / "run"
    data = os.path.join(ROOT, "python_tests", "data")
    files = [os.path.join(data, "task_sentiment.jsonl"), os.path.join(data, "task_echo.jsonl")]
    argv = ["--config", "tiny", "--tasks", *files, "--steps", "4", "--batch-size", "4", "--eval-examples", "4",
            "--lr", "1e-3", "--output-dir", str(out), "--no-progress", "--backend", W.BACKEND,
            "--replica-check-every", "2", "--seed", "3", "--device", "cpu"]
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MAZO_SKIP_CUDA="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "-m", "mazo_kernels.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["metrics.json", "model", "seed_log.json"]
    import json
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["world_size"] == 2 and len(metrics["train_loss"]) == 4

    # one process, the same global batches, each split into the two ranks' halves and combined in rank order
    a = cli.parse_args(argv)
    train_tasks, _ = split_tasks(load_tasks(files), a.eval_examples, seed=a.seed)
    model, tok = tiny_llama(seed=a.seed)
    opt = make_zo_optimizer(model, ZOArguments(eps=a.eps, seed=a.seed, backend=a.backend), lr=a.lr, seed=a.seed)
    sampler = MultiTaskSampler(train_tasks, a.batch_size, mixing=a.mixing, seed=a.seed)
    for _ in range(a.steps):
        exs = sampler.next_batch()
        mbs = [training_batch(tok, exs[i:i + 2]) for i in (0, 2)]
        opt.step(mkd.micro_batch_closure(lambda b: batch_loss(model, b), mbs))
    from safetensors.torch import load_file
    saved = load_file(str(out / "model" / "model.safetensors"))
    for n, p in model.named_parameters():
        assert torch.equal(saved[n], p.detach()), n


# ---------------------------------------------------------------------------------------------------- in process
def test_combine_losses_adds_in_rank_order():
    x = torch.tensor([[1e8, 1.0], [1.0, 2.0], [-1e8, 3.0], [1.0, 4.0]], dtype=torch.float32)
    got = mkd.combine_losses(x, "sum")
    assert got.tolist() == [1.0, 10.0]              # ((1e8 + 1) - 1e8) + 1 = 1 in float32, not 2
    assert mkd.combine_losses(x, "mean").tolist() == [0.25, 2.5]
    assert mkd.combine_losses(x[:1], "mean").tolist() == [1e8, 1.0]
    with pytest.raises(ValueError, match="reduce"):
        mkd.combine_losses(x, "max")


def test_shard_batch():
    b = {"x": torch.arange(12).view(6, 2), "y": torch.arange(6), "n": 3}
    parts = [mkd.shard_batch(b, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), b["x"]) and parts[1]["y"].tolist() == [2, 3]
    assert parts[2]["n"] == 3
    with pytest.raises(ValueError, match="multiple of the world size"):
        mkd.shard_batch(b, 0, 4)
    from collections import UserDict                # transformers' BatchEncoding is a UserDict
    assert mkd.shard_batch(UserDict(b), 2, 3)["y"].tolist() == [4, 5]


def test_replica_checksum_sees_one_ulp_and_ignores_order_of_summation():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(1000, generator=g), torch.randn(37, 5, generator=g).bfloat16(),
          torch.randn(9, generator=g).half()]
    c0 = int(mkd.replica_checksum(ts))
    assert c0 == int(mkd.replica_checksum([t.clone() for t in ts]))
    for i in range(3):
        t2 = [t.clone() for t in ts]
        v = t2[i].view(-1)
        v[3] = torch.nextafter(v[3].float(), torch.tensor(float("inf"))).to(v.dtype) if v.dtype == torch.float32 \
            else (v[3].float() * (1 + 2 ** -6)).to(v.dtype)
        assert int(mkd.replica_checksum(t2)) != c0, i
    t3 = [t.clone() for t in ts]                   # +1 ulp on one element, -1 ulp on another: still seen
    b = t3[0].view(torch.int32)
    b[0] += 1
    b[1] -= 1
    assert int(mkd.replica_checksum(t3)) != c0
    assert int(mkd.replica_checksum([ts[1], ts[0], ts[2]])) != c0     # tensor order matters (weights 2i + 1)


def test_loss_reduce_hook_in_one_process():
    """The hook sees the step's losses in a fixed order and its result is what g is computed from."""
    model = W.Net(0)
    seen = []

    def reduce(v):
        seen.append(v.clone())
        return v * 2

    opt = W.make_opt(model, "fp32", loss_reduce=reduce)
    x, y = W.global_batch(0)
    est = opt.step(lambda: model(x, y))
    assert len(seen) == 1 and seen[0].shape == (2,)
    lp, lm = seen[0].tolist()
    g = mk.seed_log.bits_f32(opt.seed_log.steps[0]["g_bits"])
    g_expect = (torch.tensor([lp]) * 2 - torch.tensor([lm]) * 2) / torch.tensor(2 * 1e-3, dtype=torch.float32)
    assert torch.equal(g, g_expect)
    assert float(est) == float(torch.tensor([lp * 2, lm * 2]).mean())

    opt2 = W.make_opt(W.Net(0), "fp32", loss_reduce=lambda v: v[:1])
    m2 = opt2.module
    with pytest.raises(TypeError, match="loss_reduce must return a tensor of shape"):
        opt2.step(lambda: m2(x, y))
    assert opt2.seed_log.steps[0]["skipped"] is True
    with pytest.raises(TypeError, match="callable"):
        W.make_opt(W.Net(0), "fp32", loss_reduce=3)


def test_data_parallel_needs_a_process_group():
    opt = W.make_opt(W.Net(0), "fp32")
    with pytest.raises(RuntimeError, match="process group"):
        mkd.data_parallel(opt)


def test_plans_per_device_match_one_plan(monkeypatch):
    """A model split across devices (device_map="auto") gets one plan per device. Here two 'devices' are
    simulated on the CPU by keying the split on the storage of fc2's tensors; the result must equal one plan bit for
    bit."""
    def run(split):
        if split:
            monkeypatch.setattr(O, "_device_key", lambda t: ("fake", t.data_ptr() in fc2_ids))
        else:
            monkeypatch.setattr(O, "_device_key", lambda t: t.device)
        model = W.Net(0, torch.bfloat16)
        fc2_ids.clear()
        fc2_ids.update(p.data_ptr() for p in model.fc2.parameters())
        opt = W.make_opt(model, "bf16q2")
        for k in range(3):
            x, y = W.global_batch(k)
            opt.step(lambda: model(x, y))
        return model, opt

    fc2_ids: set = set()
    a, oa = run(False)
    b, ob = run(True)
    assert len(oa.plans) == 1 and len(ob.plans) == 2
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    init = W.Net(0, torch.bfloat16)                 # replay also splits by device
    mk.replay(init, ob.seed_log, backend=W.BACKEND)
    for p, q in zip(init.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_local_shard_fallback_layout():
    """The torch.chunk layout used when torch lacks compute_local_shape_and_global_offset."""
    class Mesh:
        def __init__(self, coord, sizes):
            self.coord, self.sizes = coord, sizes

        def get_coordinate(self):
            return self.coord

        def size(self, i):
            return self.sizes[i]

    from torch.distributed.tensor import Replicate, Shard
    got = [mkd._local_shape_and_offset((10, 12), Mesh([r], [4]), [Shard(0)]) for r in range(4)]
    assert got == [((3, 12), (0, 0)), ((3, 12), (3, 0)), ((3, 12), (6, 0)), ((1, 12), (9, 0))]
    assert mkd._local_shape_and_offset((3, 5), Mesh([3], [4]), [Shard(0)]) == ((0, 5), (3, 0))
    assert mkd._local_shape_and_offset((8, 2), Mesh([1, 1], [2, 2]), [Replicate(), Shard(0)]) == ((4, 2), (4, 0))
