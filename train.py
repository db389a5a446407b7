"""Train an image classifier: `python train.py [group=option ...] [key=value ...]`.

See README.md for experiments (`experiment=...`), sweeps (`-m hparams_search=...`) and resuming.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("AUTOCLS_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="configs", config_name="train.yaml")
def main(cfg: DictConfig) -> dict:
    from src.hpo.sweep_job import in_multirun, sweep_job
    from src.train import train
    from src.utils.task import user_errors_as_messages

    # in a sweep, a run that fails is a failed trial for the sweeper to record, not the end of the program
    task = train if in_multirun() else user_errors_as_messages(train)
    with sweep_job(__file__):  # DDP inside a sweep's job: the ranks re-run this job, not the sweep
        # the sweeper (hparams_search) reads the metric(s) that cfg.optimized_metric names
        return task(cfg)


if __name__ == "__main__":
    main()
