"""
maild: a small mail server (SMTP, submission, POP3, IMAP) on Twisted,
storing mail in Maildir.
"""

__version__ = "0.1.0"
