#!/usr/bin/env python3
"""
Probe how fast a disk makes small files durable, Maildir style.

Each mode writes files of S octets into tmp/ and renames them into new/,
making them durable in a different way:

  fsync           per file: write, fsync the file, rename, fsync new/
  syncfs-batch    per batch of B files: write all, rename all, one syncfs()
  parallel-fsync  per batch of B files: write all, fsync them from T
                  threads, rename all, one fsync of new/

and reports files/s, the latency of one iteration (a file in fsync mode,
a batch in the others) and, where Linux shows them, the write requests,
cache flushes and octets the block device received per file.  Each mode
runs in a fresh directory under --dir (default: the current directory),
which is removed afterwards.

Example::

    python bench/disk_probe.py --mode all --files 2000 --batch 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import ctypes.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

MODES = ("fsync", "syncfs-batch", "parallel-fsync")


class ProbeDirectory:
    """
    A fresh directory with tmp/ and new/ folders, and a descriptor of new/
    to fsync it.  Removed on exit.
    """

    def __init__(self, parent: Path) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="disk_probe.", dir=parent))
        self.tmp = self.path / "tmp"
        self.new = self.path / "new"
        self.tmp.mkdir()
        self.new.mkdir()
        self.newDescriptor = os.open(self.new, os.O_RDONLY | os.O_DIRECTORY)

    def __enter__(self) -> ProbeDirectory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.newDescriptor)
        shutil.rmtree(self.path)

    def write(self, name: str, payload: bytes) -> int:
        """
        Create tmp/C{name} holding C{payload}; return its open descriptor.
        """
        descriptor = os.open(self.tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(payload)
        while view:
            view = view[os.write(descriptor, view):]
        return descriptor

    def rename(self, name: str) -> None:
        """
        Move tmp/C{name} into new/.
        """
        os.rename(self.tmp / name, self.new / name)


def loadSyncfs() -> Callable[[int], None]:
    """
    libc's syncfs(2), which the os module does not offer.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = libc.syncfs
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(descriptor: int) -> None:
        if function(descriptor) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return syncfs


def probeFsync(directory: ProbeDirectory, names: list[str], payload: bytes) -> list[float]:
    """
    Make each file durable on its own; return each file's latency.
    """
    latencies = []
    for name in names:
        start = time.perf_counter()
        descriptor = directory.write(name, payload)
        os.fsync(descriptor)
        os.close(descriptor)
        directory.rename(name)
        os.fsync(directory.newDescriptor)
        latencies.append(time.perf_counter() - start)
    return latencies


def probeSyncfsBatch(
    directory: ProbeDirectory, batches: list[list[str]], payload: bytes
) -> list[float]:
    """
    Make each batch durable with one syncfs(); return each batch's latency.
    """
    syncfs = loadSyncfs()
    latencies = []
    for batch in batches:
        start = time.perf_counter()
        for name in batch:
            os.close(directory.write(name, payload))
        for name in batch:
            directory.rename(name)
        syncfs(directory.newDescriptor)
        latencies.append(time.perf_counter() - start)
    return latencies


def probeParallelFsync(
    directory: ProbeDirectory, batches: list[list[str]], payload: bytes, threads: int
) -> list[float]:
    """
    Make each batch durable with fsyncs from C{threads} threads, then one
    fsync of new/; return each batch's latency.
    """
    latencies = []
    # os.fsync releases the GIL, so the threads' fsyncs overlap and the
    # file system can commit them together.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for batch in batches:
            start = time.perf_counter()
            descriptors = [directory.write(name, payload) for name in batch]
            list(pool.map(os.fsync, descriptors))
            for descriptor in descriptors:
                os.close(descriptor)
            for name in batch:
                directory.rename(name)
            os.fsync(directory.newDescriptor)
            latencies.append(time.perf_counter() - start)
    return latencies


def deviceCounters(path: Path) -> tuple[int, int, int] | None:
    """
    The write requests, cache flushes and 512-octet sectors written so far
    by the block device holding C{path}, or None where Linux does not show
    them.  They count everything on the device, not only this probe.
    """
    device = path.stat().st_dev
    try:
        fields = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat").read_text().split()
        # Documentation/block/stat.rst: writes are fields 5 and 7, flushes 16.
        return int(fields[4]), int(fields[15]), int(fields[6])
    except (OSError, IndexError, ValueError):
        return None


def percentile(sortedValues: list[float], fraction: float) -> float:
    """
    The nearest-rank percentile of an ascending, non-empty list.
    """
    return sortedValues[max(1, math.ceil(fraction * len(sortedValues))) - 1]


def fileSystemOf(path: Path) -> str:
    """
    The type and source of the file system holding C{path}, such as
    C{"ext4 on /dev/vda"}, read from /proc/self/mountinfo.
    """
    target = os.path.realpath(path)
    best = ("", "unknown file system")
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                # Fields after the "-" separator: type, source, options.
                mountPoint = fields[4]
                separator = fields.index("-")
                inside = target == mountPoint or target.startswith(mountPoint.rstrip("/") + "/")
                if inside and len(mountPoint) >= len(best[0]):
                    best = (mountPoint, f"{fields[separator + 1]} on {fields[separator + 2]}")
    except OSError:
        pass
    return best[1]


def runMode(mode: str, options: argparse.Namespace, payload: bytes) -> dict:
    """
    Run one mode in a fresh directory and summarize it.
    """
    names = [f"{number}.{os.getpid()}.probe" for number in range(options.files)]
    batches = [names[i : i + options.batch] for i in range(0, len(names), options.batch)]
    with ProbeDirectory(options.dir) as directory:
        countersBefore = deviceCounters(directory.path)
        start = time.perf_counter()
        if mode == "fsync":
            latencies = probeFsync(directory, names, payload)
        elif mode == "syncfs-batch":
            latencies = probeSyncfsBatch(directory, batches, payload)
        else:
            latencies = probeParallelFsync(directory, batches, payload, options.threads)
        seconds = time.perf_counter() - start
        countersAfter = deviceCounters(directory.path)
    latencies.sort()
    result = {
        "mode": mode,
        "files": options.files,
        "size": options.size,
        "batch": 1 if mode == "fsync" else options.batch,
        "threads": options.threads if mode == "parallel-fsync" else 1,
        "seconds": round(seconds, 3),
        "files_per_second": round(options.files / seconds, 1),
        "iteration_p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
        "iteration_p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
    }
    if countersBefore is not None and countersAfter is not None:
        writes, flushes, sectors = (after - before for before, after in zip(countersBefore, countersAfter))
        result["device_writes_per_file"] = round(writes / options.files, 2)
        result["device_flushes_per_file"] = round(flushes / options.files, 2)
        result["device_kib_per_file"] = round(sectors * 512 / 1024 / options.files, 1)
    return result


def formatResult(result: dict) -> str:
    """
    One line describing C{result}.
    """
    if result["mode"] == "fsync":
        unit = "per file"
    elif result["mode"] == "syncfs-batch":
        unit = f"per batch of {result['batch']}"
    else:
        unit = f"per batch of {result['batch']}, {result['threads']} threads"
    line = (
        f"{result['mode']:<15} {result['files']} files x {result['size']} octets: "
        f"{result['files_per_second']:9.1f} files/s   "
        f"p50 {result['iteration_p50_ms']:.3f} ms  p99 {result['iteration_p99_ms']:.3f} ms  ({unit})"
    )
    if "device_writes_per_file" in result:
        line += (
            f"\n{'':<16}device, per file: {result['device_writes_per_file']:.2f} write requests, "
            f"{result['device_flushes_per_file']:.2f} flushes, {result['device_kib_per_file']:.1f} KiB"
        )
    return line


def parseArguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure how fast the disk makes small files durable."
    )
    parser.add_argument(
        "--mode", choices=MODES + ("all",), default="fsync",
        help="durability strategy, or all of them in turn (default %(default)s)",
    )
    parser.add_argument(
        "--files", "-n", type=int, default=2000,
        help="files to write: the iterations of fsync mode, in batches in the others "
        "(default %(default)s)",
    )
    parser.add_argument("--size", type=int, default=10240, help="octets per file (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="files per batch (default %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=8, help="fsync threads for parallel-fsync (default %(default)s)"
    )
    parser.add_argument(
        "--dir", type=Path, default=Path.cwd(),
        help="where to make the probe's temporary directory (default: the current directory)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per mode")
    options = parser.parse_args(argv)
    if min(options.files, options.batch, options.threads) < 1:
        parser.error("--files, --batch and --threads must be at least 1")
    if options.size < 0:
        parser.error("--size cannot be negative")
    return options


def main(argv: list[str]) -> int:
    options = parseArguments(argv)
    # Random content, so that a compressing file system cannot cheat.
    payload = os.urandom(options.size)
    modes = MODES if options.mode == "all" else (options.mode,)
    if not options.json:
        print(f"probing {options.dir.resolve()} ({fileSystemOf(options.dir)})")
    for mode in modes:
        result = runMode(mode, options, payload)
        print(json.dumps(result) if options.json else formatResult(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
