"""Population Based Augmentation: the policy op against its definition, schedules, exploit/explore, and
the search end to end (slow)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.augment.pba import OPS, PBAPolicy, read_schedule, write_schedule, zero_policy
from src.hpo.pba import Member, exploit_and_explore, explore
from src.train import train
from src.utils.errors import AutoclsError

ROOT = Path(__file__).resolve().parents[1]


def test_zero_policy_holds_every_op_twice_and_changes_nothing(tmp_path):
    policy = zero_policy()
    assert len(policy) == 2 * len(OPS) == 26 and {op for op, _, _ in policy} == set(OPS)
    op = PBAPolicy(write_schedule(tmp_path / "s.json", [(0, policy)], epochs=4))
    x = torch.rand(64, 3, 8, 8)
    assert torch.equal(op(x), x)


def test_each_image_uses_zero_one_or_two_entries_with_the_papers_probabilities(tmp_path):
    """All 26 entries Brightness at probability 1 and magnitude 0.9 (random sign): a grey 0.25 image is
    unchanged (0 entries, p=0.2), brightened once to 0.25 x (1 +- 0.9) (p=0.3) or twice (p=0.5)."""
    torch.manual_seed(0)
    policy = [["Brightness", 10, 9]] * 26
    op = PBAPolicy(write_schedule(tmp_path / "s.json", [(0, policy)], epochs=1))
    out = op(torch.full((4000, 1, 4, 4), 0.25))[:, 0, 0, 0]
    once = {0.25 * 1.9, 0.25 * 0.1}
    twice = {0.25 * 1.9 * 1.9, 0.25 * 1.9 * 0.1, 0.25 * 0.1 * 0.1}

    def share(values):
        return sum(torch.isclose(out, torch.tensor(v), atol=1e-5).float().mean().item() for v in values)

    assert share({0.25}) == pytest.approx(0.2, abs=0.03)
    assert share(once) == pytest.approx(0.3, abs=0.03)
    assert share(twice) == pytest.approx(0.5, abs=0.03)


def test_schedule_is_stretched_to_the_run_length(tmp_path):
    strong = [["Rotate", 10, 9]] * 26
    op = PBAPolicy(write_schedule(tmp_path / "s.json", [(0, zero_policy()), (4, strong)], epochs=8))
    picks = []
    for epoch in range(16):  # a run twice as long as the search
        op.set_epoch(epoch, 16)
        picks.append(op.policy_index())
    assert picks == [0] * 8 + [1] * 8


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", r"is not JSON"),
        ('{"format": "other"}', r"is not a PBA schedule"),
        ('{"format": "autocls-pba-schedule", "epochs": 2, "schedule": [{"epoch": 0, "policy": [["Warp", 1, 1]]}]}',
         r"has the entry \['Warp', 1, 1\]; ops must be among"),
    ],
)
def test_bad_schedule_file_is_one_sentence(tmp_path, content, message):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(AutoclsError, match=message):
        read_schedule(path)
    with pytest.raises(AutoclsError, match=r"does not exist"):
        read_schedule(tmp_path / "missing.json")


def test_explore_moves_levels_within_range_and_exploit_copies_the_top():
    rng = random.Random(0)
    policy = [[op, 10, 9] for op, _, _ in zero_policy()]
    moved = explore(policy, rng)
    assert all(0 <= p <= 10 and 0 <= m <= 9 for _, p, m in moved) and moved != policy
    assert [op for op, _, _ in moved] == [op for op, _, _ in policy]
    members = [Member(i, zero_policy(), [[0, zero_policy()]], ckpt=f"m{i}.ckpt", score=s)
               for i, s in enumerate([0.9, 0.5, 0.7, 0.1])]
    copies = exploit_and_explore(members, epoch=2, rng=rng, quantile=0.25)
    assert copies == [(3, 0)]
    assert members[3].ckpt == "m0.ckpt" and members[3].history[-1][0] == 2
    assert members[3].history[:-1] == members[0].history and members[0].ckpt == "m0.ckpt"


def test_training_with_a_pba_schedule(compose_train, tmp_path):
    """`augmentation=pba augmentation.schedule=...` trains the default digits run (the callback feeds the
    epoch to the op, which logs the schedule entry in use)."""
    strong = [[op, 5, 3] for op, _, _ in zero_policy()]
    schedule = write_schedule(tmp_path / "schedule.json", [(0, zero_policy()), (1, strong)], epochs=2)
    metrics = train(compose_train(["augmentation=pba", f"augmentation.schedule={schedule}", "trainer.max_epochs=2",
                                   "augmentation.ops.crop=null",
                                   "logger=csv"]))
    assert metrics["val/acc_best"] > 0.5
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("train/pba_policy")
    assert [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]] == [0.0, 1.0]


@pytest.mark.slow
def test_pba_search_writes_a_schedule_and_resumes_after_a_kill(tmp_path):
    """Kill -9 the search (and its member run) during round 1, rerun: members that finished round 1 are
    kept, the others train it again, and the search ends with a schedule."""
    cmd = [sys.executable, str(ROOT / "scripts" / "pba_search.py"), "--out", str(tmp_path / "pba"),
           "--population", "4", "--epochs", "4", "--interval", "2", "--", "model.net.width=8", "logger=none",
           "~callbacks.rich_progress_bar", "~callbacks.model_summary"]
    kept = tmp_path / "pba" / "round_001" / "member_00" / "metrics.json"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not kept.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the search ended before round 1"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (tmp_path / "pba" / "schedule.json").exists()
    before = kept.stat().st_mtime_ns
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert kept.stat().st_mtime_ns == before
    assert all((tmp_path / "pba" / "round_001" / f"member_{i:02d}" / "metrics.json").is_file() for i in range(4))
    schedule = read_schedule(tmp_path / "pba" / "schedule.json")
    assert schedule["epochs"] == 4 and schedule["schedule"][0]["epoch"] == 0
    rows = (tmp_path / "pba" / "population.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 and any(r.split(",")[3] for r in rows[1:5])  # a copy after round 0
