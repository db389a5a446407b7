"""Prediction: the Predictor computes exactly what evaluation computes, and scripts/predict.py turns
images, folders and list files into a CSV, skipping bad files and reporting user mistakes in one
sentence."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.datamodules.image_files import scan_class_folders
from src.deploy.predictor import CSV_COLUMNS, Predictor, find_inputs, predict
from src.utils.checkpoints import checkpoint_metadata, load_checkpoint
from src.utils.errors import AutoclsError, find_user_error
from src.utils.instantiate import build_datamodule
from src.utils.task import reject_unknown_options

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# --- references: what eval.py feeds the network and what the network answers ----------------------
def eval_model(ckpt_path: Path):
    """The LightningModule as eval.py rebuilds it: from the checkpoint's config, weights loaded."""
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = OmegaConf.create(checkpoint_metadata(ckpt, ckpt_path)["config"])
    model = instantiate(run_cfg.model)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), run_cfg


def eval_datamodule(run_cfg, **data_overrides):
    cfg = OmegaConf.create({"data": run_cfg.data, "augmentation": None})
    cfg.data.update(data_overrides)
    datamodule = build_datamodule(cfg)
    datamodule.setup("test")
    return datamodule


def eval_logits(model, datamodule, batch) -> torch.Tensor:
    images, _ = datamodule.on_after_batch_transfer(batch, 0)  # trainer is None: eval, no augmentation
    with torch.inference_mode():
        return model(images)


def save_digits_pngs(images: torch.Tensor, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(image[0].numpy(), mode="L").save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def digits_test_images(digits_ckpt, tmp_path_factory):
    """The first 40 test images of the digits run, as eval sees them (uint8 batch) and as PNG files."""
    model, run_cfg = eval_model(digits_ckpt)
    datamodule = eval_datamodule(run_cfg)
    split = datamodule.splits["test"]
    images, labels = split.images[:40], split.labels[:40]
    paths = save_digits_pngs(images, tmp_path_factory.mktemp("digits_png"))
    return {"model": model, "datamodule": datamodule, "batch": (images, labels), "paths": paths}


# --- the predictor ---------------------------------------------------------------------------------
def test_torch_predictor_logits_equal_eval_logits_on_digits(digits_ckpt, digits_test_images):
    d = digits_test_images
    expected = eval_logits(d["model"], d["datamodule"], d["batch"])
    predictor = Predictor.load(digits_ckpt)
    images = torch.stack([predictor.load_image(p) for p in d["paths"]])
    assert torch.equal(images, d["batch"][0])  # the PNG round trip is lossless
    got = predictor.logits(images)
    assert got.shape == (40, 10)
    assert (got - expected).abs().max() <= 1e-5


def test_topk_sorted_probabilities_sum_to_one_and_bounds(digits_ckpt, digits_test_images):
    predictor = Predictor.load(digits_ckpt)
    images = digits_test_images["batch"][0][:8]
    everything = predictor.predict(images, topk=10)
    logits = predictor.logits(images)
    for row, row_logits in zip(everything, logits):
        probs = [p.probability for p in row]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert row[0].class_index == int(row_logits.argmax())
        assert [p.label for p in row] == [predictor.class_names[p.class_index] for p in row]
        # softmax of the logits, in closed form
        ref = torch.softmax(row_logits.double(), 0)
        assert all(abs(p.probability - float(ref[p.class_index])) < 1e-9 for p in row)
    top3 = predictor.predict(images, topk=3)
    assert [r[:3] for r in everything] == top3
    assert len(predictor.predict(images, topk=50)[0]) == 10  # capped at the number of classes
    with pytest.raises(AutoclsError, match="topk=0 is not a positive integer"):
        predictor.predict(images, topk=0)


def test_image_folder_predictions_equal_eval_for_both_eval_paths(cifar_jpg_dir, compose_train, tmp_path):
    """A 3-channel model with the eval crop (crop_pct=0.875: resize 32 -> 37, centre 32): the
    predictor's logits for the test JPEGs equal eval's, whether eval decodes the split into memory
    or streams it through DataLoader workers."""
    from src.train import train

    overrides = [
        "data=image_folder", f"data.data_dir={cifar_jpg_dir}", "data.image_size=32", "data.in_memory=true",
        "data.num_workers=0", "model.net.width=8", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1", "logger=none", "test=false",
    ]
    train(compose_train(overrides))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    model, run_cfg = eval_model(ckpt)
    predictor = Predictor.load(ckpt)
    assert predictor.crop_pct == 0.875 and predictor.class_names[0] == "airplane"
    samples, _, _ = scan_class_folders(cifar_jpg_dir / "test", class_names=predictor.class_names)
    paths = [path for path, _ in samples][::10]  # 20 images, 2 per class, in the split's order
    got = predictor.logits(torch.stack([predictor.load_image(p) for p in paths]))

    in_memory = eval_datamodule(run_cfg, in_memory=True)
    split = in_memory.splits["test"]
    batch = (split.images[::10], split.labels[::10])
    assert (got - eval_logits(model, in_memory, batch)).abs().max() <= 1e-5

    streamed = eval_datamodule(run_cfg, in_memory=False, num_workers=0, eval_batch_size=len(samples))
    images, labels = next(iter(streamed.test_dataloader()))
    assert (got - eval_logits(model, streamed, (images[::10], labels[::10]))).abs().max() <= 1e-5


def test_onnx_predictor_matches_torch_predictor(digits_ckpt, digits_test_images, tmp_path):
    """An exported model (dynamic batch, and a batch-1 export fed in chunks) with its model.json
    sidecar predicts what the checkpoint predicts (logits within 1e-4)."""
    from src.deploy.onnx_export import export_onnx
    from src.deploy.sidecar import write_sidecar
    from src.deploy.trained_net import load_trained_net

    trained = load_trained_net(digits_ckpt)
    torch_predictor = Predictor.load(digits_ckpt)
    images = digits_test_images["batch"][0][:7]
    expected = torch_predictor.logits(images)
    for name, dynamic in (("dynamic", True), ("batch1", False)):
        folder = tmp_path / name
        export_onnx(trained.net, trained.input_shape, folder / "model.onnx", dynamic_batch=dynamic)
        write_sidecar(folder / "model.onnx", trained.data, export={"format": "onnx"})
        onnx_predictor = Predictor.load(folder / "model.onnx")
        assert onnx_predictor.backend_name == "onnxruntime"
        assert (onnx_predictor.logits(images) - expected).abs().max() <= 1e-4, name
        ranked = onnx_predictor.predict(images, topk=3)
        assert [r[0].class_index for r in ranked] == expected.argmax(1).tolist()


def test_onnx_without_sidecar_or_unreadable_is_one_sentence(digits_ckpt, tmp_path):
    from src.deploy.sidecar import write_sidecar
    from src.deploy.trained_net import load_trained_net

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    with pytest.raises(AutoclsError, match="model.json is missing; export the model with scripts/export.py"):
        Predictor.load(model)
    write_sidecar(model, load_trained_net(digits_ckpt).data, export={"format": "onnx"})
    with pytest.raises(AutoclsError, match="onnxruntime could not load .*model.onnx") as err:
        Predictor.load(model)
    assert "\n" not in str(err.value)


# --- inputs ------------------------------------------------------------------------------------------
def test_find_inputs_for_image_folder_and_list_file(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("b.png", "a.jpg", "sub/c.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "readme.txt").write_text("x")
    (tmp_path / "imgs" / ".hidden.png").write_text("x")

    found = find_inputs(tmp_path / "imgs")
    assert [Path(p).relative_to(tmp_path / "imgs").as_posix() for p in found.paths] == ["a.jpg", "b.png", "sub/c.png"]
    assert [(Path(s.path).name, s.reason) for s in found.skipped] == [("readme.txt", "not an image file")]

    assert find_inputs(tmp_path / "imgs" / "a.jpg").paths == [str(tmp_path / "imgs" / "a.jpg")]

    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\nimgs/b.png\nimgs/sub/c.png 3\n\n{tmp_path / 'imgs' / 'a.jpg'}\nimgs/gone.png\n")
    found = find_inputs(listing)
    assert [Path(p).name for p in found.paths] == ["b.png", "c.png", "a.jpg"]
    assert [(Path(s.path).name, s.reason) for s in found.skipped] == [("gone.png", "missing")]


# --- scripts/predict.py ---------------------------------------------------------------------------
def compose_predict(tmp_path: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("predict.yaml", overrides=[f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}", *overrides])


def write_bad_files(folder: Path, good_png: Path) -> dict[str, str]:
    """A corrupt JPEG, a truncated PNG and a text file; returns name -> the reason predict gives."""
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    data = good_png.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image")
    return {"corrupt.jpg": "unreadable", "truncated.png": "unreadable", "notes.txt": "not an image file"}


def test_predict_cli_skips_bad_files_and_writes_csv(digits_ckpt, digits_test_images, tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    good = [Path(p) for p in digits_test_images["paths"][:5]]
    for path in good:
        (folder / path.name).write_bytes(path.read_bytes())
    bad = write_bad_files(folder, good[0])
    out = tmp_path / "preds.csv"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), f"ckpt_path={digits_ckpt}", f"inputs={folder}",
         "topk=3", "batch_size=2", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"],
        check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr  # Hydra logs to stdout
    assert "Traceback" not in output
    for name, reason in bad.items():
        lines = [line for line in output.splitlines() if f"Skipping {folder / name}: {reason}" in line]
        assert len(lines) == 1, (name, output[-2000:])

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 5 * 3
    assert [r["rank"] for r in rows[:3]] == ["1", "2", "3"]
    expected = Predictor.load(digits_ckpt).predict(torch.stack([digits_test_images["batch"][0][i] for i in range(5)]), topk=3)
    for i, path in enumerate(good):
        mine = [r for r in rows if Path(r["path"]).name == path.name]
        assert [int(r["class_index"]) for r in mine] == [p.class_index for p in expected[i]]
        assert [float(r["probability"]) for r in mine] == pytest.approx([p.probability for p in expected[i]], abs=1e-6)
        assert f"{folder / path.name}: " in result.stdout
    skipped = (tmp_path / "preds_skipped.tsv").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in skipped[1:]) == sorted(bad)


def test_predict_cli_unknown_option_is_one_sentence(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), "ckpt_path=x.ckpt", "inputs=.", "topkk=3"],
        check=False, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: Unknown option 'topkk' (did you mean topk?)")


def test_unknown_option_check_allows_config_keys_and_groups():
    config = CONFIGS / "predict.yaml"
    reject_unknown_options(["topk=3", "paths.log_dir=/tmp", "hydra.run.dir=/tmp", "+extra=1", "--cfg", "job"], config)
    with pytest.raises(AutoclsError, match="Unknown option 'output_dir'"):
        reject_unknown_options(["output_dir=x"], config)


def assert_one_sentence(err: BaseException, fragment: str) -> None:
    user_error = find_user_error(err)
    assert user_error is not None, repr(err)
    assert "\n" not in str(user_error) and fragment in str(user_error), str(user_error)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["inputs=/no/such/folder"], "inputs=/no/such/folder does not exist; pass an image"),
        ([], "Pass inputs="),
        (["inputs=IMAGES", "model_path=/no/model.onnx", "ckpt_path=null"], "model_path=/no/model.onnx does not exist"),
        (["inputs=IMAGES", "model_path=/no/model.onnx"], "Pass exactly one model"),
        (["inputs=IMAGES", "topk=0"], "topk=0 is not a positive integer"),
        (["inputs=IMAGES", "batch_size=0"], "batch_size=0 is not a positive integer"),
    ],
    ids=["missing-inputs", "no-inputs", "missing-onnx", "two-models", "bad-topk", "bad-batch"],
)
def test_predict_user_errors_are_one_sentence(digits_ckpt, digits_test_images, tmp_path, overrides, fragment):
    folder = Path(digits_test_images["paths"][0]).parent
    overrides = [o.replace("IMAGES", str(folder)) for o in overrides]
    with pytest.raises(Exception) as err:
        predict(compose_predict(tmp_path, [f"ckpt_path={digits_ckpt}", *overrides]))
    assert_one_sentence(err.value, fragment)


def test_checkpoint_without_autocls_metadata_is_one_sentence(digits_test_images, tmp_path):
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, ckpt)  # e.g. a bare Lightning checkpoint
    folder = Path(digits_test_images["paths"][0]).parent
    with pytest.raises(Exception) as err:
        predict(compose_predict(tmp_path, [f"ckpt_path={ckpt}", f"inputs={folder}"]))
    assert_one_sentence(err.value, "has no autocls metadata (not written by train.py)")


def test_predict_with_only_unreadable_files_is_one_sentence(digits_ckpt, digits_test_images, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_bad_files(folder, Path(digits_test_images["paths"][0]))
    with pytest.raises(AutoclsError, match="None of the 3 files .* could be read as images"):
        predict(compose_predict(tmp_path, [f"ckpt_path={digits_ckpt}", f"inputs={folder}"]))
