"""Run an AutoML pipeline: `python pipeline.py pipeline=<name> [key=value ...]`.

The steps of configs/pipeline/<name>.yaml (e.g. NAS -> HPO -> augmentation search -> full training) run in
order, each as the train.py run, sweep or PBA search a user would start by hand, in its own folder under
`pipeline_dir`. Rerunning the same command skips the finished steps. See docs/pipeline.md.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOCLS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="pipeline.yaml")
def main(cfg: DictConfig) -> None:
    from src.pipeline.runner import run_pipeline
    from src.utils.task import user_errors_as_messages

    user_errors_as_messages(run_pipeline)(cfg)


if __name__ == "__main__":
    main()
