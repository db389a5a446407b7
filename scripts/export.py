"""Export a trained checkpoint: `python scripts/export.py ckpt_path=<ckpt> format=onnx|torchscript int8=true`.

Options are in configs/export.yaml (output_dir, fp16, dynamo, opset, calibration_images, latency_threads).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AUTOCLS_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="../configs", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    from src.deploy.exporter import export_checkpoint
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(export_checkpoint)(cfg)


if __name__ == "__main__":
    from src.utils.task import reject_unknown_options, user_errors_as_messages

    user_errors_as_messages(reject_unknown_options)(sys.argv[1:], ROOT / "configs" / "export.yaml")
    main()
