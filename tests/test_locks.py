import subprocess
import sys
from pathlib import Path

from tasks.common import ProcessLockManager

REPO = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from pathlib import Path
from tasks.common import ProcessLockManager
assert ProcessLockManager(Path(sys.argv[1])).acquire_lock("stage-key", "holder-1")
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_killed_process_is_broken_and_a_live_one_is_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        mine = ProcessLockManager(tmp_path)
        assert mine.is_locked("stage-key")  # its owner is alive: the lock holds
        assert not mine.wait_for_lock("stage-key", timeout=0.3)
    finally:
        proc.kill()
        proc.wait()
    assert not mine.is_locked("stage-key")  # owner killed: the lock is broken, not waited on forever
    assert mine.acquire_lock("stage-key", "holder-2")
    mine.release_lock("stage-key", "holder-2")
    assert not list(tmp_path.glob("*.owner"))


def test_ownerless_lock_is_broken_only_after_a_grace_period(tmp_path):
    import json
    import os
    import time

    m = ProcessLockManager(tmp_path)
    lock = m._lock_path_for_key("k")
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"holder": "gone", "expiration": None}))
    assert m.is_locked("k")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert not m.is_locked("k")
