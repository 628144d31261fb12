"""LoRA on the distilled student, merged back: the tiny-lora recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel

from edgedistill.cli import main
from edgedistill.lora import MERGE_TOLERANCE
from edgedistill.pipeline import is_complete
from edgedistill.runtimes.pytorch import load_model

ROOT = Path(__file__).resolve().parent.parent


def test_lora_adapter_is_kept_merged_and_exported(tmp_path):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "recipes" / "tiny-lora.yaml"), "--out", str(out)]) == 0
    for stage in ("lora", "merge", "export", "report"):
        assert is_complete(out / stage), stage

    # The adapter stands on its own: a PEFT folder without the base weights.
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "lora").iterdir()}
    assert not (out / "lora" / "model.safetensors").exists()
    lora = json.loads((out / "lora" / "manifest.json").read_text())["result"]
    assert 0 < lora["trainable_parameters"] < 100_000
    assert lora["processes"] == 2

    # Merged logits equal base + adapter, checked here independently of the stage's own check.
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198]])
    with torch.inference_mode():
        adapted = PeftModel.from_pretrained(load_model(out / "distill"), out / "lora").eval()
        want = adapted(input_ids=ids).logits
        got = load_model(out / "merge")(input_ids=ids).logits
        base = load_model(out / "distill")(input_ids=ids).logits
    assert (got - want).abs().max().item() <= MERGE_TOLERANCE
    assert (base - want).abs().max().item() > 10 * MERGE_TOLERANCE, "the adapter changed nothing"

    export = json.loads((out / "export" / "manifest.json").read_text())
    assert set(export["inputs"]) == {"merge"}
    assert "## LoRA adapter" in (out / "report.md").read_text()
