"""The local launcher's workers (runner/launch/workers.py): they never run the user's main
module (a script without a __main__ guard, stdin), and one that dies while starting fails the
run at once, naming the cause, instead of being replaced forever."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, wait_until

pytestmark = pytest.mark.unit

# a script without an `if __name__ == "__main__":` guard that starts a worker: plain spawn runs
# the whole script again in the child (printing MAIN twice, then failing in the child)
UNGUARDED = textwrap.dedent("""
    import os
    from runner.launch.workers import WorkerContext
    print("MAIN", os.getpid(), flush=True)
    ctx = WorkerContext()
    p = ctx.Process(target=os.getpid)
    p.start()
    p.join()
    print("EXIT", p.exitcode, flush=True)
""")


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, **kw)


def test_worker_never_runs_an_unguarded_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED)
    p = _run([str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.count("MAIN") == 1, p.stdout + p.stderr
    assert "EXIT 0" in p.stdout and "Traceback" not in p.stderr, p.stderr


def test_worker_never_reads_stdin_again():
    p = _run(["-"], input=UNGUARDED, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.count("MAIN") == 1, p.stdout + p.stderr
    assert "EXIT 0" in p.stdout and "<stdin>" not in p.stderr, p.stderr


def test_only_our_workers_drop_the_main_module(tmp_path):
    """Another user of multiprocessing in the same program keeps spawn's usual behaviour."""
    script = tmp_path / "guarded.py"
    script.write_text(textwrap.dedent("""
        import os
        from multiprocessing import spawn
        from runner.launch.workers import WorkerContext
        if __name__ == "__main__":
            p = WorkerContext().Process(target=os.getpid)
            p.start()
            p.join()
            print("KEYS", sorted(k for k in spawn.get_preparation_data("x") if k.startswith("init_main")))
    """))
    p = _run([str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "KEYS ['init_main_from_path']" in p.stdout, p.stdout + p.stderr


def _pool_until_error(init, initargs, timeout_s=30):
    from runner.launch.workers import WorkerWatch, WorkerContext, WorkerStartError

    ctx = WorkerContext()
    watch = WorkerWatch(ctx)
    i, a = watch.initializer(init, initargs)
    pool = ctx.Pool(processes=2, initializer=i, initargs=a)
    t0 = time.time()
    try:
        pending = pool.apply_async(os.getpid)
        while time.time() - t0 < timeout_s:
            watch.check()
            assert not pending.ready(), "a task ran although every worker fails to start"
            time.sleep(0.1)
    except WorkerStartError as e:
        return str(e), time.time() - t0, len(ctx.started)
    finally:
        pool.terminate()
    raise AssertionError(f"no WorkerStartError after {timeout_s} s ({len(ctx.started)} workers started)")


def test_a_worker_whose_initializer_raises_fails_the_run_naming_the_cause(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    msg, took, started = _pool_until_error(os.chdir, (missing,))
    assert "FileNotFoundError" in msg and missing in msg and "\n" not in msg, msg
    assert took < 15 and started <= 6, (took, started)  # not replaced again and again


def test_a_worker_that_exits_while_starting_fails_the_run():
    msg, took, _ = _pool_until_error(os._exit, (3,))
    assert "exited with code 3 while starting" in msg and "\n" not in msg, msg
    assert took < 15


def test_workers_that_start_are_not_blamed():
    from runner.launch.workers import WorkerWatch, WorkerContext

    ctx = WorkerContext()
    watch = WorkerWatch(ctx)
    i, a = watch.initializer(os.getcwd, ())
    with ctx.Pool(processes=2, initializer=i, initargs=a) as pool:
        r = pool.apply_async(os.getpid)
        while not r.ready():
            watch.check()
            time.sleep(0.05)
        assert r.get() in {p.pid for p in ctx.started}
        # the worker that ran it said "ready" first; its message comes through the queue's feeder
        # thread in its own time: waited for, not slept for
        wait_until(lambda: watch.check() or watch.ready, timeout=60, what="the ready message")
