"""Evaluate a checkpoint on the test split: `python eval.py ckpt_path=<file>`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOCLS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    from src.eval import evaluate
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(evaluate)(cfg)


if __name__ == "__main__":
    main()
