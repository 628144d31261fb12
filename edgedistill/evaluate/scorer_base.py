"""The scorer interface: what one scorer is given (ScoreInput), what it is (Scorer), and the text
normalization every comparing scorer shares. edgedistill.evaluate.scorers builds and runs scorers.

    python -c "from edgedistill.evaluate.scorer_base import normalize_text; print(normalize_text(' «Zürich.» '))"
"""

from __future__ import annotations

import importlib
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from edgedistill.errors import EdgedistillError


@dataclass(frozen=True)
class ScoreInput:
    prediction: str  # the final answer, any reasoning trace already removed
    reference: str | dict | list | None  # gold text, gold JSON value, or None
    record: dict = field(default_factory=dict)  # the whole held-out record


@dataclass(frozen=True)
class ScorerSpec:
    """One entry of a recipe's scorer list (the recipe passes its own objects with these attributes)."""

    name: str
    pattern: str | None = None
    function: str | None = None
    normalize: bool = True
    rubric: str | None = None
    scale: tuple[float, float] = (1, 5)
    endpoint: Any = None  # an EndpointConfig, or its dict as task.json holds it


Outcome = float | bool | Exception  # what a scorer gave for one example, before score_all checks it


class Scorer:
    """One scorer. `score_batch` is what score_all calls: a scorer that asks a model (the teacher as
    judge) overrides it to send the whole batch at once; every other scorer is a plain __call__."""

    name: str
    needs_reference: bool = True

    def __call__(self, item: ScoreInput) -> float:
        raise NotImplementedError

    def has_reference(self, item: ScoreInput) -> bool:
        return item.reference is not None

    def score_batch(self, items: list[ScoreInput]) -> list[Outcome]:
        """One outcome per item: its score, or the exception scoring it raised. A batch that fails
        as a whole may raise: every item then counts that error."""
        outcomes: list[Outcome] = []
        for item in items:
            try:
                outcomes.append(self(item))
            except Exception as exc:  # a bad example is counted, never a lost run
                outcomes.append(exc)
        return outcomes

    def parts(self, items: list[ScoreInput]) -> dict[str, list[Outcome | None]]:
        """Sub-scores reported as scorers of their own (json_field:<name>): per part, one outcome per
        item, None where the item has no reference for that part. It does not raise: an item's
        exception takes the place of its score. None by default."""
        return {}


def normalize_text(text: str) -> str:
    """Case-folded, whitespace runs as one space, punctuation, quotes and backticks stripped from
    both ends; NFC first, so that é typed as one code point or as e + accent compare equal."""
    text = " ".join(unicodedata.normalize("NFC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(char: str) -> bool:
    return char.isspace() or char == "`" or unicodedata.category(char).startswith("P")


def reference_text(item: ScoreInput) -> str:
    if not isinstance(item.reference, str):
        raise TypeError(f"this scorer compares text, and the reference is {type(item.reference).__name__}")
    return item.reference


def require_package(module: str, package: str, scorer: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EdgedistillError(f"the {scorer} scorer needs the package {package}, which is not installed",
                               f"pip install {package}") from exc

