"""LoRA on the distilled student, merged back: the tiny-lora recipe end to end."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel

from edgedistill.cli import main
from edgedistill.lora import MERGE_TOLERANCE
from edgedistill.pipeline import is_complete
from edgedistill.runtimes import gguf_artifacts
from edgedistill.runtimes.pytorch import load_model

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_lora_adapter_is_kept_merged_and_exported(tmp_path):
    out = tmp_path / "run"
    # up to the export: the stages after it read the merged student like any other (the report's
    # LoRA section is tests/test_report.py's)
    assert main(["run", str(ROOT / "recipes" / "tiny-lora.yaml"), "--out", str(out), "--to", "export"]) == 0
    for stage in ("lora", "merge", "export"):
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
    assert set(export["inputs"]) == {"distill", "lora", "merge", "generate"}
    # One base, many adapters: the distilled student and the adapter as GGUF, which llama.cpp
    # applied together matches the merged model (the stage checked it within the F16 bounds).
    lora_export = export["result"]["lora"]
    assert lora_export["verification"]["passed"] and lora_export["verification"]["file_type"] == "F16"
    assert (out / "export" / lora_export["base"]).is_file() and (out / "export" / lora_export["adapter"]).is_file()
    assert lora_export["adapter_bytes"] < (out / "export" / lora_export["base"]).stat().st_size / 4
    # export.imatrix: every quantized student file was weighted by the answers' importance matrix
    assert export["result"]["imatrix"]["chunks"] >= 1
    for qtype in ("Q8_0", "Q4_K_M"):
        reader = gguf.GGUFReader(out / "export" / export["result"][qtype]["file"])
        assert reader.get_field("quantize.imatrix.file").contents() == "student-imatrix.gguf"
    # bench and eval take the top-level models only, not the adapter, its base or the imatrix
    models = ["student-f16.gguf", "student-q8_0.gguf", "student-q4_k_m.gguf"]
    assert [p.name for p in gguf_artifacts(out / "export")] == models
