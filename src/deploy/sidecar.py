"""The `<model>.json` file beside every exported model: what a predictor needs besides the graph.

`model.onnx` (or `model.int8.onnx`, `model.ts`) gets `model.json` (`model.int8.json`, ...): the data
description of the checkpoint it came from (`class_names`, `num_classes`, `image_size`, `in_chans`,
`mean`, `std`, and `crop_pct` when the run's data config has one) at the top level, so a predictor
preprocesses images exactly as evaluation did and names its predictions, and the export settings
under `export` (format, precision, exporter, opset, input/output names, dynamic batch, the source
checkpoint, the measured max |onnxruntime - torch| difference).
"""

from __future__ import annotations

import json
from pathlib import Path

from src.utils.errors import AutoclsError

DATA_KEYS = ("class_names", "num_classes", "image_size", "in_chans", "mean", "std")


def sidecar_path(model_path: str | Path) -> Path:
    """`export/model.onnx` -> `export/model.json`, `model.int8.onnx` -> `model.int8.json`."""
    return Path(model_path).with_suffix(".json")


def write_sidecar(model_path: str | Path, data: dict, export: dict, *, crop_pct: float | None = None) -> Path:
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise AutoclsError(f"The data description lacks {', '.join(missing)}; export a checkpoint written by train.py.")
    content = {k: data[k] for k in DATA_KEYS}
    if crop_pct is not None:
        content["crop_pct"] = float(crop_pct)
    content["export"] = dict(export, file=Path(model_path).name)
    path = sidecar_path(model_path)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def read_sidecar(model_path: str | Path) -> dict:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise AutoclsError(f"{path} is missing; export the model with scripts/export.py, which writes it beside the model.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AutoclsError(f"{path} is not valid JSON ({err.msg}); export the model again.") from err
    missing = [k for k in DATA_KEYS if k not in content]
    if missing:
        raise AutoclsError(f"{path} lacks {', '.join(missing)}; export the model again with scripts/export.py.")
    return content
