"""The local progress bar as a person sees it: a real terminal (tmux), a real run. Workers' log
lines must appear above the one bar, never glued into it or splitting it into copies."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, tiny_model_args, wait_until

pytestmark = pytest.mark.slow


def test_log_lines_print_above_one_progress_bar(photos, tiny_net, tmp_path):
    if not shutil.which("tmux"):
        pytest.skip("needs tmux (make test installs it)")
    session = f"cr-bar-{tmp_path.name}"[:40]
    done = tmp_path / "exit-code"
    cmd = " ".join([sys.executable, "-m", "runner", f"input.dir={photos}", f"output.dir={tmp_path / 'run'}",
                    "launcher.workers=2", "num_shards=4", "batch_size=2", "device=cpu", *tiny_model_args(tiny_net)])
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "60",
                    f"cd {REPO} && {cmd}; echo $? > {done}; sleep 300"], check=True)
    try:
        wait_until(done.exists, timeout=600, interval=0.5, what="the run in the terminal to end")
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-"], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.read_text().strip() == "0", screen
    lines = [ln for ln in screen.splitlines() if ln.strip()]
    bars = [i for i, ln in enumerate(lines) if re.search(r"\d+%\|", ln)]
    shard_logs = [i for i, ln in enumerate(lines) if re.search(r"shard \d/4 done", ln)]
    assert len(bars) == 1 and "100%" in lines[bars[0]] and "20/20" in lines[bars[0]], screen
    assert len(shard_logs) == 4, screen
    for i in shard_logs:  # a whole log line of its own, above the bar
        assert re.match(r"^\d\d:\d\d:\d\d INFO shard \d/4 done", lines[i]) and "%|" not in lines[i], lines[i]
        assert i < bars[0], screen
