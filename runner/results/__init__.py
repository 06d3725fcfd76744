"""The features a run writes: the shard writer (write.py), the merge into one file
(merge.py), verify (verify.py), the export for search tools (embeddings.py).

May import: runner.run and everything below it.
"""
