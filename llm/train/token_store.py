"""Rendered training data held compactly: flat arrays in a temporary file, memory-mapped.

A list of Python ints costs about 36 bytes a token (an int object and a pointer to
it), so a 1 GiB upload's tokens would not fit in a worker's memory. Here a token
costs 5 bytes (an int32 id and a uint8 "trained" flag), written to an anonymous
temporary file while the input streams and paged in by the operating system as
training reads it. The file has no name on disk: it disappears when the run ends,
however it ends.

`ExampleStore` and `PairStore` are sequences of the `RenderedExample`s and
`RenderedPair`s they were given: indexing one rebuilds it exactly, so packing,
batching and everything downstream see what they saw before.
"""

import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar, overload

import numpy as np
import numpy.typing as npt

from llm.chat import IGNORE_INDEX, RenderedExample
from llm.chat.pairs import RenderedPair

__all__ = ["ExampleStore", "ExampleStoreWriter", "PairStore", "PairStoreWriter"]

_FLUSH_ITEMS = 1 << 20
"""Values a column buffers in memory before it appends them to its file."""


class _Column:
    """One flat array, appended to in pieces and read back memory-mapped."""

    def __init__(self, typecode: str, dtype: type[np.generic], directory: Path | None) -> None:
        self.buffer = array(typecode)
        self.dtype = np.dtype(dtype)
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=directory)  # closed when mapped
        self.length = 0

    def extend(self, values: Sequence[int]) -> None:
        self.buffer.extend(values)
        if len(self.buffer) >= _FLUSH_ITEMS:
            self._flush()

    def _flush(self) -> None:
        self.file.write(self.buffer.tobytes())
        self.length += len(self.buffer)
        self.buffer = array(self.buffer.typecode)

    def finish(self) -> npt.NDArray[np.generic]:
        """The column, read-only; the file closes now and goes when the mapping does."""
        self._flush()
        self.file.flush()
        try:
            if not self.length:  # mmap cannot map an empty file
                return np.zeros(0, dtype=self.dtype)
            return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(self.length,))
        finally:
            self.file.close()


def _spill_dir(directory: str | Path | None) -> Path | None:
    """Where the temporary files go: directory (made if missing), or the system's temporary folder."""
    if directory is None:
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path


Item = TypeVar("Item")


class BuiltWhenRead(Sequence[Item]):
    """A read-only sequence whose items are built as they are read: a subclass gives __len__ and _item."""

    def _item(self, index: int) -> Item:
        """The item at 0 <= index < len(self)."""
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        return self._item(index % len(self))

    def __iter__(self) -> Iterator[Item]:
        return (self._item(i) for i in range(len(self)))


# --- Chat examples ---------------------------------------------------------------


class ExampleStore(BuiltWhenRead[RenderedExample]):
    """Rendered examples as flat arrays; store[i] is the i-th example as it was added."""

    def __init__(
        self,
        ids: npt.NDArray[np.int32],
        trained: npt.NDArray[np.uint8],
        bounds: npt.NDArray[np.int64],
        truncated: npt.NDArray[np.int64],
    ) -> None:
        self.ids, self.trained, self.bounds, self.truncated = ids, trained, bounds, truncated

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _item(self, index: int) -> RenderedExample:
        start, end = int(self.bounds[index]), int(self.bounds[index + 1])
        ids: list[int] = self.ids[start:end].tolist()
        trained: list[int] = self.trained[start:end].tolist()
        labels = [token if counts else IGNORE_INDEX for token, counts in zip(ids, trained, strict=True)]
        return RenderedExample(input_ids=ids, labels=labels, truncated_tokens=int(self.truncated[index]))

    @property
    def tokens(self) -> int:
        """Tokens of every example together."""
        return int(self.bounds[-1])

    def lengths(self) -> npt.NDArray[np.int64]:
        """Tokens of each example."""
        return np.diff(self.bounds)


class ExampleStoreWriter:
    """Appends rendered examples to temporary files in directory (the system's when None)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        spill = _spill_dir(directory)
        self.ids = _Column("i", np.int32, spill)
        self.trained = _Column("B", np.uint8, spill)
        self.bounds = array("q", [0])
        self.truncated = array("q")

    def add(self, example: RenderedExample) -> None:
        self.ids.extend(example.input_ids)
        self.trained.extend(example.loss_mask)
        self.bounds.append(self.bounds[-1] + len(example.input_ids))
        self.truncated.append(example.truncated_tokens)

    def finish(self) -> ExampleStore:
        return ExampleStore(
            self.ids.finish().view(np.int32),
            self.trained.finish().view(np.uint8),
            np.frombuffer(self.bounds, dtype=np.int64),
            np.frombuffer(self.truncated, dtype=np.int64),
        )


# --- Preference pairs -------------------------------------------------------------


class PairStore(BuiltWhenRead[RenderedPair]):
    """Rendered preference pairs as flat arrays, each laid out prompt | chosen | rejected."""

    def __init__(
        self,
        ids: npt.NDArray[np.int32],
        trained: npt.NDArray[np.uint8],
        bounds: npt.NDArray[np.int64],
        truncated: npt.NDArray[np.int64],
    ) -> None:
        self.ids, self.trained, self.truncated = ids, trained, truncated
        self.bounds = bounds
        """(pairs, 4): where each pair's prompt, chosen and rejected answer begin, and where it ends."""

    def __len__(self) -> int:
        return len(self.bounds)

    def _item(self, index: int) -> RenderedPair:
        start, chosen, rejected, end = (int(bound) for bound in self.bounds[index])
        ids: list[int] = self.ids[start:end].tolist()
        trained = [bool(flag) for flag in self.trained[chosen:end].tolist()]
        prompt, answers = chosen - start, rejected - start
        return RenderedPair(
            prompt_ids=ids[:prompt],
            chosen_ids=ids[prompt:answers],
            rejected_ids=ids[answers:],
            chosen_trained=trained[: rejected - chosen],
            rejected_trained=trained[rejected - chosen :],
            truncated_tokens=int(self.truncated[index]),
        )

    @property
    def tokens(self) -> int:
        """Tokens one packed pass over every pair processes."""
        return int(self.bounds[-1, 3]) if len(self) else 0

    def lengths(self) -> npt.NDArray[np.int64]:
        """Tokens of each pair: prompt, chosen and rejected answer."""
        return self.bounds[:, 3] - self.bounds[:, 0]


class PairStoreWriter:
    """Appends rendered pairs to temporary files in directory (the system's when None)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        spill = _spill_dir(directory)
        self.ids = _Column("i", np.int32, spill)
        self.trained = _Column("B", np.uint8, spill)
        self.bounds = array("q")
        self.truncated = array("q")
        self.end = 0

    def add(self, pair: RenderedPair) -> None:
        self.ids.extend(pair.prompt_ids)
        self.ids.extend(pair.chosen_ids)
        self.ids.extend(pair.rejected_ids)
        self.trained.extend([0] * len(pair.prompt_ids))
        self.trained.extend([int(flag) for flag in pair.chosen_trained])
        self.trained.extend([int(flag) for flag in pair.rejected_trained])
        chosen = self.end + len(pair.prompt_ids)
        rejected = chosen + len(pair.chosen_ids)
        end = rejected + len(pair.rejected_ids)
        self.bounds.extend((self.end, chosen, rejected, end))
        self.truncated.append(pair.truncated_tokens)
        self.end = end

    def finish(self) -> PairStore:
        return PairStore(
            self.ids.finish().view(np.int32),
            self.trained.finish().view(np.uint8),
            np.frombuffer(self.bounds, dtype=np.int64).reshape(-1, 4),
            np.frombuffer(self.truncated, dtype=np.int64),
        )
