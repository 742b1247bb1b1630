"""QUIC across worker processes: each datagram reaches the worker that holds its connection.

Theory of operation: with ``SO_REUSEPORT`` alone the kernel picks a worker by a
hash of the datagram's addresses, which follows the client's address, not the
QUIC connection: a client that migrates, or any flow while a worker restarts
(the group changes size), lands on a worker that does not know it. So:

- The supervisor binds the UDP port once per worker, in index order, and keeps
  the sockets for the node's life (``bind_group``); worker ``i`` serves on
  socket ``i``, inherited (``ENV_UDP_FD``). A restarted worker takes over the
  same socket, so the group's order never changes.
- A classic BPF program on the group (``SO_ATTACH_REUSEPORT_CBPF``) picks the
  socket from the first byte of the destination connection id, modulo the
  worker count: byte 1 of a short-header packet, byte 6 of a long-header one.
- Each worker issues connection ids whose first byte is its index
  (``steer_connection_ids``). A client's first Initial carries a connection id
  it chose at random, which picks some worker; that worker answers with its own
  ids, and every later packet (handshake, 1-RTT, after a migration) names one of
  them, so it reaches the same worker.

aioquic draws connection ids with ``os.urandom`` in two places (the first id in
``QuicConnection.__init__``, later ones in ``_replenish_connection_ids``); the
first is rewritten before the server registers it, the others by wrapping that
method on the connection. Linux only; elsewhere workers bind the port each,
hashed by address (docs/http3.md).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # the supervisor binds the sockets without importing aioquic
    from aioquic.quic.connection import QuicConnection

#: The worker's inherited UDP socket (a file descriptor number).
ENV_UDP_FD: Final = "HAPAX_UDP_FD"
#: <asm-generic/socket.h>; Python's socket module does not name it.
SO_ATTACH_REUSEPORT_CBPF: Final = 51
#: At most one byte of index: the first byte of a connection id.
MAX_WORKERS: Final = 256

_LD_B_ABS: Final = 0x30  # BPF_LD | BPF_B | BPF_ABS
_JSET_K: Final = 0x45  # BPF_JMP | BPF_JSET | BPF_K
_JA: Final = 0x05  # BPF_JMP | BPF_JA
_MOD_K: Final = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_RET_A: Final = 0x16  # BPF_RET | BPF_A


def steering_program(count: int) -> bytes:
    """The classic BPF program: socket index = first byte of the destination id % count."""
    insns = [
        (_LD_B_ABS, 0, 0, 0),  # A = the first byte (header form)
        (_JSET_K, 0, 2, 0x80),  # long header? on: next; off: the short-header load
        (_LD_B_ABS, 0, 0, 6),  # long: flags, version (4), id length, then the id
        (_JA, 0, 0, 1),
        (_LD_B_ABS, 0, 0, 1),  # short: flags, then the id
        (_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]
    return b"".join(struct.pack("HBBI", *i) for i in insns)


def bind_group(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` UDP sockets on one port, in index order, steered by connection id."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((host, port))
            port = s.getsockname()[1]  # port 0: the rest join the one the first got
        if sys.platform == "linux":
            prog = steering_program(count)
            buf = ctypes.create_string_buffer(prog, len(prog))
            fprog = struct.pack("@HP", len(prog) // 8, ctypes.addressof(buf))
            socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def steer_connection_ids(quic: QuicConnection, index: int) -> None:
    """Make every connection id ``quic`` issues start with ``index``; call before the
    server registers the connection (``create_protocol``)."""
    prefix = bytes((index,))
    first = quic._host_cids[0]
    first.cid = prefix + first.cid[1:]
    quic.host_cid = first.cid
    quic._local_initial_source_connection_id = first.cid  # sent in the transport parameters
    replenish = quic._replenish_connection_ids

    def steered() -> None:
        known = len(quic._host_cids)
        replenish()
        for c in quic._host_cids[known:]:
            c.cid = prefix + c.cid[1:]

    setattr(quic, "_replenish_connection_ids", steered)  # noqa: B010 - a method, per connection
