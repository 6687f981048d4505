"""Children die with the process that started them, however it ends (Linux)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.cluster import wait_until

PARENT = """
import sys, time
from disagg.cli.procs import Child
child = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its reaper is gone too
        return f.read().split()[2] != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_when_its_parent_is_sigkilled():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not alive(child), timeout=10, what="the orphan gone")
    finally:
        parent.kill()
        parent.wait(10)


def test_supervisor_backs_off_resets_when_stable_and_gives_up_on_a_crash_loop():
    from disagg.cli.supervisor import RestartPolicy, Supervisor

    sup = Supervisor(RestartPolicy(restart_initial_s=1, restart_max_s=4, crash_loop_exits=5,
                                   crash_loop_window_s=60))  # fmt: skip
    sup.started("decode-1", 0.0)
    delays, now = [], 0.0
    for _ in range(4):  # 1, 2, 4, 4 s: doubling, capped
        now += 1.0
        delays.append(sup.exited("decode-1", now) - now)
        assert sup.due(now) == []
        now += delays[-1]
        assert sup.due(now) == ["decode-1"] and sup.due(now) == []  # once per exit
        sup.started("decode-1", now)
    assert delays == [1, 2, 4, 4]
    assert sup.exited("decode-1", now + 1) is None  # the 5th exit within 60 s: a crash loop
    assert sup.given_up == ["decode-1"] and sup.exits("decode-1") == 5
    sup.started("gateway", 0.0)
    assert sup.exited("gateway", 100.0) == 101.0  # stable for a window: first delay again
    sup.started("gateway", 101.0)
    assert sup.exited("gateway", 200.0) == 201.0
    assert sup.given_up == ["decode-1"]
