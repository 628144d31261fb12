"""The error an exporter raises for a model it cannot express, naming the config.json keys involved.

    python -c "from edgedistill.export.refusal import ConfigRefusal as C; print(C('p', keys=('rope_scaling',)).keys)"

It is an EdgedistillError like any other. The keys let edgedistill.export.check, which runs the
exporters' rules before the long stages on the config the student will have, name the recipe
field that made the value (student.width.num_attention_heads for a pruned head count).
"""

from __future__ import annotations

from edgedistill.errors import EdgedistillError


class ConfigRefusal(EdgedistillError):
    """An exporter's refusal of a config.json value; `keys` are the config keys the rule reads."""

    def __init__(self, problem: str, hint: str | None = None, *, keys: tuple[str, ...] = ()):
        super().__init__(problem, hint)
        self.keys = keys
