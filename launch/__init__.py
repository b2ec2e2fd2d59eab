"""Where a stage runs: ``python -m launch local`` (processes on this machine) or, later, Slurm."""
