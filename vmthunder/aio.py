"""asyncio helpers for the data path."""

from __future__ import annotations

import asyncio
import contextvars
import sys


# Hashes at least this long are worth a worker thread (see run_hashing).
HASH_IN_THREAD_BYTES = 64 * 1024


async def run_hashing(check, hash_bytes: int):
    """``check()`` (hashing, e.g. a run of chunk digests) off the loop
    when each hash covers at least HASH_IN_THREAD_BYTES: the hashes
    release the GIL, so they run on another core while the loop serves
    other requests. Shorter ones run here: a worker takes the GIL back
    after every hash, each a wait on the event loop, which costs more
    than the hash (a 2 MiB run of 8 KiB chunks: 3.5 ms in a thread, 0.7
    ms here)."""
    if hash_bytes >= HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(check)
    return check()


def run(coro):
    """Run ``coro`` to completion on a new event loop (uvloop's when it
    is installed: the data path's loop) and return its result."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _finish(coro, awaited):
    """Drive the rest of a coroutine that suspended on ``awaited``."""
    while True:
        try:
            if awaited is None:
                await asyncio.sleep(0)      # it yielded control bare
            else:
                # The coroutine's own await marked the future as being
                # waited on; a Task clears that mark, and so must we.
                awaited._asyncio_future_blocking = False
                await awaited
        except asyncio.CancelledError:
            if awaited is not None and not awaited.cancelled():
                awaited.cancel()
            # The coroutine sees the cancellation where it waits.
        except BaseException:
            pass                            # ...and so does any other error
        try:
            awaited = coro.send(None)
        except StopIteration as stop:
            return stop.value


def start_eager(coro) -> asyncio.Future | None:
    """Run ``coro`` now, up to its first real wait.

    Most requests on a warm cache finish without ever waiting (the data is
    in the page cache), and then no Task is created at all: a Task costs
    more than the whole request. A coroutine that does wait continues in
    a Task, which is returned. Python 3.12's eager tasks do the same.
    Returns None when the coroutine finished; it must handle its own
    errors (an exception here propagates to the caller).
    """
    if sys.version_info >= (3, 12):
        task = asyncio.Task(coro, eager_start=True)
        return None if task.done() else task
    # One context for the whole run, as a Task (and 3.12's eager start)
    # gives it: a context variable set before the first wait can be reset
    # after it, and never leaks into the caller's context.
    ctx = contextvars.copy_context()
    try:
        awaited = ctx.run(coro.send, None)
    except StopIteration:
        return None
    task = asyncio.get_running_loop().create_task(_finish(coro, awaited),
                                                  context=ctx)
    task.add_done_callback(lambda t: _cancel_unstarted(t, coro, awaited,
                                                       ctx))
    return task


def _read_outcome(future) -> None:
    if not future.cancelled():
        future.exception()


def _cancel_unstarted(task, coro, awaited, ctx) -> None:
    """A Task cancelled before its first step never runs _finish, so the
    coroutine would never see the cancellation: its cleanup (giving back
    a budget, leaving a lock's queue) would never run. Deliver it here."""
    if not task.cancelled() or coro.cr_frame is None:
        return                              # it ran (or finished) itself
    if awaited is not None and not awaited.done():
        # As a Task would; what it ends with is nobody's to read now.
        awaited.cancel()
        awaited.add_done_callback(_read_outcome)
    try:
        ctx.run(coro.throw, asyncio.CancelledError())
    except (asyncio.CancelledError, StopIteration):
        pass
    except BaseException:
        # Its cleanup failed; the loop's handler logs it.
        asyncio.get_running_loop().call_exception_handler({
            "message": "cleanup of a cancelled request failed",
            "exception": sys.exc_info()[1]})
    finally:
        coro.close()
