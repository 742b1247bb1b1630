"""The streams benchmark's load side compiled from ``bench/sseload.c``: upstream and generator.

At 2,000 streams the Python upstream and generator take about two thirds of a
core from a machine whose two cores the node needs; the C ones take what their
syscalls cost. Each run compiles the source into its own temporary directory
with the system's ``cc`` (no build output is kept); the bytes both sides send
come from Python (``bench.upstream``'s replies, ``bench.streams``' request), so
the wire format is defined once.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from . import upstream

SOURCE = Path(__file__).resolve().parent / "sseload.c"


def build(out_dir: Path) -> Path:
    """Compile ``sseload.c`` into ``out_dir``; SystemExit with the compiler's words if it fails."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("--load native needs a C compiler (cc); use --load python")
    binary = out_dir / "sseload"
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(SOURCE)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"compiling {SOURCE.name} failed:\n{done.stderr}")
    return binary


def write_blobs(path: Path, blobs: list[bytes]) -> Path:
    """The file ``sseload`` reads: a count, then each blob's length and bytes (little-endian u32)."""
    parts = [struct.pack("<I", len(blobs))]
    for b in blobs:
        parts += [struct.pack("<I", len(b)), b]
    path.write_bytes(b"".join(parts))
    return path


def upstream_argv(binary: Path, tmp: Path, port: int, chunks: int, chunk_ms: float) -> list[str]:
    """``sseload upstream``: ``bench.upstream``'s replies, byte for byte, dripped every ``chunk_ms``."""
    plain, stream = upstream.canned_responses(chunks)
    blobs = write_blobs(tmp / "upstream.blobs", [plain, stream, *upstream.dripped_frames(chunks)])
    return [str(binary), "upstream", "--port", str(port), "--blobs", str(blobs), "--chunk-ms", str(chunk_ms)]


def streams_argv(binary: Path, tmp: Path, port: int, request: bytes, n: int, ramp_s: float,
                 timeout_s: float) -> list[str]:
    """``sseload streams``: ``n`` streams of ``request`` over ``ramp_s`` seconds, a result line each."""
    blobs = write_blobs(tmp / f"request-{port}.blobs", [request])
    return [str(binary), "streams", "--port", str(port), "--blobs", str(blobs), "--streams", str(n),
            "--ramp-s", str(ramp_s), "--timeout-s", str(timeout_s)]


def parse_line(line: str) -> tuple[float | None, float, int, str, float]:
    """One stream's ``first worst worst_at events error`` line, as ``StreamResult``'s fields."""
    first, worst, worst_at, events, error = line.split(" ", 4)
    return ((None if first == "-" else float(first)), float(worst), int(events), ("" if error == "ok" else error),
            float(worst_at))
