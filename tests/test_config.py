"""
Configuration: the TOML file, command-line overrides, and the clear error
for each mistake.
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial import unittest

from maild.config import ConfigError, configFromOptions, loadConfig


class ConfigTests(unittest.SynchronousTestCase):
    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def problems(self, text: str, **overrides) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            loadConfig(self.write(text), overrides)
        return caught.exception.problems

    def test_defaults(self):
        """
        With no file and no options: ./maildata, localhost, SMTP on 8025,
        25 MiB messages, 100 recipients.
        """
        config = loadConfig()
        self.assertEqual(config.data_dir, Path("maildata"))
        self.assertEqual(config.domains, ("localhost",))
        self.assertEqual(config.listeners["smtp"], "tcp:8025")
        self.assertEqual(config.limits.message_size, 25 * 1024 * 1024)
        self.assertEqual(config.limits.recipients, 100)

    def test_dkimProcessesZero(self):
        """
        [mx] dkim_processes = 0 (verify in the daemon) is accepted; a
        negative count is refused, saying what is allowed.
        """
        self.assertEqual(loadConfig(self.write("[mx]\ndkim_processes = 0\n")).mx.dkim_processes, 0)
        self.assertEqual(loadConfig(self.write("[mx]\ndkim_processes = 2\n")).mx.dkim_processes, 2)
        self.assertEqual(
            self.problems("[mx]\ndkim_processes = -1\n"),
            ["mx.dkim_processes: must be 0 or more, got -1"],
        )
        self.assertIn(
            "limits.recipients: must be greater than 0, got 0",
            self.problems("[limits]\nrecipients = 0\n"),
        )

    def test_readmeSampleLoads(self):
        """
        The README's "Every key, with its default" file loads as it is:
        a user may start from it.
        """
        readme = (Path(__file__).parent.parent / "README.rst").read_text()
        block = readme.split("Every key, with its default:", 1)[1].split(".. code-block:: toml", 1)[1]
        lines = []
        for line in block.splitlines()[1:]:
            if line and not line.startswith("    "):
                break
            # A default computed at start ("<this machine's FQDN>") is
            # shown as a placeholder, not a value to copy.
            if not re.search(r'= "<[^">]*>"', line):
                lines.append(line[4:])
        sample = "\n".join(lines)
        self.assertIn("[mx]", sample)
        dataDir = Path(self.mktemp()).absolute()
        config = loadConfig(self.write(sample.replace('data_dir = "maildata"', f'data_dir = "{dataDir}"')))
        self.assertEqual(config.data_dir, dataDir)

    def test_fileThenOptions(self):
        """
        The file's values are used, paths in it are relative to it, and
        command-line options win over it.
        """
        path = self.write(
            'data_dir = "data"\nhostname = "mail.example.org"\ndomains = ["Example.ORG"]\n'
            'postmaster = "alice@example.org"\n[aliases]\n"sales@example.org" = "alice@example.org"\n'
            '[listen]\nsmtp = "tcp:2525"\n[limits]\nmessage_size = 1000\n[store]\nsync = "syncfs"\n'
        )
        config = loadConfig(path)
        self.assertEqual(config.data_dir, path.resolve().parent / "data")
        self.assertEqual(config.domains, ("example.org",))
        self.assertEqual(config.aliases["sales@example.org"], "alice@example.org")
        self.assertEqual(config.listeners["smtp"], "tcp:2525")
        self.assertEqual(config.limits.message_size, 1000)
        self.assertEqual(config.sync, "syncfs")
        overridden = configFromOptions(
            {"config": str(path), "data_dir": "/srv/mail", "smtp": "none", "domains": ["x.test", "example.org"]}
        )
        self.assertEqual(overridden.data_dir, Path("/srv/mail"))
        self.assertIsNone(overridden.listeners["smtp"])
        self.assertEqual(overridden.domains, ("x.test", "example.org"))

    def test_everyMistakeReported(self):
        """
        Unknown keys, wrong types, bad endpoint strings, bad names and
        unreadable files are each reported with the key at fault, all at
        once.
        """
        problems = self.problems(
            'colour = "blue"\ndomains = ["ok.test", "bad/domain"]\n'
            '[listen]\nsmtp = "tcpp:25"\nfax = "tcp:1"\n'
            '[limits]\nmessage_size = "big"\nrecipients = -1\nwarp = 9\n'
            '[tls]\ncert = "/nonexistent/cert.pem"\nkey = "/nonexistent/key.pem"\n'
            '[store]\nsync = "sometimes"\n'
            '[aliases]\n"x@elsewhere.test" = "a@ok.test"\n'
        )
        text = "\n".join(problems)
        for expected in (
            "colour: unknown key",
            "domains: 'bad/domain'",
            "listen.smtp: bad endpoint string 'tcpp:25'",
            "listen.fax: unknown listener",
            "limits.message_size: expected int",
            "limits.recipients: must be greater than 0",
            "limits.warp: unknown key",
            "tls.cert: cannot read /nonexistent/cert.pem",
            "store.sync: must be 'fsync' or 'syncfs'",
            "aliases.x@elsewhere.test: elsewhere.test is not a local domain",
        ):
            self.assertIn(expected, text)

    def test_uidlFormat(self):
        """
        [pop3] uidl_format defaults to Dovecot's %08Xu%08Xv; a format with
        a variable maild cannot fill (%m, an MD5 of the headers) or
        without the UID is refused at load time.
        """
        self.assertEqual(loadConfig().pop3.uidl_format, "%08Xu%08Xv")
        self.assertEqual(loadConfig(self.write('[pop3]\nuidl_format = "%u.%v"\n')).pop3.uidl_format, "%u.%v")
        for bad in ("%m", "%v", "%08Xu%"):
            [problem] = self.problems(f'[pop3]\nuidl_format = "{bad}"\n')
            self.assertIn("pop3 uidl_format", problem)

    def test_authRehash(self):
        """
        [auth] rehash is off unless set, and must be a boolean.
        """
        self.assertFalse(loadConfig().rehash_passwords)
        self.assertTrue(loadConfig(self.write("[auth]\nrehash = true\n")).rehash_passwords)
        [problem] = self.problems('[auth]\nrehash = "yes"\n')
        self.assertIn("auth.rehash: expected bool", problem)

    def test_badToml(self):
        [problem] = self.problems('data_dir = "unterminated\n')
        self.assertIn("not valid TOML", problem)

    def test_unreadableFile(self):
        with self.assertRaises(ConfigError) as caught:
            loadConfig("/nonexistent/maild.toml")
        self.assertIn("cannot read the config file", caught.exception.problems[0])

    def test_cpuChoices(self):
        """
        [cluster] scheduling (batch by default, normal on request) and
        cpu_affinity (auto by default, none on request): anything else is
        reported.
        """
        for key, default, other, bad, choices in [
            ("scheduling", "batch", "normal", "fifo", "batch, normal"),
            ("cpu_affinity", "auto", "none", "0-3", "auto, none"),
        ]:
            self.assertEqual(getattr(loadConfig().cluster, key), default)
            config = loadConfig(self.write(f'[cluster]\n{key} = "{other}"\n'))
            self.assertEqual(getattr(config.cluster, key), other)
            problems = "\n".join(self.problems(f'[cluster]\n{key} = "{bad}"\n'))
            self.assertIn(f"cluster.{key}: must be one of {choices}, got '{bad}'", problems)

    def test_mxTable(self):
        """
        [mx]: the DMARC policy (enforce by default), whether checks run,
        and their DNS timeouts; an unknown policy is reported.
        """
        self.assertEqual(loadConfig().mx.dmarc, "enforce")
        self.assertTrue(loadConfig().mx.checks)
        config = loadConfig(self.write('[mx]\ndmarc = "report"\nchecks = false\ndns_timeout = 2\n'))
        self.assertEqual((config.mx.dmarc, config.mx.checks, config.mx.dns_timeout), ("report", False, 2))
        problems = "\n".join(self.problems('[mx]\ndmarc = "reject"\nspf_timeout = 0\n'))
        self.assertIn("mx.dmarc: must be one of enforce, quarantine, report, got 'reject'", problems)
        self.assertIn("mx.spf_timeout: must be greater than 0", problems)
