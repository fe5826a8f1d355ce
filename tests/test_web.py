"""
The HTTP listeners: client autoconfiguration documents checked field by
field against the listeners that are really up, metrics that move, health
that turns 503, and the HTTP listener's own limits.
"""

from __future__ import annotations

import plistlib
import poplib
import re
import smtplib
import ssl
import subprocess
import urllib.error
import urllib.request
from xml.etree import ElementTree as ET

from twisted.internet import defer

from tests.support import PASSWORD, RawClient, ServerTestCase, clientContext, sampleMessage

MAIL_LISTENERS = ("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps")


def fetch(port: int, path: str, method: str = "GET", body: bytes | None = None,
          headers: dict | None = None, https: ssl.SSLContext | None = None) -> tuple[int, dict, bytes]:
    """
    One HTTP request to the daemon: status, headers, body (also for 4xx/5xx).
    """
    scheme = "https" if https else "http"
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=https) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class AutoconfigTests(ServerTestCase):
    listeners = MAIL_LISTENERS + ("http", "https")

    def get(self, path: str, **kwargs):
        return self.inThread(fetch, self.port("http"), path, **kwargs)

    def expectedServers(self):
        ports = {name: self.port(name) for name in MAIL_LISTENERS}
        return [
            ("imap", ports["imaps"], "SSL"),
            ("imap", ports["imap"], "STARTTLS"),
            ("pop3", ports["pop3s"], "SSL"),
            ("pop3", ports["pop3"], "STARTTLS"),
            ("smtp", ports["smtps"], "SSL"),
            ("smtp", ports["submission"], "STARTTLS"),
        ]

    def checkThunderbird(self, body: bytes, domain: str):
        root = ET.fromstring(body)
        self.assertEqual(root.tag, "clientConfig")
        self.assertEqual(root.get("version"), "1.1")
        [provider] = root.findall("emailProvider")
        self.assertEqual(provider.get("id"), domain)
        self.assertEqual([d.text for d in provider.findall("domain")], [domain])
        self.assertTrue(provider.findtext("displayName"))
        servers = []
        for element in provider:
            if element.tag not in ("incomingServer", "outgoingServer"):
                continue
            # Thunderbird's reader (readFromXML): these children, these values.
            self.assertEqual(element.findtext("hostname"), "mx.test")
            self.assertIn(element.findtext("socketType"), ("SSL", "STARTTLS"))
            self.assertEqual(element.findtext("authentication"), "password-cleartext")
            self.assertEqual(element.findtext("username"), "%EMAILADDRESS%")
            self.assertEqual(element.tag == "outgoingServer", element.get("type") == "smtp")
            servers.append((element.get("type"), int(element.findtext("port")), element.findtext("socketType")))
        # IMAP, then POP3, then SMTP; implicit TLS before STARTTLS; the MX
        # port and any plaintext listener never offered.
        self.assertEqual(servers, self.expectedServers())

    @defer.inlineCallbacks
    def test_thunderbirdBothPaths(self):
        """
        Thunderbird's two autoconfig URLs give the same document, naming
        every TLS listener that is up with its real port, best first.
        """
        for path in ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"):
            status, headers, body = yield self.get(path + "?emailaddress=bob%40example.org")
            self.assertEqual(status, 200)
            self.assertIn("xml", headers["Content-Type"])
            self.checkThunderbird(body, "example.org")

    @defer.inlineCallbacks
    def test_thunderbirdDomainFromHost(self):
        """
        Without C{emailaddress}, the domain is the C{Host} the client asked
        (C{autoconfig.<domain>}).
        """
        status, _, body = yield self.get(
            "/mail/config-v1.1.xml", headers={"Host": "autoconfig.example.org"}
        )
        self.assertEqual(status, 200)
        self.checkThunderbird(body, "example.org")

    @defer.inlineCallbacks
    def test_unknownDomain(self):
        """
        An address of a domain that is not local gets 404, never another
        domain's settings.
        """
        status, _, body = yield self.get("/mail/config-v1.1.xml?emailaddress=eve%40gmail.com")
        self.assertEqual(status, 404)
        self.assertNotIn(b"clientConfig", body)
        status, _, _ = yield self.get("/mail/config-v1.1.xml", headers={"Host": "autoconfig.gmail.com"})
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_markupRefused(self):
        """
        An C{emailaddress} holding markup is refused, and none of it is
        echoed.
        """
        status, _, body = yield self.get(
            "/mail/config-v1.1.xml?emailaddress=%3Cx%3E%3C/emailProvider%3E%40example.org"
        )
        self.assertEqual(status, 400)
        self.assertNotIn(b"<x>", body)

    @defer.inlineCallbacks
    def test_autodiscover(self):
        """
        Autodiscover's POX request gets one Protocol per TLS listener, with
        the address as login name, "SSL" for implicit TLS, "TLS" for STARTTLS.
        """
        request = (
            b'<?xml version="1.0" encoding="utf-8"?>'
            b'<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
            b"<Request><EMailAddress>bob@example.org</EMailAddress>"
            b"<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
            b"</AcceptableResponseSchema></Request></Autodiscover>"
        )
        for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
            status, _, body = yield self.get(path, method="POST", body=request)
            self.assertEqual(status, 200, body)
            ns = {"r": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
            protocols = ET.fromstring(body).findall(".//r:Protocol", ns)
            found = [
                (
                    p.findtext("r:Type", namespaces=ns).lower(),
                    int(p.findtext("r:Port", namespaces=ns)),
                    {"SSL": "SSL", "TLS": "STARTTLS"}[p.findtext("r:Encryption", namespaces=ns)],
                )
                for p in protocols
            ]
            self.assertEqual(found, self.expectedServers())
            for p in protocols:
                self.assertEqual(p.findtext("r:LoginName", namespaces=ns), "bob@example.org")
                self.assertEqual(p.findtext("r:Server", namespaces=ns), "mx.test")

    @defer.inlineCallbacks
    def test_autodiscoverBadRequests(self):
        """
        Autodiscover: not XML, no address, another domain's address, an
        entity-expansion bomb: each a 4xx, and the server goes on.
        """
        bomb = (
            b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY a "aaaaaaaaaa">'
            + b"".join(b'<!ENTITY a%d "&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;&a%s;">'
                       % ((i,) + (b"" if i == 1 else str(i - 1).encode(),) * 10) for i in range(1, 10))
            + b']><Autodiscover><Request><EMailAddress>&a9;</EMailAddress></Request></Autodiscover>'
        )
        for body, code in (
            (b"not xml", 400),
            (b"<Autodiscover/>", 400),
            (b"<a><EMailAddress>eve@gmail.com</EMailAddress></a>", 404),
            (bomb, 400),
        ):
            status, _, _ = yield self.get("/autodiscover/autodiscover.xml", method="POST", body=body)
            self.assertEqual(status, code, body[:60])
        status, _, _ = yield self.get("/mail/config-v1.1.xml?emailaddress=bob%40example.org")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_mobileconfig(self):
        """
        The Apple profile is a valid plist with one mail account: IMAP over
        implicit TLS in, SMTPS out, the address as user name; and the local
        CA that signed the listeners' certificate, so that the device can
        trust them.
        """
        status, headers, body = yield self.get("/profile/bob@example.org.mobileconfig")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/x-apple-aspen-config")
        profile = plistlib.loads(body)
        self.assertEqual(profile["PayloadType"], "Configuration")
        [authority, account] = profile["PayloadContent"]
        self.assertEqual(authority["PayloadType"], "com.apple.security.root")
        self.assertEqual(
            authority["PayloadContent"],
            ssl.PEM_cert_to_DER_cert(self.service.localCA.certPath.read_text("ascii")),
        )
        self.assertEqual(account["PayloadType"], "com.apple.mail.managed")
        self.assertEqual(account["EmailAccountType"], "EmailTypeIMAP")
        self.assertEqual(account["EmailAddress"], "bob@example.org")
        self.assertEqual(account["IncomingMailServerHostName"], "mx.test")
        self.assertEqual(account["IncomingMailServerPortNumber"], self.port("imaps"))
        self.assertEqual(account["OutgoingMailServerPortNumber"], self.port("smtps"))
        self.assertIs(account["IncomingMailServerUseSSL"], True)
        self.assertEqual(account["IncomingMailServerUsername"], "bob@example.org")
        again = yield self.get("/profile/bob@example.org.mobileconfig")
        self.assertEqual(plistlib.loads(again[2])["PayloadUUID"], profile["PayloadUUID"])
        status, _, _ = yield self.get("/profile/eve@gmail.com.mobileconfig")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_settingsPage(self):
        """
        The page for a person names the server and each TLS listener's port.
        """
        status, headers, body = yield self.get("/")
        self.assertEqual(status, 200)
        self.assertIn("text/html", headers["Content-Type"])
        self.assertIn(b"mx.test", body)
        for _, port, _ in self.expectedServers():
            self.assertIn(b"<td>%d</td>" % port, body)
        status, _, _ = yield self.get("/nothing-here")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_https(self):
        """
        The https listener serves the same documents over TLS, with the mail
        listeners' certificate.
        """
        status, _, body = yield self.inThread(
            fetch, self.port("https"), "/mail/config-v1.1.xml?emailaddress=bob%40example.org",
            https=clientContext(self.service),
        )
        self.assertEqual(status, 200)
        self.checkThunderbird(body, "example.org")

    def test_autoconfigForThunderbirdsFileName(self):
        """
        The listener names offered are only those that speak TLS: a daemon
        with only plain IMAP offers it with STARTTLS, and never the MX port.
        """
        from maild.web.autoconfig import servers

        offered = servers("mx.test", {"imap": 143, "smtp": 25})
        self.assertEqual([(s.protocol, s.port, s.socketType) for s in offered], [("imap", 143, "STARTTLS")])


def metricValue(text: str, name: str, **labels) -> float:
    """
    The value of one sample of the Prometheus text format (0 if absent).
    """
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:]+)(\{[^}]*\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


class MetricsTests(ServerTestCase):
    listeners = ("smtp", "submission", "imap", "http")

    def scrape(self):
        def get():
            status, _, body = fetch(self.port("http"), "/metrics")
            assert status == 200, status
            return body.decode()

        return self.inThread(get)

    @defer.inlineCallbacks
    def test_countersMove(self):
        """
        A delivery and a failed login move their counters, the connection
        and octet counters of their listeners, and the DATA-to-reply
        histogram.
        """
        before = yield self.scrape()

        def traffic():
            with smtplib.SMTP("127.0.0.1", self.port("smtp")) as s:
                s.sendmail("carol@remote.test", ["alice@localhost"], sampleMessage())
            client = RawClient(self.port("imap"))
            client.readLine()
            client.send(b'a LOGIN "alice@localhost" "wrong"\r\n')
            reply = client.readLine()
            client.close()
            return reply

        reply = yield self.inThread(traffic)
        self.assertTrue(reply.startswith(b"a NO"), reply)
        after = yield self.scrape()

        def moved(name, **labels):
            return metricValue(after, name, **labels) - metricValue(before, name, **labels)

        self.assertEqual(moved("maild_messages_total", listener="smtp", result="accepted"), 1)
        self.assertEqual(moved("maild_logins_total", protocol="imap", result="failed"), 1)
        self.assertEqual(moved("maild_connections_total", listener="smtp"), 1)
        self.assertEqual(moved("maild_connections_total", listener="imap"), 1)
        self.assertGreater(moved("maild_received_bytes_total", listener="smtp"), len(sampleMessage()))
        self.assertGreater(moved("maild_sent_bytes_total", listener="imap"), 0)
        self.assertEqual(moved("maild_data_reply_seconds_count"), 1)
        self.assertGreaterEqual(moved("maild_store_commit_group_size_count"), 1)
        self.assertGreaterEqual(moved("maild_imap_command_seconds_count", command="LOGIN"), 1)

    @defer.inlineCallbacks
    def test_refusedMessageCounted(self):
        """
        A message refused at the end of DATA is counted with its enhanced
        status code as the reason.
        """
        before = yield self.scrape()

        def send():
            client = RawClient(self.port("smtp"))
            client.readReply()
            client.command(b"EHLO test")
            client.command(b"MAIL FROM:<carol@remote.test>")
            client.command(b"RCPT TO:<alice@localhost>")
            client.command(b"DATA")
            reply = client.command(b"Subject: x\r\n\r\nbare\nLF\r\n.")
            client.close()
            return reply

        code, _ = yield self.inThread(send)
        self.assertEqual(code, 550)
        after = yield self.scrape()
        self.assertEqual(
            metricValue(after, "maild_messages_total", listener="smtp", result="refused", reason="5.6.0")
            - metricValue(before, "maild_messages_total", listener="smtp", result="refused", reason="5.6.0"),
            1,
        )


class MetricsAccessTests(ServerTestCase):
    listeners = ("http",)
    limits = {"trusted_networks": []}

    @defer.inlineCallbacks
    def test_untrustedRefused(self):
        """
        By default /metrics is for trusted networks only: with none trusted,
        loopback gets 403 while the autoconfig documents are still served.
        """
        status, _, _ = yield self.inThread(fetch, self.port("http"), "/metrics")
        self.assertEqual(status, 403)
        status, _, _ = yield self.inThread(fetch, self.port("http"), "/healthz")
        self.assertEqual(status, 200)


class MetricsForAnyoneTests(ServerTestCase):
    listeners = ("http",)
    limits = {"trusted_networks": []}
    configValues = {"web": {"metrics": "anyone"}}

    @defer.inlineCallbacks
    def test_anyone(self):
        """
        C{[web] metrics = "anyone"} serves /metrics to every address.
        """
        status, _, body = yield self.inThread(fetch, self.port("http"), "/metrics")
        self.assertEqual(status, 200)
        self.assertIn(b"maild_connections_total", body)


class HealthTests(ServerTestCase):
    listeners = ("smtp", "imap", "http")

    @defer.inlineCallbacks
    def test_healthy(self):
        """
        Every listener up and the data folder writable: 200, status ok.
        """
        status, _, body = yield self.inThread(fetch, self.port("http"), "/healthz")
        self.assertEqual(status, 200)
        self.assertIn(b'"ok"', body)

    @defer.inlineCallbacks
    def test_listenerDown(self):
        """
        A listener that stopped turns the answer into 503, naming it.
        """
        yield self.service.listeners["imap"].stopService()
        status, _, body = yield self.inThread(fetch, self.port("http"), "/healthz")
        self.assertEqual(status, 503)
        self.assertIn(b"imap", body)

    @defer.inlineCallbacks
    def test_readOnlyDataFolder(self):
        """
        A data folder that takes no write (a read-only file system) turns
        the answer into 503.
        """
        probe = self.dataDir / "tmp"
        probe.mkdir(exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
        if mounted.returncode:
            raise self.skipTest(f"cannot mount a file system here: {mounted.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(probe)])
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(probe)], capture_output=True)
        self.assertEqual(remounted.returncode, 0, remounted.stderr)
        status, _, body = yield self.inThread(fetch, self.port("http"), "/healthz")
        self.assertEqual(status, 503)
        self.assertIn(b"not writable", body)
        subprocess.run(["mount", "-o", "remount,rw", str(probe)], check=True)
        status, _, _ = yield self.inThread(fetch, self.port("http"), "/healthz")
        self.assertEqual(status, 200)


class HTTPLimitTests(ServerTestCase):
    listeners = ("http",)
    limits = {"trusted_networks": [], "connections_per_ip": 2}

    @defer.inlineCallbacks
    def test_perAddressLimit(self):
        """
        The HTTP listener has the mail listeners' per-address connection
        limit: a third connection from one address is closed at once.
        """

        def connect():
            held = [RawClient(self.port("http")) for _ in range(2)]
            extra = RawClient(self.port("http"))
            closedAtOnce = extra.closed(wait=5)
            for client in held + [extra]:
                client.close()
            return closedAtOnce

        closedAtOnce = yield self.inThread(connect)
        self.assertTrue(closedAtOnce)


class LiveCheckTests(ServerTestCase):
    listeners = ("smtp", "submission", "imaps", "pop3", "http", "https")

    def writeConfig(self) -> str:
        listen = "\n".join(
            f'{name} = "tcp:{self.port(name)}:interface=127.0.0.1"' for name in self.listeners
        )
        others = "\n".join(
            f'{name} = "none"' for name in ("smtps", "pop3s", "imap") if name not in self.listeners
        )
        path = self.dataDir.parent / "live.toml"
        path.write_text(
            f'data_dir = "{self.dataDir}"\nhostname = "mx.test"\ndomains = ["localhost", "example.org"]\n'
            f"[listen]\n{listen}\n{others}\n"
        )
        return str(path)

    def runCheck(self, path: str):
        import io

        from maild import cli

        def run():
            out, err = io.StringIO(), io.StringIO()
            status = cli.main(["--config", path, "check", "--live", "--timeout", "5"], io.StringIO(), out, err)
            return status, out.getvalue(), err.getvalue()

        return self.inThread(run)

    @defer.inlineCallbacks
    def test_allUp(self):
        """
        Every listener answers as its protocol should (TLS first on the
        implicit ones, with the configured certificate): exit status 0 and
        one "ok" line each.
        """
        status, out, err = yield self.runCheck(self.writeConfig())
        self.assertEqual(status, 0, out + err)
        lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
        self.assertEqual(len(lines), len(self.listeners), out)
        self.assertTrue(all(line.startswith("ok") for line in lines), out)
        self.assertIn("certificate as configured", "".join(l for l in lines if " imaps " in l))

    @defer.inlineCallbacks
    def test_listenerDown(self):
        """
        A listener that does not answer is reported FAIL and the exit
        status is 1.
        """
        path = self.writeConfig()
        yield self.service.listeners["pop3"].stopService()
        status, out, _ = yield self.runCheck(path)
        self.assertEqual(status, 1)
        [line] = [line for line in out.splitlines() if " pop3 " in line]
        self.assertTrue(line.startswith("FAIL"), line)
