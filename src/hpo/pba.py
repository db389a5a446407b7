"""The PBA search (Ho et al. 2019): population based training of augmentation policies, in rounds.

Every member of the population trains `interval` epochs with its current policy (one `python train.py`
run per member and round, continuing from the member's checkpoint). After a round the members are ranked
by `metric`; each member of the bottom `quantile` copies the checkpoint and policy history of a random
member of the top `quantile` (exploit) and perturbs the policy (explore: each probability and magnitude is
resampled with probability `resample_prob`, else moved by 0..3 levels up or down). At the end the best
member's policy history is the schedule (`<out>/schedule.json`, read by `augmentation=pba`).

Why not Ray Tune's PBT (which the paper used): PBT's logic here is a ranking and a copy every few epochs;
the hard parts are process management and state, which the project already has (train.py runs,
checkpoints, Hydra configs). Ray would add a cluster runtime that runs trials in its own actor processes,
beside Hydra's launchers and Lightning's DDP launcher, for no extra correctness. This design is
synchronous (a round ends when every member has trained it, as PBA's population of 16 on one machine
does) and resumable at member granularity: state lives in `<out>/pba_state.json`, written after every
round, and a member's round is done when its run dir holds metrics.json, so a killed search continues
with the members that had not finished. Members of a round run in parallel with `workers` > 1 (one GPU
each with `gpus`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl

from src.augment.pba import MAGNITUDE_LEVELS, PROB_LEVELS, write_schedule, zero_policy
from src.utils.errors import AutoclsError

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


class StopAtEpoch(pl.Callback):
    """Ends fit after `epoch` epochs while `trainer.max_epochs` (and so the lr schedule) stays the whole
    search's length: one PBA round of a member."""

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epoch:
            trainer.should_stop = True


@dataclass
class Member:
    index: int
    policy: list
    # (first epoch, policy) pairs: the schedule this member's weights were trained with
    history: list = field(default_factory=list)
    ckpt: str | None = None
    score: float | None = None


def explore(policy: list, rng: random.Random, resample_prob: float = 0.2) -> list:
    """PBA's explore step (Ho et al. 2019, Algorithm 2) on every probability and magnitude level."""

    def perturb(value: int, levels: int) -> int:
        if rng.random() < resample_prob:
            return rng.randrange(levels)
        step = rng.choice((0, 1, 2, 3)) * rng.choice((-1, 1))
        return min(max(value + step, 0), levels - 1)

    return [[op, perturb(p, PROB_LEVELS), perturb(m, MAGNITUDE_LEVELS)] for op, p, m in policy]


def exploit_and_explore(members: list[Member], epoch: int, rng: random.Random, quantile: float = 0.25,
                        resample_prob: float = 0.2) -> list[tuple[int, int]]:
    """Replace the bottom `quantile` by perturbed copies of the top `quantile`; returns (member, donor)."""
    ranked = sorted(members, key=lambda m: m.score if m.score is not None else -math.inf, reverse=True)
    n = max(1, int(len(members) * quantile))
    top, bottom = ranked[:n], ranked[-n:]
    copies = []
    for member in bottom:
        if member in top:
            continue
        donor = rng.choice(top)
        member.ckpt, member.history = donor.ckpt, [list(h) for h in donor.history]
        member.policy = explore(donor.policy, rng, resample_prob)
        member.history.append([epoch, member.policy])
        copies.append((member.index, donor.index))
    return copies


class PBASearch:
    def __init__(self, out_dir: str | Path, overrides: list[str] = (), population: int = 16, epochs: int = 8,
                 interval: int = 2, quantile: float = 0.25, resample_prob: float = 0.2, metric: str = "val/acc",
                 workers: int = 1, gpus: list[str] | None = None, seed: int = 0) -> None:
        if population < 2 or interval < 1 or epochs < interval:
            raise AutoclsError(f"PBA needs population >= 2 and 1 <= interval <= epochs (got population={population}, "
                               f"interval={interval}, epochs={epochs}).")
        self.out = Path(out_dir).resolve()
        self.overrides, self.population, self.epochs, self.interval = list(overrides), population, epochs, interval
        self.quantile, self.resample_prob, self.metric = quantile, resample_prob, metric
        self.workers, self.gpus, self.seed = max(1, workers), list(gpus or []), seed
        self.state_path = self.out / "pba_state.json"

    # --- state -----------------------------------------------------------------------------------

    def _load(self) -> tuple[int, list[Member]]:
        if not self.state_path.is_file():
            return 0, [Member(i, zero_policy(), [[0, zero_policy()]]) for i in range(self.population)]
        state = json.loads(self.state_path.read_text())
        if state["population"] != self.population or state["epochs"] != self.epochs or state["interval"] != self.interval:
            raise AutoclsError(f"{self.state_path} is a search with population={state['population']}, epochs="
                               f"{state['epochs']}, interval={state['interval']}; rerun with those or another --out.")
        return state["round"], [Member(**m) for m in state["members"]]

    def _save(self, round_: int, members: list[Member]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"population": self.population, "epochs": self.epochs, "interval": self.interval,
                                   "round": round_, "members": [asdict(m) for m in members]}))
        tmp.replace(self.state_path)  # atomic: a kill never leaves half a state

    # --- one round -------------------------------------------------------------------------------

    def _run_dir(self, round_: int, member: Member) -> Path:
        return self.out / f"round_{round_:03d}" / f"member_{member.index:02d}"

    def _train(self, round_: int, member: Member, gpu_pool) -> None:
        run_dir = self._run_dir(round_, member)
        if (run_dir / "metrics.json").is_file():
            return
        if run_dir.exists():  # cut short by a kill: start this member's round again
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        schedule = write_schedule(run_dir / "policy.json", [(0, member.policy)], self.epochs)
        end = min((round_ + 1) * self.interval, self.epochs)
        # a seed per member (the members differ from the start, as in PBT), which the user's overrides may fix
        cmd = [sys.executable, str(ROOT / "train.py"), f"seed={self.seed * 1000 + member.index}", *self.overrides,
               "augmentation=pba",
               f"augmentation.schedule={schedule}", f"trainer.max_epochs={self.epochs}", "test=false",
               "+callbacks.pba_round._target_=src.hpo.pba.StopAtEpoch", f"+callbacks.pba_round.epoch={end}",
               f"hydra.run.dir={run_dir}"]
        if member.ckpt:
            cmd.append(f"ckpt_path={member.ckpt}")
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
        gpu = gpu_pool.get() if gpu_pool else None
        try:
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
            with open(run_dir / "pba_run.log", "w") as f:
                result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
        finally:
            if gpu is not None:
                gpu_pool.put(gpu)
        if result.returncode != 0:
            raise AutoclsError(f"PBA member {member.index} failed in round {round_} (exit {result.returncode}); "
                               f"see {run_dir / 'pba_run.log'}.")

    def run(self) -> Path:
        start, members = self._load()
        rounds = math.ceil(self.epochs / self.interval)
        gpu_pool = None
        if self.gpus:
            import queue

            gpu_pool = queue.Queue()
            for g in self.gpus:
                gpu_pool.put(g)
        for round_ in range(start, rounds):
            log.info(f"PBA round {round_ + 1}/{rounds}: {self.population} members, epochs "
                     f"{round_ * self.interval}..{min((round_ + 1) * self.interval, self.epochs)}")
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                list(pool.map(partial(self._train, round_, gpu_pool=gpu_pool), members))
            for member in members:
                run_dir = self._run_dir(round_, member)
                metrics = json.loads((run_dir / "metrics.json").read_text())
                if self.metric not in metrics:
                    raise AutoclsError(f"PBA metric {self.metric} is not in {run_dir / 'metrics.json'} "
                                       f"({', '.join(sorted(metrics))}); pass --metric with one of them.")
                member.score = float(metrics[self.metric])
                member.ckpt = str(run_dir / "checkpoints" / "last.ckpt")
            end = (round_ + 1) * self.interval
            copies = []
            if end < self.epochs:
                rng = random.Random(self.seed * 100_003 + round_)
                copies = exploit_and_explore(members, end, rng, self.quantile, self.resample_prob)
            self._log_round(round_, members, copies)
            self._save(round_ + 1, members)
            self._drop_old_checkpoints(round_)
        best = max(members, key=lambda m: m.score)
        path = write_schedule(self.out / "schedule.json", [(e, p) for e, p in best.history], self.epochs)
        log.info(f"PBA: best member {best.index} ({self.metric}={best.score:.4f}); schedule in {path}")
        return path

    def _log_round(self, round_: int, members: list[Member], copies: list[tuple[int, int]]) -> None:
        path = self.out / "population.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["round", "member", self.metric, "copied_from", "mean_prob", "mean_magnitude"])
            donors = dict(copies)
            for m in members:
                writer.writerow([round_, m.index, m.score, donors.get(m.index, ""),
                                 round(sum(p for _, p, _ in m.policy) / len(m.policy) / (PROB_LEVELS - 1), 3),
                                 round(sum(x for _, _, x in m.policy) / len(m.policy), 2)])

    def _drop_old_checkpoints(self, round_: int) -> None:
        """Only the last round's checkpoints are ever continued from; older ones only fill the disk."""
        if round_ >= 1:
            for ckpts in (self.out / f"round_{round_ - 1:03d}").glob("member_*/checkpoints"):
                shutil.rmtree(ckpts, ignore_errors=True)
