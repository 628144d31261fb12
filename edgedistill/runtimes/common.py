"""What every runtime shares: log-probs from logits, the score() request's checks, streamed text
pieces, and the devices and dtypes PyTorch runs in.

    python -c "import numpy as np; from edgedistill.runtimes.common import log_softmax; print(log_softmax(np.zeros(4)))"

The runtime modules import these from here, not from the edgedistill.runtimes package, whose
open_runtime imports them: a helper in the package would make each runtime and the package import
each other. This module imports numpy and edgedistill.errors only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from edgedistill.errors import EdgedistillError

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16", "bf16")


def log_softmax(logits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Log-probs of logits rows, normalized in float64 (a 262k vocabulary stays exact), as `dtype`."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))).astype(dtype, copy=False)


def scored_positions(ids: list[int], last: int | None) -> int:
    """How many positions score(ids, last=last) returns; refuses an empty or bad request."""
    if not ids:
        raise EdgedistillError("score() needs at least one token id", "pass a non-empty list of ids")
    if last is not None and not 0 < last:
        raise EdgedistillError(f"score(last={last}) asks for no positions", "pass last >= 1 or None (all)")
    return len(ids) if last is None else min(last, len(ids))


def stream_pieces(tokens: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Text pieces of an answer whose tokens (end token left out) come one by one: each piece is
    what the text gained, and a piece that ends inside a multi-byte character waits for the rest."""
    emitted, ids = "", []
    for token in tokens:
        ids.append(token)
        # decoding the whole answer each time keeps multi-byte characters whole; answers are short,
        # so the quadratic cost does not matter
        text = decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text
