"""The local launcher's workers (runner/launch/workers.py): they never run the user's main
module (a script without a __main__ guard, stdin); one that dies while starting fails the run at
once, naming the cause, and is not replaced; one that dies later is named with the task it
held; and nothing in runner/ reaches into CPython's private multiprocessing code or replaces
a standard library module's attribute (the first design did both: any release could break it)."""
from __future__ import annotations

import ast
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.unit

# a script without an `if __name__ == "__main__":` guard that starts workers: a worker that ran
# the user's main module again (as multiprocessing's spawn does) would print MAIN again, and
# start workers of its own, for ever
UNGUARDED = textwrap.dedent("""
    import os
    from runner.launch.workers import WorkerPool
    print("MAIN", os.getpid(), flush=True)
    pool = WorkerPool(os.getcwd, [(), ()])
    r = pool.apply_async(os.getpid)
    while not r.ready():
        assert pool.wait(60) == []
    pool.close()
    print("RAN IN", r.get(), r.get() in pool.pids, flush=True)
""")


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60, **kw)


def test_worker_never_runs_an_unguarded_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED)
    p = _run([str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.count("MAIN") == 1, p.stdout + p.stderr
    assert "RAN IN" in p.stdout and p.stdout.strip().endswith("True"), p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr


def test_worker_never_reads_stdin_again():
    p = _run(["-"], input=UNGUARDED, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.stdout.count("MAIN") == 1, p.stdout + p.stderr
    assert p.stdout.strip().endswith("True") and "<stdin>" not in p.stderr, p.stdout + p.stderr


def _wait_for(pool, what, timeout_s=60):
    """pool.wait() until what(deaths) holds: the deaths seen then."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        deaths = pool.wait(1)
        if what(deaths):
            return deaths
    raise AssertionError(f"nothing after {timeout_s} s")


def _start_error(init, initargs):
    from runner.launch.workers import WorkerPool, WorkerStartError

    pool = WorkerPool(init, [initargs, initargs])
    t0 = time.monotonic()
    try:
        r = pool.apply_async(os.getpid)
        with pytest.raises(WorkerStartError) as e:
            _wait_for(pool, lambda deaths: False)
        assert not r.ready(), "a task ran although every worker fails to start"
        return str(e.value), time.monotonic() - t0, pool
    finally:
        pool.terminate()


def test_a_worker_whose_initializer_raises_fails_the_run_naming_the_cause(tmp_path):
    missing = str(tmp_path / "no-such-folder")
    msg, took, pool = _start_error(os.chdir, (missing,))
    assert "failed while starting: FileNotFoundError" in msg and missing in msg and "\n" not in msg, msg
    assert "fix the cause and rerun the same command" in msg, msg
    assert took < 30 and len(pool.pids) == 2, (took, pool.pids)  # never replaced


def test_a_worker_that_exits_while_starting_fails_the_run():
    msg, took, _ = _start_error(os._exit, (3,))
    assert "exited with code 3 while starting" in msg and "\n" not in msg, msg
    assert took < 30


def test_tasks_run_in_the_workers_and_a_raising_task_is_its_own_failure():
    from runner.launch.workers import TaskError, WorkerPool

    with WorkerPool(os.getcwd, [(), ()]) as pool:
        bad = pool.apply_async(os.chdir, ("/no/such/folder",), "bad")
        good = [pool.apply_async(os.getpid, (), k) for k in range(4)]
        _wait_for(pool, lambda deaths: bad.ready() and all(r.ready() for r in good))
        assert {r.get() for r in good} <= set(pool.pids)
        with pytest.raises(TaskError, match=r"^FileNotFoundError: .*/no/such/folder"):
            bad.get()
        pool.close()  # the workers end when told, not as deaths
        assert [w.p.returncode for w in pool.workers] == [0, 0]


@pytest.mark.parametrize("task, args, code", [
    (signal.raise_signal, (signal.SIGKILL,), -signal.SIGKILL),  # kill -9, the OOM killer
    (os.abort, (), -signal.SIGABRT),  # Caffe's CHECK failing
    (os._exit, (7,), 7),
])
def test_a_worker_that_dies_in_a_task_is_named_with_that_task(task, args, code):
    from runner.launch.workers import Death, WorkerPool

    with WorkerPool(os.getcwd, [()]) as pool:
        pool.apply_async(task, args, "shard 3")
        deaths = _wait_for(pool, bool)
        assert deaths == [Death(pool.pids[0], code, "shard 3")]


def test_an_idle_worker_killed_is_a_death_and_the_pool_still_stops():
    """Idle, a worker waits for its next task on its own pipe (no lock shared with the other
    workers, as Pool's task queue was: bpo-22393); killed there, it is seen and stopping the
    pool does not wait for it."""
    from runner.launch.workers import WorkerPool

    pool = WorkerPool(os.getcwd, [(), ()])
    try:
        r = pool.apply_async(os.getpid)
        _wait_for(pool, lambda deaths: r.ready())
        os.kill(r.get(), signal.SIGKILL)
        deaths = _wait_for(pool, bool)
        assert [(d.pid, d.exitcode, d.task) for d in deaths] == [(r.get(), -signal.SIGKILL, None)]
        again = pool.apply_async(os.getpid, (), "after")  # the other worker still serves
        _wait_for(pool, lambda deaths: again.ready())
        assert again.get() != r.get()
    finally:
        pool.terminate()
    assert all(w.p.returncode is not None for w in pool.workers)


def test_worker_log_records_reach_the_launcher():
    """The local launcher's initializer hands the workers' log lines to the launcher."""
    from runner import log
    from runner.launch.local import _init_worker
    from runner.launch.workers import WorkerPool

    got = []
    with WorkerPool(_init_worker, [(None, logging.INFO, None)], got.append) as pool:
        r = pool.apply_async(log.info, ("hello from %s", "a worker"))
        _wait_for(pool, lambda deaths: r.ready())
        r.get()
    assert [rec.getMessage() for rec in got] == ["hello from a worker"]
    assert got[0].process == pool.pids[0]


def test_a_message_cut_short_by_a_death_is_the_end_of_the_pipe():
    from runner.task import child

    r, w = os.pipe()
    frame = child.dumps(("log", "x" * 1000))
    os.write(w, frame[:len(frame) // 2])
    os.close(w)
    with os.fdopen(r, "rb") as f, pytest.raises(EOFError):
        child.recv(f)


# ---- no CPython internals -----------------------------------------------------------------

# multiprocessing's documented submodules; the others (spawn, context, popen_*, resource_tracker,
# util, reduction, queues, ...) are its implementation
DOCUMENTED_MP = {"connection", "managers", "pool", "shared_memory", "sharedctypes", "dummy"}
# attributes the documentation says to assign: the hooks
HOOKS = {"sys.excepthook", "sys.unraisablehook", "sys.displayhook", "sys.breakpointhook", "threading.excepthook"}
RUNNER = REPO / "runner"


def _stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def internals_used(source: str) -> list:
    """What a module of ours does that reaches into the standard library's implementation
    (pure: the source's AST, nothing imported): an import of an undocumented multiprocessing
    submodule, an attribute of a standard library module assigned, deleted or set. One entry
    per line of source."""
    tree = ast.parse(source)
    modules = {}  # names bound to standard library modules -> the module's name
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("multiprocessing.") and a.name.split(".")[1] not in DOCUMENTED_MP:
                    bad.append(f"line {node.lineno}: import {a.name}")
                if _stdlib(a.name):
                    modules[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full.startswith("multiprocessing.") and full.split(".")[1] not in DOCUMENTED_MP and (
                        node.module != "multiprocessing" or _is_module(full)):
                    bad.append(f"line {node.lineno}: from {node.module} import {a.name}")
                if _stdlib(node.module) and _is_module(full):
                    modules[a.asname or a.name] = full

    def root(expr):
        while isinstance(expr, (ast.Attribute, ast.Subscript)):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and root(node) in modules:
            chain, e = [], node
            while isinstance(e, ast.Attribute):
                chain.insert(0, e.attr)
                e = e.value
            full = modules[root(node)] + "." + ".".join(chain)
            if full.startswith("multiprocessing.") and full.split(".")[1] not in DOCUMENTED_MP and \
                    _is_module(".".join(full.split(".")[:2])):
                bad.append(f"line {node.lineno}: {full}")
            if isinstance(node.ctx, (ast.Store, ast.Del)) and full not in HOOKS:
                bad.append(f"line {node.lineno}: {full} assigned")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("setattr", "delattr") and node.args and root(node.args[0]) in modules:
            bad.append(f"line {node.lineno}: {node.func.id}({modules[root(node.args[0])]}, ...)")
    lines = {}
    for b in bad:
        lines.setdefault(b.split(":")[0], b)
    return sorted(lines.values())


@pytest.mark.parametrize("source, found", [
    ("from multiprocessing import context, spawn\n", 1),
    ("from multiprocessing import popen_spawn_posix as p\nclass P(p.Popen): pass\n", 2),
    ("import multiprocessing.spawn\n", 1),
    ("import multiprocessing as mp\nclass C(mp.context.SpawnContext): pass\n", 1),
    ("from multiprocessing import spawn\nspawn.get_preparation_data = print\n", 2),
    ("import subprocess\nsubprocess.Popen = object\n", 1),
    ("import os.path\nsetattr(os.path, 'join', print)\n", 1),
    ("import sys\nsys.excepthook, sys.unraisablehook = print, print\n", 0),
    ("import multiprocessing as mp\nfrom multiprocessing import connection, get_context\n"
     "mp.get_context('spawn').Process; connection.wait([])\nimport os\nos.environ['A'] = '1'\n", 0),
])
def test_the_guard_below_sees_each_way_in(source, found):
    assert len(internals_used(source)) == found, internals_used(source)


def test_runner_patches_no_python_internals():
    bad = {str(p.relative_to(REPO)): internals_used(p.read_text()) for p in sorted(RUNNER.rglob("*.py"))}
    bad = {p: b for p, b in bad.items() if b}
    assert not bad, ("runner/ reaches into the standard library's implementation (use only documented "
                     f"interfaces: runner/task/child.py, runner/launch/workers.py): {bad}")


def test_the_child_runs_our_function_only(tmp_path):
    """A folder named `runner` in the working directory is not what the child imports."""
    from runner.task import child

    (tmp_path / "runner").mkdir()
    (tmp_path / "runner" / "__init__.py").write_text("raise SystemExit('the wrong runner')\n")
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        p = child.start("runner.launch.workers", "worker_main")
    finally:
        os.chdir(old)
    child.send(p.stdin, (os.getcwd, ()))
    assert child.recv(p.stdout) == ("ready", None)
    p.stdin.close()
    assert p.wait(60) == 0
    p.stdout.close()


def test_the_launchers_sys_path_reaches_the_workers(tmp_path):
    """A script that makes a module importable through sys.path (as Caffe users do for pycaffe:
    `sys.path.insert(0, CAFFE_ROOT + "/python")`) has it in the workers too; a task the worker
    cannot import fails alone, the worker serves on."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "extra_mod.py").write_text("def answer():\n    return 42\n")
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path / "lib")!r})
        import extra_mod
        from runner.launch.workers import TaskError, WorkerPool
        pool = WorkerPool(os.getcwd, [()])
        r = pool.apply_async(extra_mod.answer)
        while not r.ready():
            assert pool.wait(60) == []
        print("ANSWER", r.get(), flush=True)
        sys.path.remove({str(tmp_path / "lib")!r})
        pool.terminate()  # a fresh pool: its workers start without that folder
        pool = WorkerPool(os.getcwd, [()])
        r, after = pool.apply_async(extra_mod.answer), pool.apply_async(os.getpid)
        while not after.ready():
            assert pool.wait(60) == []
        try:
            r.get()
        except TaskError as e:
            print("FAILED", e, flush=True)
        print("AFTER", after.get() == pool.pids[0], flush=True)
        pool.close()
    """))
    p = _run([str(script)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "ANSWER 42" in p.stdout, p.stdout + p.stderr
    assert "FAILED ModuleNotFoundError: No module named 'extra_mod'" in p.stdout, p.stdout + p.stderr
    assert "AFTER True" in p.stdout, p.stdout + p.stderr
