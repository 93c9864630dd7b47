"""Where `beam serve`'s CPU goes: a summary of the py-spy profiles `bench/run.py --profile DIR`
records (collapsed stacks, one file per closed-loop round of Beam, named ``<call>-NN.txt``).

    .venv/bin/python bench/run.py --calls check --profile /tmp/prof --native
    .venv/bin/python bench/profile.py /tmp/prof

For each call it prints two tables, as shares of the samples in which the process was
running (py-spy leaves idle threads out):

- **by library**: each sample goes to the innermost frame that belongs to a library
  (Python files and extension modules; the interpreter, libc and the vDSO go to the frame
  that called them), so "grpc" is grpcio's Cython and C core plus its Python, "protobuf"
  the upb extension, "beam" our own Python, and so on;
- **by stage**: the share of samples with a given frame of ours on the stack (inclusive,
  so the rows overlap), to split one call's path: authentication, the handler, the Redis
  script, the settled-id lookup, metrics.

Only the event loop's thread is counted unless ``--all-threads``: with ``--native``, py-spy
reports grpcio's poller thread as running while it waits in the completion queue (about
40% of all samples, for the empty handler as for Beam), where /proc's per-thread CPU shows
it near idle. grpcio's C++ threads (``event_engine``) are not Python threads and are not
sampled at all; /proc gives their CPU (docs/PERFORMANCE.md).

py-spy with ``--native`` stops the process for every sample: shares are meaningful, the
calls/s of a profiled run are not.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<where>[^()]*)\)$")
_RUNTIME = ("libpython", "libc.so", "[vdso]", "ld-linux", "libm.so", "libpthread", "<frozen")

LIBRARIES = (
    ("grpc", ("grpc/", "grpc_", "cygrpc", "libstdc++")),
    ("protobuf", ("google/protobuf", "google/_upb", "_message.")),
    ("redis-py", ("redis/",)),
    ("hiredis (reply parser)", ("hiredis", "reader.c", "read.c", "sds.")),
    ("asyncpg", ("asyncpg/", "protocol.c", "pgproto", "recordobj.c")),
    ("prometheus_client", ("prometheus_client/",)),
    ("uvicorn/starlette/fastapi", ("uvicorn/", "starlette/", "fastapi/", "h11/", "httptools")),
    ("pydantic", ("pydantic",)),
    (
        "event loop and sockets (asyncio, uvloop/libuv, epoll, send/recv)",
        ("asyncio/", "_asyncio", "selectors.py", "selectmodule", "socketmodule", "_socket",
         "uvloop", "linux.c", "loop.c", "stream.c", "core.c", "queue.h", "heap-inl.h",
         "uv-common", "_weakrefset.py", "inspect.py", "contextvars"),
    ),
    ("hashing (hashlib/hmac/secrets)", ("hashlib", "hmac.py", "secrets.py", "_hashopenssl",
                                        "libcrypto", "random.py", "base64", "binascii")),
    ("beam", ("beam/", "<string>")),  # <string>: our dataclasses' generated __init__
)  # fmt: skip

# Frames of ours worth a row of their own: (label, function name as py-spy prints it).
STAGES = (
    ("gRPC servicer (_Base._serve, all of our call)", "_Base._serve"),
    ("REST route (RestApi)", "RestApi."),
    ("authenticate", "Authenticator.authenticate"),
    ("  SHA-256 of the key", "hash_key"),
    ("Handlers.timed (latency histogram + the handler)", "Handlers.timed"),
    ("  Histogram.observe", "Histogram.observe"),
    ("  Counter.inc / .labels", "Counter.inc"),
    ("  MetricWrapperBase.labels", "MetricWrapperBase.labels"),
    ("Ledger.check", "Ledger.check"),
    ("Ledger.deduct", "Ledger.deduct"),
    ("Ledger.finalize", "Ledger.finalize"),
    ("Ledger.balance", "Ledger.balance"),
    ("  fingerprint", "fingerprint"),
    ("  price lookup", "PriceBook."),
    ("  request token (HMAC)", "RequestTokens."),
    ("  Redis script (RedisStore.run)", "RedisStore.run"),
    ("    redis-py execute_command", "execute_command"),
    ("  settled-id lookup (Ledger._refuse_settled_id)", "Ledger._refuse_settled_id"),
    ("  Batcher (group commit / lookups)", "Batcher."),
    ("  PostgreSQL (asyncpg)", "asyncpg"),
    ("ByteSize", "ByteSize"),
)


@dataclass(frozen=True)
class Frame:
    function: str
    where: str

    @property
    def runtime(self) -> bool:
        return self.where.startswith("0x") or any(r in self.where for r in _RUNTIME)


def parse(lines: Iterable[str]) -> Iterator[tuple[list[Frame], int]]:
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for text in stack.split(";"):
            if text.startswith("process "):
                continue
            match = _FRAME.match(text)
            if match:
                frames.append(Frame(match["function"], match["where"]))
            else:
                frames.append(Frame(text, text))
        yield frames, int(count)


def library(frames: list[Frame]) -> str:
    for frame in reversed(frames):
        if frame.runtime:
            continue
        for name, needles in LIBRARIES:
            if any(n in frame.where for n in needles):
                return name
        return f"other ({frame.where.split(':')[0]})"
    return "interpreter / libc"


LOOP = "event loop"


def thread(frames: list[Frame]) -> str:
    """The event loop's thread (started from a module), or another (grpcio's poller)."""
    roots = [f for f in frames if not f.runtime][:1]
    if roots and roots[0].function in ("_run_module_as_main", "<module>"):
        return LOOP
    return "other Python threads"


@dataclass
class Summary:
    samples: int
    by_library: Counter[str]
    by_stage: Counter[str]
    by_thread: Counter[str]


def summarize(files: Iterable[Path], *, all_threads: bool = False) -> Summary:
    summary = Summary(0, Counter(), Counter(), Counter())
    for path in files:
        with path.open(errors="replace") as handle:
            for frames, count in parse(handle):
                where = thread(frames)
                summary.by_thread[where] += count
                if where != LOOP and not all_threads:
                    continue
                summary.samples += count
                summary.by_library[library(frames)] += count
                text = ";".join(f"{f.function} ({f.where})" for f in frames)
                for label, needle in STAGES:
                    if needle in text:
                        summary.by_stage[label] += count
    return summary


def render(call: str, summary: Summary, cpu_us: float | None) -> list[str]:
    def share(n: int) -> str:
        fraction = n / summary.samples if summary.samples else 0.0
        us = f" | {fraction * cpu_us:,.0f}" if cpu_us else ""
        return f"{fraction:.0%}{us}"

    unit = " | ≈ µs/call" if cpu_us else ""
    rule = "|---|---:|---:|" if cpu_us else "|---|---:|"
    lines = [f"### {call} ({summary.samples:,} samples)", "", f"| library | share{unit} |", rule]
    lines += [f"| {name} | {share(n)} |" for name, n in summary.by_library.most_common()]
    lines += ["", f"| stage (inclusive) | share{unit} |", rule]
    lines += [f"| {label} | {share(summary.by_stage[label])} |" for label, _ in STAGES
              if summary.by_stage[label]]  # fmt: skip
    total = sum(summary.by_thread.values()) or 1
    threads = ", ".join(f"{k} {v / total:.0%}" for k, v in summary.by_thread.most_common())
    lines += ["", f"Samples by thread: {threads}.", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument(
        "--cpu-us",
        action="append",
        default=[],
        metavar="CALL=US",
        help="the bench's CPU µs per call of Beam, to turn shares into µs (repeatable)",
    )
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="count every Python thread, not only the event loop's (see the module doc)",
    )
    args = parser.parse_args()
    cpu = {k: float(v) for k, _, v in (item.partition("=") for item in args.cpu_us)}
    calls: dict[str, list[Path]] = {}
    for path in sorted(args.directory.glob("*.txt")):
        calls.setdefault(path.stem.rsplit("-", 1)[0], []).append(path)
    for call, files in calls.items():
        summary = summarize(files, all_threads=args.all_threads)
        print("\n".join(render(call, summary, cpu.get(call))))


if __name__ == "__main__":
    main()
