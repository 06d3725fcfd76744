"""slurm/dev-cluster as a new user meets it: root's 0700 home and the default state dir, env /
status / down finding the cluster `up` started, and a failed `up` leaving nothing running."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import DEV, wait_until

pytestmark = pytest.mark.slurm

# a port base of its own, beside the session cluster's (DEV_CLUSTER_PORT_BASE)
PORT = int(os.environ.get("DEV_CLUSTER_PORT_BASE", "16817")) + 10


def _dev(home: Path, *args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("CAFFE_RUNNER_SLURM_STATE", "SLURM_CONF")}
    env.update(HOME=str(home), DEV_CLUSTER_PORT_BASE=str(PORT))
    return subprocess.run(["bash", str(DEV), *args], capture_output=True, text=True, env=env, timeout=timeout)


def _our_daemons(state: Path):
    """pids of processes whose command line names this state dir (ours only)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if str(state) in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    stat = (p / "stat").read_text().rsplit(")", 1)[1].split()
                    if stat[0] != "Z":
                        pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def home():
    # short: the state dir holds unix sockets, whose paths the kernel limits to 108 bytes
    h = Path(tempfile.mkdtemp(prefix="h-", dir="/tmp"))
    os.chmod(h, 0o700)  # as root's is
    yield h
    _dev(h, "down", "--wipe", timeout=120)
    shutil.rmtree(h, ignore_errors=True)


def test_up_under_a_0700_home_with_the_default_state_dir(home):
    up = _dev(home, "up")
    assert up.returncode == 0, up.stderr[-3000:]
    state = home / ".cache" / "caffe-runner" / "slurm-dev"
    assert f"export SLURM_CONF={state}/etc/slurm.conf" in up.stdout
    # env, status and down without --state-dir act on the cluster `up` started
    assert _dev(home, "env").stdout.strip().startswith(f"export SLURM_CONF={state}/etc/slurm.conf ")
    st = _dev(home, "status")
    assert st.returncode == 0 and "debug" in st.stdout
    for n in ("node1", "node2", "node3"):  # three nodes by default
        assert f"slurmd {n}: running" in st.stdout, st.stdout
    sinfo = ["sinfo", "-h", "-N", "-o", "%N %t"]
    slurm_env = dict(os.environ, SLURM_CONF=f"{state}/etc/slurm.conf")
    sq = subprocess.run(sinfo, capture_output=True, text=True, env=slurm_env)
    assert sq.stdout.split() == ["node1", "idle", "node2", "idle", "node3", "idle"], sq.stdout
    assert _our_daemons(state)
    # a node lost: its namespace's processes die, status says so; `up` starts it again
    k = _dev(home, "kill-node", "node2")
    assert k.returncode == 0 and "node2 lost" in k.stderr, k.stderr
    st = _dev(home, "status")
    assert st.returncode != 0 and "slurmd node2: stopped" in st.stdout and "slurmd node3: running" in st.stdout
    assert _dev(home, "kill-node", "node9").returncode == 2
    assert _dev(home, "up").returncode == 0
    assert "slurmd node2: running" in _dev(home, "status").stdout
    wait_until(lambda: subprocess.run(sinfo, capture_output=True, text=True, env=slurm_env).stdout.split()[3] == "idle",
               timeout=60, what="node2 idle again")
    down = _dev(home, "down")
    assert down.returncode == 0 and "stopped" in down.stderr
    assert not _our_daemons(state)
    assert _dev(home, "status").returncode != 0


def test_failed_up_stops_every_daemon_it_started(home):
    # slurmdbd's port is taken: up fails at slurmdbd, after munged and MariaDB were started
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", PORT + 2))
    s.listen()
    try:
        up = _dev(home, "up")
    finally:
        s.close()
    state = home / ".cache" / "caffe-runner" / "slurm-dev"
    assert up.returncode != 0
    assert "slurmdbd did not start" in up.stderr and "stopping the daemons it started" in up.stderr
    assert not _our_daemons(state), "a failed up left daemons running"


def test_unusable_state_dir_is_named(home, tmp_path):
    f = home / "afile"
    f.write_text("x")
    p = _dev(home, "up", "--state-dir", str(f / "sub"))
    assert p.returncode == 2 and "cannot use" in p.stderr and "--state-dir" in p.stderr
    p = _dev(home, "up", "--state-dir", str(tmp_path / ("long" * 20)))
    assert p.returncode == 2 and "too long for its sockets" in p.stderr


@pytest.mark.unit
@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_prints_the_usage(flag):
    """Issue 36: `slurm/dev-cluster --help` printed an error instead of its usage. Needs no Slurm."""
    p = subprocess.run(["bash", str(DEV), flag], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "slurm/dev-cluster up" in p.stdout and "kill-node" in p.stdout and "set -euo" not in p.stdout
