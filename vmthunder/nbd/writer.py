"""Ordered, non-blocking reply output with zero-copy file ranges.

asyncio transports take bytes only, so a read reply would have to be
copied from the page cache into Python and again into the socket. This
writer owns the sending side of a connection (a dup of the transport's
socket; the transport keeps reading): it queues replies as bytes or as
file ranges, sends bytes with sendmsg(2) and file ranges with sendfile(2),
and waits for the socket to drain with the loop's add_writer. Replies
leave in the order they were queued.
"""

from __future__ import annotations

import collections
import logging
import os
import socket

LOG = logging.getLogger(__name__)

# Parts per sendmsg (Linux's IOV_MAX is 1024).
_MAX_IOV = 1024


class FileRange:
    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.offset, self.length = fd, offset, length


class ReplyWriter:
    def __init__(self, loop, sock: socket.socket, *, on_error,
                 on_pressure, may_send=None, on_sent=None,
                 high_water: int = 8 * 1024 * 1024):
        """``sock`` is this writer's own (dup'd) socket.

        ``on_error(reason)`` is called once when the socket fails;
        ``on_pressure(bool)`` when queued bytes cross ``high_water`` (True)
        and fall back under a quarter of it (False). ``may_send()`` returns
        False while someone else (the transport, still sending the
        handshake) has bytes to go first. ``on_sent(n)`` is told, once per
        send pass, how many queued bytes of memory (not file ranges) have
        left or been dropped: the owner's memory budget gives them back.
        """
        self._may_send = may_send
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        sock.setblocking(False)
        self._queue: collections.deque = collections.deque()
        self._queued = 0
        # Of _queued, the bytes held in memory (bytes parts, not ranges).
        self._queued_mem = 0
        self._on_sent = on_sent
        self._high = high_water
        self._pressure = False
        self._waiting = False
        self._scheduled = False
        self._on_error = on_error
        self._on_pressure = on_pressure
        # Called once the queue is empty (set by whoever wants to close).
        self.on_drained = None
        self.closed = False

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def write(self, *parts, sent=None) -> None:
        """Queue bytes-like objects and FileRanges, then send what we can.

        ``sent()``, if given, is called once these parts have left (or
        will never leave: the writer closed), so a caller can count
        memory until then.
        """
        if self.closed:
            if sent is not None:
                sent()
            return
        queue = self._queue
        for part in parts:
            if type(part) is FileRange:
                n = part.length
            else:
                n = len(part)
                self._queued_mem += n
            if n:
                queue.append(part)
                self._queued += n
        if sent is not None:
            self._queue.append(sent)
        if not self._waiting and not self._scheduled:
            # Send once per pass of the event loop, not once per reply:
            # the replies of all requests that arrived together then leave
            # in one sendmsg (16 small replies per call instead of 1).
            self._scheduled = True
            self._loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        if not self._waiting and not self.closed:
            self._flush()

    def _flush(self) -> None:
        queue = self._queue
        if self._may_send is not None:
            if not self._may_send():
                self._waiting = True
                self._loop.call_later(0.001, self._gate_retry)
                return
            self._may_send = None       # once clear, it stays clear
        try:
            while queue:
                head = queue[0]
                if callable(head):
                    queue.popleft()
                    head()
                    continue
                if isinstance(head, FileRange):
                    n = os.sendfile(self._fd, head.fd, head.offset,
                                    head.length)
                    if n == 0:
                        raise OSError(f"file ended {head.length} bytes "
                                      "short of a reply")
                    self._queued -= n
                    if n < head.length:
                        head.offset += n
                        head.length -= n
                        continue
                    queue.popleft()
                    continue
                # Gather leading byte strings into one sendmsg (the
                # "sent" callbacks between replies carry no bytes).
                iov = []
                total = count = 0
                plain = True
                for part in queue:
                    if type(part) is FileRange or len(iov) == _MAX_IOV:
                        break
                    count += 1
                    if callable(part):
                        plain = False
                    else:
                        iov.append(part)
                        total += len(part)
                n = self._sock.sendmsg(iov)
                self._queued -= n
                self._mem_sent(n)
                if n == total and plain:
                    # All of it left, and no callback among it: the
                    # common case, with no per-part bookkeeping.
                    if count == len(queue):
                        queue.clear()
                    else:
                        for _ in range(count):
                            queue.popleft()
                    continue
                while queue:
                    part = queue[0]
                    if callable(part):
                        # Everything queued before it has left.
                        queue.popleft()
                        part()
                    elif isinstance(part, FileRange) or not n:
                        break
                    elif n >= len(part):
                        n -= len(part)
                        queue.popleft()
                    else:
                        queue[0] = memoryview(part)[n:]
                        break
        except BlockingIOError:
            if not self._waiting:
                self._waiting = True
                self._loop.add_writer(self._fd, self._writable)
        except OSError as exc:
            self._fail(f"sending replies failed: {exc}")
            return
        else:
            if self._waiting:
                self._waiting = False
                self._loop.remove_writer(self._fd)
            if self.on_drained is not None:
                callback, self.on_drained = self.on_drained, None
                callback()
        self._check_pressure()

    def _mem_sent(self, n: int) -> None:
        if n:
            self._queued_mem -= n
            if self._on_sent is not None:
                self._on_sent(n)

    def _writable(self) -> None:
        self._flush()

    def _gate_retry(self) -> None:
        if not self.closed:
            self._waiting = False
            self._flush()

    def _check_pressure(self) -> None:
        if not self._pressure and self._queued > self._high:
            self._pressure = True
            self._on_pressure(True)
        elif self._pressure and self._queued <= self._high // 4:
            self._pressure = False
            self._on_pressure(False)

    def _fail(self, reason: str) -> None:
        if not self.closed:
            self.close()
            self._on_error(reason)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._waiting:
            self._loop.remove_writer(self._fd)
            self._waiting = False
        pending = [part for part in self._queue if callable(part)]
        self._queue.clear()
        self._queued = 0
        self._mem_sent(self._queued_mem)
        self._sock.close()
        for sent in pending:
            sent()
