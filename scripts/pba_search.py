"""Population Based Augmentation search: learn an augmentation policy schedule for a training config.

    python scripts/pba_search.py --out logs/pba/digits --population 4 --epochs 6 --interval 2 -- \
        model.net.width=16                                             # the default digits run, CPU
    python scripts/pba_search.py --out logs/pba/cifar10 --population 16 --epochs 200 --interval 3 \
        --workers 4 --gpus 0,1,2,3 -- experiment=cifar10_resnet18 trainer=gpu ...
    python train.py augmentation=pba augmentation.schedule=logs/pba/digits/schedule.json

Everything after `--` goes to every member's `train.py` run (data, network, budget). Rerunning the same
command after an interruption continues the search (`<out>/pba_state.json`). Writes `<out>/schedule.json`
(the best member's policy history) and `<out>/population.csv` (scores, copies, policy strength per round).
See src/hpo/pba.py for the algorithm and docs/hpo.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.hpo.pba import PBASearch
from src.utils.task import user_errors_as_messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="search directory (state, runs, schedule.json)")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8, help="training length of the search (the schedule's)")
    parser.add_argument("--interval", type=int, default=2, help="epochs between exploit/explore steps")
    parser.add_argument("--quantile", type=float, default=0.25, help="bottom/top fraction for exploit")
    parser.add_argument("--metric", default="val/acc")
    parser.add_argument("--workers", type=int, default=1, help="members trained at the same time")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids, one per running member")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every member (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    search = PBASearch(args.out, args.overrides, population=args.population, epochs=args.epochs,
                       interval=args.interval, quantile=args.quantile, metric=args.metric, workers=args.workers,
                       gpus=[g for g in args.gpus.split(",") if g], seed=args.seed)
    path = user_errors_as_messages(search.run)()
    print(f"schedule: {path}\ntrain with: python train.py augmentation=pba augmentation.schedule={path} ...")


if __name__ == "__main__":
    main()
