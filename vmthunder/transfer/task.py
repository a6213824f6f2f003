"""copy(src, dst) -> Task: a copy running in the background.

From synchronous code (Nova, the CLI) the copy runs on an event loop in
a thread of its own; from asyncio code (called with a loop running) it
is a task on that loop. Either way the same :class:`Task`::

    task = copy("glance://ID", "/var/lib/nova/instances/_base/ID")
    ...                                   # other work
    result = task.wait()                  # or: result = await task

``wait()`` returns the :class:`~vmthunder.transfer.engine.Result` or
raises the TransferError the copy ended with (SourceError,
VerificationError, DestinationError, TransferCancelled).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from vmthunder.transfer import engine, registry
from vmthunder.transfer.errors import TransferCancelled, TransferError

# Options of the copy itself; the rest go to the drivers.
ENGINE_OPTIONS = ("max_in_flight", "request_size", "rate_limit", "digest",
                  "detect_zeroes")
DRIVER_OPTIONS = ("dst_format", "overwrite", "timeout", "config",
                  "config_file", "headers", "checksum", "glance_endpoint",
                  "glance_token", "agent_socket", "origin")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Task:
    """A copy in progress. Thread-safe: wait, done, progress and cancel
    may be called from any thread."""

    def __init__(self, copy: engine.Copy):
        self._copy = copy
        self.source = copy.src_where
        self.destination = copy.dst_where
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        # Running from the start: a cancelled waiter (wrap_future) can
        # then never cancel it, only cancel() ends a copy.
        self._future.set_running_or_notify_cancel()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._atask: asyncio.Task | None = None
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._loop = loop
            self._atask = loop.create_task(self._main())
            return
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), daemon=True,
            name=f"vmthunder-copy {self.source} -> {self.destination}")
        self._thread.start()
        ready.wait()

    def _thread_main(self, ready: threading.Event) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._atask = loop.create_task(self._main())
            ready.set()
            loop.run_until_complete(self._atask)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            ready.set()
            asyncio.set_event_loop(None)
            loop.close()

    async def _main(self) -> None:
        try:
            result = await self._copy.run()
        except asyncio.CancelledError:
            self._future.set_exception(TransferCancelled(
                f"copy {self.source} -> {self.destination}"))
        except TransferError as exc:
            self._future.set_exception(exc)
        except BaseException as exc:      # a bug: say so, never hang
            error = TransferError(None, f"internal error: {exc!r}")
            error.__cause__ = exc
            self._future.set_exception(error)
        else:
            self._future.set_result(result)

    # -- the caller's side -------------------------------------------------

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def wait(self, timeout: float | None = None) -> engine.Result:
        """Block until the copy ends: its Result, or its TransferError.
        TimeoutError after ``timeout`` seconds (the copy goes on). Not
        from the event loop running the copy: await the task there."""
        if self._on_loop_thread() and not self._future.done():
            raise RuntimeError("Task.wait() would block the event loop "
                               "running the copy; use `await task`")
        return self._future.result(timeout)

    async def wait_async(self) -> engine.Result:
        """Await the end from any event loop (the copy's or another)."""
        return await asyncio.wrap_future(self._future)

    def __await__(self):
        return self.wait_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    @property
    def result(self) -> engine.Result | None:
        """The Result once the copy succeeded, else None."""
        if self._future.done() and self._future.exception() is None:
            return self._future.result()
        return None

    def exception(self) -> BaseException | None:
        """The TransferError the copy ended with (None while running or
        after success)."""
        return self._future.exception() if self._future.done() else None

    def progress(self) -> engine.Progress:
        return self._copy.progress()

    def cancel(self) -> bool:
        """Stop the copy: the destination is aborted (its temporary file
        removed) and wait() raises TransferCancelled. False when the copy
        had ended already."""
        if self._future.done() or self._atask is None:
            return False
        if self._on_loop_thread():
            self._atask.cancel()
        else:
            try:
                self._loop.call_soon_threadsafe(self._atask.cancel)
            except RuntimeError:            # its loop has just closed
                return False
        return True

    def __repr__(self) -> str:
        state = "done" if self.done() else self._copy.stage
        return f"<Task {self.source} -> {self.destination} {state}>"


def copy(src: str, dst: str, **options) -> Task:
    """Copy ``src`` to ``dst`` in the background; returns the Task.

    Sources and destinations by URI (see ``registry.SOURCE_FORMS`` and
    ``DESTINATION_FORMS``). Options:

    - ``max_in_flight`` (requests), ``request_size`` (bytes per request):
      the driver's defaults otherwise;
    - ``rate_limit``: bytes per second read from the source;
    - ``digest``: algorithm of the result's digest of what was written
      (blake3 by default, any hashlib name, None for none; a source's
      own whole-image hash algorithm wins);
    - ``detect_zeroes`` (True): blocks of zeros are not written;
    - ``dst_format``: ``raw`` or ``qcow2`` (file destinations);
      ``overwrite`` (True): replace an existing file at commit;
    - ``timeout``: seconds to connect and for a reply (NBD, HTTP;
      iSCSI logins follow [iscsi] login_timeout);
    - ``config`` (a loaded ConfigOpts) or ``config_file``: vmthunder's
      options for iscsi://, export:NAME and vmthunder:// ([iscsi],
      [export], [agent]);
    - HTTP: ``headers``, ``checksum`` (``ALGORITHM:HEX`` of the whole
      image); Glance: ``glance_endpoint``, ``glance_token``;
      vmthunder://: ``agent_socket``, ``origin`` (attach the image if it
      is not attached).

    A bad URI scheme or option raises here (TransferError, TypeError);
    everything else comes out of ``wait()``.
    """
    unknown = set(options) - set(ENGINE_OPTIONS) - set(DRIVER_OPTIONS)
    if unknown:
        raise TypeError(f"copy() got unknown options: "
                        f"{', '.join(sorted(unknown))}")
    source = registry.make_source(src, options)
    destination = registry.make_destination(dst, options)
    try:
        job = engine.Copy(source, destination, **{
            k: options[k] for k in ENGINE_OPTIONS if k in options})
    except ValueError as exc:
        raise TransferError(None, str(exc)) from None
    task = Task(job)
    task._start()
    return task
