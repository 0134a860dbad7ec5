"""The generation benchmark runs end to end on the CPU (tiny model) and writes its JSON."""
import json

import pytest

pytest.importorskip("transformers")


def test_bench_decode_cpu_smoke(tmp_path, capsys):
    from benchmarks.bench_decode import main

    out = tmp_path / "decode.json"
    assert main(["--device", "cpu", "--batch", "2", "--prompt-len", "8", "--new-tokens", "3", "--reps", "1",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefill tok/s" in text and "transformers-sdpa" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"ours", "transformers-sdpa"}
    assert all(r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 for r in rows)
