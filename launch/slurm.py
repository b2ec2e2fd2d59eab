"""Stages as submitit jobs on Slurm: one task per GPU through srun, save-and-requeue on the time-limit
or preemption signal, chains of dependent jobs, sweeps as job arrays. The only module that imports
submitit.

Inside the job, :class:`StageJob` runs the stage in-process (``package.__main__.main(argv)``) on every
task. Slurm (``--signal``) or an operator (``scancel --signal=USR2``) sends SIGUSR2 to every task; each
task forwards it to the stage as its save-now signal (SIGUSR1), so that all ranks agree at the next step
boundary, write a checkpoint and return. Rank 0 then hands over to submitit, which calls
:meth:`StageJob.checkpoint` (a fresh submission with one more requeue counted, or none past the cap)
and requeues the job; the requeued job resumes from the run dir's latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from launch import events
from launch.backend import Backend
from launch.spec import (SlurmOptions, check_partition, check_stage, resolve_options, sweep_base, sweep_points,
                         time_minutes)
from launch.stage import Stage, parse_stages
from pretrain.config import ConfigError
from pretrain.dist import STOPPED_EXIT_CODE, leave_process_group
from pretrain.processes import SaveForwarder


class SlurmBackend:
    name = "slurm"
    help = "submitit jobs on Slurm (chains, sweeps, requeue)"
    epilog = """\
Each STAGE after '--' is a job; several stages ('-- pretrain A.yaml -- finetune linear B.yaml') form a
chain, each starting after the previous one succeeded. An override with several values
('optim.lr=1e-3,2e-3') makes a sweep: a job array with one run dir per point under run.dir.
A job that reaches its time limit or is preempted saves, requeues itself and resumes.
"""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--profile", help="cluster profile: configs/launch/NAME.yaml or a path; flags override it")
        parser.add_argument("--nodes", type=int)
        parser.add_argument("--gpus-per-node", type=int, help="default 0 (CPU, gloo)")
        parser.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node, or 1 without GPUs")
        parser.add_argument("--cpus-per-task", type=int)
        parser.add_argument("--mem", help="memory per node, e.g. 64G")
        parser.add_argument("--partition")
        parser.add_argument("--account")
        parser.add_argument("--qos")
        parser.add_argument("--constraint")
        parser.add_argument("--time", help="time limit per job: minutes or [D-]HH:MM[:SS] (default 60)")
        parser.add_argument("--exclude", help="nodes to avoid")
        parser.add_argument("--max-requeues", type=int, help="requeues after time limits or preemptions (default 3)")
        parser.add_argument("--signal-delay-s", type=int,
                            help="seconds before the time limit to save and requeue (default 120)")
        parser.add_argument("--job-name")
        parser.add_argument("--dry-run", action="store_true", help="print the sbatch scripts and configs; submit nothing")
        parser.add_argument("stage", nargs=argparse.REMAINDER, help="-- STAGE [-- STAGE ...]")

    def run(self, args: argparse.Namespace) -> int:
        flags = {name: getattr(args, name) for name in SlurmOptions.__dataclass_fields__ if hasattr(args, name)}
        return run(resolve_options(args.profile, flags), args.stage, dry_run=args.dry_run)


BACKEND: Backend = SlurmBackend()


class StageJob:
    """The submitted callable: run one stage on this task; requeue when asked to stop early."""

    def __init__(self, stage: Stage, run_dir: str, max_requeues: int, requeues: int = 0) -> None:
        self.stage = stage
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.requeues = requeues

    def __call__(self) -> str:
        env = submitit.JobEnvironment()
        export_topology(env)
        save_request = SaveRequest()  # after submitit installed its handlers, which it keeps
        main_rank = env.global_rank == 0
        if main_rank:
            events.record(self.run_dir, "started", job_id=env.job_id, requeues=self.requeues,
                          tasks=env.num_tasks, nodes=env.hostnames, stderr=str(env.paths.stderr))
        try:
            code = self.stage.main()
            if code not in (0, STOPPED_EXIT_CODE):
                raise RuntimeError(f"{self.stage.command_line()} exited with status {code}")
        except BaseException as e:
            if main_rank:
                events.record(self.run_dir, "failed", job_id=env.job_id, error=f"{type(e).__name__}: {e}")
            raise
        leave_process_group()
        if code == STOPPED_EXIT_CODE and not save_request.requeue:
            # SIGTERM (a cancellation, or a preemption that Slurm requeues) or a save signal sent to
            # the tasks: the job must not count as a success, or a chain would start its next stage.
            if main_rank:
                events.record(self.run_dir, "stopped", job_id=env.job_id,
                              error=f"saved and stopped before the end of the run (exit code {STOPPED_EXIT_CODE}); "
                                    f"resubmit to resume")
            sys.exit(STOPPED_EXIT_CODE)
        if code == STOPPED_EXIT_CODE:
            if main_rank:
                events.record(self.run_dir, "requeued" if self.requeues < self.max_requeues else "failed",
                              job_id=env.job_id, requeues=self.requeues + 1,
                              error=None if self.requeues < self.max_requeues else
                              f"stopped on a signal after {self.requeues} requeues (--max-requeues)")
                save_request.hand_over_to_submitit()  # checkpoint() -> requeue, then exits
            return "stopped for a requeue"
        if main_rank:
            events.record(self.run_dir, "finished", job_id=env.job_id)
        return "finished"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 after the stage saved: the job to requeue, or None at the cap."""
        if self.requeues >= self.max_requeues:
            return None
        return submitit.helpers.DelayedSubmission(
            StageJob(self.stage, self.run_dir, self.max_requeues, self.requeues + 1))


class SaveRequest:
    """SIGUSR2 (submitit's time-limit and preemption signal) and SIGTERM become the stage's save request
    (pretrain.processes.SaveForwarder, to this process: the stage runs in it, and gets the request once
    it handles it, so a signal during start-up waits for that instead of killing the process).

    After SIGUSR2 the job requeues itself. SIGTERM comes from a cancellation (which must stay final)
    or from a preemption that Slurm requeues itself, so it only saves."""

    def __init__(self) -> None:
        self._submitit_handler = signal.getsignal(signal.SIGUSR2)
        self._forwarder = SaveForwarder(lambda: [os.getpid()], listen=(signal.SIGUSR2, signal.SIGTERM),
                                        escalate=False)

    @property
    def requeue(self) -> bool:
        return signal.SIGUSR2 in self._forwarder.received

    def hand_over_to_submitit(self) -> None:
        self._submitit_handler(signal.SIGUSR2, None)


def export_topology(env) -> None:
    """torch.distributed's variables from submitit's view of the job (srun started one task per rank)."""
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.hostnames[0],
        # Every task derives the same port from the job id; array tasks have distinct job ids.
        MASTER_PORT=str(20000 + int(os.environ.get("SLURM_JOB_ID", env.raw_job_id)) % 40000))


# ---------------------------------------------------------------------------------------------
# Submission


def sbatch_parameters(options: SlurmOptions, stage: Stage, dependency: str | None = None) -> dict:
    """submitit's Slurm parameters (sbatch's names) for one stage."""
    params = {
        "job_name": options.job_name or f"vitscale-{stage.package}",
        "nodes": options.nodes,
        "ntasks_per_node": options.ntasks_per_node,
        "time": time_minutes(options.time),
        "signal_delay_s": options.signal_delay_s,
        # One failed task (a crash, a SIGKILL, the OOM killer) ends the step at once: the other ranks
        # would otherwise wait in a collective until its timeout.
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *options.setup],
        "additional_parameters": {"requeue": True},
    }
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    for key in ("cpus_per_task", "mem", "partition", "account", "qos", "constraint", "exclude"):
        if getattr(options, key) is not None:
            params[key] = getattr(options, key)
    if dependency:
        params["dependency"] = dependency
    return params


def sbatch_script(options: SlurmOptions, stage: Stage, folder: Path, dependency: str | None = None,
                  array_size: int | None = None) -> str:
    """The sbatch script submitit writes for this stage (what --dry-run prints)."""
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=array_size,
                               **sbatch_parameters(options, stage, dependency))


def _executor(options: SlurmOptions, stage: Stage, folder: Path, dependency: str | None):
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    executor.update_parameters(**sbatch_parameters(options, stage, dependency))
    return executor


def submit_chain(options: SlurmOptions, stages: list[Stage]) -> list[str]:
    """Each stage a job that starts after the previous one succeeded (afterok); returns the job ids."""
    job_ids: list[str] = []
    for stage in stages:
        run_dir = stage.run_dir()
        dependency = f"afterok:{job_ids[-1]}" if job_ids else None
        executor = _executor(options, stage, run_dir / "slurm", dependency)
        job = executor.submit(StageJob(stage, str(run_dir), options.max_requeues))
        events.record(run_dir, "submitted", job_id=job.job_id, command=stage.command_line(),
                      dependency=dependency, stderr=str(job.paths.stderr).replace("%t", "0"))
        job_ids.append(job.job_id)
    return job_ids


def submit_sweep(options: SlurmOptions, base_run_dir: Path, points: list[tuple[str, Stage]]) -> list[str]:
    """One job array, one task per point; its logs under the sweep's base run dir."""
    executor = _executor(options, points[0][1], base_run_dir / "slurm", None)
    with executor.batch():
        jobs = [executor.submit(StageJob(stage, str(stage.run_dir()), options.max_requeues))
                for _, stage in points]
    for job, (_, stage) in zip(jobs, points):
        record = dict(job_id=job.job_id, command=stage.command_line(),
                      stderr=str(job.paths.stderr).replace("%t", "0"))
        events.record(stage.run_dir(), "submitted", **record)
        events.record(base_run_dir, "submitted", point=str(stage.run_dir()), **record)  # the sweep's overview
    return [job.job_id for job in jobs]


# ---------------------------------------------------------------------------------------------
# python -m launch slurm


def run(options: SlurmOptions, stage_tokens: list[str], dry_run: bool = False) -> int:
    """Check everything, then submit (or with ``dry_run`` print) the chain or the sweep."""
    stages = parse_stages(stage_tokens)
    points = sweep_points(stages[0]) if len(stages) == 1 else []
    if len(stages) > 1 and any(sweep_points(s) for s in stages):
        raise ConfigError("a sweep (key=v1,v2) cannot be part of a chain: submit the sweep on its own")
    for i, stage in enumerate([stage for _, stage in points] or stages):
        first = i == 0 or bool(points)
        if first:  # a later stage's inputs are an earlier one's outputs
            stage.prepare()
        check_stage(stage, options, first=first)
    if not dry_run or shutil.which("sinfo"):
        check_partition(options)
    if dry_run:
        print_dry_run(options, stages, points)
        return 0
    try:
        submit(options, stages, points)
    except submitit.core.utils.FailedJobError as e:  # sbatch's own message says what it refused
        raise ConfigError(f"sbatch refused the job: {e}") from None
    return 0


def submit(options: SlurmOptions, stages: list[Stage], points: list[tuple[str, Stage]]) -> None:
    if points:
        base = sweep_base(stages[0]).run_dir()
        job_ids = submit_sweep(options, base, points)
        for job_id, (label, stage) in zip(job_ids, points):
            print(f"submitted job {job_id}: {label} -> {stage.run_dir()}")
    else:
        job_ids = submit_chain(options, stages)
        for job_id, stage in zip(job_ids, stages):
            print(f"submitted job {job_id}: {stage.command_line()} -> {stage.run_dir()}")
    print(f"follow it with: python -m launch status {(sweep_base(stages[0]) if points else stages[-1]).run_dir()}")


def print_dry_run(options: SlurmOptions, stages: list[Stage], points: list[tuple[str, Stage]]) -> None:
    if points:
        base = sweep_base(stages[0]).run_dir()
        print(f"# sweep: a job array of {len(points)} tasks, logs in {base / 'slurm'}")
        print(sbatch_script(options, stages[0], base / "slurm", array_size=len(points)))
        for i, (label, stage) in enumerate(points):
            print(f"# array task {i}: {label}\n# run dir: {stage.run_dir()}\n# command: {stage.command_line()}")
            print(stage.describe_config())
        return
    for i, stage in enumerate(stages):
        dependency = f"afterok:JOB{i - 1}" if i else None  # the id job i-1 will get
        print(f"# job {i}: {stage.command_line()}\n# run dir: {stage.run_dir()}")
        print(sbatch_script(options, stage, stage.run_dir() / "slurm", dependency))
        print(f"# resolved config of job {i}\n{stage.describe_config()}")
