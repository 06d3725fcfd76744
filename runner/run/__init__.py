"""What a run is and where it stands: the config's composition (config.py,
overrides.py), the plan that validates it and writes run.json (plan.py), a change described in
words (changes.py), sweeps (sweep.py, sharedpass.py), a run's state read from its directory
and Slurm's word (status.py).

May import: everything below it: runner (log, errors, schema, faults), runner.jobs,
runner.store, runner.engine, runner.inputs, runner.runtimes.
"""
