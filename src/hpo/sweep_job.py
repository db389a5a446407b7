"""Run one job of a Hydra multirun so that Lightning's DDP can start inside it, and so the next job can too.

Lightning 2.6 starts ranks 1..N-1 of `strategy=ddp` by re-running the script
(pytorch_lightning/strategies/launchers/subprocess_script.py -> lightning_fabric's `_hydra_subprocess_cmd`):
`python <sys.argv[0]> <sys.argv[1:]> hydra.run.dir="<HydraConfig.run.dir>" hydra.output_subdir=null`.
Inside a multirun job that command is wrong twice over: `sys.argv` is the *sweep's* command (`-m`, the
search space), so every child would start a sweep of its own, and `hydra.run.dir` is the un-swept run
directory pattern, not the job's directory. After the job, the launcher has also left `LOCAL_RANK` and
`MASTER_PORT` in `os.environ` and the process group initialised, so the next job's Trainer believes an
external launcher created its ranks and waits for peers that never come.

`sweep_job` fixes all three for the duration of one job: argv becomes `script + this job's overrides`,
`hydra.run.dir` the job's output directory, and afterwards the environment and process group are reset.
Outside a multirun (including in the DDP children themselves, which run in Hydra's RUN mode) it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# what the DDP launcher writes into os.environ (lightning_fabric ... subprocess_script.py, seed_everything)
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED",
            "PL_SEED_WORKERS")
# options that choose the config (they must reach the children); `-m/--multirun` must not
_CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextlib.contextmanager
def sweep_job(script: str) -> Iterator[None]:
    """Within a multirun job: DDP children re-run exactly this job (see the module docstring)."""
    if not in_multirun():
        yield
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import read_write

    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env = list(sys.argv), {k: os.environ.get(k) for k in _DDP_ENV}
    saved_run_dir = hydra_cfg.run.dir
    sys.argv = [os.path.abspath(script), *config_flags(saved_argv[1:]), *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _destroy_process_group()


def config_flags(argv: list[str]) -> list[str]:
    """The `--config-name x` / `-cn=x` style options in `argv` (with their values), nothing else."""
    kept, take_next = [], False
    for arg in argv:
        if take_next:
            kept.append(arg)
            take_next = False
        elif arg in _CONFIG_FLAGS:
            kept.append(arg)
            take_next = True
        elif arg.split("=", 1)[0] in _CONFIG_FLAGS:
            kept.append(arg)
    return kept


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
