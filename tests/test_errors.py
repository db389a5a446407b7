"""Mistakes a user can make end in one sentence that names the fix, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from src.eval import evaluate
from src.train import train
from src.utils.errors import AutoclsError, find_user_error

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(ROOT / script), f"paths.log_dir={cwd / 'logs'}", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def _assert_one_sentence(err: BaseException, *fragments: str) -> None:
    user_error = find_user_error(err)
    assert user_error is not None, f"not a user error: {err!r}"
    message = str(user_error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["data=image_folder", "data.data_dir=/no/such/folder"], "does not exist; set data.data_dir"),
        (["model/net=timm", "model.net.model_name=resnet181"], "close names: resnet18"),
        (["ckpt_path=/no/such.ckpt"], "does not exist; pass an existing file"),
    ],
)
def test_cli_prints_one_line_error_without_traceback(tmp_path, args, fragment):
    result = _run_cli("train.py", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr[-2000:]


def test_cli_unknown_config_option_names_the_choices(tmp_path):
    """A wrong override is caught by Hydra itself, which lists the available options."""
    result = _run_cli("train.py", "optimizer=sgdd", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Could not find 'optimizer/sgdd'" in result.stderr and "adamw" in result.stderr


def _write_folder(root: Path, classes: dict[str, int], size=(12, 10)) -> Path:
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (20 * i % 255, 40, 60)).save(root / name / f"{i}.png")
    return root


def test_class_folder_without_images(compose_train, tmp_path):
    data = _write_folder(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (data / "bird").mkdir()
    (data / "bird" / "notes.txt").write_text("no images here")
    with pytest.raises(Exception) as err:
        train(compose_train(["data=image_folder", f"data.data_dir={data}"]))
    _assert_one_sentence(err.value, "bird")


def test_corrupt_and_odd_images_are_skipped_listed_or_converted(compose_train, tmp_path):
    """Corrupt and non-image files are skipped and listed in the run dir; grayscale, RGBA and palette
    images train like RGB ones."""
    data = _write_folder(tmp_path / "imgs", {"cat": 6, "dog": 6})
    Image.new("L", (9, 9), 100).save(data / "cat" / "gray.png")
    Image.new("RGBA", (9, 9), (10, 20, 30, 0)).save(data / "dog" / "rgba.png")
    Image.new("P", (9, 9), 3).save(data / "dog" / "palette.png")
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "dog" / "readme.md").write_text("hello")
    overrides = ["data=image_folder", f"data.data_dir={data}", "data.image_size=16", "data.batch_size=4",
                 "data.val_fraction=0.2", "data.test_fraction=0.2", "trainer.max_epochs=1"]
    metrics = train(compose_train(overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    listed = (tmp_path / "skipped_files.tsv").read_text()
    assert "broken.jpg" in listed and "readme.md" in listed
    assert "gray.png" not in listed and "rgba.png" not in listed and "palette.png" not in listed


def test_checkpoint_for_another_class_count(compose_train, compose_eval, tmp_path):
    fit = train(compose_train(["trainer.max_epochs=1", "test=false"], out=tmp_path / "fit"))
    ckpt = tmp_path / "fit" / "checkpoints" / "last.ckpt"
    data = _write_folder(tmp_path / "imgs", {"a": 5, "b": 5, "c": 5})
    other_data = ["data=image_folder", f"data.data_dir={data}", "data.image_size=8", "data.in_chans=1",
                  "data.mean=[0.5]", "data.std=[0.5]"]
    with pytest.raises(Exception) as err:
        evaluate(compose_eval([f"ckpt_path={ckpt}", *other_data], out=tmp_path / "eval"))
    _assert_one_sentence(err.value, "trained for 10 classes but the data has 3")
    with pytest.raises(Exception) as err:
        train(compose_train([f"ckpt_path={ckpt}", *other_data], out=tmp_path / "resume"))
    _assert_one_sentence(err.value, "trained for 10 classes but the data has 3")
    assert fit["val/acc"] > 0


def test_not_a_checkpoint(compose_eval, tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(AutoclsError, match="Could not read checkpoint"):
        evaluate(compose_eval([f"ckpt_path={bogus}"]))


def test_expected_class_count_is_checked(compose_train, tmp_path):
    data = _write_folder(tmp_path / "imgs", {"a": 3, "b": 3})
    with pytest.raises(Exception) as err:
        train(compose_train(["data=image_folder", f"data.data_dir={data}", "data.num_classes=5"]))
    _assert_one_sentence(err.value, "data.num_classes=5 but the data has 2 classes")


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        # a network overridden to another size than the data: torch's "Target 7 is out of bounds" otherwise
        (["model.net.num_classes=3"], ["model.net.num_classes=3 but the data has 10 classes", "drop the override"]),
        (["data.batch_size=0"], ["data.batch_size=0 must be a positive whole number"]),
        (["optimizer.lr=-1"], ["torch.optim rejects", "Invalid learning rate: -1", "optimizer.lr"]),
        (["optimizer=sgd", "optimizer.momentum=-0.5"], ["Invalid momentum value: -0.5"]),
        (["loss.label_smoothing=2"], ["loss.label_smoothing=2 must be in [0, 1)"]),
        (["loss.temperature=0"], ["loss.temperature=0 must be positive"]),
        # Lightning's "train forever" has no length for the per-step lr schedule (an OverflowError otherwise)
        (["trainer.max_epochs=-1"], ["has no end", "trainer.max_epochs or trainer.max_steps"]),
        (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0 must be a whole number >= 1"]),
        (["trainer.precision=fp8"], ["Lightning refuses the trainer settings", "Precision 'fp8' is invalid",
                                     "trainer.* override"]),
        (["trainer.devices=0"], ["Lightning refuses the trainer settings", "trainer.* override"]),
        (["data=image_folder"], ["data.data_dir has no value", "pass data.data_dir=<value>"]),
        # a misspelled key added with + (Hydra's own advice for a key it does not know): the target refuses it
        (["+model.net.widht=16"], ["model.net.widht is not a setting of SmallCNN (did you mean model.net.width?)",
                                   "remove it with ~model.net.widht"]),
        (["+loss.label_smothing=0.1"], ["model.loss.label_smothing is not a setting of CrossEntropyLoss (did you mean "
                                        "model.loss.label_smoothing?)"]),
        (["+trainer.max_epoch=3"], ["trainer.max_epoch is not a setting of Trainer (did you mean trainer.max_epochs"]),
    ],
)
def test_bad_settings_end_in_one_sentence(compose_train, overrides, fragments):
    with pytest.raises(Exception) as err:
        train(compose_train(["trainer.max_epochs=1", *overrides]))
    _assert_one_sentence(err.value, *fragments)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_trainer_without_a_gpu(compose_train):
    with pytest.raises(Exception) as err:
        train(compose_train(["trainer=gpu"]))
    _assert_one_sentence(err.value, "trainer.accelerator=gpu needs a CUDA GPU", "use trainer=cpu")


def test_pretrained_weights_without_network(compose_train, monkeypatch):
    """An unreachable Hub (no network here, or a proxy) is an OSError inside timm: one sentence naming
    the offline ways out. The download is made to fail even where a network is reachable."""
    import timm

    def unreachable(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise ConnectionError("Name or service not known")  # what requests raises offline (an OSError)
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", unreachable)
    with pytest.raises(Exception) as err:
        train(compose_train(["model/net=timm", "model.net.model_name=resnet18", "model.net.pretrained=true"]))
    _assert_one_sentence(err.value, "Could not fetch the pretrained weights of timm model 'resnet18'",
                         "model.net.pretrained=false")


def test_eval_without_a_checkpoint(tmp_path):
    result = _run_cli("eval.py", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    expected = ("Error: eval.py needs a checkpoint: pass ckpt_path=<run dir>/checkpoints/last.ckpt, or "
                "ckpt_path=last for the newest run under paths.log_dir.")
    assert errors == [expected], result.stderr[-2000:]


def test_one_class_folder(compose_train, tmp_path):
    """A folder of one class would otherwise fail inside torchmetrics ("num_classes ... larger than 1")."""
    data = _write_folder(tmp_path / "imgs", {"cat": 6})
    with pytest.raises(Exception) as err:
        train(compose_train(["data=image_folder", f"data.data_dir={data}"]))
    _assert_one_sentence(err.value, "The data has 1 class; a classifier needs at least 2")


@pytest.mark.parametrize(("val", "test"), [(1.5, 0.1), (0.5, 0.6), (-0.1, 0.1)])
def test_split_fractions_that_leave_nothing_to_train(compose_train, tmp_path, val, test):
    data = _write_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    with pytest.raises(Exception) as err:
        train(compose_train(["data=image_folder", f"data.data_dir={data}", f"data.val_fraction={val}",
                             f"data.test_fraction={test}"]))
    _assert_one_sentence(err.value, f"data.val_fraction={val} and data.test_fraction={test} must each be in [0, 1)")


def test_network_sizes_that_cannot_be_built(compose_train):
    """A zero-width network would fail inside torch's conv ("expected weight to be at least 1")."""
    from src.models.resnet_cifar import CifarResNet

    with pytest.raises(Exception) as err:
        train(compose_train(["model.net.width=0"]))
    _assert_one_sentence(err.value, "model.net.width=0 must be a positive number of channels")
    # the ResNet class as a custom `_target_` (also what stage pruning builds)
    with pytest.raises(AutoclsError, match=r"widths=\[16, 0, 64\] need one positive entry per stage"):
        CifarResNet([1, 1, 1], [16, 0, 64])
    with pytest.raises(AutoclsError, match="need one positive entry per stage"):
        CifarResNet([1, 1], [16, 32, 64])
