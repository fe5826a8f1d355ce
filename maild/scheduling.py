"""
How Linux schedules maild's processes and threads (C{[cluster] scheduling}).

maild is a throughput server: every process is one reactor thread that
holds Python's GIL, with helper threads (syncs, file removals, password
hashing) that hand their results back to it.  Under the default policy
(C{SCHED_OTHER}) a thread that wakes preempts the one running on its core:
a helper thread done with an fsync preempts the reactor thread that holds
the GIL, only to wait for the GIL at once, and one worker's reactor woken
by a new command preempts another worker's in the middle of its work, so
each pays two context switches and cold caches.  Under C{SCHED_BATCH} a
woken thread waits for the running one to block or use up its time slice
(a few milliseconds at most, unnoticeable for mail) and the cores switch
far less often.  Measured on 2 cores with 2 workers under imaptest, the
reactor threads were preempted 0.26 times per IMAP command instead of 1.8;
two workers delivered 1.43 and 1.59 times one process's SMTP messages in
two runs, against 1.26 and 1.22 under the default policy (for IMAP the
difference stayed within the rounds' spread; README, "Every core").

The policy is set for the calling thread; threads and processes started
from it afterwards (the thread pools, the workers) inherit it.  Switching
between these two policies needs no privilege.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

log = Logger()

# [cluster] scheduling's values, and the os module's names for them.
POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}


def applyScheduling(policy: str) -> bool:
    """
    Put this thread, and what it starts from now on, under C{policy}
    (C{"batch"} or C{"normal"}).

    @return: whether the policy is now in force (False where the system
        has no such policy, which is logged, not fatal).
    """
    constant = getattr(os, POLICIES[policy], None)
    if constant is None or not hasattr(os, "sched_setscheduler"):
        log.info("CPU scheduling policy {policy!r} not available here", policy=policy)
        return False
    try:
        os.sched_setscheduler(0, constant, os.sched_param(0))
    except OSError as e:
        log.warn("could not set CPU scheduling policy {policy!r}: {error}", policy=policy, error=e)
        return False
    return True
