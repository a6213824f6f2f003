"""start_eager: a request run eagerly keeps one context of its own."""

import asyncio
import contextvars

from vmthunder import aio

flag = contextvars.ContextVar("flag", default=False)


def test_context_var_set_before_a_wait_resets_after_it():
    async def request(seen):
        token = flag.set(True)
        try:
            await asyncio.sleep(0.01)
            seen.append(flag.get())
        finally:
            flag.reset(token)           # ValueError with a foreign context

    async def main():
        seen = []
        task = aio.start_eager(request(seen))
        assert task is not None
        assert flag.get() is False      # did not leak into the caller
        await task
        assert seen == [True]
        assert flag.get() is False

    asyncio.run(main())


def test_a_request_that_never_waits_needs_no_task():
    async def request():
        return 42

    async def main():
        assert aio.start_eager(request()) is None

    asyncio.run(main())
