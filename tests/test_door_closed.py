"""Issue 37, "the door closed" and "a merge for big runs": the folders above a run directory
checked as OpenSSH's StrictModes does, the privacy check in every command that writes, lock and
export files never written through a planted link, control characters escaped where names are
shown; a merged view that cannot read another run's shards, "merged" meaning every planned image
is in features.h5, no copy unless asked, and the merge job's resources. Synthetic runs written by
the real ShardWriter (no pycaffe, no cluster)."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import REPO, run_cli
from runner.errors import ConfigError, shown
from runner.results.merge import merge_run, open_merged
from runner.run.plan import load_run_dir
from synthetic import expected_row, make_run, shard_file

pytestmark = pytest.mark.unit


def _one_line(p, code=2):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == code and len(lines) == 1, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    return lines[0]


def _tree(d: Path):
    """Every entry under d with its size and mode, and each folder's mtime (a file made and removed
    again, a write probe, changes it): what a refused command must leave as it was."""
    return {str(p.relative_to(d)): (p.lstat().st_size, p.lstat().st_mode,
                                     p.lstat().st_mtime_ns if p.is_dir() and not p.is_symlink() else 0)
            for p in [d, *d.rglob("*")]}


# ---- StrictModes: the folders above the run directory -------------------------------------------

def test_unsafe_folder_table():
    from runner.store.private import unsafe_folder

    def st(mode, uid=1000):
        return os.stat_result((mode, 0, 0, 1, uid, 1000, 0, 0, 0, 0))

    me = 1000
    assert unsafe_folder(st(0o40755), me) is None and unsafe_folder(st(0o40700), me) is None
    assert unsafe_folder(st(0o40755, uid=0), me) is None  # root's folders: /, /home, /scratch
    assert unsafe_folder(st(0o41777, uid=0), me) is None  # /tmp: sticky, others cannot rename what is mine
    assert unsafe_folder(st(0o43775), me) is None  # a group project space with the sticky bit
    assert unsafe_folder(st(0o42775), me) == "mode drwxrwsr-x, no sticky bit"  # setgid is not sticky
    assert unsafe_folder(st(0o40757), me) == "mode drwxr-xrwx, no sticky bit"
    assert unsafe_folder(st(0o40755, uid=1001), me) == "owned by uid 1001"  # its owner can swap what is in it
    assert unsafe_folder(st(0o41777, uid=1001), me) == "owned by uid 1001"


def test_every_folder_on_the_way_is_checked_through_symlinks(tmp_path):
    from runner.store.private import unsafe_parent

    ok, shared, sticky = tmp_path / "ok", tmp_path / "shared", tmp_path / "sticky"
    for d in (ok, shared, sticky):
        d.mkdir()
    shared.chmod(0o2775)
    sticky.chmod(0o1777)
    assert unsafe_parent(ok / "run") is None and unsafe_parent(ok / "a" / "b" / "run") is None  # not made yet
    assert unsafe_parent(sticky / "run") is None
    assert unsafe_parent(shared / "run") == (shared, "mode drwxrwsr-x, no sticky bit")
    assert unsafe_parent(shared / "deeper" / "run") == (shared, "mode drwxrwsr-x, no sticky bit")
    assert unsafe_parent(shared) is None  # the run directory's own mode: check_private's walk says it
    # a symlink into the shared folder: the folder it leads through is checked, as the kernel walks it
    (ok / "link").symlink_to(shared)
    assert unsafe_parent(ok / "link" / "run") == (shared, "mode drwxrwsr-x, no sticky bit")
    (ok / "rel").symlink_to("../shared/../ok")  # through shared by "..": nothing is looked up in it
    assert unsafe_parent(ok / "rel" / "run") is None
    # a folder another user owns, however its mode
    other = ok / "theirs"
    other.mkdir()
    os.chown(other, 65534, 65534)
    assert unsafe_parent(other / "run") == (other, "owned by uid 65534")


def test_an_extraction_under_a_group_writable_parent_is_refused_and_nothing_made(photos, tmp_path):
    shared = tmp_path / "project"
    shared.mkdir()
    shared.chmod(0o2775)  # a group's space without the sticky bit: a co-tenant can swap the run folder
    for sweep in ([], ["-m", "batch_size=4,8"]):
        p = run_cli(*sweep, f"input.dir={photos}", f"output.dir={shared / 'me' / 'run'}", "model=res10_ssd",
                    "model.prototxt=/nonexistent.prototxt", check=False)
        line = _one_line(p)
        assert f"the folder {shared} above it can be written by others (mode drwxrwsr-x, no sticky bit)" in line, line
        assert f"chmod go-w {shared}" in line
        assert list(shared.iterdir()) == []


@pytest.fixture
def shared_run(tmp_path):
    """A complete synthetic run in a folder, and a way to make that folder group-writable."""
    parent = tmp_path / "project"
    run = make_run(parent / "run", 30, 3, dim=2, fail_every=7)
    return parent, run


@pytest.mark.parametrize("cmd", ["merge", "export", "export-npy", "report", "retry"])
def test_every_writing_command_checks_the_folders_above(shared_run, tmp_path, cmd):
    parent, run = shared_run
    parent.chmod(0o775)
    before = _tree(tmp_path)
    args = {"merge": ["merge", run], "export": ["export", run, tmp_path / "out.h5"],
            "export-npy": ["export", run, tmp_path / "npy", "--format", "npy"], "report": ["report", run],
            "retry": ["retry", run, "--all"]}[cmd]
    line = _one_line(run_cli(*args, check=False))
    assert f"the folder {parent} above it can be written by others" in line, line
    assert _tree(tmp_path) == before  # nothing written: no features.h5, no merge.lock, no probe, no export
    parent.chmod(0o755)  # the fix the message names
    p = run_cli(*args, check=False)
    assert "can be written by others" not in p.stderr
    assert p.returncode == 0 or cmd == "retry", p.stderr  # a synthetic run has no launcher to retry with


def test_the_slurm_merge_job_checks_the_run_directory(shared_run):
    """The merge job runs merge_run, as a local run's last step does: the same check."""
    from runner.launch.slurm import merge_job

    parent, run = shared_run
    parent.chmod(0o777)
    with pytest.raises(ConfigError, match="can be written by others"):
        merge_job(str(run))
    assert not (run / "features.h5").exists() and not (run / "merge.lock").exists()


# ---- planted links: lock files and export files ------------------------------------------------

def test_a_planted_merge_lock_is_refused_in_one_line_and_its_target_kept(shared_run, tmp_path):
    _, run = shared_run
    bashrc = tmp_path / "home" / ".bashrc"
    bashrc.parent.mkdir()
    bashrc.write_text("export PATH=$HOME/bin:$PATH\n")
    (run / "merge.lock").symlink_to(bashrc)
    line = _one_line(run_cli("merge", run, check=False))
    assert f"{run / 'merge.lock'} is a symlink (to {bashrc})" in line and f"rm {run / 'merge.lock'}" in line, line
    assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n" and not (run / "features.h5").exists()
    # a hard link to it: refused as well (a lock file of ours has one name)
    (run / "merge.lock").unlink()
    os.link(bashrc, run / "merge.lock")
    line = _one_line(run_cli("merge", run, check=False))
    assert "a hard link to a file with 2 names" in line, line
    assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n"
    (run / "merge.lock").unlink()
    run_cli("merge", run)


def test_a_planted_launch_lock_is_refused_by_retry(shared_run, tmp_path):
    _, run = shared_run
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    (run / "launch.lock").symlink_to(victim)
    line = _one_line(run_cli("retry", run, "--all", check=False))
    assert "launch.lock is a symlink" in line, line
    assert victim.read_text() == "keep me\n"


def test_export_npy_never_writes_through_planted_links(shared_run, tmp_path):
    _, run = shared_run
    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    out = tmp_path / "npy"
    out.mkdir()
    (out / "names.txt").symlink_to(victim)
    line = _one_line(run_cli("export", run, out, "--format", "npy", check=False))
    assert f"{out / 'names.txt'} is a symlink (to {victim})" in line, line
    assert victim.read_text() == "keep me\n" and sorted(os.listdir(out)) == ["names.txt"]  # nothing written
    (out / "names.txt").unlink()
    os.link(victim, out / "emb.npy")
    assert "a hard link" in _one_line(run_cli("export", run, out, "--format", "npy", check=False))
    assert victim.read_text() == "keep me\n"
    (out / "emb.npy").unlink()
    # the folder itself a planted link to another folder: nothing is written into that folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "npy-link"
    link.symlink_to(elsewhere)
    assert "is a symlink" in _one_line(run_cli("export", run, link, "--format", "npy", check=False))
    assert list(elsewhere.iterdir()) == []
    run_cli("export", run, out, "--format", "npy")
    assert np.load(out / "emb.npy").shape == (len(np.load(out / "index.npy")), 2)  # written, readable
    assert not (out / "names.txt").is_symlink() and victim.read_text() == "keep me\n"


def test_export_files_are_opened_without_following_a_link_planted_after_the_check(tmp_path):
    """The up-front check and the writes are apart in time: each file is opened O_NOFOLLOW in
    the folder's own descriptor, and emptied only once it is known to be a plain file of ours."""
    from runner.results.merge import _Folder

    victim = tmp_path / "victim"
    victim.write_text("keep me\n")
    out = tmp_path / "npy"
    folder = _Folder(out)
    try:
        (out / "names.txt").symlink_to(victim)  # planted between the check and the write
        with pytest.raises(ConfigError, match="is a symlink"):
            folder.open("names.txt", text=True)
        (out / "mine.txt").write_text("old content, longer than the new\n")
        with folder.open("mine.txt", text=True) as f:
            f.write("new\n")
    finally:
        folder.close()
    assert victim.read_text() == "keep me\n" and (out / "mine.txt").read_text() == "new\n"


# ---- control characters on the terminal ---------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("plain/name.jpg", "plain/name.jpg"),
    ("a\x1b[2Jb.jpg", "a\\x1b[2Jb.jpg"),  # ESC: clear screen
    ("x\rfake OK line", "x\\rfake OK line"),  # CR: overwrite what was shown
    ("two\nlines", "two\\nlines"),
    ("tab\there", "tab\\there"),
    ("c1\x9b31m", "c1\\x9b31m"),  # a C1 CSI
    ("gpj.\u202eexe", "gpj.\\u202eexe"),  # right-to-left override: a name shown reversed
    ("ünïcödé ok", "ünïcödé ok"),
])
def test_shown_escapes_what_a_terminal_would_act_on(text, expected):
    assert shown(text) == expected


def test_status_and_verify_escape_control_characters(shared_run):
    _, run = shared_run
    load_run_dir(run).write_heartbeat(1, {"state": "failed", "error": "cannot read d0/\x1b]0;owned\x07\x1b[2Jx.jpg"})
    os.unlink(shard_file(run, 1, 3))
    st = run_cli("status", run, "--no-sacct", check=False)
    assert st.returncode == 1 and "\x1b" not in st.stdout and "\x07" not in st.stdout, repr(st.stdout)
    assert "cannot read d0/\\x1b]0;owned\\x07\\x1b[2Jx.jpg" in st.stdout
    v = run_cli("verify", run, check=False)
    assert v.returncode == 1 and "\x1b" not in v.stdout + v.stderr


# ---- a merged view never reads another run's shards (fact 8) -----------------------------------

def test_a_view_never_reads_another_runs_shards_from_the_current_folder(tmp_path, monkeypatch):
    """HDF5 looks for a relative source beside the view, then in the current folder: with the
    run's shards gone, a view naming `shards/shard-...` read run B's shards when opened from B."""
    a = make_run(tmp_path / "A", 40, 4, dim=3)
    b = make_run(tmp_path / "B", 40, 4, dim=3)
    for i in range(4):  # B's rows differ from A's
        with h5py.File(shard_file(b, i, 4), "r+") as f:
            f["features/emb"][...] = 7.0
    merge_run(load_run_dir(a))
    merge_run(load_run_dir(b))
    with h5py.File(a / "features.h5", "r") as f:  # the README's plain h5py reads the run's own rows
        np.testing.assert_array_equal(f["feats"][:], expected_row(f["index"][:], 3))
    shutil.rmtree(a / "shards")  # deleted (or features.h5 copied away alone)
    monkeypatch.chdir(b)
    with h5py.File(a / "features.h5", "r") as f:
        x = f["feats"][:]
    assert not (x == 7.0).any(), "features.h5 of run A read run B's shards"
    assert np.isnan(x).all()  # what a view with its sources gone reads (open_merged refuses it)
    with pytest.raises(Exception, match="cannot be read"):
        open_merged(a / "features.h5")
    # B's own view, from B, is B's
    with h5py.File(b / "features.h5", "r") as f:
        assert (f["feats"][:] == 7.0).all()


def test_open_merged_refuses_a_view_whose_sources_lie_outside_its_folder(tmp_path):
    a = make_run(tmp_path / "A", 20, 2, dim=2)
    b = make_run(tmp_path / "B", 20, 2, dim=2)
    merge_run(load_run_dir(b))
    from runner.results.merge import write_merged

    write_merged(a / "features.h5", [shard_file(b, i, 2) for i in range(2)], "view")  # ../B/shards/...
    with pytest.raises(Exception, match="outside its own folder"):
        open_merged(a / "features.h5")


def test_merge_and_report_under_umask_002_leave_the_run_private(shared_run):
    """merge (its view folder, features.h5, stats.json) and report write the user's files alone
    whatever the umask: else the next command would refuse the run they just wrote in."""
    _, run = shared_run

    def umask_002():
        os.umask(0o002)

    for args in (["merge", run], ["report", run], ["merge", run]):
        p = subprocess.run([sys.executable, "-m", "runner", *map(str, args)], capture_output=True, text=True,
                           cwd=REPO, preexec_fn=umask_002, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    find = subprocess.run(["find", str(run), "-perm", "/022"], capture_output=True, text=True, check=True)
    assert find.stdout == "", find.stdout
    assert [p.name for p in run.iterdir() if p.name.startswith("view.")] and (run / "report.html").exists()


# ---- "merged" is every planned image in features.h5 ---------------------------------------------

def test_merged_means_the_counts_match_the_plan(shared_run):
    _, run = shared_run
    r = load_run_dir(run)
    assert not r.rundir.merged_done(r.plan)
    (run / "features.h5").write_bytes(b"not hdf5")  # a file of that name is not a merge
    assert not r.rundir.merged_done(r.plan)
    st = run_cli("status", run, "--no-sacct")
    assert st.stdout.splitlines()[0].split(": ")[1].startswith("done,"), st.stdout
    merge_run(r)
    assert r.rundir.merged_done(r.plan)
    assert run_cli("status", run, "--no-sacct").stdout.splitlines()[0].split(": ")[1].startswith("merged,")
    with h5py.File(run / "features.h5", "r+") as f:  # one of another plan: fewer images
        f.attrs["rows"] = int(f.attrs["rows"]) - 1
    assert not r.rundir.merged_done(r.plan)
    with h5py.File(run / "features.h5", "r+") as f:
        f.attrs["rows"] = int(f.attrs["rows"]) + 1
        f.attrs["fingerprint"] = "another run's"
    assert not r.rundir.merged_done(r.plan)


# ---- a merge for big runs: no copy unless asked, a view within the fd limit ---------------------

READ = """
import sys, resource, numpy as np
from runner.results.merge import open_merged
sys.path.insert(0, "tests")  # tests/synthetic.py (cwd: the repo)
from synthetic import expected_row
with open_merged(sys.argv[1]) as f:
    x, idx = f["feats"][:], f["index"][:]
assert not np.isnan(x).any(), int(np.isnan(x).any(axis=1).sum())
np.testing.assert_array_equal(x, expected_row(idx, x.shape[1]))
print("ok", len(x), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_above_view_max_shards_a_view_not_a_copy_and_our_readers_raise_their_limit(tmp_path):
    """300 shards, view_max_shards=100: features.h5 is a view (no feature written twice); a
    whole read holds all 300 sources open, so under a soft limit of 256 a plain h5py read gets
    NaN rows, while open_merged raises its soft limit (the hard one allows) and reads them all."""
    run = make_run(tmp_path / "run", 600, 300, dim=4, view_max_shards=100)
    p = run_cli("merge", run)
    assert "a view over 300 shard files" in p.stderr and "ulimit -n 364" in p.stderr, p.stderr
    with h5py.File(run / "features.h5", "r") as f:
        assert f.attrs["layout"] == "view" and f["features/emb"].is_virtual

    def soft_256():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    plain = ("import sys, h5py, numpy as np\nwith h5py.File(sys.argv[1], 'r') as f: x = f['feats'][:]\n"
             "print(int(np.isnan(x).any(axis=1).sum()))")
    raw = subprocess.run([sys.executable, "-c", plain, str(run / "features.h5")], capture_output=True, text=True,
                         cwd=REPO, preexec_fn=soft_256, timeout=300)
    assert raw.returncode == 0 and int(raw.stdout.split()[-1]) > 0, raw.stdout + raw.stderr  # HDF5's silent NaN
    ours = subprocess.run([sys.executable, "-c", READ, str(run / "features.h5")], capture_output=True, text=True,
                          cwd=REPO, preexec_fn=soft_256, timeout=300)
    assert ours.returncode == 0 and ours.stdout.split() == ["ok", "600", "364"], ours.stdout + ours.stderr
    # asked for: a copy
    run_cli("merge", "--copy", run)
    with h5py.File(run / "features.h5", "r") as f:
        assert f.attrs["layout"] == "copy" and not f["features/emb"].is_virtual


def test_the_merge_job_resources_are_launcher_keys():
    from omegaconf import OmegaConf

    from runner.schema import SlurmLauncherConf

    lc = OmegaConf.structured(SlurmLauncherConf())
    assert (lc.merge_cpus_per_task, lc.merge_mem_gb, lc.merge_timeout_min) == (1, 2.0, 60)
