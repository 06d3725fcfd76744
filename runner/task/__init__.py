"""What runs inside one array task or local worker: the shard function (extract.py),
taking free shards (steal.py), a poison shard decoded image by image in child processes
(isolate.py), the task's identity, threads, logging and death with its parent (identity.py),
a Python child process of ours spoken to in pickles (child.py: the local workers, isolate).

May import: runner.results and everything below it; never a launcher.
"""
