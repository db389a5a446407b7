"""The DARTS search: the weight/architecture split of the train data, the architect's gradients (first
and second order, the latter against finite differences), which parameters each step may change, and
a short search run end to end (genotype files, heatmap, checkpoint, then training the result)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from src.datamodules.digits import DigitsDataModule
from src.nas.architect import first_order_arch_grads, sgd_lookahead, unrolled_arch_grads
from src.nas.genotypes import Genotype
from src.nas.supernet import DartsSupernet
from src.utils.errors import AutoclsError

# tiny NAS nets: one intra-op thread (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_supernet(**kwargs) -> DartsSupernet:
    # 3 cells (normal, reduce, reduce) of 2 nodes on 8x8 one-channel images: every part of the
    # supernet, at a size a 2-core CPU runs in milliseconds
    return DartsSupernet(**{"C": 4, "num_classes": 3, "layers": 3, "steps": 2, "multiplier": 2, "in_chans": 1, **kwargs})


def _batch(n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


# --- the data split --------------------------------------------------------------------------------

def test_search_split_gives_disjoint_stratified_halves_as_a_combined_loader():
    dm = DigitsDataModule(batch_size=32, search_split=0.5)
    dm.setup()
    train, weights, arch = dm.splits["train"], dm.splits["search_weights"], dm.splits["search_arch"]
    assert len(weights) + len(arch) == len(train) and abs(len(weights) - len(arch)) <= 1

    def as_rows(split):
        return {(img.numpy().tobytes(), int(y)) for img, y in zip(split.images, split.labels)}

    assert as_rows(weights) | as_rows(arch) == as_rows(train)
    assert not as_rows(weights) & as_rows(arch) or len(as_rows(train)) < len(train)  # digits has duplicates
    counts = torch.bincount(weights.labels, minlength=10) - torch.bincount(arch.labels, minlength=10)
    assert counts.abs().max() <= 1  # stratified: every class split in half
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert set(batch) == {"weights", "arch"}
    assert batch["weights"][0].shape == batch["arch"][0].shape == (32, 1, 8, 8)
    out = dm.on_after_batch_transfer(batch, 0)  # both halves become normalised float batches
    assert out["arch"][0].dtype == torch.float32 and out["arch"][0].mean().abs() < 1.5
    assert len(loader) == min(len(weights), len(arch)) // 32


def test_search_split_must_be_a_fraction():
    with pytest.raises(AutoclsError, match="data.search_split"):
        DigitsDataModule(search_split=1.0)


# --- the architect -------------------------------------------------------------------------------

def _params(net) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def _changed(before: dict, net) -> set[str]:
    return {name for name, p in net.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("second_order", [False, True])
def test_architect_step_changes_only_architecture_parameters(second_order):
    torch.manual_seed(0)
    net = _tiny_supernet(partial_channels=2)
    weight_opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    arch_opt = torch.optim.Adam(net.arch_parameters(), lr=3e-2)
    before = _params(net)
    arch_opt.zero_grad()
    if second_order:
        unrolled_arch_grads(net, F.cross_entropy, _batch(4, 1), _batch(4, 2), weight_opt)
    else:
        first_order_arch_grads(net, F.cross_entropy, *_batch(4, 2))
    assert all(p.grad is None for p in net.weight_parameters())  # not even gradients for the weights
    arch_opt.step()
    arch_names = {"alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"}
    assert _changed(before, net) == arch_names


def test_sgd_lookahead_is_exactly_the_next_sgd_step():
    torch.manual_seed(0)
    for nesterov in (False, True):
        net = _tiny_supernet()
        groups = [{"params": net.weight_parameters()[:5], "weight_decay": 0.0, "lr": 0.05}, {"params": net.weight_parameters()[5:]}]
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=3e-4, nesterov=nesterov)
        for step in range(2):  # the second step reads the momentum buffers of the first
            loss = F.cross_entropy(net(_batch(4, step)[0]), _batch(4, step)[1])
            weights = net.weight_parameters()
            grads = torch.autograd.grad(loss, weights)
            ahead, scales = sgd_lookahead(opt, weights, grads)
            for p, g in zip(weights, grads):
                p.grad = g
            opt.step()
            for p, w in zip(weights, ahead):
                torch.testing.assert_close(p.detach(), w, rtol=0, atol=1e-6)
        assert scales[-1] == pytest.approx(0.1 * (1.9 if nesterov else 1.0))


def test_second_order_gradient_matches_finite_differences():
    """d/dalpha L_val(w - lr * step(w, alpha), alpha), the quantity DARTS's second-order step
    approximates, by central differences of that very function along random directions."""
    torch.manual_seed(0)
    # Smooth ops only (softplus for ReLU, no max-pool): a ReLU net's gradient jumps wherever a unit
    # crosses zero, which a finite difference cannot follow; the architect's code is the same for both.
    net = _tiny_supernet(primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3"))
    _replace_relu(net)
    net = net.double()
    loss_fn = F.cross_entropy
    train, val = _batch(6, 1, torch.float64), _batch(6, 2, torch.float64)
    lr, momentum, weight_decay = 0.5, 0.9, 3e-4
    opt = torch.optim.SGD(net.weight_parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    # one real step first, so the virtual step has momentum buffers to use
    loss_fn(net(train[0]), train[1]).backward()
    opt.step()
    opt.zero_grad()

    names = [name for name, p in net.named_parameters() if p in set(net.weight_parameters())]
    weights = net.weight_parameters()
    buffers = [opt.state[p]["momentum_buffer"] for p in weights]

    def unrolled_val_loss() -> float:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(net(train[0]), train[1]), weights)
        ahead = {n: w.detach() - lr * (momentum * b + g + weight_decay * w.detach()) for n, w, b, g in zip(names, weights, buffers, grads)}
        with torch.no_grad():
            return float(loss_fn(functional_call(net, ahead, (val[0],)), val[1]))

    unrolled_arch_grads(net, loss_fn, train, val, opt)
    second = [p.grad.clone() for p in net.arch_parameters()]
    first_order_arch_grads(net, loss_fn, *val)
    first = [p.grad.clone() for p in net.arch_parameters()]

    gen = torch.Generator().manual_seed(3)
    eps = 1e-5
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in net.arch_parameters()]
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for p, d in zip(net.arch_parameters(), direction):
                    p.add_(sign * eps * d)
            values.append(unrolled_val_loss())
            with torch.no_grad():
                for p, d in zip(net.arch_parameters(), direction):
                    p.sub_(sign * eps * d)
        finite_difference = (values[0] - values[1]) / (2 * eps)
        analytic = sum(float((g * d).sum()) for g, d in zip(second, direction))
        first_order = sum(float((g * d).sum()) for g, d in zip(first, direction))
        error = abs(analytic - finite_difference)
        assert error <= 1e-3 * abs(finite_difference) + 1e-7, (analytic, finite_difference)
        # the implicit (second-order) term is not negligible here, so the check could fail
        assert abs(first_order - finite_difference) > 20 * error


def _replace_relu(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(module, name, torch.nn.Softplus(beta=2.0))
        else:
            _replace_relu(child)


def test_second_order_needs_sgd():
    net = _tiny_supernet()
    with pytest.raises(AutoclsError, match="optimizer=sgd"):
        unrolled_arch_grads(net, F.cross_entropy, _batch(2, 0), _batch(2, 1), torch.optim.Adam(net.weight_parameters()))


# --- the LightningModule ---------------------------------------------------------------------------

def _search_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "experiment=digits_darts",
        "logger=none",
        "model.net.layers=3",
        "model.net.steps=2",
        "model.net.multiplier=2",
        "model.net.C=4",
        "data.batch_size=16",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "test=false",
        *extra,
    ]


def _fit(compose_train, tmp_path, *extra):
    from hydra.utils import instantiate

    from src.utils.instantiate import build_datamodule

    cfg = compose_train(_search_overrides(tmp_path, *extra, "+trainer.max_steps=1"))
    datamodule = build_datamodule(cfg)
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    before = _params(model.net)
    trainer.fit(model, datamodule=datamodule)
    return model, _changed(before, model.net)


def test_weight_step_changes_only_weights(compose_train, tmp_path):
    # arch_start_epoch=1: the first epoch trains the weights alone
    model, changed = _fit(compose_train, tmp_path, "model.arch_start_epoch=1")
    assert changed and not changed & {"alphas_normal", "alphas_reduce"}
    assert changed == {name for name, _ in model.net.named_parameters() if name not in ("alphas_normal", "alphas_reduce")} - {
        name for name, p in model.net.named_parameters() if p.grad is None or not p.grad.any()
    }


def test_training_step_with_frozen_weights_changes_only_the_architecture(compose_train, tmp_path):
    _, changed = _fit(compose_train, tmp_path, "optimizer.lr=0.0", "optimizer.weight_decay=0.0")
    assert changed == {"alphas_normal", "alphas_reduce"}


def test_search_run_writes_genotypes_heatmaps_and_checkpoints(compose_train, tmp_path):
    from src.train import train

    cfg = compose_train(
        _search_overrides(
            tmp_path, "trainer.max_epochs=2", "+trainer.limit_train_batches=2", "test=true",
            "callbacks.model_checkpoint.save_top_k=-1",  # every epoch's checkpoint, whatever val/acc did
        )
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and "test/acc" in metrics
    for epoch in (0, 1):
        assert Genotype.from_json((tmp_path / "genotypes" / f"epoch_{epoch:03d}.json").read_text()).steps == 2
        assert (tmp_path / "genotypes" / f"alphas_epoch_{epoch:03d}.png").stat().st_size > 1000
    latest = Genotype.from_json((tmp_path / "genotype.json").read_text())
    assert (tmp_path / "alphas.png").is_file()

    ckpt = torch.load(tmp_path / "checkpoints" / "epoch_001.ckpt", map_location="cpu", weights_only=False)
    assert [epoch for epoch, _ in ckpt["darts_genotype_history"]] == [0, 1]
    net = _tiny_supernet(num_classes=10)
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    assert net.genotype() == latest  # the checkpoint's alphas give the written genotype

    # the search result trains as an evaluation network straight from genotype.json
    out = tmp_path / "train_result"
    train_cfg = compose_train(
        [
            "data=digits", "model/net=darts_net", f"model.net.genotype={tmp_path / 'genotype.json'}",
            "model.net.C=4", "model.net.layers=3", "logger=none", "trainer.fast_dev_run=true",
        ],
        out=out,
    )
    assert "test/acc" in train(train_cfg)
    assert json.loads((tmp_path / "genotype.json").read_text())["normal_concat"] == [2, 3]


def test_search_without_the_split_says_how_to_fix_it(compose_train, tmp_path):
    from src.train import train

    cfg = compose_train(_search_overrides(tmp_path, "data.search_split=null", "trainer.fast_dev_run=true"))
    with pytest.raises(AutoclsError, match="data.search_split=0.5"):
        train(cfg)


@pytest.mark.parametrize("variant", [["model.second_order=true"], ["model.net.partial_channels=2"]])
def test_second_order_and_pcdarts_searches_run(variant, compose_train, tmp_path):
    from src.train import train

    metrics = train(compose_train(_search_overrides(tmp_path, "trainer.fast_dev_run=true", *variant)))
    assert metrics["train/arch_loss"] > 0
