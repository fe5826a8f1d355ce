"""
twistd plugin: C{twistd maild [options]}.  All logic lives in L{maild.tap}.
"""

from twisted.application.service import ServiceMaker

maild = ServiceMaker(
    "maild",
    "maild.tap",
    "A small, durable mail server: SMTP, submission, POP3 and IMAP over Maildir.",
    "maild",
)
