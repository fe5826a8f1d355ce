"""
Inbound trust checks on the MX: SPF (RFC 7208), DKIM verification
(RFC 6376) and DMARC (RFC 7489), recorded in an Authentication-Results
header (RFC 8601) and acted on per the C{[mx] dmarc} policy.

Every DNS lookup goes through the one twisted.names resolver
(L{maild.resolver.makeResolver}); the reactor never waits on DNS.
"""
