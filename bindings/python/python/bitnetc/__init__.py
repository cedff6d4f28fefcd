"""bitnetc: run BitNet b1.58 (ternary) and llama GGUF models with the bitnetc engine.

>>> import bitnetc
>>> m = bitnetc.Model("model.gguf", threads=2)
>>> m.generate("Once upon a time", max_tokens=16, temperature=0)
>>> for piece in m.stream("Once upon a time", max_tokens=16):
...     print(piece, end="")
>>> m.logits(m.tokenize("Hello"))   # numpy float32 array [tokens, vocab]

Calls into the engine release the GIL; errors raise `BitnetcError` with the engine's message.
"""

from ._native import BitnetcError, Stream, __version__
from ._native import Model as _NativeModel

__all__ = ["Model", "Stream", "BitnetcError", "__version__"]


class Model(_NativeModel):
    """A loaded model: a GGUF file or a compiled plan (`.bplan`), bound to kernels for this CPU.

    `Model(path, threads=None, context=None)`: `threads` defaults to every core, `context` (KV
    cache positions) to the model's own.
    """

    def logits(self, ids):
        """Every position's logits for `ids` evaluated from an empty cache: a float32 numpy
        array of shape `[len(ids), vocab_size]`."""
        import numpy as np

        raw, rows, vocab = self.logits_bytes(list(ids))
        return np.frombuffer(raw, dtype="<f4").reshape(rows, vocab)
