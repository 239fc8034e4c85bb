"""ZOTrainer: a transformers Trainer whose step is a ZO step (no backward), with plain, masked and PEFT models."""
import os

import pytest
import torch

import mazo_kernels as mk

import transformers  # noqa: E402

from mazo_kernels import tasks as T  # noqa: E402
from mazo_kernels.tiny import tiny_llama  # noqa: E402
from mazo_kernels.trainer import ZOArguments, ZOTrainer, make_zo_optimizer  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
BACKEND = "cpu" if mk.has_cpu() else "reference"


@pytest.fixture(scope="module")
def tasks():
    return T.load_tasks([os.path.join(DATA, "task_sentiment.jsonl"), os.path.join(DATA, "task_echo.jsonl")])


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=1e-3,
                lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                seed=0, disable_tqdm=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


@pytest.fixture
def no_backward(monkeypatch):
    """Any backward pass fails the test."""
    def boom(*a, **k):
        raise AssertionError("backward was called")
    monkeypatch.setattr(torch.Tensor, "backward", boom)
    monkeypatch.setattr(torch.autograd, "backward", boom)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zo_trainer_learns_without_backward(tmp_path, tasks, no_backward):
    model, tok = tiny_llama(seed=1)
    train = tasks["task_sentiment"]
    before = _snapshot(model)
    loss0 = T.evaluate(model, tok, train[:16])["loss"]
    tr = ZOTrainer(model=model, args=_args(tmp_path, max_steps=30, eval_strategy="steps", eval_steps=15),
                   zo_args=ZOArguments(backend=BACKEND), train_dataset=T.TaskDataset(train),
                   data_collator=T.TaskCollator(tok), processing_class=tok, eval_tasks={"sentiment": train[:8]})
    out = tr.train()
    assert out.global_step == 30
    # exactly one ZO step per Trainer step: the loop's own optimizer.step() added none
    assert len(tr.zo_optimizer.seed_log) == 30
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    loss1 = T.evaluate(model, tok, train[:16])["loss"]
    assert loss1 < loss0 - 0.3, (loss0, loss1)          # the answer tokens' loss falls (4.75 -> 4.06 here)
    logged = [h["eval_sentiment_accuracy"] for h in tr.state.log_history if "eval_sentiment_accuracy" in h]
    assert len(logged) == 2 and all(0.0 <= a <= 1.0 for a in logged)
    train_losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0]


def test_trainer_step_is_exactly_one_zosgd_step(tmp_path, tasks):
    """The Trainer's weights equal a plain loop's: ZOSGD.step(closure) on the same batches, bit for bit."""
    mixed = T.MixedTaskDataset(tasks, mixing="uniform", seed=3)
    m1, tok = tiny_llama(seed=2)
    m2, _ = tiny_llama(seed=2)
    zo = ZOArguments(backend=BACKEND, seed=77)
    tr = ZOTrainer(model=m1, args=_args(tmp_path, max_steps=6), zo_args=zo, train_dataset=mixed,
                   data_collator=T.TaskCollator(tok), processing_class=tok)
    tr.train()
    opt = make_zo_optimizer(m2, zo, lr=1e-3)
    stream = iter(mixed)
    collate = T.TaskCollator(tok)
    for _ in range(6):
        batch = collate([next(stream) for _ in range(4)])
        opt.step(lambda: m2(**batch).loss)        # what Trainer.compute_loss does
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a, b), n


def test_peft_lora_trains_only_adapters(tmp_path, tasks, no_backward):
    import peft
    base, tok = tiny_llama(seed=4)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    before = _snapshot(model)
    tr = ZOTrainer(model=model, args=_args(tmp_path, max_steps=5), zo_args=ZOArguments(backend=BACKEND),
                   train_dataset=T.TaskDataset(tasks["task_sentiment"]), data_collator=T.TaskCollator(tok),
                   processing_class=tok)
    tr.train()
    names = [e.name for e in tr.zo_optimizer.plan.entries]
    assert names and all("lora_" in n for n in names)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    lora = {n for n, _ in model.named_parameters() if "lora_" in n}
    assert changed == lora          # every adapter moved; every base weight is bit-identical
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("unmasked", ["freeze", "train"])
def test_sparse_mezo_leaves_large_weights(tmp_path, tasks, unmasked):
    model, tok = tiny_llama(seed=5)
    before = _snapshot(model)
    tr = ZOTrainer(model=model, args=_args(tmp_path, max_steps=4),
                   zo_args=ZOArguments(method="sparse-mezo", sparsity=0.5, backend=BACKEND, unmasked=unmasked),
                   train_dataset=T.TaskDataset(tasks["task_sentiment"]), data_collator=T.TaskCollator(tok),
                   processing_class=tok)
    tr.train()
    assert tr.zo_masks
    params = dict(model.named_parameters())
    for name, mask in tr.zo_masks.items():
        w0, w1 = before[name], params[name].detach()
        frozen = w0.abs() >= mask.tau
        assert 0.4 < frozen.float().mean().item() < 0.6
        assert torch.equal(w1[frozen], w0[frozen])
        assert not torch.equal(w1[~frozen], w0[~frozen])
    unmasked_params = [n for n in params if n not in tr.zo_masks]
    assert unmasked_params            # the norms (1-D) get no threshold mask
    for n in unmasked_params:         # frozen entirely, or trained densely
        assert torch.equal(params[n], before[n]) == (unmasked == "freeze"), n


def test_mazo_builds_masks_from_train_tasks(tmp_path, tasks):
    model, tok = tiny_llama(seed=6)
    before = _snapshot(model)
    ds = T.TaskDataset(tasks["task_sentiment"] + tasks["echo"])
    tr = ZOTrainer(model=model, args=_args(tmp_path, max_steps=3),
                   zo_args=ZOArguments(method="mazo", density=0.25, mask_batches=2, backend=BACKEND,
                                       unmasked="freeze"),
                   train_dataset=ds, data_collator=T.TaskCollator(tok), processing_class=tok)
    tr.train()
    masks = tr.zo_masks
    assert masks and all(isinstance(m, (mk.BitMask, mk.RowIndexMask)) for m in masks.values())
    for name, p in model.named_parameters():
        if name not in masks:        # unmasked="freeze": untouched
            assert torch.equal(p, before[name]), name
            continue
        m = masks[name]
        sel = torch.zeros(p.shape, dtype=torch.bool)
        if isinstance(m, mk.RowIndexMask):
            sel.scatter_(1, m.cols.long(), True)
        else:
            bits = m.bits.unsqueeze(-1).bitwise_right_shift(torch.arange(8, dtype=torch.uint8)) & 1
            sel = bits.reshape(-1)[:p.numel()].bool().view(p.shape)
        assert torch.equal(p[~sel], before[name][~sel]), name
        assert not torch.equal(p[sel], before[name][sel]), name


def test_bad_settings_are_refused(tmp_path, tasks):
    with pytest.raises(ValueError, match="ZOArguments.method"):
        ZOArguments(method="adam")
    with pytest.raises(ValueError, match="density applies to method 'mazo'"):
        ZOArguments(method="mezo", density=0.1)
    with pytest.raises(ValueError, match="sparsity must be in"):
        ZOArguments(method="sparse-mezo", sparsity=1.5)
    with pytest.raises(ValueError, match="eps must be finite"):
        ZOArguments(eps=0.0)
    model, tok = tiny_llama(seed=7)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        ZOTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2),
                  train_dataset=T.TaskDataset(tasks["echo"]), data_collator=T.TaskCollator(tok))
    # mazo without any way to get task batches
    tr = ZOTrainer(model=model, args=_args(tmp_path), zo_args=ZOArguments(method="mazo", backend=BACKEND),
                   train_dataset=[{"input_ids": [1, 2]}], data_collator=T.TaskCollator(tok))
    with pytest.raises(ValueError, match="needs task batches"):
        tr.create_optimizer()


def test_lookahead_trains_the_same_steps_and_settles(tmp_path, tasks):
    """ZOArguments(lookahead=True): the same losses as a plain run (every forward sees the same weights, settled
    for the evaluation in between), and after train() the weights are settled: the seed log's replay rebuilds them."""
    train = tasks["task_sentiment"]
    runs = {}
    for la in (False, True):
        model, tok = tiny_llama(seed=5)
        tr = ZOTrainer(model=model, args=_args(tmp_path / str(la), max_steps=8, logging_steps=1,
                                               eval_strategy="steps", eval_steps=4),
                       zo_args=ZOArguments(backend=BACKEND, lookahead=la), train_dataset=T.TaskDataset(train),
                       data_collator=T.TaskCollator(tok), processing_class=tok, eval_tasks={"s": train[:4]})
        tr.train()
        runs[la] = (model, tr)
    losses = {la: [h["loss"] for h in tr.state.log_history if "loss" in h] for la, (_, tr) in runs.items()}
    assert len(losses[True]) == 8 and losses[True] == losses[False]
    model, tr = runs[True]
    assert not tr.zo_optimizer.carries_perturbation
    settled = [s.get("settled_seed") is not None for s in tr.zo_optimizer.seed_log.steps]
    assert settled == [False, False, False, True, False, False, False, True]   # the evaluations at steps 4 and 8
    fresh, _ = tiny_llama(seed=5)
    mk.replay(fresh, tr.zo_optimizer.seed_log, backend=BACKEND)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="lookahead"):
        ZOArguments(lookahead=True, mode="transient")
