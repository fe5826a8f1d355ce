"""
Sending to other domains: two maild instances on loopback, A (a.test)
and B (b.test); A reaches B by a route, through a private DNS server, or
with B as its smarthost.
"""

from __future__ import annotations

import email
import io
import smtplib
import time
from pathlib import Path

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from maild import cli
from maild.config import PROTOCOLS, loadConfig
from maild.service import MailService
from tests.support import LOOPBACK, PASSWORD, freePort, writeUsers

ALICE = "alice@a.test"
BOB = "bob@b.test"


def outgoing(subject: str = "Hi", to: str = BOB, sender: str = ALICE, extra: str = "") -> str:
    return (
        f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n{extra}\r\n"
        "Hello from A.\r\n.leading dot stays\r\n"
    )


class TwoServersTestCase(unittest.TestCase):
    """
    Fixtures: start B and A (each a whole daemon in this process), send
    through A's submission port, wait for files to appear.
    """

    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.services = {}

    @defer.inlineCallbacks
    def startMaild(self, name: str, domains, users, listeners=("smtp", "submission"), ports=None, **values):
        dataDir = Path(self.mktemp()).resolve() if name not in self.services else self.services[name].config.data_dir
        if name not in self.services:
            writeUsers(dataDir, users)
        ports = ports or {}
        overrides = {
            "data_dir": dataDir,
            "hostname": f"mx.{domains[0]}",
            "domains": list(domains),
            "listeners": {
                p: (f"tcp:{ports[p]}:interface=127.0.0.1" if p in ports else LOOPBACK)
                if p in listeners
                else "none"
                for p in PROTOCOLS
            },
            "submission_plaintext_auth": True,
        }
        overrides.update(values)
        config = loadConfig(None, overrides)
        service = MailService(config, reactor)
        service.startService()
        self.services[name] = service
        self.addCleanup(self.stopMaild, name)
        yield defer.gatherResults([lst.ready for lst in service.listeners.values()])
        return service

    def stopMaild(self, name: str):
        service = self.services.get(name)
        if service is not None and service.running:
            return service.stopService()
        return None

    @defer.inlineCallbacks
    def startPair(self, routeB=True, bPorts=None, **relay):
        """
        B first (its port goes into A's route), then A.
        """
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports=bPorts)
        self.bPort = b.port("smtp")
        relaySettings = {"scan_interval": 0.05, "retry_first": 3600.0, "connect_timeout": 5.0}
        if routeB:
            relaySettings["routes"] = {"b.test": f"127.0.0.1:{self.bPort}"}
        relaySettings.update(relay)
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD, "carol@a.test": PASSWORD}, relay=relaySettings
        )
        return a, b

    def submit(self, service, recipients, message: str, user: str = ALICE, tls: bool = False):
        """
        Send through C{service}'s submission port (in a thread).
        """

        def run():
            with smtplib.SMTP("127.0.0.1", service.port("submission"), timeout=10) as client:
                if tls:
                    client.starttls()
                client.login(user, PASSWORD)
                return client.sendmail(user, recipients, message)

        return self._inThread(run)

    def _inThread(self, f, *args):
        from twisted.internet import threads

        return threads.deferToThread(f, *args)

    def mailOf(self, service, address: str, folder: str = "") -> list[bytes]:
        local, _, domain = address.partition("@")
        root = service.config.data_dir / "mail" / domain / local / folder
        files = [p for sub in ("new", "cur") for p in (root / sub).glob("*") if p.is_file()]
        return [p.read_bytes() for p in sorted(files)]

    @defer.inlineCallbacks
    def waitFor(self, condition, timeout: float = 20.0):
        """
        Wait until C{condition()} is true (polling), or fail.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail("timed out waiting")
            yield task.deferLater(reactor, 0.02, lambda: None)

    def deliveryLines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("log_format", "").startswith("delivery id=")]

    def cli(self, service, *argv) -> str:
        """
        Run `maild` with a config file naming C{service}'s data folder,
        domains and host name.
        """
        config = service.config
        configFile = config.data_dir / "maild.toml"
        configFile.write_text(
            f'data_dir = "{config.data_dir}"\nhostname = "{config.hostname}"\n'
            f"domains = {list(config.domains)!r}\n".replace("'", '"')
        )
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", str(configFile), *argv], stdout=out, stderr=err)
        self.assertEqual(code, 0, err.getvalue())
        return out.getvalue()


def dkimRecords(dnsOutput: str) -> dict[bytes, bytes]:
    """
    The DKIM TXT records in C{maild dns}'s output, as dkimpy's DNS
    function answers them.
    """
    records = {}
    for line in dnsOutput.splitlines():
        if "._domainkey." in line and not line.startswith(";"):
            name, _, _, _, value = line.split("\t", 4)
            text = "".join(part for part in value.split('"')[1::2])
            records[name.encode()] = text.encode()
    return records


class RouteDeliveryTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_routeDeliveryWithSTARTTLSAndDKIM(self):
        """
        A message from alice@a.test to bob@b.test and carol@a.test: Carol
        has it at once, B gets it over STARTTLS through the route, signed
        with A's Ed25519 and RSA keys (both verify with dkimpy against the
        records `maild dns` prints), without A's Return-Path:, with the
        Date: and Message-ID: submission added; one Postfix-like log line
        says it was sent, and A's queue is empty.
        """
        a, b = yield self.startPair()
        yield self.submit(a, [BOB, "carol@a.test"], outgoing("Route"))
        self.assertEqual(len(self.mailOf(a, "carol@a.test")), 1)
        yield self.waitFor(lambda: self.mailOf(b, BOB) and not a.relay.entries)
        [received] = self.mailOf(b, BOB)
        self.assertIn(b"with ESMTPS id", received)
        self.assertIn(b".leading dot stays", received)
        self.assertEqual(received.count(b"Return-Path:"), 1)  # B's own
        message = email.message_from_bytes(received)
        self.assertEqual(message["Subject"], "Route")
        self.assertTrue(message["Date"])
        self.assertTrue(message["Message-ID"].endswith("@a.test>"))
        records = dkimRecords(self.cli(a, "dns", "a.test"))
        self.assertEqual(len(records), 2)
        asReceived = received.replace(b"\n", b"\r\n")
        verifier = dkim.DKIM(asReceived)
        results = [
            verifier.verify(idx=i, dnsfunc=lambda name, timeout=5: records.get(name)) for i in range(2)
        ]
        self.assertEqual(results, [True, True])
        self.assertIn(b"a=ed25519-sha256", received)
        self.assertIn(b"a=rsa-sha256", received)
        [line] = self.deliveryLines()
        self.assertRegex(
            line,
            rf'^delivery id=[0-9A-F]+ to=<{BOB}> relay=127\.0\.0\.1\[127\.0\.0\.1\]:{self.bPort} '
            r'status=sent dsn=2\.0\.0 delay=\d+\.\ds reply="250 2\.0\.0 Ok: queued as [0-9A-F]+"$',
        )
        self.assertEqual(list((a.config.data_dir / "queue").glob("*.*")), [])

    @defer.inlineCallbacks
    def test_deferredListedThenFlushed(self):
        """
        With B down, the message is deferred and `maild queue list` shows
        it with the reason; once B is up, `maild queue flush` reaches the
        running daemon and the message is delivered.
        """
        bPort = freePort()
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={"routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0},
        )
        yield self.submit(a, [BOB], outgoing("Later"))
        yield self.waitFor(lambda: "1 attempt(s)" in self.cli(a, "queue", "list"))
        self.assertIn("status=deferred", self.deliveryLines()[0])
        listing = self.cli(a, "queue", "list")
        self.assertIn(f"<{ALICE}>", listing)
        self.assertIn(f"<{BOB}> queued, 1 attempt(s): connect to 127.0.0.1[127.0.0.1]:{bPort} failed", listing)
        self.assertIn("-- 1 message(s) in the queue", listing)
        [entry] = a.relay.entries.values()
        self.assertIn(entry.id, self.cli(a, "queue", "show", entry.id))
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        self.assertIn("flush of every message requested", self.cli(a, "queue", "flush"))
        yield self.waitFor(lambda: self.mailOf(b, BOB))
        yield self.waitFor(lambda: not a.relay.entries)
        self.assertIn("-- 0 message(s) in the queue", self.cli(a, "queue", "list"))

    @defer.inlineCallbacks
    def test_flushAskedWhileStopped(self):
        """
        `maild queue flush` run while the daemon is stopped (or restarting)
        is acted on when it starts: the deferred message is delivered
        without waiting for its next try.
        """
        bPort = freePort()
        relay = {"routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0}
        a = yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD}, relay=relay)
        yield self.submit(a, [BOB], outgoing("Asked while stopped"))
        yield self.waitFor(lambda: "1 attempt(s)" in self.cli(a, "queue", "list"))
        yield self.stopMaild("a")
        self.cli(a, "queue", "flush")
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        a = yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD}, relay=relay)
        yield self.waitFor(lambda: self.mailOf(b, BOB))
        yield self.waitFor(lambda: not a.relay.entries)

    @defer.inlineCallbacks
    def test_permanentFailureBounces(self):
        """
        B answers 550 5.1.1 for an unknown recipient: the sender finds an
        RFC 3464 report in her INBOX (from MAILER-DAEMON, null Return-Path,
        the recipient's status and B's reply, the original headers), the
        other recipient is delivered, and the queue is empty.
        """
        a, b = yield self.startPair()
        yield self.submit(a, [BOB, "nobody@b.test"], outgoing("Bounce me"))
        yield self.waitFor(lambda: self.mailOf(a, ALICE) and not a.relay.entries)
        self.assertEqual(len(self.mailOf(b, BOB)), 1)
        [report] = self.mailOf(a, ALICE)
        self.assertTrue(report.startswith(b"Return-Path: <>\n"), report[:80])
        message = email.message_from_bytes(report)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertTrue(message["From"].startswith("MAILER-DAEMON@"))
        text = report.decode()
        self.assertIn("Final-Recipient: rfc822; nobody@b.test", text)
        self.assertIn("Action: failed", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1", text)
        self.assertIn("Subject: Bounce me", text)
        self.assertNotIn("Hello from A.", text)
        self.assertNotIn(BOB, text.split("Content-Type: text/rfc822-headers")[0].split("message/delivery-status")[1])
        statuses = sorted(line.split(" status=")[1].split()[0] for line in self.deliveryLines())
        self.assertEqual(statuses, ["bounced", "sent"])

    @defer.inlineCallbacks
    def test_lifetimeExpiredBounces(self):
        """
        A recipient still deferred when the queue lifetime runs out is
        returned to the sender (4.4.7, with the last problem).
        """
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={
                "routes": {"b.test": f"127.0.0.1:{freePort()}"},
                "scan_interval": 0.05, "retry_first": 0.05, "queue_lifetime": 0.3,
            },
        )
        yield self.submit(a, [BOB], outgoing("Too late"))
        yield self.waitFor(lambda: self.mailOf(a, ALICE) and not a.relay.entries)
        text = self.mailOf(a, ALICE)[0].decode()
        self.assertIn("Status: 4.4.7", text)
        self.assertIn("delivery time expired; last problem: connect to", text)

    @defer.inlineCallbacks
    def test_delayNotice(self):
        """
        After delay_warning in the queue the sender is told once that the
        message is still being retried; it stays queued.
        """
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={
                "routes": {"b.test": f"127.0.0.1:{freePort()}"},
                "scan_interval": 0.05, "retry_first": 0.05, "delay_warning": 0.2,
            },
        )
        yield self.submit(a, [BOB], outgoing("Slow"))
        yield self.waitFor(lambda: self.mailOf(a, ALICE))
        yield task.deferLater(reactor, 0.3, lambda: None)
        [notice] = self.mailOf(a, ALICE)
        self.assertIn(b"Action: delayed", notice)
        self.assertIn(b"Subject: Delayed Mail", notice)
        self.assertEqual(len(a.relay.entries), 1)
        [entry] = a.relay.entries.values()
        self.assertTrue(entry.warned)


class LimitTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_recipientsPerHour(self):
        """
        Past recipients_per_hour recipients in other domains, RCPT gets
        451 4.7.1; local recipients are not counted.
        """
        a, b = yield self.startPair(recipients_per_hour=2)

        def run():
            with smtplib.SMTP("127.0.0.1", a.port("submission"), timeout=10) as client:
                client.login(ALICE, PASSWORD)
                client.mail(ALICE)
                return [client.rcpt(r)[0] for r in (BOB, "carol@a.test", "x@b.test", "y@b.test")] + [
                    client.rcpt("z@b.test")[1][:5]
                ]

        codes = yield self._inThread(run)
        self.assertEqual(codes, [250, 250, 250, 451, b"4.7.1"])

    @defer.inlineCallbacks
    def test_queueFull(self):
        """
        With queue_max_messages queued, RCPT to another domain gets 452
        4.3.1; local mail still goes through.
        """
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD, "carol@a.test": PASSWORD},
            relay={"routes": {"b.test": f"127.0.0.1:{freePort()}"}, "queue_max_messages": 1},
        )
        yield self.submit(a, [BOB], outgoing("One"))
        with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
            yield self.submit(a, [BOB], outgoing("Two"))
        [(code, text)] = caught.exception.recipients.values()
        self.assertEqual((code, text[:5]), (452, b"4.3.1"))
        yield self.submit(a, ["carol@a.test"], outgoing("Local", to="carol@a.test"))
        self.assertEqual(len(self.mailOf(a, "carol@a.test")), 1)

    @defer.inlineCallbacks
    def test_mxPortNeverRelays(self):
        """
        The MX port refuses other domains (554 5.7.1), relay or not.
        """
        a, b = yield self.startPair()

        def run():
            with smtplib.SMTP("127.0.0.1", a.port("smtp"), timeout=10) as client:
                client.ehlo()
                client.mail(ALICE)
                return client.rcpt(BOB)

        code, text = yield self._inThread(run)
        self.assertEqual((code, text[:5]), (554, b"5.7.1"))


class QueueFileTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_corruptFileMovedAside(self):
        """
        An envelope that cannot be parsed (a crash, a disk error) is moved
        into queue/corrupt/ at start and reported by `maild queue list`,
        never dropped; a message without its envelope too.
        """
        a = yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD})
        yield self.stopMaild("a")
        queue = a.config.data_dir / "queue"
        queue.mkdir(exist_ok=True)
        (queue / "00000001000010001.env").write_bytes(b'{"id": "00000001000010001", "sen')
        (queue / "00000001000010001.msg").write_bytes(b"Subject: x\n\nbody\n")
        (queue / "00000002000010001.msg").write_bytes(b"Subject: y\n\nbody\n")
        yield self.startMaild("a", ["a.test"], {ALICE: PASSWORD})
        self.assertEqual(
            sorted(p.name for p in (queue / "corrupt").iterdir()),
            ["00000001000010001.env", "00000001000010001.msg", "00000002000010001.msg"],
        )
        listing = self.cli(a, "queue", "list")
        self.assertIn("3 unreadable file(s) moved aside", listing)

    @defer.inlineCallbacks
    def test_deleteFromCommandLine(self):
        """
        `maild queue delete ID` removes a queued message; the daemon
        forgets it at its next try.
        """
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={"routes": {"b.test": f"127.0.0.1:{freePort()}"}, "scan_interval": 0.05, "retry_first": 3600.0},
        )
        yield self.submit(a, [BOB], outgoing("Delete me"))
        yield self.waitFor(lambda: self.deliveryLines())
        [queueId] = a.relay.entries
        self.assertIn(f"deleted {queueId}", self.cli(a, "queue", "delete", queueId))
        self.cli(a, "queue", "flush", queueId)
        yield self.waitFor(lambda: not a.relay.entries)
        self.assertEqual(list((a.config.data_dir / "queue").glob("*.*")), [])


class MisbehavingServer(protocol.Protocol):
    """
    A remote SMTP server that goes wrong in the way its factory says.
    """

    def connectionMade(self):
        self.buffer = b""
        self.inData = False
        behaviour = self.factory.behaviour
        if behaviour == "garbage":
            self.transport.write(b"Welcome, friend!\r\n")
        else:
            self.transport.write(b"220 bad.test ESMTP\r\n")

    def dataReceived(self, data):
        self.buffer += data
        behaviour = self.factory.behaviour
        while b"\r\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            verb = line[:4].upper()
            if behaviour == "hang":
                return
            if self.inData:
                if behaviour == "dropMidData":
                    self.transport.loseConnection()
                    return
                if line == b".":
                    self.inData = False
                    self.transport.write(b"250 2.0.0 ok\r\n")
            elif verb == b"EHLO":
                if behaviour == "hugeReply":
                    self.transport.write(b"250-bad.test\r\n" * 10_000 + b"250 OK\r\n")
                else:
                    self.transport.write(b"250-bad.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.inData = True
                self.transport.write(b"354 go on\r\n")
            else:
                self.transport.write(b"250 2.0.0 ok\r\n")


class BadServerTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def deferredBy(self, behaviour: str):
        factory = protocol.Factory.forProtocol(MisbehavingServer)
        factory.behaviour = behaviour
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={
                "routes": {"b.test": f"127.0.0.1:{port.getHost().port}"},
                "scan_interval": 0.05, "retry_first": 3600.0, "command_timeout": 0.3,
            },
        )
        yield self.submit(a, [BOB], outgoing(behaviour))
        yield self.waitFor(lambda: "1 attempt(s)" in self.cli(a, "queue", "list"))
        [line] = self.deliveryLines()
        self.assertIn("status=deferred dsn=4.4.2", line)
        [entry] = a.relay.entries.values()
        self.assertEqual([r.state for r in entry.recipients], ["queued"])
        return line

    @defer.inlineCallbacks
    def test_hangingServer(self):
        """
        A server that stops answering is given up on after the command
        timeout; the message is deferred.
        """
        line = yield self.deferredBy("hang")
        self.assertIn("timeout waiting for the server's reply", line)

    @defer.inlineCallbacks
    def test_garbageGreeting(self):
        """
        A server that answers something that is not SMTP: deferred.
        """
        line = yield self.deferredBy("garbage")
        self.assertIn("garbage from the server", line)

    @defer.inlineCallbacks
    def test_dropMidData(self):
        """
        A server that drops the connection in the middle of DATA: deferred,
        nothing counted as sent.
        """
        line = yield self.deferredBy("dropMidData")
        self.assertIn("connection", line)

    @defer.inlineCallbacks
    def test_hugeReply(self):
        """
        A reply of 10,000 lines: deferred, not read into memory forever.
        """
        line = yield self.deferredBy("hugeReply")
        self.assertIn("reply of more than 100 lines", line)


class Zone:
    """
    A tiny authoritative zone for the private DNS server: names to
    records by type; any other name does not exist.
    """

    def __init__(self, records):
        self.records = records

    def query(self, query, timeout=None):
        from twisted.names import dns
        from twisted.names.error import DomainError

        name = query.name.name.decode().lower()
        if name not in self.records:
            return defer.fail(DomainError(name))
        answers = [
            dns.RRHeader(name=name, type=payload.TYPE, payload=payload, ttl=60)
            for payload in self.records[name]
            if payload.TYPE == query.type
        ]
        return defer.succeed((answers, [], []))


class DNSDeliveryTests(TwoServersTestCase):
    def startDNS(self, records) -> int:
        from twisted.names import dns, server

        factory = server.DNSServerFactory(clients=[Zone(records)])
        port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def test_mxDelivery(self):
        """
        A looks up b.test's MX (mx.b.test, then its address) on a private
        DNS server and delivers there; a domain with a null MX (RFC 7505)
        and one that does not exist are returned to the sender at once
        (5.1.10, 5.1.2).
        """
        from twisted.names import dns

        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD})
        dnsPort = self.startDNS(
            {
                "b.test": [dns.Record_MX(20, b"backup.b.test"), dns.Record_MX(10, b"mx.b.test")],
                "mx.b.test": [dns.Record_A("127.0.0.1")],
                "backup.b.test": [dns.Record_A("127.0.0.2")],
                "nullmx.test": [dns.Record_MX(0, b"")],
            }
        )
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            dns={"nameservers": [f"127.0.0.1:{dnsPort}"]},
            relay={"mx_port": b.port("smtp"), "scan_interval": 0.05, "retry_first": 3600.0},
        )
        yield self.submit(a, [BOB, "x@nullmx.test", "y@nosuch.test"], outgoing("By MX"))
        yield self.waitFor(lambda: self.mailOf(b, BOB) and self.mailOf(a, ALICE) and not a.relay.entries)
        lines = sorted(self.deliveryLines())
        self.assertEqual(len(lines), 3)
        self.assertIn(f"to=<{BOB}> relay=mx.b.test[127.0.0.1]:{b.port('smtp')} status=sent", lines[0])
        self.assertIn("to=<x@nullmx.test> relay=none status=bounced dsn=5.1.10", lines[1])
        self.assertIn("to=<y@nosuch.test> relay=none status=bounced dsn=5.1.2", lines[2])
        report = self.mailOf(a, ALICE)[0].decode()
        self.assertIn("Status: 5.1.10", report)
        self.assertIn("Status: 5.1.2", report)


class SmarthostTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_smarthostWithAuthOverSTARTTLS(self):
        """
        With a smarthost, everything goes there: STARTTLS with the
        certificate verified, then AUTH with the configured user and the
        password from its file (B logs the submission as ESMTPSA).
        """
        b = yield self.startMaild(
            "b", ["b.test", "a.test"], {BOB: PASSWORD, ALICE: PASSWORD},
            submission_plaintext_auth=False,
        )
        passwordFile = Path(self.mktemp())
        passwordFile.write_text(PASSWORD + "\n")
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={
                "smarthost": f"127.0.0.1:{b.port('submission')}",
                "smarthost_user": ALICE,
                "smarthost_password_file": str(passwordFile),
                "smarthost_cafile": str(b.localCA.certPath),
                "scan_interval": 0.05,
                "retry_first": 3600.0,
            },
        )
        yield self.submit(a, [BOB], outgoing("Via smarthost"))
        yield self.waitFor(lambda: self.mailOf(b, BOB) and not a.relay.entries)
        [received] = self.mailOf(b, BOB)
        self.assertIn(b"with ESMTPSA id", received)
        [line] = self.deliveryLines()
        self.assertIn(f"relay=127.0.0.1[127.0.0.1]:{b.port('submission')} status=sent", line)

    @defer.inlineCallbacks
    def test_smarthostCertificateVerified(self):
        """
        A smarthost whose certificate does not verify gets nothing: the
        message is deferred.
        """
        b = yield self.startMaild("b", ["b.test", "a.test"], {BOB: PASSWORD, ALICE: PASSWORD})
        passwordFile = Path(self.mktemp())
        passwordFile.write_text(PASSWORD + "\n")
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={
                "smarthost": f"127.0.0.1:{b.port('submission')}",
                "smarthost_user": ALICE,
                "smarthost_password_file": str(passwordFile),
                "scan_interval": 0.05,
                "retry_first": 3600.0,
            },
        )
        yield self.submit(a, [BOB], outgoing("Not to a stranger"))
        yield self.waitFor(lambda: self.deliveryLines())
        self.assertIn("status=deferred", self.deliveryLines()[0])
        self.assertEqual(self.mailOf(b, BOB), [])


class CrashTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_killDuringDeliveryLosesNothing(self):
        """
        A (a separate twistd process) holds 200 queued messages and is
        killed with SIGKILL while delivering them to B; after a restart and
        a flush every message reaches B, and only the few whose
        acknowledgement was not yet written (at most one group of queue
        updates) arrive twice.
        """
        import os
        import subprocess
        import sys

        from tests.test_daemon import ROOT, waitForPort

        bPort, submissionPort = freePort(), freePort()
        folder = Path(self.mktemp()).resolve()
        dataDir = folder / "data"
        writeUsers(dataDir, {ALICE: PASSWORD})
        configFile = folder / "maild.toml"
        listeners = "\n".join(
            f'{p} = "{f"tcp:{submissionPort}:interface=127.0.0.1" if p == "submission" else "none"}"'
            for p in PROTOCOLS
        )
        configFile.write_text(
            f'data_dir = "{dataDir}"\nhostname = "mx.a.test"\ndomains = ["a.test"]\n'
            f"[listen]\n{listeners}\n[auth]\nsubmission_plaintext = true\n"
            f"[relay]\nscan_interval = 0.05\nretry_first = 3600.0\n"
            f'[relay.routes]\n"b.test" = "127.0.0.1:{bPort}"\n'
        )
        log = folder / "a.log"

        def startA():
            # Output to a file: a pipe nobody reads would fill and stall A.
            with open(log, "a") as output:
                return subprocess.Popen(
                    [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                     "-n", "--pidfile=", "maild", "--config", str(configFile)],
                    cwd=folder, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                    stdout=output, stderr=subprocess.STDOUT,
                )

        daemon = startA()
        self.addCleanup(lambda: daemon.poll() is None and (daemon.kill(), daemon.wait()))
        yield self._inThread(waitForPort, submissionPort, daemon)

        def submitAll():
            with smtplib.SMTP("127.0.0.1", submissionPort, timeout=30) as client:
                client.login(ALICE, PASSWORD)
                for n in range(200):
                    client.sendmail(ALICE, [BOB], outgoing(f"n{n}"))

        yield self._inThread(submitAll)
        queue = dataDir / "queue"
        self.assertEqual(len(list(queue.glob("*.env"))), 200)
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        (queue / "flush").mkdir(exist_ok=True)
        (queue / "flush" / "ALL").touch()
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) >= 30, timeout=300)
        daemon.kill()
        daemon.wait()
        delivered = len(self.mailOf(b, BOB))
        self.assertLess(delivered, 200)
        daemon = startA()
        yield self._inThread(waitForPort, submissionPort, daemon)
        (queue / "flush" / "ALL").touch()
        yield self.waitFor(lambda: not list(queue.glob("*.env")), timeout=300)
        daemon.terminate()
        daemon.wait()
        output = log.read_text()
        subjects = [email.message_from_bytes(m)["Subject"] for m in self.mailOf(b, BOB)]
        self.assertEqual(sorted(set(subjects)), sorted(f"n{n}" for n in range(200)))
        duplicates = len(subjects) - 200
        self.assertLessEqual(duplicates, 40, f"{duplicates} sent twice")
        self.assertNotIn("Traceback", output)

    # Two daemon starts and 200 messages through each side: minutes on a
    # loaded machine.
    test_killDuringDeliveryLosesNothing.timeout = 900


class ConfigTests(unittest.TestCase):
    def test_relayTable(self):
        """
        [relay] and its [relay.routes] sub-table are read from the file;
        a route or smarthost that is not "host:port", and a smarthost user
        without a password file, are reported.
        """
        from maild.config import ConfigError

        path = Path(self.mktemp())
        path.write_text(
            '[relay]\nsmarthost = "smtp.example.net:465"\nqueue_lifetime = 3600\n'
            '[relay.routes]\n"b.test" = "127.0.0.1:2525"\n'
        )
        relay = loadConfig(path).relay
        self.assertEqual(relay.smarthost, "smtp.example.net:465")
        self.assertEqual(relay.queue_lifetime, 3600)
        self.assertEqual(dict(relay.routes), {"b.test": "127.0.0.1:2525"})
        path.write_text('[relay]\nsmarthost = "x:y"\nsmarthost_user = "u"\n[relay.routes]\n"b.test" = "h:0"\n')
        with self.assertRaises(ConfigError) as caught:
            loadConfig(path)
        self.assertEqual(len(caught.exception.problems), 3)


class ReplyReaderTests(unittest.TestCase):
    """
    The client's reply reader, driven without a network.
    """

    def reader(self):
        from twisted.internet.testing import StringTransport

        from maild.relay.client import SMTPClient

        clock = task.Clock()
        client = SMTPClient(clock)
        client.makeConnection(StringTransport())
        return client, clock

    def test_multiLineReply(self):
        """
        A multi-line reply comes as one Reply, with its enhanced status.
        """
        client, _ = self.reader()
        replies = []
        client.expect(5).addCallback(replies.append)
        client.dataReceived(b"250-first\r\n250-8BITMIME\r\n250 5.1.1 last\r\n")
        [reply] = replies
        self.assertEqual((reply.code, reply.lines), (250, ("first", "8BITMIME", "5.1.1 last")))
        self.assertEqual(reply.status, "2.0.0")

    def test_timeout(self):
        """
        No reply within the deadline: the wait fails and the connection
        is aborted.
        """
        from maild.relay.client import SessionError

        client, clock = self.reader()
        d = client.expect(5)
        clock.advance(5)
        self.failureResultOf(d, SessionError)
        self.assertTrue(client.transport.disconnecting or client.transport.disconnected)

    def test_eachWaitHasItsDeadline(self):
        """
        Waits queued behind each other (pipelined commands) each get their
        own deadline, counted from the reply before them, whether longer
        or shorter than the one before; one timer serves them all.
        """
        from maild.relay.client import SessionError

        client, clock = self.reader()
        first, second, third = client.expect(5), client.expect(10), client.expect(3)
        clock.advance(4)
        client.dataReceived(b"250 one\r\n")
        self.assertEqual(self.successResultOf(first).code, 250)
        clock.advance(9)
        self.assertNoResult(second)
        client.dataReceived(b"250 two\r\n")
        self.successResultOf(second)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(2.9)
        self.assertNoResult(third)
        clock.advance(0.2)
        self.failureResultOf(third, SessionError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_anyInputNeverRaises(self):
        """
        Whatever bytes a server sends, in whatever pieces, the reader gives
        replies or a SessionError, never an exception.
        """
        from hypothesis import given, settings, strategies as st

        from maild.relay.client import SessionError

        @settings(max_examples=300, deadline=None)
        @given(st.lists(st.binary(max_size=300), max_size=20))
        def check(pieces):
            client, _ = self.reader()
            outcomes = []
            for _ in range(5):
                client.expect(5).addCallbacks(outcomes.append, lambda f: outcomes.append(f.trap(SessionError)))
            for piece in pieces:
                client.dataReceived(piece)

        check()


class NullSenderTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_nullSenderNeverBounced(self):
        """
        A message with the null sender (a report itself) that the remote
        server refuses is dropped with a log line, never returned: no
        bounce loops (RFC 5321 section 4.5.5).
        """
        from maild.relay import RemoteRecipient

        a, b = yield self.startPair()
        message = a.store.incoming(b"Return-Path: <>\r\n")
        message.write(b"From: MAILER-DAEMON@mx.a.test\r\nSubject: report\r\n\r\nreport\r\n")
        yield a.relay.enqueue(message, "", [], [RemoteRecipient("nobody@b.test")], "", b"Subject: report\r\n")
        yield self.waitFor(lambda: not a.relay.entries)
        [line] = self.deliveryLines()
        self.assertIn("status=bounced dsn=5.1.1", line)
        self.assertTrue(any("its sender is null" in str(e.get("log_format")) for e in self.events))
        self.assertEqual(self.mailOf(a, ALICE), [])
        self.assertEqual(list((a.config.data_dir / "queue").glob("*.*")), [])


class EnvelopeParserTests(unittest.TestCase):
    def test_anyBytesGiveAnEnvelopeOrValueError(self):
        """
        Whatever a damaged envelope file holds, reading it gives an
        envelope or ValueError (the file is then moved aside), never
        another exception; a written envelope reads back the same.
        """
        from hypothesis import given, settings, strategies as st

        from maild.relay.queue import QueueEntry, Recipient

        @settings(max_examples=300, deadline=None)
        @given(st.one_of(st.binary(max_size=300), st.from_regex(rb'\A\{"id": ?"[0-9A-F]{1,20}".{0,200}', fullmatch=False), st.just(b"[" * 100000)))
        def check(data):
            try:
                QueueEntry.fromJSON(data)
            except ValueError:
                pass

        check()
        entry = QueueEntry("0A1B", "alice@a.test", [Recipient("bob@b.test", "sent", 2, "250 ok")], 1.5, 2.5, "alice@a.test", ["Date: x"], True, "sig")
        self.assertEqual(QueueEntry.fromJSON(entry.toJSON()), entry)


class SharedQueueTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_twoProcessesOneQueue(self):
        """
        Two daemons sharing one data folder (--workers, or nodes on shared
        storage) both know the queued messages and both act on a flush:
        each message is still sent once, since an attempt holds a lock on
        the message file and starts from the recipients' state on disk.
        """
        bPort = freePort()
        relay = {"routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0}
        first = yield self.startMaild("a1", ["a.test"], {ALICE: PASSWORD}, relay=relay)
        for n in range(10):
            yield self.submit(first, [BOB], outgoing(f"shared {n}"))
        yield self.waitFor(lambda: len(self.deliveryLines()) == 10)
        second = yield self.startMaild(
            "a2", ["a.test"], {}, relay=relay, data_dir=first.config.data_dir, listeners=()
        )
        self.assertEqual(len(second.relay.entries), 10)
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        self.cli(first, "queue", "flush")
        yield self.waitFor(lambda: not first.relay.entries and not second.relay.entries)
        subjects = sorted(email.message_from_bytes(m)["Subject"] for m in self.mailOf(b, BOB))
        self.assertEqual(subjects, sorted(f"shared {n}" for n in range(10)))


class AttemptLimitTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_fewAttemptsAtOnce(self):
        """
        With more messages due than MAX_ATTEMPTS (each attempt holds a
        lock, so a file descriptor), the rest wait their turn and follow
        as attempts end: all are delivered, never more in hand at once.
        """
        from maild.relay import relay as relayModule

        self.patch(relayModule, "MAX_ATTEMPTS", 2)
        bPort = freePort()
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={"routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0},
        )
        for n in range(12):
            yield self.submit(a, [BOB], outgoing(f"turn {n}"))
        yield self.waitFor(lambda: len(self.deliveryLines()) == 12)
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        inHand = []
        original = a.relay._start
        self.patch(a.relay, "_start", lambda entry: (inHand.append(len(a.relay._claims)), original(entry)))
        self.cli(a, "queue", "flush")
        yield self.waitFor(lambda: not a.relay.entries)
        self.assertEqual(len(self.mailOf(b, BOB)), 12)
        self.assertLessEqual(max(inHand), 1)


class DKIMKeyTests(unittest.TestCase):
    def test_keyMadeByAnotherProcessWins(self):
        """
        Processes starting together on one data folder (--workers) may
        each make a domain's key: the first complete file stays, the
        others use it, and no temporary file is left.
        """
        from maild.relay import dkim as relayDKIM

        folder = Path(self.mktemp())
        keys = relayDKIM.DKIMKeys(folder)
        keys.ensure(["a.test"])
        first = sorted((p.name, p.read_bytes()) for p in (folder / "a.test").iterdir())
        relayDKIM._writePrivate(folder / "a.test" / "rsa.key", b"another process's key")
        again = relayDKIM.DKIMKeys(folder)
        again.ensure(["a.test"])
        self.assertEqual(sorted((p.name, p.read_bytes()) for p in (folder / "a.test").iterdir()), first)
        self.assertEqual(again.keysFor("a.test"), keys.keysFor("a.test"))


class ConnectionReuseTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_idleConnectionCarriesTheNextMessage(self):
        """
        A connection left without work waits connection_idle_time for
        more: a message queued meanwhile goes out on it (conn_use=2 in its
        delivery line) rather than on a new connection.
        """
        a, b = yield self.startPair(connection_idle_time=60.0)
        yield self.submit(a, [BOB], outgoing("First"))
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) == 1 and not a.relay.entries)
        self.assertEqual(len(a.relay._sessions), 1)
        yield self.submit(a, [BOB], outgoing("Second"))
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) == 2 and not a.relay.entries)
        first, second = self.deliveryLines()
        self.assertNotIn("conn_use", first)
        self.assertIn("status=sent dsn=2.0.0", second)
        self.assertRegex(second, r" delay=\d+\.\ds conn_use=2 reply=")

    @defer.inlineCallbacks
    def test_idleConnectionClosedMeanwhile(self):
        """
        When an idle connection is closed (by the server, say), the next
        message goes out on a new one: it is not deferred.
        """
        a, b = yield self.startPair(connection_idle_time=60.0)
        yield self.submit(a, [BOB], outgoing("First"))
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) == 1 and not a.relay.entries)
        [session] = a.relay._sessions
        session.client.transport.loseConnection()
        yield self.waitFor(lambda: not a.relay._sessions)
        yield self.submit(a, [BOB], outgoing("Second"))
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) == 2 and not a.relay.entries)
        first, second = self.deliveryLines()
        self.assertIn("status=sent", second)
        self.assertNotIn("conn_use", second)

    @defer.inlineCallbacks
    def test_idleConnectionClosesAfterIdleTime(self):
        """
        Once connection_idle_time passes without work, the connection says
        QUIT and closes.
        """
        a, b = yield self.startPair(connection_idle_time=0.05)
        yield self.submit(a, [BOB], outgoing("Only"))
        yield self.waitFor(lambda: len(self.mailOf(b, BOB)) == 1 and not a.relay.entries)
        yield self.waitFor(lambda: not a.relay._sessions and not a.relay._connections)


class TransactionPipeliningTests(unittest.TestCase):
    """
    L{OutboundSession.transfer} driven without a network.
    """

    def session(self, extensions):
        from twisted.internet.testing import StringTransport

        from maild.relay.client import OutboundSession, SessionSettings, SMTPClient

        client = SMTPClient(task.Clock())
        client.makeConnection(StringTransport())
        session = OutboundSession(
            client, SessionSettings("mx.a.test", 300.0, 600.0, tlsOptions=None), "mx.b.test"
        )
        session.extensions = extensions
        return session, client.transport

    def test_nextTransactionFollowsTheEndOfData(self):
        """
        With PIPELINING, once a message's data is sent the next
        transaction may begin (RFC 2920 section 3.1): its MAIL, RCPT and
        DATA follow the end of data without waiting for its reply, and
        each transaction gets its own replies, in order.
        """
        session, transport = self.session({"PIPELINING": []})
        first = session.transfer("alice@a.test", ["bob@b.test"], b"Subject: 1\r\n\r\none\r\n")
        self.assertEqual(
            transport.value(), b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nDATA\r\n"
        )
        transport.clear()
        session.client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(transport.value(), b"Subject: 1\r\n\r\none\r\n.\r\n")
        self.successResultOf(first.sent)
        self.assertNoResult(first.outcome)
        transport.clear()
        second = session.transfer("alice@a.test", ["carol@b.test"], b"Subject: 2\r\n\r\ntwo\r\n")
        self.assertEqual(
            transport.value(), b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<carol@b.test>\r\nDATA\r\n"
        )
        transport.clear()
        session.client.dataReceived(b"250 2.0.0 first queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        outcome = self.successResultOf(first.outcome)
        self.assertEqual(str(outcome["bob@b.test"]), "250 2.0.0 first queued")
        self.assertEqual(transport.value(), b"Subject: 2\r\n\r\ntwo\r\n.\r\n")
        session.client.dataReceived(b"451 4.3.0 second failed\r\n")
        outcome = self.successResultOf(second.outcome)
        self.assertEqual(str(outcome["carol@b.test"]), "451 4.3.0 second failed")
        # A final reply ends the transaction: no RSET follows.
        self.assertNotIn(b"RSET", transport.value())

    def test_withoutPipeliningTheNextWaits(self):
        """
        Without PIPELINING a transaction counts as sent only once its final
        reply is in.
        """
        session, transport = self.session({})
        first = session.transfer("alice@a.test", ["bob@b.test"], b"Subject: 1\r\n\r\none\r\n")
        session.client.dataReceived(b"250 ok\r\n")
        session.client.dataReceived(b"250 ok\r\n")
        session.client.dataReceived(b"354 go\r\n")
        self.assertTrue(transport.value().endswith(b".\r\n"))
        self.assertNoResult(first.sent)
        session.client.dataReceived(b"250 ok\r\n")
        self.successResultOf(first.sent)
        self.assertEqual(str(self.successResultOf(first.outcome)["bob@b.test"]), "250 ok")

    def test_refusedTransactionIsReset(self):
        """
        A transaction that ends before its data (every recipient refused)
        is cleared with RSET before it counts as sent.
        """
        session, transport = self.session({"PIPELINING": []})
        first = session.transfer("alice@a.test", ["x@b.test"], b"Subject: 1\r\n\r\none\r\n")
        transport.clear()
        session.client.dataReceived(b"250 ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n")
        self.assertEqual(transport.value(), b"RSET\r\n")
        self.assertNoResult(first.sent)
        session.client.dataReceived(b"250 ok\r\n")
        self.successResultOf(first.sent)
        self.assertEqual(self.successResultOf(first.outcome)["x@b.test"].code, 550)


class QueueIndexTests(TwoServersTestCase):
    @defer.inlineCallbacks
    def test_signaturesKeptOnDiskBetweenAttempts(self):
        """
        Between attempts the in-memory index does not hold a message's
        DKIM signatures (about 1 KB each): they stay in its envelope, and
        the next attempt sends those same signatures.
        """
        import json

        bPort = freePort()
        a = yield self.startMaild(
            "a", ["a.test"], {ALICE: PASSWORD},
            relay={"routes": {"b.test": f"127.0.0.1:{bPort}"}, "scan_interval": 0.05, "retry_first": 3600.0},
        )
        yield self.submit(a, [BOB], outgoing("Signed once"))
        yield self.waitFor(lambda: "1 attempt(s)" in self.cli(a, "queue", "list"))
        yield self.waitFor(lambda: not a.relay._claims)
        [entry] = a.relay.entries.values()
        self.assertEqual(entry.signatures, "")
        stored = json.loads(a.relay.queue.envelopePath(entry.id).read_bytes())["signatures"]
        self.assertEqual(stored.count("DKIM-Signature:"), 2)
        b = yield self.startMaild("b", ["b.test"], {BOB: PASSWORD}, ports={"smtp": bPort})
        self.cli(a, "queue", "flush")
        yield self.waitFor(lambda: self.mailOf(b, BOB) and not a.relay.entries)
        [received] = self.mailOf(b, BOB)
        self.assertIn(stored.replace("\r\n", "\n").encode("ascii"), received)


class ReadIfCachedTests(unittest.TestCase):
    def test_cachedFileReadWhole(self):
        """
        A file just written (in the page cache) is read whole without a
        thread, where the file system can tell (tmpfs and NFS cannot:
        None, and the queue reads it in a thread).
        """
        from maild.relay.queue import readIfCached

        path = Path(self.mktemp())
        path.write_bytes(b"x" * 10_000 + b"\n")
        self.assertIn(readIfCached(path), (b"x" * 10_000 + b"\n", None))
        path.write_bytes(b"")
        self.assertIn(readIfCached(path), (b"", None))

    def test_missingFile(self):
        """
        A message deleted meanwhile is a FileNotFoundError, as from a
        thread.
        """
        from maild.relay.queue import readIfCached

        self.assertRaises(FileNotFoundError, readIfCached, Path(self.mktemp()))


class _ManualCommitter:
    """
    Runs the queue's blocking work only when the test says so.
    """

    def __init__(self) -> None:
        self.pending: list = []

    def callInPool(self, f, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append((d, f, args))
        return d

    def runPending(self) -> None:
        pending, self.pending = self.pending, []
        for d, f, args in pending:
            try:
                result = f(*args)
            except Exception:
                d.errback()
            else:
                d.callback(result)


class QueueBatchTests(unittest.TestCase):
    def setUp(self):
        from maild.relay.queue import OutboundQueue

        self.committer = _ManualCommitter()
        self.path = Path(self.mktemp())
        self.path.mkdir()
        self.queue = OutboundQueue(self.path, self.committer)

    def queued(self, queueId: str):
        from maild.relay.queue import QueueEntry, Recipient

        (self.path / f"{queueId}.msg").write_bytes(b"Subject: x\n\nbody\n")
        entry = QueueEntry(id=queueId, sender=ALICE, recipients=[Recipient(BOB)], arrival=0.0, nextTry=0.0)
        (self.path / f"{queueId}.env").write_bytes(entry.toJSON())
        return entry, self.queue.claim(entry)

    def isOpen(self, fd: int) -> bool:
        import os

        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    def test_removalClosesLockInPool(self):
        """
        A message removed with its lock: the lock stays held until its
        files are gone, and is closed in the committer's thread (closing
        the last descriptor of an unlinked file frees its inode, a
        journal write that must not block the reactor), never before.
        """
        _, claim = self.queued("00000001000010001")
        removed = self.queue.remove("00000001000010001", claim)
        self.assertTrue(self.isOpen(claim))
        self.assertTrue((self.path / "00000001000010001.msg").exists())
        self.committer.runPending()
        self.successResultOf(removed)
        self.assertFalse(self.isOpen(claim))
        self.assertEqual(list(self.path.iterdir()), [])

    def test_failedChangeLeavesBatchDone(self):
        """
        A change of the queue that fails (here its envelope cannot be
        written) fails alone: the others grouped with it are made, and a
        removal's lock is closed.
        """
        first, firstClaim = self.queued("00000001000010001")
        broken, brokenClaim = self.queued("00000002000010001")
        _, claim = self.queued("00000003000010001")
        (self.path / "00000002000010001.tmp").mkdir()
        # The first change is being written; the next two wait, grouped.
        self.queue.remove(first.id, firstClaim)
        saved = self.queue.save(broken)
        removed = self.queue.remove("00000003000010001", claim)
        self.committer.runPending()
        self.committer.runPending()
        self.failureResultOf(saved, IsADirectoryError)
        self.successResultOf(removed)
        self.assertFalse(self.isOpen(claim))
        self.assertFalse((self.path / "00000003000010001.msg").exists())
        self.assertEqual(len(self.flushLoggedErrors(IsADirectoryError)), 1)
        import os

        os.close(brokenClaim)


class AccessTimeTests(unittest.TestCase):
    def test_queueFilesReadWithoutAccessTime(self):
        """
        Reading a queued message or its envelope leaves the file's access
        time alone (O_NOATIME): with relatime the first read after a write
        would change it, a journal write in the reactor thread for each
        file sent.
        """
        import os

        from maild.relay.queue import readIfCached, readWithoutAtime

        path = Path(self.mktemp())
        path.write_bytes(b"Subject: x\n\nbody\n")
        before = os.stat(path)
        # An access time older than the change: relatime updates it at the
        # next read.
        os.utime(path, ns=(before.st_mtime_ns - 10**9, before.st_mtime_ns))
        atime = os.stat(path).st_atime_ns
        self.assertEqual(readWithoutAtime(path), b"Subject: x\n\nbody\n")
        self.assertIn(readIfCached(path), (b"Subject: x\n\nbody\n", None))
        self.assertEqual(os.stat(path).st_atime_ns, atime)


def _stuffedReference(message: bytes) -> bytes:
    """
    DATA as RFC 5321 section 4.5.2 wants it, the plain way: every line
    end (CRLF, LF or CR) made CRLF, a dot added before each line that
    begins with one, the end marker after a final line end.
    """
    lines = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


class MessageDataTests(unittest.TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b" "]), max_size=40).map(b"".join))
    def test_sentAsDATA(self, message):
        """
        Whatever its line ends (the relay's are CRLF, which take the short
        way), a message goes out with CRLF line ends, dot-stuffed, and
        ended by the end marker.
        """
        from twisted.internet.testing import StringTransport

        from maild.relay.client import SMTPClient

        transport = StringTransport()
        client = SMTPClient(task.Clock())
        client.makeConnection(transport)
        client.sendMessage(message)
        self.assertEqual(transport.value(), _stuffedReference(message))
