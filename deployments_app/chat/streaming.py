"""Carrying an answer to an async response, and stopping it when the caller leaves.

Generation runs on the engine's own thread and its pieces reach the event loop
without a thread per stream (`llm.serve.engine.Stream.events`); only blocking
set-up (loading a model) runs on the chat threads here. Closing any iterator
here closes the chain down to the engine, so nobody is generated for after the
client has gone.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="chat")


async def run_in_thread(function, *args):
    """Call a blocking function on the chat threads and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_executor, function, *args)


async def prepend(first, rest):
    """`first`, then everything `rest` yields; closing this closes `rest`."""
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event


class Closable:
    """An async generator as Django's streaming content, with the close() Django calls when the response ends.

    Django closes only its own wrapper around an async iterator, so without this a
    client that leaves mid-answer would leave our generators suspended until garbage
    collection, and the model generating for nobody. close() runs in a worker thread:
    it schedules aclose() on the loop, which closes the chain down to the model.
    """

    def __init__(self, events, *, also=None):
        self._events = events
        self._also = also
        """An iterator events reads from, closed after it: a generator never started never closes its own."""
        self._loop = asyncio.get_running_loop()

    def __aiter__(self):
        return self._events

    def close(self) -> None:
        if self._loop.is_closed():  # the request's loop has ended (a test client's): nothing runs to stop
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop)

    async def _close(self) -> None:
        try:
            await self._events.aclose()
        finally:
            if self._also is not None:
                await self._also.aclose()
