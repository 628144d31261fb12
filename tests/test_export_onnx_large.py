"""An ONNX export over protobuf's 2 GB limit: a random 720M-parameter Llama (2.9 GB in float32)
exported by the builder path and verified against PyTorch like any other (slow: a few minutes and
about 9 GB of free disk on 2 cores).

    .venv/bin/python -m pytest -q -m slow tests/test_export_onnx_large.py
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_tiny_model

from edgedistill.export.onnx import MANIFEST, OnnxExportOptions, export_onnx

TWO_GB = 2 ** 31


@pytest.mark.slow
def test_fp32_export_over_two_gigabytes(tmp_path):
    # the conftest tiny model scaled up; transformers' default initializer_range keeps 14 layers of
    # this width from saturating
    hf_dir = make_tiny_model(tmp_path / "large", hidden_size=2048, intermediate_size=5632, num_hidden_layers=14,
                             num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                             initializer_range=0.02)
    weight_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))  # float32
    assert weight_bytes > TWO_GB

    out = tmp_path / "large-fp32"
    manifest = export_onnx(hf_dir, out, OnnxExportOptions("fp32"))
    shutil.rmtree(hf_dir)
    # the graph alone stays small; every weight is in the external data file, which is over 2 GB
    assert (out / "model.onnx").stat().st_size < 16 * 2 ** 20
    assert (out / "model.onnx.data").stat().st_size > TWO_GB
    assert manifest["verification"]["passed"] and manifest["verification"]["greedy_verdict"] in ("identical", "tie")
    assert json.loads((out / MANIFEST).read_text())["files"]["model.onnx.data"]["bytes"] > TWO_GB
