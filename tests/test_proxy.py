"""
Listeners behind a load balancer (haproxy: endpoints): the PROXY header's
client address is the one the sessions see; only trusted proxies may send
one; real HAProxy in front of maild.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from maild.config import PROTOCOLS, loadConfig
from maild.proxyheader import InvalidHeader, ProxyHeaderFactory, parseHeader
from maild.service import MailService
from tests.support import PASSWORD, RawClient, ServerTestCase, freePort, writeUsers


def v2(source: bytes, dest: bytes, sport: int, dport: int, family: int = 0x11, command: int = 1) -> bytes:
    body = source + dest + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class ParseTests(unittest.SynchronousTestCase):
    def test_v1(self):
        """
        A v1 header gives the client's address and its own length; partial
        headers ask for more; UNKNOWN gives no address.
        """
        header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r\n"
        address, used = parseHeader(header + b"EHLO x\r\n")
        self.assertEqual((address.host, address.port, used), ("192.0.2.7", 5555, len(header)))
        address, _ = parseHeader(b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 25\r\n")
        self.assertEqual(address.host, "2001:db8::7")
        for partial in (b"", b"PRO", b"PROXY TCP4 192.0.2.7"):
            self.assertIsNone(parseHeader(partial))
        self.assertEqual(parseHeader(b"PROXY UNKNOWN\r\n"), (None, 15))

    def test_v1Refused(self):
        """
        Malformed v1 headers: wrong family, bad addresses or ports, too long.
        """
        for bad in (
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
            b"PROXY TCP4 192.0.2.777 198.51.100.1 1 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 01 25\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n",
            b"PROXY " + b"x" * 200,
            b"EHLO x\r\n",
        ):
            self.assertRaises(InvalidHeader, parseHeader, bad)

    def test_v2(self):
        """
        v2 headers: IPv4 and IPv6 sources, LOCAL (no address), partial ones.
        """
        header = v2(bytes([192, 0, 2, 7]), bytes([198, 51, 100, 1]), 5555, 993)
        address, used = parseHeader(header + b"\x16\x03\x01")
        self.assertEqual((address.host, address.port, used), ("192.0.2.7", 5555, len(header)))
        six = v2(socket.inet_pton(socket.AF_INET6, "2001:db8::7"), bytes(16), 1, 2, family=0x21)
        self.assertEqual(parseHeader(six)[0].host, "2001:db8::7")
        local = v2(b"", b"", 0, 0, family=0, command=0)[:-4]
        local = local[:14] + struct.pack("!H", 0)
        self.assertEqual(parseHeader(local), (None, 16))
        for cut in (1, 12, 15, len(header) - 1):
            self.assertIsNone(parseHeader(header[:cut]))
        self.assertRaises(InvalidHeader, parseHeader, header[:12] + b"\x31" + header[13:])

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_anyInput(self, data):
        """
        Any input is parsed, asks for more, or is refused: never another
        exception.
        """
        try:
            result = parseHeader(data)
        except InvalidHeader:
            return
        if result is not None:
            self.assertLessEqual(result[1], len(data))

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=200))
    def test_anySuffix(self, data):
        """
        A valid header is found whatever follows it.
        """
        header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r\n"
        self.assertEqual(parseHeader(header + data)[1], len(header))


class _Echo(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello " + self.transport.getPeer().host.encode())


class FactoryTests(unittest.SynchronousTestCase):
    def makeSession(self, peer: str = "127.0.0.1", trusted=("127.0.0.0/8",)):
        self.clock = task.Clock()
        factory = ProxyHeaderFactory(Factory.forProtocol(_Echo), trusted, self.clock, headerTimeout=10)
        session = factory.buildProtocol(IPv4Address("TCP", peer, 1234))
        if session is None:
            return None, None
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 1234))
        session.makeConnection(transport)
        return session, transport

    def test_sessionAfterHeader(self):
        """
        The session is made once the header is in, and sees the client's
        address; it says nothing before.
        """
        session, transport = self.makeSession()
        self.assertEqual(transport.value(), b"")
        session.dataReceived(b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 25\r")
        self.assertEqual(transport.value(), b"")
        session.dataReceived(b"\n")
        self.assertEqual(transport.value(), b"hello 192.0.2.7")

    def test_untrustedProxy(self):
        """
        A connection from an address that is not a trusted proxy is refused.
        """
        self.assertEqual(self.makeSession(peer="192.0.2.50"), (None, None))

    def test_headerDeadline(self):
        """
        A connection that sends no header within the deadline is closed.
        """
        session, transport = self.makeSession()
        session.dataReceived(b"PROXY TCP4")
        self.clock.advance(11)
        self.assertTrue(transport.disconnecting)


def proxiedConfig(dataDir: Path, listeners: dict[str, str], **values):
    overrides = {
        "data_dir": dataDir,
        "hostname": "mx.test",
        "domains": ["localhost"],
        "listeners": {name: listeners.get(name, "none") for name in PROTOCOLS},
        "limits": {"trusted_networks": [], "connections_per_ip": 1, "auth_failure_delay": 0.01},
        # No SPF/DKIM/DMARC checks: they would ask the system's DNS servers.
        "mx": {"checks": False},
    }
    overrides.update(values)
    return loadConfig(None, overrides)


class ProxiedServiceTests(unittest.TestCase):
    @defer.inlineCallbacks
    def startService(self, **values):
        self.dataDir = Path(self.mktemp()).resolve()
        writeUsers(self.dataDir, {"alice@localhost": PASSWORD})
        config = proxiedConfig(
            self.dataDir,
            {"smtp": "haproxy:tcp:0:interface=127.0.0.1", "imaps": "haproxy:tcp:0:interface=127.0.0.1"},
            **values,
        )
        self.service = MailService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        yield defer.gatherResults([lst.ready for lst in self.service.listeners.values()])

    def inThread(self, f, *args):
        from twisted.internet import threads

        return threads.deferToThread(f, *args)

    @defer.inlineCallbacks
    def test_clientAddressEverywhere(self):
        """
        Through a PROXY header, the Received: header names the client, and
        the per-address limit counts the client, not the proxy: two clients
        behind one proxy are served while a client's second connection is
        refused.
        """
        yield self.startService()
        port = self.service.port("smtp")

        def talk():
            first = RawClient(port)
            first.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n")
            greeting = first.readReply()
            other = RawClient(port)
            other.send(b"PROXY TCP4 192.0.2.8 127.0.0.1 5556 25\r\n")
            otherGreeting = other.readReply()
            same = RawClient(port)
            same.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5557 25\r\n")
            refused = same.readReply()
            for line in (b"EHLO client.test", b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"):
                first.command(line)
            done = first.command(b"Subject: proxied\r\n\r\nhi\r\n.")
            for client in (first, other, same):
                client.close()
            return greeting[0], otherGreeting[0], refused[0], done[0]

        codes = yield self.inThread(talk)
        self.assertEqual(codes, (220, 220, 421, 250))
        [stored] = list((self.dataDir / "mail/localhost/alice/new").iterdir())
        self.assertIn(b"([192.0.2.7])", stored.read_bytes())

    @defer.inlineCallbacks
    def test_implicitTLSBehindProxy(self):
        """
        On an implicit-TLS listener the PROXY header comes first, then TLS.
        """
        yield self.startService()
        port = self.service.port("imaps")

        def talk():
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 993\r\n")
            context = ssl.create_default_context(cafile=str(self.service.localCA.certPath))
            with context.wrap_socket(sock, server_hostname="mx.test") as tls:
                return tls.recv(100)

        greeting = yield self.inThread(talk)
        self.assertTrue(greeting.startswith(b"* OK"), greeting)

    @defer.inlineCallbacks
    def test_noHeaderOrUntrusted(self):
        """
        A connection without a valid header is closed without a word; so is
        every connection from an address that is not a trusted proxy.
        """
        yield self.startService()
        port = self.service.port("smtp")

        def noHeader():
            client = RawClient(port)
            client.send(b"EHLO x\r\n")
            closed = client.closed()
            return closed, client.buffer

        closed, said = yield self.inThread(noHeader)
        self.assertEqual((closed, said), (True, b""))

    @defer.inlineCallbacks
    def test_untrustedProxy(self):
        """
        With only 192.0.2.0/24 trusted, a loopback connection is closed at
        once, even with a well-formed header.
        """
        yield self.startService(cluster={"trusted_proxies": ["192.0.2.0/24"]})
        port = self.service.port("smtp")

        def talk():
            client = RawClient(port)
            client.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 25\r\n")
            return client.closed(), client.buffer

        closed, said = yield self.inThread(talk)
        self.assertEqual((closed, said), (True, b""))


class RealHAProxyTests(ServerTestCase):
    """
    Real HAProxy (Debian's haproxy) in TCP mode in front of maild, with
    send-proxy-v2, as docs/cluster... the README's configuration has it.
    """

    listeners = ()

    @defer.inlineCallbacks
    def setUp(self):
        if shutil.which("haproxy") is None:
            raise unittest.SkipTest("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
        self.dataDir = Path(self.mktemp()).resolve()
        writeUsers(self.dataDir, self.users)
        self.backend = freePort()
        config = proxiedConfig(self.dataDir, {"smtp": f"haproxy:tcp:{self.backend}:interface=127.0.0.1"})
        self.service = MailService(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        yield defer.gatherResults([lst.ready for lst in self.service.listeners.values()])
        self.front = freePort()
        haproxyConfig = Path(self.mktemp())
        haproxyConfig.write_text(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n"
            "  timeout client 60s\n  timeout server 60s\n"
            f"frontend smtp\n  bind 127.0.0.1:{self.front}\n  default_backend maild\n"
            f"backend maild\n  server node1 127.0.0.1:{self.backend} send-proxy-v2\n"
        )
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(haproxyConfig), "-db"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.addCleanup(self._stopHAProxy)
        yield self.inThread(self._waitForFront)

    def _waitForFront(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.front), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("haproxy did not start")

    def _stopHAProxy(self):
        self.haproxy.terminate()
        self.haproxy.communicate(timeout=10)

    @defer.inlineCallbacks
    def test_throughHAProxy(self):
        """
        Mail sent through HAProxy from 127.0.0.2 is received with 127.0.0.2
        as the client, though the connection comes from HAProxy.
        """

        def send():
            with smtplib.SMTP("127.0.0.1", self.front, source_address=("127.0.0.2", 0)) as s:
                s.sendmail("carol@remote.test", ["alice@localhost"], b"Subject: via haproxy\r\n\r\nx\r\n")

        yield self.inThread(send)
        [stored] = list((self.dataDir / "mail/localhost/alice/new").iterdir())
        self.assertIn(b"([127.0.0.2])", stored.read_bytes())
