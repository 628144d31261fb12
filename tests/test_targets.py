"""Device targets: every built-in profile loads; budgets turn bench and eval rows into pass/fail."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedistill.errors import EdgedistillError
from edgedistill.targets import (BUDGET_SOURCES, Budgets, Target, any_failed, builtin_targets, check_target,
                                 format_target_checks, kv_cache_bytes, load_target, preflight)

ROOT = Path(__file__).resolve().parent.parent
PROFILES = sorted((ROOT / "recipes" / "targets").glob("*.yaml"))


def test_the_promised_profiles_ship():
    assert {"laptop-cpu", "raspberry-pi-5", "phone-8gb", "consumer-gpu"} <= set(builtin_targets())


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_loads_by_path_and_by_name(path):
    target = load_target(path)
    assert target.name == path.stem
    assert target.description
    assert load_target(path.stem) == target
    # the shipped profiles set every budget, so a report shows them all
    assert all(getattr(target.budgets, b) is not None for b in BUDGET_SOURCES)


def test_unknown_name_lists_the_builtin_targets():
    with pytest.raises(EdgedistillError) as err:
        load_target("toaster")
    assert "'toaster'" in str(err.value)
    assert "raspberry-pi-5" in err.value.hint and "phone-8gb" in err.value.hint


def test_missing_yaml_file_is_refused(tmp_path):
    with pytest.raises(EdgedistillError, match="does not exist"):
        load_target(tmp_path / "nope.yaml")


def test_unknown_key_is_refused_naming_file_and_key(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("name: board\ncontext_length: 1024\nbudgets:\n  max_memory_mb: 500\n  max_ram_mb: 400\n")
    with pytest.raises(EdgedistillError) as err:
        load_target(path)
    assert f"{path}: budgets.max_ram_mb: unknown key" in str(err.value)


def test_bad_value_is_refused_naming_the_value(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("name: board\ncontext_length: 1024\nbudgets:\n  min_quality_share: 85\n")
    with pytest.raises(EdgedistillError, match=r"budgets.min_quality_share: .*\(got 85\)"):
        load_target(path)


TARGET = Target(name="t", context_length=2048, budgets=Budgets(
    max_memory_mb=400, max_file_mb=100, max_ttft_ms=500, min_decode_tokens_per_s=20, min_quality_share=0.85))
BENCH = {"artifact": "m-Q4_K_M.gguf", "file_mb": 80.0, "decode_tokens_per_s": 15.0, "prefill_tokens_per_s": 900.0,
         "ttft_ms": 250.0, "peak_rss_mb": 500.0, "threads": 2}


def test_check_target_pass_fail_and_margins():
    checks = {c["budget"]: c for c in check_target(TARGET, BENCH, {"artifact": "m-Q4_K_M.gguf", "task_score": 0.9,
                                                                     "share_of_reference": 0.9})}
    assert list(checks) == list(BUDGET_SOURCES)
    assert checks["max_file_mb"] == {"budget": "max_file_mb", "limit": 100, "value": 80.0, "passed": True,
                                     "margin": 0.2}
    assert checks["max_memory_mb"]["passed"] is False and checks["max_memory_mb"]["margin"] == -0.25
    assert checks["max_ttft_ms"]["passed"] is True and checks["max_ttft_ms"]["margin"] == 0.5
    assert checks["min_decode_tokens_per_s"]["passed"] is False and checks["min_decode_tokens_per_s"]["margin"] == -0.25
    assert checks["min_quality_share"]["passed"] is True and checks["min_quality_share"]["margin"] == 0.0588


def test_quality_without_eval_is_not_measured_and_not_a_failure():
    checks = check_target(Target(name="t", context_length=512, budgets=Budgets(max_file_mb=100, min_quality_share=0.85)),
                          BENCH)
    assert checks[-1] == {"budget": "min_quality_share", "limit": 0.85, "value": None, "passed": None, "margin": None}
    assert not any_failed(checks)


def test_only_budgets_set_are_checked():
    assert check_target(Target(name="t", context_length=512), BENCH) == []


def test_table_shows_results_and_the_this_machine_note():
    table = format_target_checks(TARGET, [("m-Q4_K_M.gguf", check_target(TARGET, BENCH))])
    assert "m-Q4_K_M.gguf:" in table
    assert "FAIL" in table and "pass" in table and "not measured" in table
    assert "-25%" in table and "+20%" in table
    assert "not on the target device" in table


SMOLLM2 = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}


def test_kv_cache_of_a_smollm2_like_config():
    assert kv_cache_bytes(SMOLLM2, 2048) == 2 * 30 * 3 * 64 * 2048 * 2
    # without num_key_value_heads every attention head has its own K and V; head_dim is given or derived
    assert kv_cache_bytes({**SMOLLM2, "num_key_value_heads": None}, 2048) == 3 * kv_cache_bytes(SMOLLM2, 2048)
    assert kv_cache_bytes({**SMOLLM2, "head_dim": 128}, 2048) == 2 * kv_cache_bytes(SMOLLM2, 2048)


def test_preflight_fits_a_large_budget_and_not_a_small_one():
    roomy = preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048, budgets=Budgets(max_memory_mb=500)))
    assert roomy["kv_cache_mb"] == 45.0  # 47.2 MB = 45.0 MiB
    assert roomy["estimate_mb"] == pytest.approx(roomy["weights_mb"] + 45.0 + roomy["overhead_mb"], abs=0.1)
    assert roomy["fits"] is True and roomy["budget_mb"] == 500
    assert preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048,
                                                  budgets=Budgets(max_memory_mb=100)))["fits"] is False
    assert preflight(SMOLLM2, 105_000_000, Target(name="t", context_length=2048))["fits"] is None


def test_preflight_names_a_missing_config_key():
    with pytest.raises(EdgedistillError, match="num_hidden_layers"):
        kv_cache_bytes({"num_attention_heads": 4, "hidden_size": 64}, 128)
