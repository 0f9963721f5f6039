"""Carrying an answer to an async response, and stopping it when the caller leaves.

Generation runs on the engine's own thread and its pieces reach the event loop
without a thread per stream (`llm.serve.engine.Stream.events`); only blocking
set-up (loading a model) runs on the chat threads here. Closing any iterator
here closes the chain down to the engine, so nobody is generated for after the
client has gone.
"""

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing

from llm.serve.schema import Completion, TextPiece, piece_logprobs

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


_ENDED = object()


async def merge_choices(choices):
    """The events of a request's n choices as one stream, in the order they come, each piece and
    Completion marked with its choice's index; closing this closes every choice's stream."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index, events):
        try:
            async for event in events:
                await queue.put((index, event))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put((index, exc))
        else:
            await queue.put((index, _ENDED))

    tasks = [asyncio.create_task(pump(index, events)) for index, events in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, event = await queue.get()
            if event is _ENDED:
                running -= 1
            elif isinstance(event, Exception):
                raise event
            else:
                yield _of_choice(event, index)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for events in choices:
            await events.aclose()


def _of_choice(event, index: int):
    if isinstance(event, Completion):
        return dataclasses.replace(event, index=index)
    return TextPiece(event, piece_logprobs(event), choice=index)


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
