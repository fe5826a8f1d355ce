"""
Outbound mail: the durable queue, the SMTP client to MX hosts, routes or a
smarthost, DKIM signing and DSN bounces.
"""

from maild.relay.relay import Relay, RemoteRecipient

__all__ = ["Relay", "RemoteRecipient"]
