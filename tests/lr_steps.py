"""A helper shared by the schedule tests (tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

import torch


def run_steps(model, opt, sched, steps: int) -> list[float]:
    """The lr each optimizer step trains with, stepping the scheduler after every step as Lightning does."""
    used = []
    for _ in range(steps):
        used.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        sched.step()
    return used
