"""Where a stage runs: ``python -m launch local`` (processes on this machine) or ``python -m launch slurm``
(submitit jobs on a Slurm cluster), and ``python -m launch status RUN_DIR`` for a run's Slurm jobs."""
