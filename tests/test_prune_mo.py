"""Compression search (hparams_search=*_prune_mo): per-stage pruning of a trained network built by Hydra,
INT8 on/off scored by the INT8 model's own accuracy, and the Pareto front of compressed models."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from src.deploy.stage_pruning import (
    network_stages,
    prune_stages,
    pruned_net,
    stage_parameters,
)
from src.hpo.pareto_models import write_pareto_models
from src.hpo.report import write_report
from src.hpo.storage import open_storage
from src.models.resnet_cifar import resnet_cifar
from src.models.small_cnn import SmallCNN
from src.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DIGITS_DATA = {"num_classes": 10, "in_chans": 1, "image_size": 8, "mean": [0.3059], "std": [0.3761]}
# a trial in seconds: one short fine-tune epoch, a few timed calls
FAST_TRIAL = ["logger=none", "trainer.max_epochs=1", "+trainer.limit_train_batches=4", "test=false",
              "callbacks.latency_export.warmup=1", "callbacks.latency_export.repeats=3",
              "callbacks.latency_export.calibration_images=32"]


def _out_channels(net: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- stages -------------------------------------------------------------------------------------

def test_stages_of_resnet_cifar_small_cnn_and_timm_nets():
    from src.models.timm_net import create_timm_net

    names = {
        "resnet20": [s.name for s in network_stages(resnet_cifar(20))],
        "resnet18": [s.name for s in network_stages(resnet_cifar(18))],
        "small_cnn": [s.name for s in network_stages(SmallCNN(width=8))],
        "timm_resnet18": [s.name for s in network_stages(create_timm_net("resnet18", num_classes=10))],
        "mobilenetv3": [s.name for s in network_stages(create_timm_net("mobilenetv3_small_050", num_classes=10))],
    }
    assert names == {
        "resnet20": ["stages.0", "stages.1", "stages.2"],
        "resnet18": ["stages.0", "stages.1", "stages.2", "stages.3"],
        "small_cnn": ["features.1", "features.3"],  # features.0 is the stem, features.2 a parameter-free pool
        "timm_resnet18": ["layer1", "layer2", "layer3", "layer4"],
        "mobilenetv3": ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "conv_head"],
    }


def test_each_stage_is_pruned_by_its_own_ratio_closed_form():
    """SmallCNN(width=8): stem 1->8, features.1 8->16, features.3 16->32, fc 32->10 (3x3 convs, no bias, BN).
    Ratios [0.5, 0.25] keep 8 and 24 channels: stage parameters 8*8*9 + 2*8 and 8*24*9 + 2*24."""
    net = SmallCNN(num_classes=10, in_chans=1, width=8)
    assert stage_parameters(net) == {"features.1": 8 * 16 * 9 + 2 * 16, "features.3": 16 * 32 * 9 + 2 * 32}
    pruned = prune_stages(net, torch.randn(2, 1, 8, 8), [0.5, 0.25])
    assert stage_parameters(pruned) == {"features.1": 8 * 8 * 9 + 2 * 8, "features.3": 8 * 24 * 9 + 2 * 24}
    widths = _out_channels(pruned)
    assert (widths["features.0.0"], widths["features.1.0"], widths["features.3.0"]) == (8, 8, 24)
    assert pruned.fc.in_features == 24 and pruned.fc.out_features == 10


def test_resnet20_stages_prune_their_inner_convs_by_their_own_ratios():
    """Option-A ResNet-20 (widths 16/32/64): each block's first conv loses its stage's fraction, the
    zero-padded residual stream (every conv2) keeps its width."""
    pruned = prune_stages(resnet_cifar(20), torch.randn(2, 3, 32, 32), [0.5, 0.0, 0.25])
    widths = _out_channels(pruned)
    for block in range(3):
        assert widths[f"stages.0.{block}.conv1"] == 8
        assert widths[f"stages.1.{block}.conv1"] == 32
        assert widths[f"stages.2.{block}.conv1"] == 48
        assert [widths[f"stages.{s}.{block}.conv2"] for s in range(3)] == [16, 32, 64]


def test_timm_resnet_prunes_only_the_chosen_stage():
    from src.models.timm_net import create_timm_net

    net = create_timm_net("resnet18", num_classes=10)
    before = stage_parameters(net)
    pruned = prune_stages(net, torch.randn(2, 3, 32, 32), [0.0, 0.0, 0.5, 0.0])
    after = stage_parameters(pruned)
    widths = _out_channels(pruned)
    assert widths["layer3.0.conv1"] == widths["layer3.1.conv2"] == widths["layer3.0.downsample.0"] == 128
    assert widths["layer2.1.conv2"] == 128 and widths["layer4.0.conv1"] == 512 and widths["conv1"] == 64
    assert after["layer1"] == before["layer1"] and after["layer2"] == before["layer2"]
    assert after["layer3"] < 0.3 * before["layer3"] < before["layer3"]
    assert after["layer4"] < before["layer4"]  # only layer4's first convs read layer3's narrower output


# --- bad input ----------------------------------------------------------------------------------

def test_pruned_net_from_a_checkpoint_is_smaller_and_ready_to_train(digits_ckpt):
    net = pruned_net(str(digits_ckpt), [0.5, 0.25], DIGITS_DATA)
    assert net.training  # Lightning would otherwise fine-tune with frozen BatchNorm statistics
    assert (_out_channels(net)["features.1.0"], _out_channels(net)["features.3.0"]) == (8, 24)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("ckpt", "ratios", "data", "message"),
    [
        (None, [0.1, 0.1], {}, r"model.net.ckpt_path is not set; pass the train.py checkpoint to compress"),
        ("absent.ckpt", [0.1, 0.1], {}, r"The base checkpoint absent.ckpt does not exist; pass an existing"),
        ("ckpt", [0.1, 1.0], {}, r"The pruning ratio 1.0 of stage features.3 is outside \[0, 1\)"),
        ("ckpt", [-0.1, 0.1], {}, r"The pruning ratio -0.1 of stage features.1 is outside \[0, 1\)"),
        ("ckpt", [0.1, 0.1, 0.1], {},
         r"stage_ratios has 3 values but SmallCNN has 2 stages \(features.1, features.3\); give one ratio per stage"),
        ("ckpt", [0.1, 0.1], {**DIGITS_DATA, "num_classes": 100},
         r"The base checkpoint .* was trained with data.num_classes=10 but this run's data has 100; "),
        ("ckpt", [0.1, 0.1], {**DIGITS_DATA, "std": [0.5]}, r"trained with data.std=\[0.3761\] but this run's data has"),
    ],
    ids=["no_path", "absent", "ratio_1", "negative", "stage_count", "classes", "normalisation"],
)
def test_bad_input_is_one_config_error_sentence(digits_ckpt, ckpt, ratios, data, message):
    path = str(digits_ckpt) if ckpt == "ckpt" else ckpt
    with pytest.raises(ConfigError, match=message) as err:
        pruned_net(path, ratios, data)
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_a_sweep_without_a_base_checkpoint_stops_at_the_first_trial(tmp_path):
    """A ConfigError ends the sweep (exit 2, one sentence) instead of failing every trial."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=digits_prune_mo", f"paths.log_dir={tmp_path}",
         "hydra.sweeper.n_trials=3", *FAST_TRIAL],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [("Error: model.net.ckpt_path is not set; pass the train.py checkpoint to compress, "
                       "e.g. model.net.ckpt_path=logs/train/runs/<run>/checkpoints/last.ckpt.")]
    journal = tmp_path / "train" / "hpo" / "digits_prune_mo" / "optuna.journal"
    study = optuna.load_study(study_name="digits_prune_mo", storage=open_storage(str(journal)))
    # one trial ran (and failed); the second enqueued base point was never started
    assert [t.state for t in study.trials if t.state != optuna.trial.TrialState.WAITING] == [optuna.trial.TrialState.FAIL]


# --- a trial ------------------------------------------------------------------------------------

def test_an_int8_trial_is_scored_by_its_int8_model_on_the_val_split(digits_ckpt, compose_train, tmp_path):
    """One trial of digits_prune_mo in process: the pruned net fine-tunes, exports, quantises; deploy/acc is
    the INT8 ONNX graph's top-1 on the val split (recomputed here), and the trial's checkpoint rebuilds the
    pruned architecture through its config."""
    from src.deploy.images import split_images, top1_accuracy
    from src.deploy.latency import ort_run, ort_session
    from src.deploy.trained_net import load_trained_net
    from src.train import train
    from src.utils.instantiate import build_datamodule

    cfg = compose_train(["hparams_search=digits_prune_mo", f"model.net.ckpt_path={digits_ckpt}",
                         "model.net.stage_ratios=[0.5,0.25]", "callbacks.latency_export.targets.0.precision=int8",
                         *FAST_TRIAL])
    metrics = train(cfg)
    deployed = json.loads((tmp_path / "export" / "latency.json").read_text())["deployed"]
    assert deployed["model"] == str(tmp_path / "export" / "model.int8.onnx")
    assert deployed["target"] == "onnxruntime-int8_cpu_t1_b1" and deployed["accuracy_split"] == "val"
    datamodule = build_datamodule(cfg)
    images, labels = split_images(datamodule, "val")
    session = ort_session(deployed["model"])
    int8_top1 = top1_accuracy(lambda x: ort_run(session, x), images, labels)
    assert deployed["images"] == len(labels) > 200
    assert metrics["deploy/acc"] == pytest.approx(int8_top1, abs=1e-6)
    assert metrics["deploy/latency_ms"] > 0

    base = load_trained_net(digits_ckpt).net
    trial = load_trained_net(next((tmp_path / "checkpoints").glob("epoch_*.ckpt"))).net
    assert stage_parameters(trial) == {"features.1": 8 * 8 * 9 + 2 * 8, "features.3": 8 * 24 * 9 + 2 * 24}
    assert metrics["deploy/params_m"] * 1e6 == pytest.approx(sum(p.numel() for p in trial.parameters()))
    assert sum(p.numel() for p in trial.parameters()) < sum(p.numel() for p in base.parameters())


def test_an_fp32_torch_target_is_scored_by_the_eager_net_as_lightning_scores_it(compose_train, tmp_path):
    """deploy/acc of an fp32 target is the exported checkpoint's val top-1: the number Lightning logged
    as val/acc_best for that checkpoint."""
    from src.train import train

    cfg = compose_train(["callbacks=latency_export", "callbacks.latency_export.accuracy_split=val",
                         "callbacks.latency_export.targets=[{backend:torch,threads:1}]", *FAST_TRIAL])
    metrics = train(cfg)
    deployed = json.loads((tmp_path / "export" / "latency.json").read_text())["deployed"]
    assert deployed["model"] is None and deployed["target"] == "torch_cpu_t1_b1"
    assert metrics["deploy/acc"] == pytest.approx(metrics["val/acc_best"], abs=1.5 / deployed["images"])


def test_an_unknown_accuracy_split_fails_before_training(compose_train):
    from src.utils.errors import find_user_error
    from src.utils.instantiate import build_callbacks

    cfg = compose_train(["callbacks=latency_export", "callbacks.latency_export.accuracy_split=validation"])
    with pytest.raises(Exception) as err:  # Hydra wraps the AutoclsError, found below
        build_callbacks(cfg)
    assert str(find_user_error(err.value)) == ("callbacks.latency_export.accuracy_split=validation is not a data "
                                               "split; use val, test, train or null.")


# --- the front ----------------------------------------------------------------------------------

def _dominated(row: dict, rows: list[dict]) -> bool:
    acc, lat = float(row["deploy/acc"]), float(row["deploy/latency_ms"])
    return any(float(o["deploy/acc"]) >= acc and float(o["deploy/latency_ms"]) <= lat
               and (float(o["deploy/acc"]), float(o["deploy/latency_ms"])) != (acc, lat) for o in rows)


def test_pareto_models_lists_exactly_the_non_dominated_trials(tmp_path):
    """Six trials (accuracy up, latency down): only 2 is dominated (by 1: more accurate and faster); 4 ties
    3 exactly and is on the front too; each row names the model file its trial deployed."""
    values = [(0.80, 2.0), (0.90, 3.0), (0.85, 3.5), (0.95, 5.0), (0.95, 5.0), (0.70, 1.0)]
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="front")
    dist = {"model.net.stage_ratios.0": optuna.distributions.CategoricalDistribution([0.0, 0.5])}
    for number, (acc, latency) in enumerate(values):
        run_dir = tmp_path / str(number)
        (run_dir / "export").mkdir(parents=True)
        model = run_dir / "export" / ("model.int8.onnx" if number % 2 else "model.onnx")
        (run_dir / "export" / "latency.json").write_text(json.dumps({"deployed": {"target": "t", "model": str(model)},
                                                                     "checkpoint": str(run_dir / "best.ckpt")}))
        (run_dir / "metrics.json").write_text(json.dumps({"deploy/params_m": 0.1 * number, "test/acc": acc - 0.01}))
        study.add_trial(optuna.trial.create_trial(values=[acc, latency], params={"model.net.stage_ratios.0": 0.5},
                                                  distributions=dist, user_attrs={"run_dir": str(run_dir)}))
    objectives = ["deploy/acc", "deploy/latency_ms"]
    write_report(study, objectives, tmp_path, plots=False)
    rows = _read_csv(write_pareto_models(tmp_path))
    trials = _read_csv(tmp_path / "trials.csv")
    by_hand = sorted(int(r["number"]) for r in trials if not _dominated(r, trials))
    assert by_hand == [0, 1, 3, 4, 5]  # 2 (0.85, 3.5) is dominated by 1 (0.90, 3.0)
    assert sorted(int(r["number"]) for r in rows) == by_hand
    assert [float(r["deploy/acc"]) for r in rows] == sorted(float(r["deploy/acc"]) for r in rows)
    for row in rows:
        number = int(row["number"])
        assert row["model"].endswith("model.int8.onnx" if number % 2 else "model.onnx")
        assert float(row["deploy/params_m"]) == pytest.approx(0.1 * number)
        assert row["run_dir"] == str(tmp_path / str(number))
        assert row["checkpoint"] == str(tmp_path / str(number) / "best.ckpt")


@pytest.mark.slow
def test_digits_prune_mo_sweep_writes_a_front_of_smaller_models(digits_ckpt, tmp_path):
    """4 NSGA-II trials (the first generation is random) on the digits checkpoint, end to end."""
    from src.deploy.trained_net import load_trained_net

    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hparams_search=digits_prune_mo", f"paths.log_dir={tmp_path}",
         f"model.net.ckpt_path={digits_ckpt}", "hydra.sweeper.n_trials=4", *FAST_TRIAL],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "train" / "hpo" / "digits_prune_mo"
    trials = _read_csv(sweep_dir / "trials.csv")
    assert [r["state"] for r in trials] == ["COMPLETE"] * 4
    base = load_trained_net(digits_ckpt).net
    base_widths = _out_channels(base)
    for row in trials:
        ratios = [float(row[f"params/model.net.stage_ratios.{i}"]) for i in range(2)]
        run_dir = Path(row["run_dir"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        net = load_trained_net(next((run_dir / "checkpoints").glob("epoch_*.ckpt"))).net
        widths = _out_channels(net)
        for stage, ratio in zip(("features.1.0", "features.3.0"), ratios):
            assert abs(widths[stage] - base_widths[stage] * (1 - ratio)) < 1  # this stage's own ratio
        params = sum(p.numel() for p in net.parameters())
        assert metrics["deploy/params_m"] * 1e6 == pytest.approx(params)
        if max(ratios) > 0:
            assert params < sum(p.numel() for p in base.parameters())
        deployed = json.loads((run_dir / "export" / "latency.json").read_text())["deployed"]
        int8 = row["params/callbacks.latency_export.targets.0.precision"] == "int8"
        assert deployed["model"].endswith("model.int8.onnx" if int8 else "model.onnx")
        assert float(row["deploy/acc"]) == pytest.approx(deployed["top1"])
    front = _read_csv(sweep_dir / "pareto_models.csv")
    assert sorted(int(r["number"]) for r in front) == sorted(int(r["number"]) for r in trials if not _dominated(r, trials))
    assert all(Path(r["model"]).is_file() and Path(r["checkpoint"]).is_file() for r in front)
    assert "Pareto front:" in result.stdout + result.stderr
