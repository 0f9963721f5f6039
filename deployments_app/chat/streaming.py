"""Carrying an answer from the blocking engine to an async response, and stopping it when the caller leaves.

Generation runs in worker threads so the event loop never blocks; each piece
crosses to the loop through a queue. Closing any iterator here closes the chain
down to the model, so nobody is generated for after the client has gone.
"""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="chat")


async def run_in_thread(function, *args):
    """Call a blocking function on the chat threads and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_executor, function, *args)


async def from_thread(stream):
    """Pull a blocking generator from a worker thread; closing this closes it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    abandoned = threading.Event()

    def put(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: the client left
            abandoned.set()

    def produce():
        try:
            for event in stream:
                if abandoned.is_set():
                    break
                put(("event", event))
        except Exception as exc:  # noqa: BLE001 - handed to the async side
            put(("error", exc))
        finally:
            stream.close()
            put(("end", None))

    loop.run_in_executor(_executor, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        abandoned.set()


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

    def __init__(self, events):
        self._events = events
        self._loop = asyncio.get_running_loop()

    def __aiter__(self):
        return self._events

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._events.aclose(), self._loop)
