"""
Client autoconfiguration: the settings a mail client needs, derived from
the listeners that are really up, written in each client family's format.

- Thunderbird (and K-9, FairEmail, Evolution): the autoconfig XML
  (C{config-v1.1.xml}, Mozilla's "clientConfig" format).
- Outlook, and Thunderbird's second try: Autodiscover's POX XML.
- iOS and macOS: an (unsigned) C{.mobileconfig} profile.
- A person: a short HTML page with the same settings.

Only TLS is ever offered: implicit TLS first (RFC 8314 section 4.1), then
STARTTLS; a listener without TLS would send passwords in the clear.
"""

from __future__ import annotations

import hashlib
import html
import plistlib
import uuid
from dataclasses import dataclass
from typing import Iterable
from xml.etree import ElementTree as ET

from maild.names import InvalidName, normalizeAddress, normalizeDomain

# (listener, protocol, socket type) in the order clients should prefer.
PREFERENCE = (
    ("imaps", "imap", "SSL"),
    ("imap", "imap", "STARTTLS"),
    ("pop3s", "pop3", "SSL"),
    ("pop3", "pop3", "STARTTLS"),
    ("smtps", "smtp", "SSL"),
    ("submission", "smtp", "STARTTLS"),
)


@dataclass(frozen=True)
class Server:
    """
    One way in: C{protocol} ("imap", "pop3" or "smtp") at C{hostname}:C{port},
    with C{socketType} "SSL" (TLS from the first byte) or "STARTTLS".
    """

    protocol: str
    hostname: str
    port: int
    socketType: str

    @property
    def incoming(self) -> bool:
        return self.protocol != "smtp"


def servers(hostname: str, ports: dict[str, int]) -> list[Server]:
    """
    The servers to offer, best first, from the listeners that are up:
    C{ports} maps a listener's name to the TCP port it is bound to.
    """
    return [
        Server(protocol, hostname, ports[name], socketType)
        for name, protocol, socketType in PREFERENCE
        if name in ports
    ]


class UnknownDomain(Exception):
    """
    The request names no local domain: no configuration is given for
    someone else's domain.
    """


class BadAddress(ValueError):
    pass


def requestedDomain(
    domains: Iterable[str], address: str | None, host: str | None
) -> tuple[str, str | None]:
    """
    The local domain a request is about, and the address it names (if
    any): the C{emailaddress} parameter's domain, else the C{Host} header
    (C{autoconfig.example.org}, C{autodiscover.example.org} or the domain
    itself).

    @raise BadAddress: C{address} is not a valid address.
    @raise UnknownDomain: it is not about a local domain.
    """
    domains = tuple(domains)
    if address:
        try:
            address = normalizeAddress(address)
        except InvalidName as e:
            raise BadAddress(str(e))
        domain = address.rpartition("@")[2]
    else:
        address = None
        name = (host or "").rpartition(":")[0] if (host or "").count(":") == 1 else (host or "")
        for prefix in ("autoconfig.", "autodiscover."):
            if name.lower().startswith(prefix):
                name = name[len(prefix):]
        try:
            domain = normalizeDomain(name)
        except InvalidName:
            raise UnknownDomain(name)
    if domain not in domains:
        raise UnknownDomain(domain)
    return domain, address


def thunderbirdXML(domain: str, offered: list[Server], displayName: str) -> bytes:
    """
    Mozilla's autoconfig document (clientConfig version 1.1).
    """
    root = ET.Element("clientConfig", version="1.1")
    provider = ET.SubElement(root, "emailProvider", id=domain)
    ET.SubElement(provider, "domain").text = domain
    ET.SubElement(provider, "displayName").text = displayName
    ET.SubElement(provider, "displayShortName").text = domain
    for server in offered:
        tag = "incomingServer" if server.incoming else "outgoingServer"
        element = ET.SubElement(provider, tag, type=server.protocol)
        ET.SubElement(element, "hostname").text = server.hostname
        ET.SubElement(element, "port").text = str(server.port)
        ET.SubElement(element, "socketType").text = server.socketType
        ET.SubElement(element, "authentication").text = "password-cleartext"
        ET.SubElement(element, "username").text = "%EMAILADDRESS%"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


AUTODISCOVER_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
AUTODISCOVER_OUTLOOK = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


def autodiscoverAddress(body: bytes) -> str | None:
    """
    The C{EMailAddress} of an Autodiscover POX request, or None.  (Python's
    expat refuses external entities and bounds entity expansion.)
    """
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.rpartition("}")[2] == "EMailAddress" and element.text:
            return element.text.strip()
    return None


def autodiscoverXML(address: str, offered: list[Server]) -> bytes:
    """
    Autodiscover's POX answer (the "outlook" response schema): one
    C{Protocol} per server, best first.
    """
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_RESPONSE)
    response = ET.SubElement(root, "Response", xmlns=AUTODISCOVER_OUTLOOK)
    account = ET.SubElement(response, "Account")
    ET.SubElement(account, "AccountType").text = "email"
    ET.SubElement(account, "Action").text = "settings"
    for server in offered:
        protocol = ET.SubElement(account, "Protocol")
        ET.SubElement(protocol, "Type").text = {"imap": "IMAP", "pop3": "POP3", "smtp": "SMTP"}[
            server.protocol
        ]
        ET.SubElement(protocol, "Server").text = server.hostname
        ET.SubElement(protocol, "Port").text = str(server.port)
        ET.SubElement(protocol, "LoginName").text = address
        ET.SubElement(protocol, "DomainRequired").text = "off"
        ET.SubElement(protocol, "SPA").text = "off"
        # "SSL" is TLS from the first byte; "TLS" is STARTTLS.
        ET.SubElement(protocol, "Encryption").text = "SSL" if server.socketType == "SSL" else "TLS"
        ET.SubElement(protocol, "AuthRequired").text = "on"
        if not server.incoming:
            ET.SubElement(protocol, "UsePOPAuth").text = "off"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def mobileconfig(
    address: str, offered: list[Server], hostname: str, authority: bytes | None = None
) -> bytes:
    """
    An Apple configuration profile with one mail account (IMAP if offered,
    else POP3), unsigned.  Its identifiers are stable for one address, so
    installing it again replaces the account rather than adding another.

    @param authority: the DER certificate of the local CA that signs the
        listeners' certificate, if maild made it: the profile then carries
        it too, so that the device can trust the server from the same
        download (iOS still asks the user to turn on full trust for it, in
        Settings, General, About, Certificate Trust Settings).
    """
    incoming = next((s for s in offered if s.incoming), None)
    outgoing = next((s for s in offered if not s.incoming), None)
    if incoming is None or outgoing is None:
        raise UnknownDomain("no incoming or no outgoing listener is up")
    namespace = uuid.uuid5(uuid.NAMESPACE_DNS, hostname)
    identifier = ".".join(reversed(hostname.split("."))) + ".maild"
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.account.{address}",
        "PayloadUUID": str(uuid.uuid5(namespace, "account:" + address)).upper(),
        "PayloadDisplayName": address,
        "EmailAccountDescription": address,
        "EmailAccountType": "EmailTypeIMAP" if incoming.protocol == "imap" else "EmailTypePOP",
        "EmailAddress": address,
        "IncomingMailServerHostName": incoming.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerUsername": address,
        "OutgoingMailServerHostName": outgoing.hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
    }
    payloads = [account]
    if authority is not None:
        payloads.insert(0, {
            "PayloadType": "com.apple.security.root",
            "PayloadVersion": 1,
            "PayloadIdentifier": f"{identifier}.ca",
            "PayloadUUID": str(uuid.uuid5(namespace, "ca:" + hashlib.sha256(authority).hexdigest())).upper(),
            "PayloadDisplayName": f"Local mail CA of {hostname}",
            "PayloadCertificateFileName": "maild-ca.cer",
            "PayloadContent": authority,
        })
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{identifier}.profile.{address}",
        "PayloadUUID": str(uuid.uuid5(namespace, "profile:" + address)).upper(),
        "PayloadDisplayName": f"Mail for {address}",
        "PayloadDescription": f"Sets up {address} on {hostname}.",
        "PayloadRemovalDisallowed": False,
        "PayloadContent": payloads,
    }
    return plistlib.dumps(profile)


def settingsPage(domains: Iterable[str], offered: list[Server], hostname: str) -> bytes:
    """
    The HTML page for a person setting a client up by hand.
    """
    rows = "".join(
        f"<tr><td>{'Incoming' if s.incoming else 'Outgoing'}</td>"
        f"<td>{s.protocol.upper()}</td><td>{html.escape(s.hostname)}</td><td>{s.port}</td>"
        f"<td>{'SSL/TLS' if s.socketType == 'SSL' else 'STARTTLS'}</td></tr>"
        for s in offered
    )
    links = "".join(
        f"<li>{html.escape(d)}: "
        f'<a href="/mail/config-v1.1.xml?emailaddress=you%40{html.escape(d)}">Thunderbird</a></li>'
        for d in domains
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Mail settings for {html.escape(hostname)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body>
<h1>Mail settings for {html.escape(hostname)}</h1>
<p>User name: your full email address. Password: the one you were given.
Authentication: normal password.</p>
<table border="1" cellpadding="4">
<tr><th></th><th>Protocol</th><th>Server</th><th>Port</th><th>Security</th></tr>
{rows}
</table>
<h2>Set up automatically</h2>
<p>Thunderbird finds these settings by itself from your address. On an iPhone,
iPad or Mac, open <code>/profile/<i>your address</i>.mobileconfig</code> on this
server and install the profile.</p>
<ul>{links}</ul>
</body></html>
"""
    return page.encode("utf-8")
