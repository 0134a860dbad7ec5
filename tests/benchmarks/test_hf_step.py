"""benchmarks.hf_step: the CPU part runs and its two losses agree; argument errors are clear."""
import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import hf_step  # noqa: E402


def test_loss_child_fused_equals_unfused():
    a = hf_step._loss_child("unfused", 50, 33, 8)
    b = hf_step._loss_child("fused", 50, 33, 8)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and a["peak_mib"] >= 0 and b["peak_mib"] >= 0


def test_loss_memory_cli(capsys):
    assert hf_step.main(["--loss-memory", "--seq", "64", "--hidden", "16", "--vocabs", "1000"]) == 0
    out = capsys.readouterr().out
    assert "unfused" in out and "fused" in out and "error" not in out


@pytest.mark.parametrize("argv,match", [(["--configs", "apex"], "unknown apex"), (["--seq", "0"], "--seq must be"),
                                        (["--vocabs", "x"], "comma-separated ints")])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        hf_step.parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_prepare_patches_a_copy():
    base = hf_step._llama(1, 64, 32, 48, 4, torch.float32, "cpu")
    model = hf_step._prepare("meditron", base)
    assert model._meditron_kernels is not None and getattr(base, "_meditron_kernels", None) is None
