"""``bench/gpu_check.py --smoke``: the GPU acceptance check's code runs on the CPU at tiny widths, so it is ready the
first time a GPU is there (its figures are not the point here)."""

import importlib.util
import json

from conftest import REPO_ROOT


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_section_and_writes_json_and_markdown(tmp_path):
    """Every case but TORCH_COMPILE (tracing alone takes ~15 s on the CPU; ``test_speed`` compiles the model)."""
    gpu_check = _gpu_check()
    cases = [case for case in gpu_check.CASES if case != "torch_compile"]
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--cases", *cases]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env = report["environment"]
    assert env["device"] == "cpu" and env["bitsandbytes"][0].isdigit() and "flash_attn" in env
    rows = {row["case"]: row for row in report["training"]}
    assert list(rows) == cases
    assert "CUDA" in rows.pop("flash_attention_2")["skipped"]  # no GPU here: skipped with the reason
    for case, row in rows.items():
        assert "error" not in row and "skipped" not in row, (case, row)
        assert row["tokens_per_s"] > 0 and row["positions"] > 0 and row["estimate_gib"] > 0
        first, last = row["loss_first_last"]
        assert last < first, (case, row)  # the package's optimizer step ran
    assert report["pipeline"]["optimizer_steps"] == 4 and report["pipeline"]["generated_s"] > 0
    assert report["generation"]["frames"] > 0 and report["generation"]["rtf"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| tiny |") == len(cases) and "pipeline:" in table and "generation:" in table
