"""Serve a trained classifier over HTTP: `python scripts/serve.py ckpt_path=<ckpt>` (or model_path=<model.onnx>).

GET /health; POST /predict with the image as multipart field `file` (curl -F file=@cat.jpg
http://127.0.0.1:8000/predict). Options are in configs/serve.yaml; see docs/serving.md.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AUTOCLS_ROOT", str(ROOT))


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve.yaml")
def main(cfg: DictConfig) -> None:
    from src.serve.server import serve
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(serve)(cfg)


if __name__ == "__main__":
    from src.utils.task import reject_unknown_options, user_errors_as_messages

    user_errors_as_messages(reject_unknown_options)(sys.argv[1:], ROOT / "configs" / "serve.yaml")
    main()
