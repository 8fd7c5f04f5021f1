"""Writing to TCP sockets once per reactor turn, without Twisted's per-write bookkeeping.

Twisted's ``transport.write`` queues the bytes and registers the socket for
writability (an ``epoll_ctl``); on the reactor's next turn the reactor
dispatches a write event to ``doWrite``, which sends and unregisters (another
``epoll_ctl``).  A proxy writes twice per exchange (the request upstream, the
response downstream), so on keep-alive connections that bookkeeping costs a
large share of a small request.

:func:`write_soon` queues the bytes in the transport's own buffer, exactly
where ``transport.write`` would (so later writes stay behind them), but
instead of registering the socket it notes the transport, and one call per
reactor turn (``callLater(0)``, which runs right after the turn's events)
sends every noted transport's queue with ``doWrite``.  Sending at once, in
the middle of handling an event, was measured too: it saves the same system
calls but wakes the peer once per send, and CPU per request did not drop;
sending at the end of the turn keeps the batching the reactor gave.

Only plain ``tcp.Server`` / ``tcp.Client`` transports are handled this way;
TLS and test transports, and transports that are closing, go through
``transport.write``.  Whatever a send does not take, or an error, is left to
the reactor: the socket is registered for writing as usual, and the reactor's
next ``doWrite`` sends the rest or closes the connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger

#: Transport classes whose queue may be sent without registering the socket.
_DIRECT: frozenset[type] = frozenset({tcp.Server, tcp.Client})

_log = Logger()


class _Turn:
    """The transports written during one reactor turn, sent when it ends."""

    __slots__ = ("pending", "reactor", "scheduled")

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pending: list[Any] = []
        self.scheduled = False

    def add(self, transport: Any) -> None:
        self.pending.append(transport)
        if not self.scheduled:
            self.scheduled = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for transport in pending:
            if not transport.connected:
                continue
            if transport.disconnecting or transport._writeDisconnecting:
                transport.startWriting()  # the reactor sends, then closes as asked
                continue
            try:
                failed = transport.doWrite()
            except Exception:  # noqa: BLE001 - leave it to the reactor, which reports it
                _log.failure("sending a queued write failed")
                failed = True
            if failed is not None or transport.dataBuffer or transport._tempDataLen:
                # Not all sent, or the socket broke: the reactor takes over.
                transport.startWriting()


_turns: dict[int, _Turn] = {}


def write_soon(transport: Any, data: bytes) -> None:
    """Queue ``data`` on ``transport``; it is sent when this reactor turn ends.

    Ordering is ``transport.write``'s: bytes written later, by either
    function, go out after these.
    """
    if (
        type(transport) not in _DIRECT
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
    ):
        transport.write(data)
        return
    transport._tempDataBuffer.append(data)
    length = transport._tempDataLen
    transport._tempDataLen = length + len(data)
    if transport.producer is not None:
        transport._maybePauseProducer()  # a full queue pauses a streaming body, as write() does
    if length or transport.dataBuffer:
        return  # already noted this turn, or already registered for writing
    reactor = transport.reactor
    turn = _turns.get(id(reactor))
    if turn is None:
        turn = _turns[id(reactor)] = _Turn(reactor)
    turn.add(transport)
