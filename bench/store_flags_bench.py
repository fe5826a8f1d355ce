"""
What a flag change costs in maild's store, and a look at a folder in
which nothing changed: run it from two source trees back to back (the
machine's load moves the figures, so alternate them)::

    PYTHONPATH=/path/to/tree python bench/store_flags_bench.py LABEL [N]

A flag change renames one file under Dovecot's dot-lock on
dovecot-uidlist (create, write, close, unlink of dovecot-uidlist.lock),
as Dovecot renames its own; the figures show what that lock costs.
"""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from maild.store import maildir
from maild.store.folder import Folder


def main(label: str, count: int) -> None:
    root = Path(tempfile.mkdtemp())
    try:
        for sub in ("cur", "new", "tmp"):
            (root / sub).mkdir()
        for i in range(count):
            (root / f"cur/{1700000000 + i}.M{i}P1Q{i}.bench,S=2,W=3:2,").write_bytes(b"x\n")
        # Directory times from the past: a refresh then trusts them.
        for sub in ("cur", "new"):
            os.utime(root / sub, (1e9, 1e9))
        folder = Folder("INBOX", root)
        folder.refresh()
        one = []
        for i in range(count):
            start = time.perf_counter()
            folder.setFlags([i], maildir.SEEN, mode=1)
            one.append(time.perf_counter() - start)
        looks = []
        for _ in range(count):
            start = time.perf_counter()
            folder.refresh()
            looks.append(time.perf_counter() - start)
        everything = []
        for k in range(5):
            start = time.perf_counter()
            folder.setFlags(range(count), maildir.FLAGGED, mode=1 if k % 2 == 0 else -1)
            everything.append(time.perf_counter() - start)
        one.sort()
        print(
            f"{label}: setFlags of one message median {statistics.median(one) * 1e6:.0f} us "
            f"(p90 {one[int(0.9 * count)] * 1e6:.0f} us); refresh with nothing changed median "
            f"{statistics.median(looks) * 1e6:.1f} us; setFlags of {count} messages median "
            f"{statistics.median(everything) * 1e3:.1f} ms"
        )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
