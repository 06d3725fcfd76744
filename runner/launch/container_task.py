"""One local shard inside a container: the local launcher runs
`<runtime wrapper> python -m runner.launch.container_task CONFIG.yaml INDEX THREADS` per shard
(under Slurm, submitit's own entry point plays this part). The module name is an entry point
of images already built: keep it. The last stdout line carries the shard's summary back to
the launcher."""
from __future__ import annotations

import json
import sys

from omegaconf import OmegaConf

from ..task.extract import run_shard
from ..task.identity import die_with_parent, setup_task_logging

RESULT_PREFIX = "CAFFE_RUNNER_RESULT "


def main(argv=None) -> int:
    cfg_path, index, threads = (argv if argv is not None else sys.argv[1:])
    die_with_parent()  # the runtime (or the launcher's worker) is gone: stop writing
    setup_task_logging()
    result = run_shard(OmegaConf.load(cfg_path), int(index), threads=int(threads))
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
