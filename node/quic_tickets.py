"""The TLS session tickets the HTTP/3 door issued, for resumption and 0-RTT.

Theory of operation: aioquic's server keeps resumption state itself and hands
the client only an opaque ticket id, so a ticket is good only at the process
that issued it (with ``--workers`` a resumed connection that lands on another
worker does a full handshake: slower, never wrong). Each ticket is single use,
taken out of the store when presented (RFC 8446 §8.1): the same early data
replayed on a second connection finds no ticket, so it is not early data
there. That bounds replays but does not end them (an attacker who races the
client replays once), which is why only safe methods are served from early
data (``node.http3``). The store is bounded: the oldest tickets go first, and
expired ones are never returned.
"""

from __future__ import annotations

import datetime
from collections import OrderedDict
from typing import Final

from aioquic.tls import SessionTicket

#: Tickets kept per process: about 3 MB at most; a client past the bound does a full handshake.
MAX_TICKETS: Final = 10_000


class TicketStore:
    def __init__(self, *, limit: int = MAX_TICKETS) -> None:
        self._limit = limit
        self._tickets: OrderedDict[bytes, SessionTicket] = OrderedDict()

    def add(self, ticket: SessionTicket) -> None:
        """aioquic's ``session_ticket_handler``: a ticket was issued."""
        self._tickets[ticket.ticket] = ticket
        while len(self._tickets) > self._limit:
            self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> SessionTicket | None:
        """aioquic's ``session_ticket_fetcher``: the ticket a client presents, used up."""
        ticket = self._tickets.pop(label, None)
        if ticket is None or ticket.not_valid_after < datetime.datetime.now(datetime.UTC):
            return None
        return ticket

    def clear(self) -> None:
        """A new certificate: tickets of the old one resume no more."""
        self._tickets.clear()

    def __len__(self) -> int:
        return len(self._tickets)
