from os import PathLike
from typing import Iterator

import numpy as np
import numpy.typing as npt

__version__: str

class BitnetcError(Exception):
    """An error of the bitnetc engine; its message names the file, field or step."""

class Stream(Iterator[str]):
    """The pieces of a generation's text; dropping it stops the generation."""

    def __iter__(self) -> Stream: ...
    def __next__(self) -> str: ...

class Model:
    """A loaded model: a GGUF file or a compiled plan (`.bplan`)."""

    def __init__(
        self, path: str | PathLike[str], threads: int | None = None, context: int | None = None
    ) -> None: ...
    def generate(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
    ) -> str:
        """Generates up to `max_tokens` tokens after `prompt` (temperature 0: greedy)."""
    def stream(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.8,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        seed: int | None = None,
    ) -> Stream:
        """Like `generate`, yielding the text piece by piece."""
    def tokenize(self, text: str, add_special: bool = True) -> list[int]: ...
    def detokenize(self, ids: list[int]) -> str: ...
    def logits(self, ids: list[int]) -> npt.NDArray[np.float32]:
        """Every position's logits, shape `[len(ids), vocab_size]`."""
    def logits_bytes(self, ids: list[int]) -> tuple[bytes, int, int]: ...
    @property
    def metrics(self) -> dict[str, float | int]:
        """Load and compile seconds, weight and arena bytes, context and vocabulary size."""
