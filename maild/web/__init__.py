"""
The HTTP listeners (twisted.web): client autoconfiguration, metrics,
health, and the developer mode's JSON API.

The resources only read the service's state (its listeners, its config,
its store); they decide nothing about mail.
"""

from __future__ import annotations

import ssl
from urllib.parse import unquote

from prometheus_client.twisted import MetricsResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server, static

from maild.auth import isTrusted
from maild.metrics import REGISTRY
from maild.web import autoconfig
from maild.web.answers import PlainAnswer
from maild.web.health import Health

log = Logger()

# The largest request body read (Autodiscover's POST, the dev API).
MAX_BODY = 64 * 1024


def _offered(service) -> list[autoconfig.Server]:
    return autoconfig.servers(service.config.hostname, service.boundPorts())


def _host(request) -> str:
    return (request.getHeader(b"host") or b"").decode("ascii", "replace")


class ThunderbirdConfig(resource.Resource):
    """
    C{config-v1.1.xml}, for the domain of C{?emailaddress=} or of the
    C{Host} (C{autoconfig.<domain>}).
    """

    isLeaf = True

    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def render_GET(self, request):
        address = request.args.get(b"emailaddress", [b""])[0].decode("utf-8", "replace")
        try:
            domain, _ = autoconfig.requestedDomain(
                self.service.config.domains, address or None, _host(request)
            )
        except autoconfig.BadAddress:
            return PlainAnswer(http.BAD_REQUEST, "not a valid email address").render(request)
        except autoconfig.UnknownDomain:
            return PlainAnswer(http.NOT_FOUND, "no mail service for that domain here").render(request)
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return autoconfig.thunderbirdXML(
            domain, _offered(self.service), f"{domain} mail ({self.service.config.hostname})"
        )


class Autodiscover(resource.Resource):
    """
    Autodiscover's POX endpoint: POST with the address in the body.
    """

    isLeaf = True

    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def render_POST(self, request):
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return PlainAnswer(http.REQUEST_ENTITY_TOO_LARGE, "request too large").render(request)
        address = autoconfig.autodiscoverAddress(body)
        if address is None:
            return PlainAnswer(http.BAD_REQUEST, "no EMailAddress in the request").render(request)
        try:
            _, address = autoconfig.requestedDomain(self.service.config.domains, address, None)
        except autoconfig.BadAddress:
            return PlainAnswer(http.BAD_REQUEST, "not a valid email address").render(request)
        except autoconfig.UnknownDomain:
            return PlainAnswer(http.NOT_FOUND, "no mail service for that domain here").render(request)
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return autoconfig.autodiscoverXML(address, _offered(self.service))

    # Outlook asks with GET first on some paths; the answer is the same
    # refusal as for a bad body.
    def render_GET(self, request):
        return PlainAnswer(http.BAD_REQUEST, "POST the Autodiscover request").render(request)


def _localAuthority(service) -> bytes | None:
    """
    The DER certificate of maild's own CA, when it signs the listeners'
    certificate (not when the configuration names certificate files).
    """
    if service.localCA is None:
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(service.localCA.certPath.read_text("ascii"))
    except (OSError, ValueError):
        return None


class AppleProfiles(resource.Resource):
    """
    C{/profile/<address>.mobileconfig}.
    """

    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def getChild(self, name: bytes, request):
        text = unquote(name.decode("utf-8", "replace"))
        if not text.endswith(".mobileconfig") or request.postpath:
            return PlainAnswer(http.NOT_FOUND, "no such profile")
        try:
            _, address = autoconfig.requestedDomain(
                self.service.config.domains, text[: -len(".mobileconfig")], None
            )
            profile = autoconfig.mobileconfig(
                address, _offered(self.service), self.service.config.hostname,
                _localAuthority(self.service),
            )
        except autoconfig.BadAddress:
            return PlainAnswer(http.BAD_REQUEST, "not a valid email address")
        except autoconfig.UnknownDomain:
            return PlainAnswer(http.NOT_FOUND, "no mail service for that domain here")
        return static.Data(profile, "application/x-apple-aspen-config")


class SettingsPage(resource.Resource):
    isLeaf = True

    def __init__(self, service) -> None:
        resource.Resource.__init__(self)
        self.service = service

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return PlainAnswer(http.NOT_FOUND, "not found").render(request)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return autoconfig.settingsPage(
            self.service.config.domains, _offered(self.service), self.service.config.hostname
        )


class TrustedOnly(resource.Resource):
    """
    Serves C{wrapped} to clients in C{limits.trusted_networks} only.
    """

    def __init__(self, wrapped: resource.Resource, networks) -> None:
        resource.Resource.__init__(self)
        self.wrapped = wrapped
        self.networks = networks

    def getChildWithDefault(self, name, request):
        return self._pick(request).getChildWithDefault(name, request)

    def render(self, request):
        return self._pick(request).render(request)

    def _pick(self, request) -> resource.Resource:
        if isTrusted(request.getClientAddress().host, self.networks):
            return self.wrapped
        return PlainAnswer(http.FORBIDDEN, "metrics are served to trusted networks only")


class _CaseInsensitive(resource.Resource):
    """
    A folder whose children are found whatever the case of their names
    (Outlook asks for C{/Autodiscover/Autodiscover.xml}).
    """

    def getChild(self, name: bytes, request):
        return self.children.get(name.lower(), PlainAnswer(http.NOT_FOUND, "not found"))


def makeRoot(service) -> resource.Resource:
    """
    Every HTTP resource of the daemon C{service} (a
    L{maild.service.MailService}).
    """
    root = resource.Resource()
    root.putChild(b"", SettingsPage(service))
    thunderbird = ThunderbirdConfig(service)
    wellKnown = resource.Resource()
    autoconfigFolder = resource.Resource()
    mailFolder = resource.Resource()
    mailFolder.putChild(b"config-v1.1.xml", thunderbird)
    autoconfigFolder.putChild(b"mail", mailFolder)
    wellKnown.putChild(b"autoconfig", autoconfigFolder)
    root.putChild(b".well-known", wellKnown)
    root.putChild(b"mail", mailFolder)
    autodiscover = _CaseInsensitive()
    autodiscover.putChild(b"autodiscover.xml", Autodiscover(service))
    root.putChild(b"autodiscover", autodiscover)
    root.putChild(b"Autodiscover", autodiscover)
    root.putChild(b"profile", AppleProfiles(service))
    metrics = MetricsResource(registry=REGISTRY)
    if service.config.web.metrics == "trusted":
        metrics = TrustedOnly(metrics, service.config.limits.trusted_networks)
    root.putChild(b"metrics", metrics)
    root.putChild(b"healthz", Health(service))
    if service.config.dev.enabled:
        from maild.web.devapi import MessagesAPI

        api = resource.Resource()
        api.putChild(b"messages", MessagesAPI(service))
        root.putChild(b"api", api)
    return root


class _Channel(http.HTTPChannel):
    def connectionLost(self, reason) -> None:
        http.HTTPChannel.connectionLost(self, reason)
        self.factory.channelClosed(self)


class WebFactory(server.Site):
    """
    The HTTP listener's factory: twisted.web's Site with the mail
    listeners' per-address connection limit (trusted networks exempt) and
    an idle timeout, and a way to close every connection when the daemon
    stops.
    """

    protocol = _Channel
    noisy = False

    def __init__(self, root, limit: int, trustedNetworks, timeout: float) -> None:
        server.Site.__init__(self, root, timeout=timeout)
        self.limit = limit
        self.trustedNetworks = trustedNetworks
        self.perHost: dict[str, int] = {}
        self.channels: set = set()

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        trusted = isTrusted(host, self.trustedNetworks)
        if not trusted and self.perHost.get(host, 0) >= self.limit:
            return None
        channel = server.Site.buildProtocol(self, addr)
        channel.clientHost = host
        self.perHost[host] = self.perHost.get(host, 0) + 1
        self.channels.add(channel)
        return channel

    def channelClosed(self, channel) -> None:
        if channel in self.channels:
            self.channels.discard(channel)
            self.perHost[channel.clientHost] -= 1
            if not self.perHost[channel.clientHost]:
                del self.perHost[channel.clientHost]

    def closeSessions(self, clock, grace: float = 5.0) -> defer.Deferred:
        for channel in list(self.channels):
            channel.transport.loseConnection()
        return defer.succeed(None)
