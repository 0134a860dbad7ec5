"""meditron_kernels/tuned and backend auto: the measured table is built, written, loaded and used
for a (fake) GPU model; elsewhere auto stays Triton with its defaults."""
import glob
import json
import os

import pytest
import torch

from meditron_kernels import backend as B
from meditron_kernels import tuned
from meditron_kernels.tuned.__main__ import main as tune_main

FAKE = "NVIDIA Fake H999 80GB"
SLUG = "nvidia-fake-h999-80gb"
GPU = torch.device("cuda", 0)  # never touched: the slug is given or patched


def _row(op, dims, provider, direction, ms, check="ok", dtype="bfloat16", shape=None):
    return dict(op=op, shape=shape or str(sorted(dims.items())), dims=dims, dtype=dtype, direction=direction,
                provider=provider, status="ok", ms=ms, check=check)


def _rows():
    small, big, wide = dict(tokens=8192, hidden=4096, residual=0), dict(tokens=8192, hidden=8192, residual=0), \
        dict(tokens=4096, hidden=20000, residual=0)
    return [
        # hidden 4096: cuda wins forward + backward (0.5 + 1.0 < 0.6 + 1.1)
        _row("rms_norm", small, "triton", "forward", 0.6), _row("rms_norm", small, "triton", "backward", 1.1),
        _row("rms_norm", small, "cuda", "forward", 0.5), _row("rms_norm", small, "cuda", "backward", 1.0),
        _row("rms_norm", small, "torch", "forward", 0.1), _row("rms_norm", small, "torch", "backward", 0.1),
        # hidden 8192: a faster tile configuration of triton wins; cuda is faster forward but wrong
        _row("rms_norm", big, "triton", "forward", 1.2), _row("rms_norm", big, "triton", "backward", 2.2),
        _row("rms_norm", big, "triton[BLOCK_M=4,num_warps=8]", "forward", 1.0),
        _row("rms_norm", big, "triton[BLOCK_M=4,num_warps=8]", "backward", 2.0),
        _row("rms_norm", big, "cuda", "forward", 0.2, check="FAIL: dx error 1e-1"),
        _row("rms_norm", big, "cuda", "backward", 1.9),
        # hidden 20000 (bucket 32768): cuda timed forward only, so it does not compete
        _row("rms_norm", wide, "triton", "forward", 3.0), _row("rms_norm", wide, "triton", "backward", 5.0),
        _row("rms_norm", wide, "cuda", "forward", 1.0),
        # swiglu 11008 (bucket 16384): cuda wins
        _row("swiglu", dict(tokens=8192, ffn=11008), "triton", "forward", 1.0),
        _row("swiglu", dict(tokens=8192, ffn=11008), "cuda", "forward", 0.9),
    ]


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tuned, "TABLE_DIR", str(tmp_path))
    tuned.clear_cache()
    yield tmp_path
    tuned.clear_cache()


def test_bucket_is_the_next_power_of_two():
    assert [tuned.bucket(n) for n in (1, 2, 3, 64, 96, 4096, 4097, 11008)] == \
        ["1", "2", "4", "64", "128", "4096", "8192", "16384"]
    assert tuned.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_build_picks_the_fastest_checked_complete_provider():
    table = tuned.build(_rows(), FAKE)
    rms = table["ops"]["rms_norm"]
    assert rms["4096"]["backend"] == "cuda" and rms["4096"]["config"] is None
    assert rms["4096"]["ms"] == {"cuda": 1.5, "triton": 1.7}
    assert rms["8192"]["backend"] == "triton" and rms["8192"]["config"] == {"BLOCK_M": 4, "num_warps": 8}
    assert "cuda" not in rms["8192"]["ms"]  # its forward failed the check
    assert rms["32768"]["backend"] == "triton" and set(rms["32768"]["ms"]) == {"triton"}
    assert table["ops"]["swiglu"]["16384"]["backend"] == "cuda"


def test_written_table_drives_auto_for_that_device_only(table_dir, monkeypatch):
    path = tuned.write(tuned.build(_rows(), FAKE))
    assert path == os.path.join(str(table_dir), SLUG + ".json")
    monkeypatch.setattr(B, "cuda_extension_available", lambda: True)
    assert B.auto_backend("rms_norm", GPU, 4096, SLUG) == "cuda"
    assert B.auto_backend("rms_norm", GPU, 3000, SLUG) == "cuda"        # same bucket
    assert B.auto_backend("rms_norm", GPU, 8192, SLUG) == "triton"
    assert B.auto_backend("rms_norm", GPU, 100, SLUG) == "triton"       # unmeasured bucket
    assert B.auto_backend("rotary", GPU, 128, SLUG) == "triton"          # unmeasured op
    assert B.auto_backend("rms_norm", GPU, 4096, "nvidia-other") == "triton"  # no table for that GPU
    assert tuned.config("rms_norm", SLUG, 8192) == {"BLOCK_M": 4, "num_warps": 8}
    assert tuned.config("rms_norm", "nvidia-other", 8192) is None
    assert B.auto_backend("rms_norm", torch.device("cpu"), 4096, SLUG) == "torch"
    # without the compiled extension, a measured "cuda" falls back to Triton
    monkeypatch.setattr(B, "cuda_extension_available", lambda: False)
    assert B.auto_backend("rms_norm", GPU, 4096, SLUG) == "triton"


def test_dispatch_chooses_by_the_arguments_shape(table_dir, monkeypatch):
    tuned.write(tuned.build(_rows(), FAKE))
    monkeypatch.setattr(tuned, "slug_of", lambda device: SLUG)
    monkeypatch.setattr(B, "cuda_extension_available", lambda: True)
    calls = []
    for name in ("cuda", "triton"):
        monkeypatch.setitem(B._REGISTRY, ("rms_norm", name), lambda x, *a, _n=name: calls.append((_n, x.shape[-1])))
    monkeypatch.delenv(B.ENV_VAR, raising=False)
    fn = B.dispatch("rms_norm", None, GPU)
    fn(torch.empty(2, 4096)), fn(torch.empty(2, 8192)), fn(torch.empty(3, 100))
    assert calls == [("cuda", 4096), ("triton", 8192), ("triton", 100)]
    # a named backend is never overridden by the table
    calls.clear()
    B.dispatch("rms_norm", "triton", GPU)(torch.empty(2, 4096))
    with B.use_backend("triton"):
        B.dispatch("rms_norm", None, GPU)(torch.empty(2, 4096))
    assert calls == [("triton", 4096), ("triton", 4096)]
    assert B.resolve(None, GPU, "rms_norm", 4096) == "cuda"


def test_cli_writes_the_table(table_dir, tmp_path, capsys):
    results = tmp_path / "r.json"
    results.write_text(json.dumps(dict(kind="kernels", env=dict(device_type="cuda", device_name=FAKE), rows=_rows())))
    assert tune_main([str(results)]) == 0
    assert json.loads((table_dir / (SLUG + ".json")).read_text())["ops"]["rms_norm"]["4096"]["backend"] == "cuda"
    results.write_text(json.dumps(dict(kind="kernels", env=dict(device_type="cpu", device_name="CPU x"), rows=[])))
    assert tune_main([str(results)]) == 2
    assert "not a kernels results file from a CUDA device" in capsys.readouterr().err


def test_bad_table_is_refused(table_dir):
    (table_dir / (SLUG + ".json")).write_text(json.dumps(dict(ops=dict(rms_norm={"4096": dict(backend="cudnn")}))))
    with pytest.raises(ValueError, match="backend in"):
        tuned.load(SLUG)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(tuned.TABLE_DIR, "*.json"))) or [None])
def test_shipped_tables_load(path):
    if path is None:
        pytest.skip("no measured table shipped yet")
    slug = os.path.basename(path)[:-5]
    tuned.clear_cache()
    table = tuned.load(slug)
    assert tuned.device_slug(table["device"]) == slug
