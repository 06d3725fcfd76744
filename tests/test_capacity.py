"""Peak memory is measured in the process being measured (make bench rows 4 and 9), and the
bench's arithmetic of what the cores can do (rows 2, 7, 10). No pycaffe; each memory test
starts one spawned child, as the bench does."""
from __future__ import annotations

import multiprocessing as mp
import resource
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from capacity import cost_s_per_image, decode_threads_per_gpu, gpu_busy_fraction, shared_cores_limit
from peakmem import peak_rss_mb, status_field_kb

pytestmark = pytest.mark.unit


def _child(mb: int, grow_steps: int, q) -> None:
    kept = []
    for _ in range(max(1, grow_steps)):
        block = np.ones(mb * 2**20 // 8)  # touched: resident
        if grow_steps:
            kept.append(block)  # a buffer that grows with the input
        del block
    q.put({"own": peak_rss_mb(), "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0})


def _in_child(target, *args):
    """target(*args, q) in a fresh spawned process; what it puts on q."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    out = q.get(timeout=120)
    p.join()
    return out


def _measure_child(mb: int, grow_steps: int = 0) -> dict:
    return _in_child(_child, mb, grow_steps)


def test_status_field_parsing():
    text = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   77824 kB\nVmRSS:\t   1024 kB\n"
    assert status_field_kb(text, "VmHWM") == 77824
    assert status_field_kb(text, "VmRSS") == 1024
    assert status_field_kb(text, "VmSwap") is None


def test_peak_is_the_childs_own_not_its_parents():
    """A 600 MB parent spawns a child that uses about 76 MB: the child's own figure is its own,
    while ru_maxrss in the child reports the parent's high-water mark (what rows 4 and 9 used to
    read: every cell the same)."""
    parent = np.ones(600 * 2**20 // 8)  # 600 MB, touched
    assert peak_rss_mb() >= 600
    got = _measure_child(mb=40)  # numpy + 40 MB: about 76 MB
    del parent
    assert 40 < got["own"] < 200, got
    # the trap this measurement avoids (Linux keeps the parent's maxrss across fork + exec)
    assert got["ru_maxrss"] >= 600, got


def test_peak_ratio_sees_a_buffer_that_grows_with_the_input():
    """Row 4's ratio (10N over N): flat when each batch is dropped, about 10x the batch when
    every batch is kept."""
    flat_n, flat_10n = _measure_child(mb=20)["own"], _measure_child(mb=20)["own"]
    grow_n, grow_10n = _measure_child(mb=20, grow_steps=1)["own"], _measure_child(mb=20, grow_steps=10)["own"]
    assert flat_10n / flat_n < 1.1
    assert grow_10n / grow_n > 1.5, (grow_n, grow_10n)
    assert grow_10n - grow_n > 150  # nine more 20 MB blocks


# ---- what the cores can do --------------------------------------------------------------

@pytest.mark.parametrize("cores,decode_s,forward_s,limit", [
    (2, 0.049, 0.042, 2 / 0.091),     # the camera photos, full decoding: about 22 img/s
    (2, 0.018, 0.042, 2 / 0.060),     # reduced decoding: about 33 img/s
    (1, 0.0, 0.05, 20.0),             # nothing to decode: the forward alone
    (8, 0.01, 0.03, 200.0),
])
def test_shared_cores_limit(cores, decode_s, forward_s, limit):
    assert shared_cores_limit(cores, decode_s, forward_s) == pytest.approx(limit)


def test_limit_from_rates_is_the_harmonic_combination():
    """Rates measured with all cores on one stage: the limit is 1 / (1/D + 1/F)."""
    cores, decode_rate, forward_rate = 2, 40.8, 47.3
    limit = shared_cores_limit(cores, cost_s_per_image(decode_rate, cores), cost_s_per_image(forward_rate, cores))
    assert limit == pytest.approx(1 / (1 / decode_rate + 1 / forward_rate))
    assert limit < min(decode_rate, forward_rate)


@pytest.mark.parametrize("bad", [(2, 0.0, 0.0), (0, 0.01, 0.01)])
def test_shared_cores_limit_refuses_nonsense(bad):
    with pytest.raises(ValueError):
        shared_cores_limit(*bad)
    with pytest.raises(ValueError):
        cost_s_per_image(0.0, 2)


@pytest.mark.parametrize("gpu,per_thread,threads", [
    (2000, 157, 13),   # photo-sized JPEGs (docs/gpus.md, issue 10)
    (2000, 20, 100),   # camera photos, full decoding: 49 ms a photo
    (2000, 55, 37),    # camera photos, reduced decoding
    (2000, 2000, 1),   # exactly one
    (100, 1000, 1),    # never fewer than one
])
def test_decode_threads_per_gpu(gpu, per_thread, threads):
    assert decode_threads_per_gpu(gpu, per_thread) == threads


def test_gpu_busy_fraction():
    assert gpu_busy_fraction(7, 20, 2000) == pytest.approx(0.07)
    assert gpu_busy_fraction(13, 157, 2000) == 1.0


# ---- full-size decodes reuse their buffers -----------------------------------------------

def _decode_faults(reuse: bool, threads: int, q) -> None:
    import cv2

    from runner.engine.decode import reuse_large_buffers

    applied = reuse_large_buffers() if reuse else False
    img = np.zeros((3000, 4000, 3), np.uint8)
    img[::7, ::5] = 200
    data = cv2.imencode(".jpg", img)[1]

    def decode(_):
        raw = bytearray(data.tobytes())  # as a reader's file bytes: allocated beside the image
        out = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)  # 36 MB
        small = cv2.resize(out, (300, 300))
        del out
        return small

    with ThreadPoolExecutor(threads) as pool:  # the pipeline decodes in threads of its own
        list(pool.map(decode, range(2 * threads)))  # first decodes: buffers are new either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        list(pool.map(decode, range(8)))
    q.put((applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8))


def _faults(reuse: bool, threads: int = 1):
    return _in_child(_decode_faults, reuse, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_full_size_decodes_reuse_their_buffer(threads):
    """Without reuse every 12-MP decode maps 36 MB afresh (a page fault per 4 KB page); with it,
    the freed buffer is reused, in decode threads too (counts, not times: the machine's load
    does not matter)."""
    _, fresh = _faults(False, threads)
    applied, reused = _faults(True, threads)
    assert applied
    assert fresh > 8000, fresh             # 36 MB / 4 KB = 9,000 pages
    # measured: under 1 to about 350 with two threads, as their allocations interleave; 8,800
    # with each thread in an arena of its own
    assert reused < fresh / 5, (fresh, reused)


# ---- the local CPU default: one single-threaded worker per core -------------------------

@pytest.mark.parametrize("cores,workers,threads_per_worker,expect", [
    (2, None, None, (2, 1)),    # the default: every core a process with one BLAS thread
    (16, None, None, (16, 1)),
    (2, 1, None, (1, 2)),       # one worker (less memory): every core a BLAS thread
    (16, 4, None, (4, 4)),
    (16, 4, 2, (4, 2)),
])
def test_local_cpu_worker_plan(monkeypatch, cores, workers, threads_per_worker, expect):
    from omegaconf import OmegaConf

    from runner.schema import LocalLauncherConf, ModelConf, RunConf
    from runner.launch.local import worker_plan

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    cfg = OmegaConf.structured(RunConf(model=ModelConf(name="m", prototxt="p", weights="w"),
                                       launcher=LocalLauncherConf(workers=workers,
                                                                  threads_per_worker=threads_per_worker)))
    cfg.device = "cpu"
    wp = worker_plan(cfg)
    assert (wp["workers"], wp["threads"]) == expect
