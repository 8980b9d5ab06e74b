"""What the command-line entry points share that reads no config: seeding, the environment the report
records, one-line messages for a user's mistake, stopping on signals, the launch's run-directory name,
quieting the libraries, leaving no empty run directory behind."""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .evaluation.metrics import current_stage
from .numerics.errors import RunStopped, UserError


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (what Lightning's ``seed_everything`` seeds), before any
    model or data is built."""
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's generator


def environment() -> dict[str, str]:
    """Every ``NVFP4CAL_*`` environment variable of this run (the report records them)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("NVFP4CAL_")}


def user_error(err: BaseException) -> str | None:
    """A one-line message for a user's mistake, or None for a bug (which keeps its traceback)."""
    while err is not None:
        if isinstance(err, MissingMandatoryValue):
            return f"missing value: {str(err).splitlines()[0]}; pass it on the command line as key=value"
        if isinstance(err, (UserError, OmegaConfBaseException)):
            return str(err).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def stop_on_signals():
    """While running: SIGTERM (what SLURM and ``timeout`` send) and SIGINT raise :class:`RunStopped` in
    the main thread, so the run unwinds as on any error (writers remove their temporary directories;
    a layerwise run keeps its progress)."""

    def stop(signum, frame):
        raise RunStopped(signum, current_stage())

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def launch_id() -> str:
    """The same run-directory name on every rank of one launch (``${now:}`` differs between ranks).

    torchrun with a rendezvous id (multi-node) -> that id; single-node torchrun -> the launcher's pid;
    SLURM -> the job id; otherwise the local time.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id != "none":
        return f"run-{run_id}"
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return f"torchrun-{os.getppid()}"
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    return time.strftime("%H-%M-%S")


def nearest(word: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"nearest: {', '.join(near)}" if near else f"valid: {', '.join(choices)}"


def quiet_libraries() -> None:
    """What the libraries print that says nothing about this run: Lightning's accelerator lines and
    logger advertisement, its pytree deprecation warning, matplotlib's first-run font cache note."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def remove_empty_run_dir(run_dir: Path) -> str:
    """A run that failed before writing anything leaves no ``outputs/DATE/TIME`` folder (Hydra made it and
    put only ``.hydra`` in it); otherwise the message names it."""
    try:
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
            shutil.rmtree(run_dir)
            parent = run_dir.parent
            if parent.is_dir() and not any(parent.iterdir()):  # outputs/DATE, made for this run only
                parent.rmdir()
            return ""
    except OSError:
        pass
    return f" (run directory: {run_dir})" if run_dir.is_dir() else ""
