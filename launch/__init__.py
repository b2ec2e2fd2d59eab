"""Where a stage runs: ``python -m launch local`` (processes on this machine), ``python -m launch torchrun``
(one node of a multi-node run under torchrun's elastic agent) or ``python -m launch slurm`` (submitit jobs
on a Slurm cluster), each a backend (launch.backend); ``python -m launch status RUN_DIR`` for a run's
Slurm jobs."""
