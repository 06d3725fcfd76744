"""Pure arithmetic: shard bounds, array chunks, task identity."""
import pytest

from runner.store.shard import array_chunks, shard_bounds, shard_name
from runner.task.identity import task_identity

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("n,k,expected", [
    (10, 3, [(0, 4), (4, 7), (7, 10)]),
    (9, 3, [(0, 3), (3, 6), (6, 9)]),
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
    (0, 2, [(0, 0), (0, 0)]),
    (7, 1, [(0, 7)]),
    (11, 4, [(0, 3), (3, 6), (6, 9), (9, 11)]),
])
def test_shard_bounds_table(n, k, expected):
    assert [shard_bounds(n, k, i) for i in range(k)] == expected


@pytest.mark.parametrize("n", [0, 1, 5, 17, 1000, 12345])
@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_shard_bounds_cover_contiguously(n, k):
    bounds = [shard_bounds(n, k, i) for i in range(k)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a0, b0), (a1, b1) in zip(bounds, bounds[1:]):
        assert b0 == a1
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args", [(10, 0, 0), (10, 3, 3), (10, 3, -1), (-1, 2, 0)])
def test_shard_bounds_rejects(args):
    with pytest.raises(ValueError):
        shard_bounds(*args)


def test_array_chunks():
    assert array_chunks(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert array_chunks([1, 5], 10) == [[1, 5]]
    with pytest.raises(ValueError):
        array_chunks([1], 0)


def test_shard_name_sorts():
    names = [shard_name(i, 120) for i in range(120)]
    assert names == sorted(names)


def test_task_identity_from_slurm_env():
    t = task_identity({"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "45",
                       "CUDA_VISIBLE_DEVICES": "2", "SLURM_RESTART_COUNT": "1"})
    assert (t.job_id, t.array_task_id, t.restart_count, t.gpu) == ("41_3", 3, 1, 2)
    t = task_identity({})
    assert (t.job_id, t.array_task_id, t.gpu) == (None, None, None)
