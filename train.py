"""Train an image classifier: `python train.py [group=option ...] [key=value ...]`.

See README.md for experiments (`experiment=...`), sweeps (`-m hparams_search=...`) and resuming.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOCLS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from src.train import train
    from src.utils.task import user_errors_as_messages

    metrics = user_errors_as_messages(train)(cfg)
    # Hydra sweepers optimise the returned value
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
