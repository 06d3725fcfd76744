"""The run directory on disk, its files and their protocols: the one way to put a
file in place (atomic.py), the one lock (locks.py), sha256 (digest.py), the run directory's
layout and life (rundir.py), the manifest format (manifest.py), shard arithmetic and names
(shard.py), each shard's event log (events.py), stats.json (stats.py), a run directory only
its owner can write (private.py), heartbeats (liveness.py), a death in words (lastwords.py),
the one HDF5 opener (h5.py).

May import: runner (log), runner.errors, runner.schema, runner.faults, runner.jobs.
"""
