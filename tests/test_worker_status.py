"""What the master reads of a worker's shared-memory status."""

from __future__ import annotations

import time

from container.arbiter import _Child
from container.worker import READY, WorkerStatus


def test_a_new_worker_read_ready_before_its_first_heartbeat_is_not_judged_stalled() -> None:
    # publish() writes the state before the heartbeat: a master reading between the two
    # sees READY with the zero heartbeat of fresh shared memory. That worker is not
    # "stopped responding" (replacing it cut the requests it was serving).
    status = WorkerStatus()
    WorkerStatus._LAYOUT.pack_into(status._map, 0, READY, 0, 0.0, 0.0, 0)
    child = _Child(pid=1, generation=1, status=status)

    assert child.status.state == READY
    assert time.monotonic() - child.heartbeat < 1.0


def test_the_heartbeat_the_worker_published_is_what_the_master_reads() -> None:
    status = WorkerStatus()
    child = _Child(pid=1, generation=1, status=status)
    time.sleep(0.01)
    status.publish(READY, 0, 0.0, 0)

    assert child.heartbeat > child.started
