"""The rows of `make bench` (bench/bench.py is the driver), one module per row or group of rows:

common.py      what every row shares: spawned measurement processes, medians, run directories
               prepared as the CLI does, the sample images, printing a table
extract.py     rows 1, 3, 6, and the rounds that measure rows 1-11 side by side
limits.py      rows 2 and 10: what the cores can do, and caffe-runner's ratio to it
gpu.py         rows 7-8: decode threads per GPU, a GPU's own rates
rss.py         row 4: a task's peak memory at N and 10N images
manifest.py    row 5: manifest build times, what one task reads
merge.py       row 9: merge, verify, export at scale
agreement.py   row 11: reduced JPEG decoding's features against full decoding
forward.py     row 12: Caffe's CPU forward against one core's SGEMM
stragglers.py  row 13: a slow node on the dev cluster
sweep.py       row 16: a sweep's shared pass

Rows 14 and 15 are bench/fscalls.py and bench/million.py (scripts of their own too).
extract.py imports the modules of the rows its rounds run, gpu.py imports limits.py's decode
measurement, the others import common.py alone; none imports bench.py. Every spawned child
imports these modules at its start, so runner modules are imported inside the functions that
use them (runner.schema aside: gpu.py reads the Slurm default at import).
"""
