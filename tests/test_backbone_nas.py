"""BackboneNAS: encodings and their networks (src/nas/backbone_space.py, src/models/encoded_resnet.py)
and the search module (src/lit_models/backbone_nas.py) on a tiny digits run."""

from __future__ import annotations

import csv
from itertools import pairwise

import numpy as np
import pytest
import torch

from src.models.encoded_resnet import EncodedResNet
from src.nas.backbone_space import BackboneEncoding, BackboneSpace, Stage
from src.utils.errors import AutoclsError

SPACE = BackboneSpace(num_stages=3, depths=(1, 2, 3), widths=(8, 16, 24), min_downsamples=1, max_downsamples=2,
                      stem_width=8, num_classes=10, in_chans=1)


def test_encoding_string_round_trip():
    enc = BackboneEncoding.parse("2x32-3x64s2-2x128s2")
    assert enc.stages == (Stage(2, 32), Stage(3, 64, True), Stage(2, 128, True))
    assert enc.to_string() == "2x32-3x64s2-2x128s2" and enc.downsamples == 2
    assert BackboneEncoding.parse(enc.to_string()) == enc


@pytest.mark.parametrize("text", ["2x32-3y64", "0x32", "2x32-", "2x32s3", "big"])
def test_malformed_encoding_is_one_sentence(text):
    with pytest.raises(AutoclsError, match=r"^Invalid backbone encoding .* write stages like '2x32-3x64s2-2x128s2'\.$"):
        BackboneEncoding.parse(text)


def test_encoding_outside_the_space_is_one_sentence():
    with pytest.raises(AutoclsError, match=r"is not in the search space .* pick one inside it or widen the space\.$"):
        SPACE.check("1x8-1x8-1x8")  # no downsampling stage, the space needs at least one


@pytest.mark.parametrize("encoding", ["1x8-2x16s2-1x24s2", "3x24s2-1x8-2x16", "1x16-1x8s2-1x8"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_decoded_net_keeps_the_contract_and_shapes(encoding, shortcut):
    widths = [8] + [s.width for s in BackboneEncoding.parse(encoding).stages]
    if shortcut == "A" and any(b < a for a, b in pairwise(widths)):
        with pytest.raises(AutoclsError, match="shortcut=A cannot shrink widths"):
            EncodedResNet(encoding, stem_width=8, shortcut=shortcut)
        return
    net = EncodedResNet(encoding, num_classes=7, in_chans=1, stem_width=8, shortcut=shortcut)
    enc = BackboneEncoding.parse(encoding)
    x = torch.randn(2, 1, 16, 16)
    features = net.forward_features(x)
    side = 16 // 2**enc.downsamples
    assert features.shape == (2, enc.stages[-1].width, side, side)
    assert net.num_features == enc.stages[-1].width and net.num_classes == 7
    assert net.forward_head(features, pre_logits=True).shape == (2, net.num_features)
    assert net(x).shape == (2, 7)
    net.reset_classifier(0)
    assert net(x).shape == (2, net.num_features)
    assert sum(1 for _ in net.stages) == 3
    assert sum(len(stage) for stage in net.stages) == sum(s.blocks for s in enc.stages)


def test_space_operators_stay_in_the_space():
    rng = np.random.default_rng(0)
    members = [SPACE.sample(rng) for _ in range(200)]
    assert all(SPACE.contains(m) for m in members)
    assert len(set(members)) > 150
    assert {m.downsamples for m in members} == {1, 2}
    for a, b in pairwise(members):
        child = SPACE.mutate(a, rng)
        assert SPACE.contains(child) and child != a
        # one local change: a single stage differs
        assert sum(x != y for x, y in zip(a.stages, child.stages)) <= 2
        assert SPACE.contains(SPACE.crossover(a, b, rng))
    assert SPACE.size() == (3 * 3) ** 3 * 6  # 6 patterns with one or two of three stages downsampling


def test_cheapest_members_have_the_fewest_parameters():
    def params(enc):
        return sum(p.numel() for p in SPACE.decode(enc).parameters())

    lowest = min(params(e) for e in SPACE.cheapest())
    rng = np.random.default_rng(1)
    assert all(params(SPACE.sample(rng)) >= lowest for _ in range(30))
    assert all(e.stages[0].blocks == 1 and e.stages[0].width == 8 for e in SPACE.cheapest())


# --- the search module ----------------------------------------------------------------------------

TINY = [
    "model=backbone_nas",
    "model/net=backbone_space",
    "logger=none",
    "model.net.depths=[1,2]",
    "model.net.widths=[8,16]",
    "model.net.stem_width=8",
    "model.population_size=3",
    "model.steps_per_candidate=3",
    "data.batch_size=32",
    "+trainer.limit_val_batches=1",
]


def test_backbone_nas_search_runs_selects_and_resumes(compose_train, tmp_path):
    from hydra.utils import instantiate

    from src.train import train

    out = tmp_path / "run"
    metrics = train(compose_train([*TINY, "trainer.max_epochs=3", "callbacks.model_checkpoint.save_top_k=-1"], out=out))
    # every epoch of 39 batches holds one 3-step generation: 3 generations, test on the best network
    assert metrics["search/generation"] == 3.0
    assert 0 <= metrics["test/acc"] <= 1 and 0 <= metrics["val/acc"] <= 1
    folder = out / "backbone_nas"
    for g in range(3):
        with open(folder / f"population_{g:03d}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == (3 if g == 0 else 6)  # parents + a new generation of the same size
        assert sum(r["selected"] == "True" for r in rows) == 3
        assert (folder / f"front_{g:03d}.png").stat().st_size > 0

    state = torch.load(out / "checkpoints" / "epoch_002.ckpt", map_location="cpu", weights_only=False)["backbone_nas"]
    assert len(state["population"]) == 3 and state["generation"] == 3
    assert state["best"]["member"] and state["best"]["state_dict"]
    cfg = compose_train([*TINY], out=tmp_path / "fresh")
    fresh = instantiate(cfg.model)
    fresh.load_search_state(state)
    assert [e.to_string() for e in fresh.population] == state["population"]
    assert fresh.member_acc == state["member_acc"] and fresh.rng.bit_generator.state == state["rng"]
    # the restored best network is the short-trained one
    net = fresh.space.decode(state["best"]["member"])
    net.load_state_dict(state["best"]["state_dict"])

    # resumed after generation 1 (epoch 1): the same third generation and selection as uninterrupted
    resumed = tmp_path / "resumed"
    ckpt = out / "checkpoints" / "epoch_001.ckpt"
    train(compose_train([*TINY, "trainer.max_epochs=3", f"ckpt_path={ckpt}", "test=false", "callbacks.model_checkpoint.save_top_k=-1"], out=resumed))
    again = torch.load(resumed / "checkpoints" / "epoch_002.ckpt", map_location="cpu", weights_only=False)["backbone_nas"]
    assert again["population"] == state["population"]
    np.testing.assert_allclose(again["member_acc"], state["member_acc"])


def test_backbone_nas_constraints(compose_train, tmp_path):
    from hydra.utils import instantiate

    module = instantiate(compose_train([*TINY, "model.max_params_m=0.004"], out=tmp_path).model)
    module._ensure_ready()
    assert all(module.member_costs(e)["params_m"] <= 0.004 for e in module.pending)
    impossible = instantiate(compose_train([*TINY, "model.max_params_m=0.0001"], out=tmp_path).model)
    with pytest.raises(AutoclsError, match=r"^No candidate can meet max_params_m=0.0001: .* widen the space"):
        impossible._ensure_ready()


def test_backbone_nas_needs_a_space(compose_train, tmp_path):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from src.utils.errors import find_user_error

    cfg = compose_train(["model=backbone_nas", "model/net=small_cnn"], out=tmp_path)
    with pytest.raises((AutoclsError, InstantiationException)) as err:
        instantiate(cfg.model)
    assert "needs model/net=backbone_space" in str(find_user_error(err.value))
