"""
SPF (RFC 7208): the openspf.org test suite run through L{maild.trust.spf},
its DNS answered by an in-memory twisted.names resolver.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from twisted.internet import defer
from twisted.names import error
from twisted.trial import unittest

from maild.trust.lookup import makeLookup
from maild.trust.spf import checkSPF
from tests.dnsserver import TIMEOUT, ZoneResolver

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"


def zoneFromSuite(zonedata: dict) -> dict[str, list]:
    """
    A scenario's zonedata as a L{ZoneResolver} zone, read as the suite's
    own driver (pyspf's testspf.py) reads it: an SPF record stands for a
    TXT record too unless the name has TXT records of its own, and a
    C{NONE} value is no record.
    """
    zone = {}
    for name, records in zonedata.items():
        entries: list = []
        generated: list = []
        hasTXT = False
        for record in records:
            if record == TIMEOUT:
                entries.append(TIMEOUT)
                continue
            ((kind, value),) = record.items()
            if kind in ("TXT", "SPF") and isinstance(value, str):
                value = (value,)
            if kind == "TXT":
                hasTXT = True
            elif kind == "SPF":
                generated.append(("TXT", value))
            if value != ("NONE",):
                if kind == "MX":
                    value = (value[0], value[1])
                entries.append((kind, tuple(value) if kind in ("TXT", "SPF") else value))
        if not hasTXT:
            entries += [(k, tuple(v)) for k, v in generated]
        zone[name] = entries
    return zone


class SuiteResolver(ZoneResolver):
    """
    As the suite's driver: names under C{error.} that are not in the zone
    time out.
    """

    def _lookup(self, name, cls, qtype, timeout, chased=False):
        key = name.decode("ascii", "replace").lower()
        if key.startswith("error.") and key not in self.zone:
            return defer.fail(error.DNSQueryTimeoutError(key))
        return ZoneResolver._lookup(self, name, cls, qtype, timeout, chased)


class RFC7208Suite(unittest.TestCase):
    """
    One test per case of the suite: the result is one the case allows,
    and so is the explanation of a fail where the case names one.
    """


def _makeTest(scenario: dict, name: str, case: dict):
    expected = case["result"]
    expected = [expected] if isinstance(expected, str) else list(expected)

    def test(self):
        resolver = SuiteResolver(zoneFromSuite(scenario.get("zonedata", {})))
        lookup = makeLookup(resolver, timeout=1.0)
        d = checkSPF(lookup, case["host"], case["mailfrom"], case["helo"])

        def check(result):
            self.assertIn(result.result, expected, f"{name}: {case.get('description', '')}")
            # "DEFAULT" stands for the implementation's own text.
            if case.get("explanation", "DEFAULT") != "DEFAULT" and result.result == "fail":
                self.assertEqual(result.explanation, case["explanation"])

        return d.addCallback(check)

    test.__doc__ = f"RFC 7208 {case.get('spec', '')}: {name} ({scenario['description']})"
    return test


def _loadSuite() -> None:
    with open(SUITE, encoding="utf-8") as f:
        scenarios = [s for s in yaml.safe_load_all(f) if s]
    for scenario in scenarios:
        for name, case in scenario["tests"].items():
            method = "test_" + name.replace("-", "_")
            setattr(RFC7208Suite, method, _makeTest(scenario, name, case))


_loadSuite()
