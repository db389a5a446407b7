"""Every experiment in configs/experiment/ composes and runs end to end (one fast_dev_run batch on
tiny fake copies of its dataset, never downloading), and the CIFAR loader reads torchvision's
"python version" pickles exactly.

New experiments are picked up from the folder automatically; one on a data module this file does
not know yet fails with a message saying where to add its test-sized overrides.
"""

from __future__ import annotations

import math
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CONFIGS
from fake_datasets import (
    CIFAR10_CLASSES,
    CIFAR10_FOLDER,
    CIFAR100_FOLDER,
    make_fake_cifar,
    make_fake_flowers102,
)
from omegaconf import OmegaConf
from teacher_checkpoints import stand_in_teacher

from src.datamodules.cifar import CIFARDataModule
from src.datamodules.folder import Flowers102DataModule
from src.utils.errors import AutoclsError

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

# Sizes of the fake datasets: CIFAR-100 needs two training images per class for a stratified
# validation split of one per class.
CIFAR_SIZES = {"cifar10": (40, 20), "cifar100": (200, 100)}
CIFAR_VAL_SIZE = {"cifar10": 10, "cifar100": 100}


def test_experiments_found():
    assert EXPERIMENTS, f"no experiment configs in {CONFIGS / 'experiment'}"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> dict[str, Path]:
    """One folder per dataset, shared by the module's tests (they only read it)."""
    roots = {}
    for variant, (n_train, n_test) in CIFAR_SIZES.items():
        roots[variant] = make_fake_cifar(tmp_path_factory.mktemp(variant), variant, n_train, n_test)
    roots["flowers102"] = make_fake_flowers102(tmp_path_factory.mktemp("flowers102"), per_split=6)
    return roots


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"test tried to open a network connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- test-sized overrides per data module ------------------------------------------------------


def _cifar_overrides(variant: str, roots: dict[str, Path]) -> list[str]:
    return [
        f"data.data_dir={roots[variant]}",
        "data.download=false",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        f"data.val_size={CIFAR_VAL_SIZE[variant]}",
    ]


def _flowers_overrides(roots: dict[str, Path]) -> list[str]:
    return [
        f"data.data_dir={roots['flowers102']}",
        "data.download=false",
        # resnet50 at 224 px is far too slow for a 2-core CPU test; 64 px keeps every stage non-empty
        "data.image_size=64",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
    ]


def data_overrides(data_cfg, roots: dict[str, Path]) -> list[str]:
    """Overrides that point the experiment's data at the fake copies and shrink the batches."""
    target = data_cfg._target_
    if target == "src.datamodules.cifar.CIFARDataModule":
        return _cifar_overrides(data_cfg.variant, roots)
    if target == "src.datamodules.folder.Flowers102DataModule":
        return _flowers_overrides(roots)
    if target == "src.datamodules.digits.DigitsDataModule":
        return []  # bundled with scikit-learn, already small
    pytest.fail(
        f"no test-sized data overrides for {target}; add a case to data_overrides() in {Path(__file__).name}"
    )


# --- every experiment runs ---------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, compose_train, fake_data, no_network, tmp_path):
    base = [f"experiment={experiment}", "logger=none", "trainer.fast_dev_run=true"]
    data_cfg = compose_train(base).data
    cfg = compose_train([*base, *data_overrides(data_cfg, fake_data)])
    if cfg.model._target_.endswith("DistillationLitModule"):  # an untrained stand-in teacher for the fake data
        teacher = stand_in_teacher(cfg, tmp_path / "teacher")
        cfg = compose_train([*base, *data_overrides(data_cfg, fake_data), f"model.teacher_ckpt={teacher}"])
    if cfg.model.net._target_ == "src.nas.front.front_member_net":  # a one-member Pareto front to train from
        from src.nas.evolution import random_genotype
        from src.nas.front import write_json

        front = write_json([{"member": random_genotype(0).to_string(), "val_acc": 0.5}], tmp_path / "front.json")
        cfg = compose_train([*base, *data_overrides(data_cfg, fake_data), f"model.net.front={front}"])
    assert not cfg.get("logger")
    if "download" in cfg.data:
        assert cfg.data.download is False

    from src.train import train

    start = time.perf_counter()
    metrics = train(cfg)
    elapsed = time.perf_counter() - start
    print(f"{experiment}: train() took {elapsed:.1f} s")

    assert "test/acc" in metrics, sorted(metrics)
    assert "train/loss" in metrics, sorted(metrics)
    assert math.isfinite(metrics["test/acc"]) and 0.0 <= metrics["test/acc"] <= 1.0
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] >= 0.0
    assert (Path(cfg.paths.output_dir) / "metrics.json").is_file()


# --- every experiment composes and is well formed ----------------------------------------------


def _experiment_yaml(name: str) -> tuple[str, dict]:
    text = (CONFIGS / "experiment" / f"{name}.yaml").read_text()
    return text, yaml.safe_load(text) or {}


def _group_overrides(body: dict) -> list[str]:
    """The experiment's `override /group: option` defaults as command-line overrides."""
    out = []
    for entry in body.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key.startswith("override /"):
                    out.append(f"{key.removeprefix('override /')}={value}")
    return out


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, compose_train):
    text, body = _experiment_yaml(experiment)
    assert text.startswith("# @package _global_"), (
        f"configs/experiment/{experiment}.yaml must start with '# @package _global_' so its keys land at the top level"
    )
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.data.get("num_classes") is not None
    assert cfg.model.net.get("_target_")
    assert cfg.data.get("_target_")

    # Every value the experiment sets must name a key that exists once its group overrides are
    # applied; a typo such as `optimizer.weight_deacy` would otherwise be merged in silently.
    base = compose_train(_group_overrides(body))
    for key, value in _leaves({k: v for k, v in body.items() if k != "defaults"}):
        assert OmegaConf.select(base, key, default="<missing>") != "<missing>", (
            f"{experiment} sets {key}, which no config in its defaults defines (a typo?)"
        )
        if not (isinstance(value, str) and "${" in value):  # interpolations resolve to something else
            assert OmegaConf.select(cfg, key) == value, f"{experiment}: {key} did not reach the composed config"


# --- the CIFAR loader --------------------------------------------------------------------------


def _read_pickles(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data.append(batch["data"])
        labels.extend(batch[label_key])
    return np.concatenate(data), np.asarray(labels)


CIFAR_FILES = {
    "cifar10": (CIFAR10_FOLDER, [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": (CIFAR100_FOLDER, ["train"], ["test"], "fine_labels", 100),
}


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_datamodule_reads_pickles(variant, fake_data):
    folder_name, train_files, test_files, label_key, num_classes = CIFAR_FILES[variant]
    root = fake_data[variant]
    n_train, n_test = CIFAR_SIZES[variant]
    k = CIFAR_VAL_SIZE[variant]
    dm = CIFARDataModule(data_dir=str(root), variant=variant, download=False, val_size=k)
    dm.setup()

    train, val, test = dm.splits["train"], dm.splits["val"], dm.splits["test"]
    assert (len(train), len(val), len(test)) == (n_train - k, k, n_test)
    for split in (train, val, test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64
    # the fakes hold every class equally often, so a stratified split of k = num_classes is one each
    assert sorted(val.labels.tolist()) == list(range(num_classes))
    assert dm.num_classes == num_classes

    # test split: in file order, each image its 3072 bytes as (R, G, B) planes of 32 rows
    test_data, test_labels = _read_pickles(root / folder_name, test_files, label_key)
    assert torch.equal(test.images[0], torch.from_numpy(test_data[0].reshape(3, 32, 32)))
    assert test.images[0, 0, 0, 1].item() == test_data[0][1]  # red, row 0, column 1
    assert test.images[0, 1, 2, 0].item() == test_data[0][1024 + 64]  # green, row 2, column 0
    assert torch.equal(test.images, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == test_labels.tolist()

    # train + val: exactly the training images (from all batch files), each with its own label
    train_data, train_labels = _read_pickles(root / folder_name, train_files, label_key)
    expected = sorted((row.tobytes(), int(y)) for row, y in zip(train_data, train_labels))
    got = sorted(
        (img.numpy().tobytes(), int(y))
        for split in (train, val)
        for img, y in zip(split.images, split.labels)
    )
    assert got == expected

    if variant == "cifar10":
        assert dm.class_names == list(CIFAR10_CLASSES)
    else:
        with open(root / folder_name / "meta", "rb") as f:
            assert dm.class_names == pickle.load(f, encoding="latin1")["fine_label_names"]
    assert dm.describe()["class_names"] == dm.class_names


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_val_size_zero_validates_on_test(variant, fake_data):
    dm = CIFARDataModule(data_dir=str(fake_data[variant]), variant=variant, download=False, val_size=0)
    dm.setup()
    n_train, n_test = CIFAR_SIZES[variant]
    assert len(dm.splits["train"]) == n_train
    assert dm.splits["val"] is dm.splits["test"] and len(dm.splits["test"]) == n_test


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_missing_without_download_names_the_fix(variant, tmp_path, no_network):
    dm = CIFARDataModule(data_dir=str(tmp_path / "nowhere"), variant=variant, download=False, val_size=10)
    with pytest.raises(AutoclsError, match=r"data\.download"):
        dm.setup()
    assert not (tmp_path / "nowhere").exists()  # nothing downloaded or created


# `val_size` is the number of training images held out, exactly, also when it is not a multiple of
# the class count (stratified_split once rounded per class: 5 over 10 classes gave an empty split).
@pytest.mark.parametrize("val_size", [5, 10, 15, 20, 25])
def test_cifar_val_size_is_the_number_held_out(val_size, fake_data):
    dm = CIFARDataModule(data_dir=str(fake_data["cifar10"]), variant="cifar10", download=False, val_size=val_size)
    dm.setup()
    assert len(dm.splits["val"]) == val_size
    assert len(dm.splits["train"]) == CIFAR_SIZES["cifar10"][0] - val_size
    per_class = torch.bincount(dm.splits["val"].labels, minlength=10)
    assert per_class.max() - per_class.min() <= 1  # still stratified: equal classes differ by one at most


def test_cifar_unknown_variant():
    with pytest.raises(AutoclsError, match="cifar10 or cifar100"):
        CIFARDataModule(variant="cifar20")


# --- the Flowers-102 loader on the fake copy ---------------------------------------------------


def test_flowers102_reads_fake_copy(fake_data):
    from scipy.io import loadmat

    root = fake_data["flowers102"]
    dm = Flowers102DataModule(data_dir=str(root), download=False, image_size=32, in_memory=False, num_workers=0)
    dm.setup()
    folder = root / "flowers-102"
    set_ids = loadmat(folder / "setid.mat")
    labels = loadmat(folder / "imagelabels.mat")["labels"].ravel()
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        ids = set_ids[key].ravel().tolist()
        assert dm.splits[split].samples == [
            (str(folder / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids
        ]
    assert dm.num_classes == 102
    assert all(0 <= label < 102 for s in dm.splits.values() for _, label in s.samples)


def test_flowers102_missing_without_download_names_the_fix(tmp_path, no_network):
    dm = Flowers102DataModule(data_dir=str(tmp_path), download=False, image_size=32)
    with pytest.raises(AutoclsError, match=r"data\.download"):
        dm.setup()
