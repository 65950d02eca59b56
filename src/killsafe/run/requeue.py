"""Requeue a SLURM job once its emergency checkpoint is safe (``Run(requeue=True)``).

A job that SLURM signals before its time limit or a preemption
(``#SBATCH --signal=B:USR1@120``), or that stops at ``stop_after=``, saves
and exits; with ``requeue=True`` it also asks SLURM to put it back in the
queue, so that it starts again later and resumes. A stop the user asked for
(``q``, Ctrl+C, a dashboard request, early stopping) is never requeued.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

__all__ = ["REQUEUE_TIMEOUT", "requeue_slurm_job", "should_requeue"]

REQUEUE_TIMEOUT = 30.0  # seconds scontrol may take before the requeue counts as failed


def should_requeue(exit_reason: str | None) -> bool:
    """Whether a run that stopped for ``exit_reason`` is one to requeue.

    Signals other than SIGINT (``signal:SIGTERM``, ``signal:SIGUSR1``) and
    the time limit come from the scheduler or the machine; SIGINT arrives as
    ``keyboard``, and the other reasons are the user's own.
    """
    return exit_reason is not None and (
        exit_reason.startswith("signal:") or exit_reason == "time-limit"
    )


def slurm_job_id(environ: Mapping[str, str]) -> str | None:
    """This job's id as ``scontrol`` takes it (``ARRAYJOB_TASK`` for an array task)."""
    array_job, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> str:
    """Run ``scontrol requeue`` for this job; returns the line that says what happened.

    Never raises: the checkpoint is already safe, and a failed requeue only
    means the job must be started again by hand.
    """
    environ = os.environ if environ is None else environ
    job = slurm_job_id(environ)
    if job is None:
        return "requeue: SLURM_JOB_ID is not set (not a SLURM job), so nothing was requeued"
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job],
            capture_output=True,
            text=True,
            timeout=REQUEUE_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        return f"requeue of SLURM job {job} failed: scontrol is not on PATH; submit it again"
    except subprocess.TimeoutExpired:
        return (
            f"requeue of SLURM job {job} failed: scontrol did not answer in "
            f"{REQUEUE_TIMEOUT:g} s; submit it again"
        )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        why = said[0] if said else f"exit status {done.returncode}"
        return f"requeue of SLURM job {job} failed: scontrol: {why}; submit it again"
    return f"requeued SLURM job {job}: it resumes from this checkpoint when it starts again"
