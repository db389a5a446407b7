"""Optimizers and learning-rate schedules: every schedule config against its closed form, resume of
every schedule, parameter groups (weight decay, stage multipliers, layer decay, lr scaling), every
optimizer and scheduler config training the default run, and the schedule plot script.

Closed forms are written out here independently of src/optim; T = 100 steps, 10 per epoch.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from lr_steps import run_steps
from torch import nn

from src.models.resnet_cifar import resnet_cifar
from src.optim.optimizers import OPTIMIZERS, build_optimizer, global_batch_from
from src.train import train
from src.utils.errors import AutoclsError, find_user_error

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = sorted(p.stem for p in (ROOT / "configs" / "scheduler").glob("*.yaml"))
OPTIMIZER_CONFIGS = sorted(p.stem for p in (ROOT / "configs" / "optimizer").glob("*.yaml"))

BASE_LR, T, SPE, W = 0.1, 100, 10, 10  # base lr, total steps, steps per epoch, warmup steps (1 epoch)


def cosine_down(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


def after_warmup(s: int, w: int = W) -> float:
    return (s - w) / (T - w)


# name -> (overrides, warmup steps, warmup start factor, closed form of the factor after warmup)
ONE_CYCLE_MIN = 1 / (25 * 1e4)
CASES = {
    "cosine": (["scheduler.min_lr_ratio=0.1"], W, 0.0, lambda s: 0.1 + 0.9 * cosine_down(after_warmup(s))),
    "piecewise": (["scheduler.milestones=[4,7]", "scheduler.gamma=0.5"], W, 0.0,
                  lambda s: 0.5 ** ((s >= 40) + (s >= 70))),
    "poly": (["scheduler.power=2", "scheduler.min_lr_ratio=0.1"], W, 0.0,
             lambda s: 0.1 + 0.9 * (1 - after_warmup(s)) ** 2),
    "exponential": (["scheduler.gamma=0.8"], W, 0.0, lambda s: 0.8 ** ((s - W) / SPE)),
    "cyclic": (["scheduler.cycle_epochs=3", "scheduler.mode=cosine", "scheduler.min_lr_ratio=0.0"], W, 0.0,
               lambda s: cosine_down(((s - W) % 30) / 30)),
    "linear_to_zero": ([], W, 0.0, lambda s: 1 - after_warmup(s)),
    # pct_start 0.25 of 100 steps: 25 warmup steps from 1/25 x lr
    "one_cycle": (["scheduler.pct_start=0.25", "scheduler.anneal_strategy=cos"], 25, 1 / 25,
                  lambda s: ONE_CYCLE_MIN + (1 - ONE_CYCLE_MIN) * cosine_down(after_warmup(s, 25))),
}


def expected_factor(name: str, s: int) -> float:
    """Linear warmup from `start` (first step already 1/(w+1) of the way) to the value at step w."""
    _, w, start, decay = CASES[name]
    if s < w:
        return start + (decay(w) - start) * (s + 1) / (w + 1)
    return decay(s)


def make_sgd(lr: float = BASE_LR, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def make_schedule(compose_train, name: str, optimizer, extra=()):
    overrides = [f"scheduler={name}", *CASES.get(name, ([],))[0], *extra]
    if name != "one_cycle":
        overrides.append("scheduler.warmup_epochs=1")
    cfg = compose_train(overrides)
    return instantiate(cfg.scheduler)(optimizer=optimizer, total_steps=T, steps_per_epoch=SPE)


# --- schedules -----------------------------------------------------------------------------------


def test_every_scheduler_config_has_a_closed_form_case():
    assert set(SCHEDULERS) - {"none"} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_closed_form(compose_train, name):
    """lr at step 0, at the end of warmup, mid-run and at the last step (and every step) equals the
    closed form; after the last step it is the schedule's final value."""
    model, opt = make_sgd()
    used = run_steps(model, opt, make_schedule(compose_train, name, opt), T)
    w = CASES[name][1]
    for s in (0, w - 1, w, (w + T) // 2, T - 1):
        assert used[s] == pytest.approx(BASE_LR * expected_factor(name, s), rel=1e-9, abs=1e-15), (name, s)
    assert used == pytest.approx([BASE_LR * expected_factor(name, s) for s in range(T)], rel=1e-9, abs=1e-15)
    assert used[w] == pytest.approx(BASE_LR * CASES[name][3](w))  # warmup ends on the schedule's curve


def test_linear_to_zero_and_one_cycle_end_points(compose_train):
    """Budgeted training reaches 0 after the last step; 1cycle starts at lr/div_factor and ends at
    lr/(div_factor x final_div_factor)."""
    model, opt = make_sgd()
    run_steps(model, opt, make_schedule(compose_train, "linear_to_zero", opt), T)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    model, opt = make_sgd()
    sched = make_schedule(compose_train, "one_cycle", opt, ["scheduler.pct_start=0.0"])
    used = run_steps(model, opt, sched, T)
    assert used[0] == BASE_LR  # no warmup: starts at the peak
    assert opt.param_groups[0]["lr"] == pytest.approx(BASE_LR * ONE_CYCLE_MIN, rel=1e-9)


def test_piecewise_switches_at_milestones(compose_train):
    """Milestones are epochs from the start: the first step of epoch 4 already uses gamma, and explicit
    `values` replace the powers of gamma."""
    model, opt = make_sgd()
    used = run_steps(model, opt, make_schedule(compose_train, "piecewise", opt), T)
    assert [used[s] / BASE_LR for s in (39, 40, 69, 70, 99)] == pytest.approx([1, 0.5, 0.5, 0.25, 0.25])
    model, opt = make_sgd()
    sched = make_schedule(compose_train, "piecewise", opt, ["scheduler.values=[1.0,0.3,0.05]"])
    used = run_steps(model, opt, sched, T)
    assert [used[s] / BASE_LR for s in (39, 40, 69, 70)] == pytest.approx([1, 0.3, 0.3, 0.05])


def test_piecewise_values_of_wrong_length(compose_train):
    _, opt = make_sgd()
    with pytest.raises(AutoclsError, match=r"has 2 entries but 2 milestones need 3") as err:
        make_schedule(compose_train, "piecewise", opt, ["scheduler.values=[1.0,0.1]"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["cosine", "triangular"])
def test_cyclic_at_cycle_boundaries(compose_train, mode):
    """Cycles of 30 steps after a 10-step warmup, between 0.1 x lr and lr: SGDR restarts at the base lr
    and is lowest just before a restart; the triangle is lowest at the boundary and peaks mid-cycle."""
    model, opt = make_sgd()
    overrides = [f"scheduler.mode={mode}", "scheduler.min_lr_ratio=0.1"]
    sched = make_schedule(compose_train, "cyclic", opt, overrides)
    used = [lr / BASE_LR for lr in run_steps(model, opt, sched, T)]
    for start in (W, W + 30, W + 60):
        if mode == "cosine":
            assert used[start] == pytest.approx(1.0)
            assert used[start + 15] == pytest.approx(0.1 + 0.9 * 0.5)
            assert used[start + 29] == pytest.approx(0.1 + 0.9 * cosine_down(29 / 30))
        else:
            assert used[start] == pytest.approx(0.1)
            assert used[start + 15] == pytest.approx(1.0)
            assert used[start + 5] == pytest.approx(0.1 + 0.9 * 10 / 30)
    if mode == "triangular":  # the warmup rises to the cycle's start, so the curve is continuous
        assert used[W - 1] == pytest.approx(0.1 * W / (W + 1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_state_dict_resume_continues_identically(compose_train, name):
    """Optimizer + scheduler state saved after 37 of 100 steps and loaded into fresh objects continues
    with exactly the lrs and weights of the uninterrupted run."""
    model_full, opt = make_sgd()
    full = run_steps(model_full, opt, make_schedule(compose_train, name, opt), T)

    model, opt = make_sgd()
    sched = make_schedule(compose_train, name, opt)
    first = run_steps(model, opt, sched, 37)
    state = (model.state_dict(), opt.state_dict(), sched.state_dict())

    model2, opt2 = make_sgd(lr=0.5, seed=1)  # a different start, all of it overwritten by the state
    sched2 = make_schedule(compose_train, name, opt2)
    model2.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    sched2.load_state_dict(state[2])
    rest = run_steps(model2, opt2, sched2, T - 37)
    assert first + rest == pytest.approx(full, rel=0, abs=1e-15)
    for p2, p_full in zip(model2.parameters(), model_full.parameters()):
        torch.testing.assert_close(p2, p_full, rtol=0, atol=0)


# --- parameter groups --------------------------------------------------------------------------


def lr_of(optimizer) -> dict[int, float]:
    """Parameter id -> lr of the group that holds it (each parameter in exactly one group)."""
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in out
            out[id(p)] = group["lr"]
    return out


def sgd(net, **kw):
    return build_optimizer(net, name="sgd", lr=BASE_LR, weight_decay=5e-4, momentum=0.9, nesterov=True, **kw)


def test_no_weight_decay_on_norm_and_bias_params():
    net = resnet_cifar(depth=20)
    one_d = {id(p) for p in net.parameters() if p.ndim == 1}
    assert len(one_d) > 20  # BN weights and biases, the classifier bias
    groups = sgd(net).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {id(p) for g in groups if g["weight_decay"] == 5e-4 for p in g["params"]}
    assert no_decay == one_d
    assert decay == {id(p) for p in net.parameters()} - one_d
    groups = sgd(net, no_weight_decay_norm_bias=False).param_groups
    assert {g["weight_decay"] for g in groups} == {5e-4}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def _assert_stage_lrs(net, stem, last_stage, head, mults):
    lrs = lr_of(sgd(net, lr_mult_list=mults))
    for module, mult in ((stem, mults[0]), (last_stage, mults[-1]), (head, 1.0)):
        params = list(module.parameters())
        assert params and all(lrs[id(p)] == pytest.approx(mult * BASE_LR) for p in params), module


def test_lr_mult_list_reaches_stages_of_resnet_cifar():
    net = resnet_cifar(depth=20)  # stem + 3 stages
    _assert_stage_lrs(net, net.stem, net.stages[2], net.fc, [0.1, 0.2, 0.3, 0.4])
    lrs = lr_of(sgd(net, lr_mult_list=[0.1, 0.2, 0.3, 0.4]))
    assert all(lrs[id(p)] == pytest.approx(0.2 * BASE_LR) for p in net.stages[0].parameters())


def test_lr_mult_list_reaches_stages_of_timm_resnet18():
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=10)  # stem + 4 stages
    _assert_stage_lrs(net, nn.ModuleList([net.conv1, net.bn1]), net.layer4, net.fc, [0.1, 0.2, 0.3, 0.4, 0.5])
    lrs = lr_of(sgd(net, lr_mult_list=[0.1, 0.2, 0.3, 0.4, 0.5]))
    assert all(lrs[id(p)] == pytest.approx(0.3 * BASE_LR) for p in net.layer2.parameters())


def test_lr_mult_list_of_wrong_length_names_the_stages():
    with pytest.raises(AutoclsError) as err:
        sgd(resnet_cifar(depth=20), lr_mult_list=[0.1, 0.2, 0.3, 0.4, 0.5])
    message = str(err.value)
    assert "has 5 values but CifarResNet has 4 stages (stem, stages.0, stages.1, stages.2)" in message
    assert "\n" not in message and message.endswith(".")
    import timm

    with pytest.raises(AutoclsError, match=r"has 1 values but ResNet has 5 stages .conv1\+bn1, layer1, layer2"):
        sgd(timm.create_model("resnet18", pretrained=False), lr_mult_list=[1.0])
    with pytest.raises(AutoclsError, match="Linear has none"):
        sgd(nn.Linear(3, 2), lr_mult_list=[1.0])


def test_layer_decay_increases_towards_the_head():
    """resnet_cifar-20: stem, 9 blocks, head = 11 layers; layer l gets 0.5^(10 - l) x lr, so the lr rises
    strictly from block to block and the head keeps the base lr."""
    net = resnet_cifar(depth=20)
    lrs = lr_of(sgd(net, layer_decay=0.5))
    layers = [net.stem, *[block for stage in net.stages for block in stage], net.fc]
    per_layer = []
    for module in layers:
        values = {lrs[id(p)] for p in module.parameters()}
        assert len(values) == 1, module  # one lr per layer
        per_layer.append(values.pop())
    assert per_layer == pytest.approx([BASE_LR * 0.5 ** (10 - i) for i in range(11)])
    assert all(a < b for a, b in zip(per_layer, per_layer[1:]))


def test_scale_lr_uses_the_global_batch():
    """2 devices x accumulate 2 x batch 96 = 384 images per step: lr = 0.1 x 384 / 256 = 0.15, in every
    group (times its multiplier)."""
    data = SimpleNamespace(batch_size=96)
    assert global_batch_from(SimpleNamespace(datamodule=data, world_size=2, accumulate_grad_batches=2)) == 384
    assert global_batch_from(SimpleNamespace(datamodule=None, world_size=2, accumulate_grad_batches=2)) is None
    net = resnet_cifar(depth=20)
    optimizer = sgd(net, scale_lr=True, global_batch_size=384, lr_mult_list=[0.5, 1, 1, 1])
    assert sorted({g["lr"] for g in optimizer.param_groups}) == pytest.approx([0.15 * 0.5, 0.15])
    assert {g["lr"] for g in sgd(net, global_batch_size=384).param_groups} == {BASE_LR}  # off by default
    with pytest.raises(AutoclsError, match="scale_lr=true needs the training batch size"):
        sgd(net, scale_lr=True, global_batch_size=None)


# --- configs --------------------------------------------------------------------------------------


def test_optimizer_configs_cover_the_names():
    assert set(OPTIMIZER_CONFIGS) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", OPTIMIZER_CONFIGS)
def test_optimizer_config_trains_one_epoch(compose_train, name):
    cfg = compose_train([f"optimizer={name}", "trainer.max_epochs=1", "test=false"])
    assert cfg.optimizer.name == name
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"]) and metrics["val/acc"] > 0.15  # 10 classes


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_config_trains_one_epoch(compose_train, name):
    cfg = compose_train([f"scheduler={name}", "trainer.max_epochs=1", "test=false"])
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"]) and metrics["val/acc"] > 0.15  # 10 classes


def test_unknown_optimizer_name_lists_the_valid_ones(compose_train):
    with pytest.raises(Exception) as err:
        train(compose_train(["optimizer.name=foo", "trainer.max_epochs=1", "test=false"]))
    user_error = find_user_error(err.value)
    assert user_error is not None, err.value
    assert str(user_error) == "Unknown optimizer.name 'foo'; choose one of sgd, adam, adamw, rmsprop, lamb, lars."


def test_optimizer_name_with_another_configs_arguments():
    """`optimizer=sgd optimizer.name=adam` would pass SGD's nesterov to Adam: one sentence naming the fix."""
    with pytest.raises(AutoclsError, match=r"Optimizer 'adam' does not take .*nesterov.*select its own config"):
        build_optimizer(nn.Linear(3, 2), name="adam", lr=0.1, nesterov=True)


# --- scripts/plot_schedule.py --------------------------------------------------------------------


def _plot_script():
    spec = importlib.util.spec_from_file_location("plot_schedule", ROOT / "scripts" / "plot_schedule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_schedule_script(tmp_path):
    """The curve follows the composed config (adamw's lr 0.005, linear to zero over 2 x 5 steps); --all
    and a single schedule write PNGs."""
    script = _plot_script()
    overrides = ["scheduler=linear_to_zero", "scheduler.warmup_epochs=0", "trainer.max_epochs=2"]
    lrs = script.lr_curve_for(overrides, steps_per_epoch=5)
    assert lrs == pytest.approx([0.005 * (1 - s / 10) for s in range(10)])
    out = script.main(["--all", "--steps-per-epoch", "3", "--out", str(tmp_path / "all.png"),
                       "trainer.max_epochs=2"])
    assert out.read_bytes().startswith(b"\x89PNG")
    out = script.main(["scheduler=cyclic", "--out", str(tmp_path / "one.png")])
    assert out.stat().st_size > 1000
