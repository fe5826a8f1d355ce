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

Several workers are also placed on CPUs of their own (C{[cluster]
cpu_affinity}, L{workerCPUs}): each worker, with its helper threads, on
its share of the CPUs the parent may use, as nginx's C{worker_cpu_affinity
auto} and HAProxy's C{cpu-map} do.  A worker left to the kernel's balancer
migrates between cores with the other worker and the clients, and finds
its caches cold.  On 2 cores, in three interleaved rounds, two pinned
workers delivered 1.87 times one process's SMTP messages against 1.45
unpinned, and served 1.56 times its IMAP commands against 1.46 (README,
"Every core").
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

from twisted.logger import Logger

log = Logger()

# [cluster] scheduling's values, and the os module's names for them.
POLICIES = {"batch": "SCHED_BATCH", "normal": "SCHED_OTHER"}
# [cluster] cpu_affinity's values.
AFFINITIES = ("auto", "none")
# The CPUs a worker is to run on, as its parent chose them ("0,2").
WORKER_CPUS_ENV = "MAILD_WORKER_CPUS"


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


def availableCPUs() -> list[int] | None:
    """
    The CPUs this process may run on (those a C{taskset}, a cgroup's
    cpuset or systemd's C{CPUAffinity=} left it), or None where the system
    cannot tell or place threads.
    """
    if not hasattr(os, "sched_getaffinity") or not hasattr(os, "sched_setaffinity"):
        return None
    return sorted(os.sched_getaffinity(0))


def workerCPUs(number: int, count: int, available: Iterable[int]) -> list[int]:
    """
    The CPUs worker C{number} (from 1) of C{count} runs on: each worker
    its own share of C{available}, every C{count}-th CPU; with more workers
    than CPUs, one CPU each, in turn.
    """
    cpus = sorted(available)
    if count >= len(cpus):
        return [cpus[(number - 1) % len(cpus)]]
    return cpus[number - 1 :: count]


def placeWorker(environ: Mapping[str, str] = os.environ) -> list[int] | None:
    """
    In a worker: run this thread, and the threads it starts from now on
    (its thread pools), on the CPUs its parent chose (L{WORKER_CPUS_ENV}).

    @return: those CPUs, or None when none were chosen or they could not
        be set (logged, not fatal).
    """
    chosen = environ.get(WORKER_CPUS_ENV)
    if not chosen or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = [int(cpu) for cpu in chosen.split(",")]
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        log.warn("could not run on CPUs {cpus}: {error}", cpus=chosen, error=e)
        return None
    return cpus
