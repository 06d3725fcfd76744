"""caffe-runner: Caffe feature extraction on Slurm arrays or one machine, into HDF5.

One package per responsibility, lowest first (a package imports only from those before it;
tests/test_layers.py checks it): jobs (Slurm's word on a run's jobs), store (the run directory
and its files), engine (nets, engines, pixels, devices), inputs, runtimes (containers), run
(config, plan, status), results (shard writer, merge, verify, export), task (inside one task),
launch (local and Slurm), ui (the commands) with api (the Python API). Here: the one named
logger; errors.py and schema.py, which every layer reads; faults.py (fault injection, inert
unless a test sets it); config.py (old pickles).
"""
import logging

__version__ = "0.1.0"

# the one named logger of the package
log = logging.getLogger("caffe_runner")
