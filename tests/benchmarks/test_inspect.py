"""The static kernel report: every Triton launch for sm_80 and sm_90 without spills, within the
part's shared memory, 128-bit loads for the memory-bound ones; the csrc kernels read for one
architecture (tests/test_csrc_static.py checks both, so the nvcc compile is not repeated here)."""
from __future__ import annotations

import json

import pytest

from benchmarks import inspect as static_report


def test_every_triton_module_has_its_static_test():
    """Each module's launches are compiled for sm_80 and sm_90 and checked (spills, shared memory,
    access width) by its own op test; the report's command line is checked on one module below,
    so no kernel is compiled twice in one run."""
    from pathlib import Path

    ops_tests = Path(__file__).resolve().parents[1] / "ops"
    for name in static_report.triton_modules():
        test = ops_tests / f"test_{name}.py"
        assert test.exists(), f"meditron_kernels.ops.{name} has static_launches but no {test.name}"
        assert f'module_reports("meditron_kernels.ops.{name}"' in test.read_text(), \
            f"{test.name} does not compile meditron_kernels.ops.{name}'s static launches"


@pytest.mark.slow
def test_no_triton_kernel_spills(tmp_path, capsys):
    path = tmp_path / "static.json"
    status = static_report.main(["--no-csrc", "--modules", "swiglu", "--json", str(path)])
    out = capsys.readouterr().out
    records = json.loads(path.read_text())
    assert any(r["source"].startswith("triton:") for r in records), out
    bad = [(r["source"], r["kernel"], r["arch"], static_report.problems(r)) for r in records if static_report.problems(r)]
    assert not bad, "\n".join(map(str, bad))
    assert status == 0, out
    for r in records:
        for key in ("kernel", "arch", "registers", "spill_bytes", "shared_bytes", "mma", "vector_load_bits"):
            assert key in r, r
        assert r["mma"] in ("none", "HMMA", "HGMMA"), r
    # Every memory-bound Triton launch moves data in 16-byte accesses.
    narrow = [(r["kernel"], r["arch"], r["vector_load_bits"]) for r in records
              if r["source"].startswith("triton:") and r["mma"] == "none" and r["vector_load_bits"] < 128]
    assert not narrow, narrow


@pytest.mark.slow
def test_csrc_records():
    records, why = static_report.csrc_records((90,))
    if why:
        pytest.skip(why)
    assert records and {r["source"] for r in records} == {f"csrc/{f}" for f in static_report_sources()}
    bad = [(r["kernel"], static_report.problems(r)) for r in records if static_report.problems(r)]
    assert not bad, bad
    for r in records:
        assert r["arch"] == "sm_90" and r["mma"] in ("none", "HMMA", "HGMMA"), r
    assert max(r["vector_load_bits"] for r in records) == 128


def static_report_sources():
    from meditron_kernels import csrc_static

    return csrc_static.cu_sources()


def test_problems_flags_spills_and_shared():
    ok = dict(source="triton:x", kernel="k", arch="sm_90", registers=32, spill_bytes=0, shared_bytes=0,
              shared_limit=1000, mma="none", vector_load_bits=128)
    assert static_report.problems(ok) == []
    assert static_report.problems({**ok, "spill_bytes": 8}) == ["8 bytes spilled"]
    assert static_report.problems({**ok, "shared_bytes": 2000}) == ["shared 2000 > limit 1000"]
    assert static_report.problems({**ok, "source": "csrc/a.cu", "stack_bytes": 16, "local_bytes": 0})
    assert static_report.problems({**ok, "error": "boom"}) == ["failed to compile"]


def test_register_limited_warps():
    assert static_report.max_warps_by_registers(32, 90) == 64
    assert static_report.max_warps_by_registers(128, 90) == 16
    assert static_report.max_warps_by_registers(255, 80) == 8
