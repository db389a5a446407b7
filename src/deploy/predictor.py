"""Top-k class predictions for images, from a train.py checkpoint or an exported ONNX model.

A prediction must be what `eval.py` computes for the same image, so the preprocessing is the data
modules' evaluation path, step for step and with their own functions:

    load_rgb -> resize_center_crop(image_size, crop_pct) -> pil_to_tensor      (image_files.py)
    -> float / 255 -> (x - mean) / std          (ClassificationDataModule.on_after_batch_transfer)

`Predictor` does this for one image or a batch and runs a backend: the checkpoint's network in
PyTorch, or an onnxruntime session over `model.onnx` with the data description that the export
writes beside it (`model.json`, see `src.deploy.sidecar`). `predict(cfg)` is the task behind
scripts/predict.py: images, folders or list files in, a CSV of top-k labels out, unreadable files
skipped and listed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.v2.functional import pil_to_tensor

from src.datamodules.image_files import (
    SkippedFile,
    _short_error,
    _walk_class_folder,
    is_image_file,
    load_rgb,
    resize_center_crop,
    write_skipped,
)
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prediction:
    class_index: int
    label: str
    probability: float


# --------------------------------------------------------------------------------------------
# Backends: normalised float images (N, C, H, W) on the CPU -> float32 logits (N, K) on the CPU
# --------------------------------------------------------------------------------------------


class TorchBackend:
    """The checkpoint's own network, in eval mode, without gradients."""

    name = "torch"

    def __init__(self, net: torch.nn.Module, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.net(images.to(self.device)).float().cpu()


class OnnxBackend:
    """An onnxruntime session. A model exported with a fixed batch size is fed in chunks of that
    size (the last one zero-padded), so batch-1 exports still take batches."""

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, device: str = "cpu", threads: int = 0) -> None:
        from src.deploy.latency import ort_session

        provider = "cuda" if device.startswith("cuda") else device
        try:
            # threads=0: onnxruntime's default, one per physical core
            self.session = ort_session(model_path, threads=threads or None, provider=provider)
        except AutoclsError:
            raise
        except Exception as err:  # onnxruntime raises its own exception types for files it cannot parse
            raise AutoclsError(
                f"onnxruntime could not load {model_path} ({_short_error(err)}); pass a model.onnx written by scripts/export.py."
            ) from err
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        batch_dim = model_input.shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        array = images.contiguous().numpy()
        if self.fixed_batch is None:
            return torch.from_numpy(self._run(array))
        outputs = []
        for start in range(0, len(array), self.fixed_batch):
            chunk = array[start : start + self.fixed_batch]
            short = self.fixed_batch - len(chunk)
            if short:
                chunk = np.concatenate([chunk, np.zeros((short, *chunk.shape[1:]), dtype=chunk.dtype)])
            outputs.append(torch.from_numpy(self._run(chunk))[: self.fixed_batch - short])
        return torch.cat(outputs)

    def _run(self, array):
        return self.session.run(None, {self.input_name: array})[0].astype("float32", copy=False)


# --------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------


class Predictor:
    """Preprocess images as evaluation does, run a backend, return the top-k classes.

    Args:
        backend: Callable from normalised float images (N, C, H, W) to logits (N, K).
        data: The checkpoint's data description (`ClassificationDataModule.describe()`):
            class_names, image_size, in_chans, mean, std and crop_pct (1.0 when absent, the data
            modules' default).
        source: What the model was loaded from, for messages and the health endpoint.
    """

    def __init__(self, backend: Callable[[torch.Tensor], torch.Tensor], data: dict, source: str = "") -> None:
        missing = [k for k in ("class_names", "image_size", "in_chans", "mean", "std") if k not in data]
        if missing:
            raise AutoclsError(f"The data description of {source or 'the model'} lacks {missing}; re-export it with scripts/export.py.")
        self.backend, self.source = backend, source
        self.class_names = [str(name) for name in data["class_names"]]
        self.image_size, self.in_chans = int(data["image_size"]), int(data["in_chans"])
        self.crop_pct = float(data.get("crop_pct") or 1.0)
        if self.in_chans not in (1, 3):
            raise AutoclsError(f"{source} takes {self.in_chans}-channel images; prediction supports grayscale (1) and RGB (3) models.")
        shape = (1, self.in_chans, 1, 1)
        self._mean = torch.tensor(data["mean"], dtype=torch.float32).view(shape)
        self._std = torch.tensor(data["std"], dtype=torch.float32).view(shape)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", threads: int = 0) -> Predictor:
        """From a `.onnx` export (with its sidecar) or, for any other file, a train.py checkpoint."""
        path = Path(path)
        if not path.is_file():
            raise AutoclsError(f"Model file {path} does not exist; pass a checkpoint (.ckpt) from train.py or a model.onnx from scripts/export.py.")
        if path.suffix.lower() == ".onnx":
            return cls.from_onnx(path, device=device, threads=threads)
        return cls.from_checkpoint(path, device=device)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | Path, device: str = "cpu") -> Predictor:
        from src.deploy.trained_net import load_trained_net

        trained = load_trained_net(ckpt_path)
        data = dict(trained.data)
        # checkpoints written before describe() recorded crop_pct: the run config still has it
        data.setdefault("crop_pct", (trained.config.get("data") or {}).get("crop_pct", 1.0))
        return cls(TorchBackend(trained.net, device), data, source=str(ckpt_path))

    @classmethod
    def from_onnx(cls, model_path: str | Path, device: str = "cpu", threads: int = 0) -> Predictor:
        model_path = Path(model_path)
        from src.deploy.sidecar import read_sidecar

        data = read_sidecar(model_path)  # first: a missing sidecar is the cheaper and likelier mistake
        return cls(OnnxBackend(model_path, device, threads), data, source=str(model_path))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__)

    # --- preprocessing -----------------------------------------------------------------------
    def load_image(self, source: str | os.PathLike[str] | bytes) -> torch.Tensor:
        """An image file (or its bytes) as the uint8 (C, H, W) tensor evaluation would feed the net.

        Raises whatever PIL raises for unreadable, truncated or non-image data.
        """
        img = load_rgb(io.BytesIO(source) if isinstance(source, bytes) else source)
        img = resize_center_crop(img, self.image_size, self.crop_pct)
        if self.in_chans == 1:
            # grayscale models (digits): a grayscale file round-trips exactly through load_rgb's RGB
            img = img.convert("L")
        return pil_to_tensor(img)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> the float input of the network, with the same operations in the same
        order as `ClassificationDataModule.on_after_batch_transfer` (so results agree bit for bit)."""
        images = images.float().div_(255)
        return (images - self._mean) / self._std

    # --- inference ---------------------------------------------------------------------------
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) from `load_image` -> logits (N, K)."""
        expected = (self.in_chans, self.image_size, self.image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"expected uint8 images (N, {expected}), got {images.dtype} {tuple(images.shape)}")
        return self.backend(self.normalize(images))

    def predict(self, images: torch.Tensor, topk: int = 5) -> list[list[Prediction]]:
        """The `topk` most probable classes of each image, most probable first."""
        k = self.check_topk(topk)
        probs = torch.softmax(self.logits(images).double(), dim=1)
        top_p, top_i = probs.topk(k, dim=1)
        return [
            [Prediction(int(i), self.class_names[int(i)], float(p)) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(top_p.tolist(), top_i.tolist())
        ]

    def check_topk(self, topk: int) -> int:
        """`topk` capped at the number of classes; below 1 is a user error."""
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise AutoclsError(f"topk={topk!r} is not a positive integer; ask for e.g. topk=5.")
        return min(topk, self.num_classes)

    def predict_files(
        self, paths: Sequence[str], topk: int = 5, batch_size: int = 64, decode_threads: int = 0
    ) -> tuple[list[tuple[str, list[Prediction]]], list[SkippedFile]]:
        """Predict every readable file, `batch_size` images per forward pass; files PIL cannot read
        are skipped with one logged line each and returned as `SkippedFile`s."""
        self.check_topk(topk)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise AutoclsError(f"batch_size={batch_size} is not a positive integer; use e.g. batch_size=64.")
        results: list[tuple[str, list[Prediction]]] = []
        skipped: list[SkippedFile] = []
        # PIL releases the GIL while decoding and resizing, so threads overlap the files of a batch
        with ThreadPoolExecutor(max_workers=decode_threads or os.cpu_count() or 1) as pool:
            for start in range(0, len(paths), batch_size):
                batch_paths = paths[start : start + batch_size]
                good_paths, tensors = [], []
                for path, decoded in zip(batch_paths, pool.map(self._try_load, batch_paths)):
                    if isinstance(decoded, str):
                        log.warning(f"Skipping {path}: {decoded}")
                        skipped.append(SkippedFile(path, decoded))
                    else:
                        good_paths.append(path)
                        tensors.append(decoded)
                if tensors:
                    results.extend(zip(good_paths, self.predict(torch.stack(tensors), topk)))
        return results, skipped

    def _try_load(self, path: str) -> torch.Tensor | str:
        try:
            return self.load_image(path)
        except Exception as exc:  # noqa: BLE001 - PIL signals bad files with many exception types
            return f"unreadable: {_short_error(exc)}"


# --------------------------------------------------------------------------------------------
# Inputs and outputs of scripts/predict.py
# --------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    paths: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def find_inputs(inputs: str | os.PathLike[str]) -> Inputs:
    """The files to predict, in a stable order:

    * an image file -> itself;
    * a folder -> every image below it (recursive, sorted, hidden entries ignored); other files are
      skipped as "not an image file";
    * any other file -> a list file: one image path per line, relative to the list's folder, blank
      and `#` lines ignored, a trailing integer label (PaddleClas list format) allowed; listed files
      that do not exist are skipped as "missing".
    """
    root = Path(inputs).expanduser()
    if not root.exists():
        raise AutoclsError(f"inputs={root} does not exist; pass an image, a folder of images or a list file of image paths.")
    if root.is_dir():
        paths, skipped = _walk_class_folder(root)
        return Inputs(paths, skipped)
    if is_image_file(root):
        return Inputs([str(root)])
    return _read_input_list(root)


def _read_input_list(list_path: Path) -> Inputs:
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise AutoclsError(
            f"inputs={list_path} is neither an image (by its suffix) nor a text list of image paths; "
            "pass an image, a folder or a list file."
        ) from err
    found = Inputs()
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = list_path.parent / line  # an absolute path in the list wins, as intended
        if not path.exists():
            head, _, label = line.rpartition(" ") if " " in line else line.rpartition("\t")
            if head.strip() and label.strip().isdigit():
                path = list_path.parent / head.strip()
        if path.is_file():
            found.paths.append(str(path))
        else:
            found.skipped.append(SkippedFile(str(path), "missing"))
    if not found.paths and not found.skipped:
        raise AutoclsError(f"List file {list_path} names no images; write one image path per line.")
    return found


CSV_COLUMNS = ("path", "rank", "class_index", "class_name", "probability")


def write_predictions_csv(results: Iterable[tuple[str, list[Prediction]]], path: str | os.PathLike[str]) -> None:
    """One row per (image, rank): path, rank (1 = most probable), class_index, class_name, probability."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for image_path, predictions in results:
            for rank, p in enumerate(predictions, start=1):
                writer.writerow((image_path, rank, p.class_index, p.label, f"{p.probability:.6f}"))


def predict(cfg) -> dict:
    """The task of scripts/predict.py: predict `cfg.inputs` with the model of `cfg.ckpt_path` or
    `cfg.model_path`, print the top-k of each image, write `cfg.output` (CSV) and, when files were
    skipped, `<output stem>_skipped.tsv` beside it. Returns a summary."""
    if cfg.get("inputs") is None:
        raise AutoclsError("Pass inputs=<an image, a folder of images or a list file of image paths> to predict.")
    model_path = resolve_model_path(cfg.get("ckpt_path"), cfg.get("model_path"), cfg.paths.log_dir)
    found = find_inputs(cfg.inputs)  # before loading the model: a typo in inputs fails fast
    if not found.paths and not found.skipped:
        raise AutoclsError(f"inputs={cfg.inputs} holds no files; pass an image, a folder of images or a list file.")
    for item in found.skipped:
        log.warning(f"Skipping {item.path}: {item.reason}")
    predictor = Predictor.load(model_path, device=cfg.get("device", "cpu"), threads=cfg.get("threads", 0))
    results, unreadable = predictor.predict_files(
        found.paths, topk=cfg.topk, batch_size=cfg.batch_size, decode_threads=cfg.get("decode_threads", 0)
    )
    skipped = found.skipped + unreadable
    if not results:
        first = skipped[0] if skipped else None
        raise AutoclsError(
            f"None of the {len(skipped)} files in {cfg.inputs} could be read as images"
            + (f" (first: {first.path}, {first.reason})" if first else "")
            + "; check that inputs points at image files."
        )
    output = Path(cfg.output)
    write_predictions_csv(results, output)
    for image_path, predictions in results:
        print(f"{image_path}: " + ", ".join(f"{p.label} {p.probability:.3f}" for p in predictions))
    skipped_path = None
    if skipped:
        skipped_path = output.with_name(f"{output.stem}_skipped.tsv")
        write_skipped(skipped, skipped_path)
        log.warning(f"Skipped {len(skipped)} of {len(skipped) + len(results)} files; list in {skipped_path}")
    log.info(f"Predicted {len(results)} images with {predictor.backend_name}; top-{predictor.check_topk(cfg.topk)} in {output}")
    return {"predicted": len(results), "skipped": len(skipped), "output": str(output),
            "skipped_list": str(skipped_path) if skipped_path else None}


def resolve_model_path(ckpt_path: str | None, model_path: str | None, log_dir: str | Path) -> str:
    """Exactly one of `ckpt_path` (a train.py checkpoint or `last`) and `model_path` (an exported
    .onnx) must be given; returns the file to load."""
    from src.utils.instantiate import resolve_ckpt_path

    if (ckpt_path is None) == (model_path is None):
        raise AutoclsError(
            "Pass exactly one model: ckpt_path=<checkpoint from train.py, or last> or model_path=<model.onnx from scripts/export.py>."
        )
    if ckpt_path is not None:
        return resolve_ckpt_path(str(ckpt_path), log_dir)
    path = Path(str(model_path)).expanduser()
    if not path.is_file():
        raise AutoclsError(f"model_path={path} does not exist; pass a model.onnx written by scripts/export.py.")
    return str(path)
