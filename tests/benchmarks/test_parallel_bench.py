"""Smoke test of python -m benchmarks.parallel memory at a tiny size (gloo, 1 and 2 ranks)."""
import json

import pytest


@pytest.mark.distributed
def test_memory_benchmark_runs_and_the_fused_loss_holds_less(tmp_path, capsys):
    from benchmarks.parallel import main

    out = tmp_path / "mem.json"
    # 2048 tokens against a 512-word vocabulary: the fused op's 1024-token chunk is half the logits
    assert main(["memory", "--seq", "2048", "--dim", "8", "--vocab", "512", "--micro-batch", "1", "--tp", "1,2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["tp"], r["path"]) for r in rows} == {(1, "fused"), (1, "logits"), (2, "fused"), (2, "logits")}
    peak = {(r["tp"], r["path"]): r["peak_mb"] for r in rows}
    for tp in (1, 2):
        assert 0 < peak[tp, "fused"] < peak[tp, "logits"]
    assert "loss step peak memory per rank" in capsys.readouterr().out
