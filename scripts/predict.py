"""Top-k labels for images: `python scripts/predict.py ckpt_path=<ckpt> inputs=<image, folder or list file>`.

Options are in configs/predict.yaml (topk, output, batch_size, model_path=<model.onnx>, device).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AUTOCLS_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict.yaml")
def main(cfg: DictConfig) -> None:
    from src.deploy.predictor import predict
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(predict)(cfg)


if __name__ == "__main__":
    from src.utils.task import reject_unknown_options, user_errors_as_messages

    user_errors_as_messages(reject_unknown_options)(sys.argv[1:], ROOT / "configs" / "predict.yaml")
    main()
