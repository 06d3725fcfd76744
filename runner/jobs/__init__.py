"""What Slurm says about a run's jobs: the pure parsers of squeue, sacct and scontrol
and the one function that asks them (slurm.py), and which of a run's recorded submissions are
still queued or running (inflight.py, from submissions.json).

May import: runner (log), runner.errors. It sits below the run directory (store.rundir refuses
to overwrite a run whose jobs are alive).
"""
