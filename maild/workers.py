"""
Every core of one machine: C{--workers N} runs N maild processes that
share the listening sockets and the data folder.

The parent opens every listener (so privileged ports are bound once, as
root if need be), then starts the workers and hands each the open sockets
the way systemd does (C{LISTEN_FDS}, C{LISTEN_FDNAMES}): a worker is an
ordinary C{twistd maild} whose listeners are C{systemd:} endpoints.  A TCP
listener is opened once per worker, every socket on the same address with
C{SO_REUSEPORT}, so that the kernel spreads new connections evenly over the
workers (L{ReusePortReactor}); other listeners (UNIX sockets, sockets the
parent itself adopted) are one socket that every worker accepts from.  The
parent restarts a worker that dies (on the same sockets: connections that
came for it meanwhile wait in its socket's queue), passes SIGHUP on
(certificate reload), and stops them all on SIGTERM.

The workers share nothing but the data folder, with the store's rules for
several writers (fcntl locks, unique file names); per-address limits are
per worker unless a cluster store (Redis) is configured.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, tcp
from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.logger import Logger

from maild.config import PROTOCOLS, Config
from maild.imap.sharedcache import RENDERINGS_FD_ENV, makeShared
from maild.logs import WORKER_LOG_FORMAT_ENV, WORKER_NAME_ENV, WorkerLogReader, useAsTwistdLog
from maild.scheduling import WORKER_CPUS_ENV, availableCPUs, workerCPUs
from maild.service import logCannotListen
from maild.tls import certificateFiles

log = Logger()

# How long a stopping worker may take before it is killed.
STOP_GRACE = 15.0
# A worker that dies this soon after its start is restarted more slowly.
CRASH_WINDOW = 10.0
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)

# Run by each worker: systemd's protocol wants LISTEN_PID to be the
# worker's own pid, which only the worker knows.
_BOOTSTRAP = (
    "import os, signal, sys\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    # A SIGHUP passed on while the worker starts must not end it; the
    # daemon installs its own handler (certificate reload) once up.
    "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "from twisted.scripts.twistd import run\n"
    "sys.argv = ['twistd'] + sys.argv[1:]\n"
    "run()\n"
)


class _ReusePortTCPPort(tcp.Port):
    """
    A TCP port whose address other sockets may share (C{SO_REUSEPORT}).
    """

    def createInternetSocket(self):
        skt = super().createInternetSocket()
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return skt


class ReusePortReactor:
    """
    The reactor as a listener's endpoint is given it, to open one socket
    per worker on one address: C{listenTCP} opens sockets with
    C{SO_REUSEPORT}, the later ones on the port number the first got (a
    listener on port 0 included).  The kernel then hashes each new
    connection to one of the sockets, so every worker gets its share.

    One socket shared by all workers spreads them badly: each worker's
    Twisted port takes up to 100 waiting connections at once, so the first
    worker woken takes a whole burst of clients for their sessions' lives
    (measured: 36 to 50 of 50 SMTP connections opened together, and most
    often all 20 of imaptest's IMAP clients, went to one of two workers),
    and taking one at a time does not help when the cores are busy (the
    worker that is running takes them all while the other waits for a
    core).

    Anything but C{listenTCP} is the reactor's own: an endpoint of another
    kind (UNIX, C{systemd:}) opens one socket, which the workers share.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.portNumber: int | None = None

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if self.portNumber is not None:
            port = self.portNumber
        listening = _ReusePortTCPPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        self.portNumber = listening.getHost().port
        return listening

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class _NotServed(protocol.Factory):
    """
    The parent's own factory for the sockets it opens: it never accepts
    (reading is stopped at once); the workers do.
    """

    noisy = False

    def buildProtocol(self, addr):
        return None


def workerArguments(options: Mapping[str, Any], listeners: Mapping[str, str | None]) -> list[str]:
    """
    The C{twistd maild} options of a worker: the parent's own, with the
    listeners replaced by the adopted sockets and no workers of its own.
    """
    args: list[str] = []
    for key, value in sorted(options.items()):
        if key in PROTOCOLS or key in ("workers", "domains") or value in (None, False):
            continue
        args.append(f"--{key}" if value is True else f"--{key}={value}")
    args += [f"--domain={domain}" for domain in options.get("domains", ())]
    args += [f"--{name}={listeners.get(name) or 'none'}" for name in PROTOCOLS]
    return args + ["--workers=1"]


class _WorkerProcess(protocol.ProcessProtocol):
    def __init__(self, supervisor: "WorkerSupervisor", number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.ended = defer.Deferred()
        self.started = 0.0
        self.logReader = WorkerLogReader(self.name, output=supervisor.logOutput)

    @property
    def name(self) -> str:
        return f"worker {self.number}"

    def connectionMade(self) -> None:
        self.started = self.supervisor.reactor.seconds()
        log.info("worker {number} started (pid {pid})", number=self.number, pid=self.transport.pid)

    def outReceived(self, data: bytes) -> None:
        # The worker's log events, as JSON records.
        self.logReader.dataReceived(data)

    def errReceived(self, data: bytes) -> None:
        # What a worker says before its logging starts (a bad option, say).
        for line in data.decode("utf-8", "replace").splitlines():
            log.warn("worker {number}: {line}", number=self.number, line=line)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor.workerEnded(self, reason.value)


class WorkerSupervisor(service.Service):
    """
    Opens the listeners, starts C{config.cluster.workers} workers, keeps
    them running.

    @param options: the parent's C{twistd maild} options, which every
        worker is given too.
    """

    name = "workers"

    def __init__(self, config: Config, options: Mapping[str, Any], reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.options = dict(options)
        self.reactor = reactor
        self.count = config.cluster.workers
        # Each listener's sockets: one per worker, or one that all share.
        self.ports: dict[str, list[Any]] = {}
        self.adopted: dict[str, str] = {}
        self.processes: dict[int, _WorkerProcess] = {}
        self._crashes: dict[int, int] = {}
        self._stopping = False
        # The shared memory file of FETCH renderings, made for the first
        # worker and kept for their restarts.
        self._renderings: int | None = None
        # Where the parent logs (what its workers send it too); see
        # maild.tap.
        self.logDestination = config.log.file
        # The stream the log is written to, when this process chose it:
        # the workers then send lines ready for it.
        self.logOutput = None

    def setServiceParent(self, parent) -> None:
        service.Service.setServiceParent(self, parent)
        self.logOutput = useAsTwistdLog(parent, self.logDestination, self.config.log, self.reactor)

    def privilegedStartService(self) -> None:
        # Bind here, as twistd binds privileged ports, so that a port that
        # cannot be had stops the daemon at once with a clear message (as
        # it does with one process), before any worker starts.
        service.Service.privilegedStartService(self)
        failure = []
        self._openSockets().addErrback(failure.append)
        if failure:
            # _openSockets has logged why.
            raise SystemExit(1)

    @defer.inlineCallbacks
    def _openSockets(self):
        # Made once here, or every worker would race to make it.
        certificateFiles(self.config)
        for name, description in self.config.enabledListeners().items():
            proxied = description.startswith("haproxy:")
            inner = description[len("haproxy:"):] if proxied else description
            sockets = ReusePortReactor(self.reactor) if hasattr(socket, "SO_REUSEPORT") else self.reactor
            endpoint = endpoints.serverFromString(sockets, inner)
            ports: list[Any] = []
            try:
                ports.append((yield endpoint.listen(_NotServed())))
                if getattr(sockets, "portNumber", None) is not None:
                    for _ in range(1, self.count):
                        ports.append((yield endpoint.listen(_NotServed())))
            except Exception as e:
                logCannotListen(name, description, e)
                for port in ports + [p for opened in self.ports.values() for p in opened]:
                    port.stopListening()
                self.ports.clear()
                raise
            for port in ports:
                port.stopReading()
            address = ports[0].getHost()
            family = (
                "UNIX" if isinstance(address, UNIXAddress)
                else "INET6" if isinstance(address, IPv6Address) else "INET"
            )
            self.ports[name] = ports
            adopted = f"systemd:domain={family}:name={name}"
            self.adopted[name] = ("haproxy:" if proxied else "") + adopted
            log.info(
                "{name} listening on {description} for the workers ({sockets})",
                name=name, description=description,
                sockets="one socket each" if len(ports) > 1 else "one shared socket",
            )

    def startService(self) -> None:
        service.Service.startService(self)
        if not self.ports:
            # Not started privileged (a test, say): open the sockets now.
            d = self._openSockets()
        else:
            d = defer.succeed(None)
        # (A failure to listen was logged: then no worker starts.)
        d.addCallbacks(lambda _: [self._spawn(n) for n in range(1, self.count + 1)], lambda _: None)
        if _isMainThread():
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.signalAll, signal.SIGHUP))

    def _spawn(self, number: int) -> None:
        if self._stopping:
            return
        names = list(self.ports)
        fds = {0: "w", 1: "r", 2: "r"}
        for i, name in enumerate(names):
            sockets = self.ports[name]
            fds[3 + i] = sockets[(number - 1) % len(sockets)].fileno()
        env = dict(os.environ)
        env.update(LISTEN_FDS=str(len(names)), LISTEN_FDNAMES=":".join(names))
        env.pop("LISTEN_PID", None)
        env[WORKER_NAME_ENV] = f"worker {number}"
        env.pop(WORKER_CPUS_ENV, None)
        cpus = availableCPUs() if self.config.cluster.cpu_affinity == "auto" else None
        if cpus:
            env[WORKER_CPUS_ENV] = ",".join(str(cpu) for cpu in workerCPUs(number, self.count, cpus))
        if self.logOutput is not None:
            env[WORKER_LOG_FORMAT_ENV] = self.config.log.format
        else:
            env.pop(WORKER_LOG_FORMAT_ENV, None)
        # FETCH renderings the workers share (L{maild.imap.sharedcache}).
        if self._renderings is None and hasattr(os, "memfd_create"):
            self._renderings = makeShared(self.count)
        env.pop(RENDERINGS_FD_ENV, None)
        if self._renderings is not None:
            renderingsFD = 3 + len(names)
            fds[renderingsFD] = self._renderings
            env[RENDERINGS_FD_ENV] = f"{renderingsFD}:{number - 1}"
        args = [
            sys.executable, "-c", _BOOTSTRAP, "--nodaemon", "--pidfile=",
            "--logger=maild.logs.workerLogObserver", "maild",
        ]
        args += workerArguments(self.options, self.adopted)
        process = _WorkerProcess(self, number)
        self.processes[number] = process
        self.reactor.spawnProcess(process, sys.executable, args, env=env, childFDs=fds)

    def workerEnded(self, process: _WorkerProcess, reason) -> None:
        if self.processes.get(process.number) is process:
            del self.processes[process.number]
        if self._stopping:
            return
        quick = self.reactor.seconds() - process.started < CRASH_WINDOW
        crashes = self._crashes.get(process.number, 0) + 1 if quick else 0
        self._crashes[process.number] = crashes
        delay = RESTART_DELAYS[min(crashes, len(RESTART_DELAYS) - 1)]
        log.warn(
            "worker {number} ended ({reason}); restarting it in {delay} s",
            number=process.number, reason=reason, delay=delay,
        )
        self.reactor.callLater(delay, self._spawn, process.number)

    def signalAll(self, signum: int) -> None:
        for process in list(self.processes.values()):
            try:
                process.transport.signalProcess(signum)
            except Exception:  # already gone
                pass

    def pids(self) -> list[int]:
        return [p.transport.pid for p in self.processes.values() if p.transport.pid]

    def stopService(self):
        service.Service.stopService(self)
        self._stopping = True
        running = list(self.processes.values())
        self.signalAll(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_GRACE, self.signalAll, signal.SIGKILL)
        d = defer.gatherResults([p.ended for p in running])

        def closePorts(_):
            if kill.active():
                kill.cancel()
            return defer.gatherResults(
                [
                    defer.maybeDeferred(port.stopListening)
                    for ports in self.ports.values()
                    for port in ports
                ]
            )

        return d.addCallback(closePorts)


def stopOnce(reactor) -> None:
    """
    In a worker: stop at the first SIGTERM, SIGINT or SIGBREAK and let
    later ones be.  A worker is often told twice, by its parent, which
    passes SIGTERM on, and by whoever signalled the parent's whole process
    group or cgroup (Ctrl-C in a terminal, systemd's default C{KillMode},
    C{timeout}); Twisted's handlers would stop the reactor again and log
    C{ReactorNotRunning} as an error.

    Set before the reactor runs: it reads its handlers when it starts.
    """
    told: list[int] = []
    for name in ("sigInt", "sigTerm", "sigBreak"):
        handler = getattr(reactor, name, None)
        if handler is None:
            continue

        def once(number, frame=None, handler=handler):
            if not told:
                told.append(number)
                handler(number, frame)

        setattr(reactor, name, once)


def _isMainThread() -> bool:
    return threading.current_thread() is threading.main_thread()
