"""The helpers the benchmark scripts share: the data-folder check (with unpacking) and the train.py child run."""

from __future__ import annotations

import io
import tarfile

import pytest
from PIL import Image

from src.datamodules.archive import ensure_split_folders
from src.utils.errors import AutoclsError
from src.utils.train_subprocess import run_train


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_missing_split_folders_name_both_fixes(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    assert ensure_split_folders(tmp_path, ("train",)) == tmp_path.resolve()
    with pytest.raises(AutoclsError, match=rf"{tmp_path} has no test/; pass --data-dir <folder with train/ and test/"):
        ensure_split_folders(tmp_path)
    with pytest.raises(AutoclsError, match="--archive .*missing.tar.gz does not exist"):
        ensure_split_folders(tmp_path / "empty", archive=tmp_path / "missing.tar.gz")


def test_missing_splits_are_unpacked_from_the_archive(tmp_path):
    archive = tmp_path / "tiny.tar.gz"
    data = _png_bytes()
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/cat/0.png", "train/dog/0.png", "test/cat/1.png", "test/dog/1.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    root = ensure_split_folders(tmp_path / "unpacked", archive=archive)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) == [
        "test/cat/1.png", "test/dog/1.png", "train/cat/0.png", "train/dog/0.png"]


def test_run_train_returns_metrics_and_turns_failures_into_one_sentence(tmp_path):
    metrics, run_dir = run_train(["trainer.max_epochs=1", "logger=none"], tmp_path / "ok")
    assert (run_dir / "metrics.json").is_file() and run_dir.parent.parent.parent == tmp_path / "ok"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["seconds"] > 0
    # a user mistake: the child's own sentence comes back
    with pytest.raises(AutoclsError, match="^data.batch_size=0 must be a positive whole number"):
        run_train(["data.batch_size=0", "logger=none"], tmp_path / "bad")
    # anything else (here Hydra refusing an unknown config option): the exit code and where its output is
    with pytest.raises(AutoclsError, match=r"exited with code 1; its command and output are in .*failed_train_run.log"):
        run_train(["optimizer=no_such_optimizer"], tmp_path / "crash")
    assert "no_such_optimizer" in (tmp_path / "crash" / "failed_train_run.log").read_text()
