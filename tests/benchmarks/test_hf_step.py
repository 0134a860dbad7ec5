"""benchmarks.hf_step: the CPU part runs and its two losses agree; argument errors are clear."""
import pytest
import torch

pytest.importorskip("transformers")

from benchmarks import hf_step  # noqa: E402


def test_loss_child_fused_equals_unfused():
    a = hf_step._loss_child("unfused", 50, 33, 8)
    b = hf_step._loss_child("fused", 50, 33, 8)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and a["peak_mib"] >= 0 and b["peak_mib"] >= 0


def test_loss_memory_cli_counts_the_child_s_own_peak(capsys):
    """Each row's peak is the child's own, even when the parent's peak is larger: a child inherits its
    parent's ru_maxrss across fork and exec, which made every figure of ``python -m benchmarks --quick``
    0 MiB (issue 21). The parent here holds more than a child ever reaches."""
    held = torch.ones(2**28)  # 1 GiB, every page written
    vocab, seq = 8000, 256
    assert hf_step.main(["--loss-memory", "--seq", str(seq), "--hidden", "16", "--vocabs", str(vocab)]) == 0
    del held
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("vocab")))
    rows = [dict(zip(lines[header].split(), line.split())) for line in lines[header + 1:]]
    assert [(r["loss_impl"], r["status"]) for r in rows] == [("unfused", "ok"), ("fused", "ok")], lines
    # Both losses hold the float32 logits of all 256 tokens at once (the fused one's chunks hold at
    # least 1024 tokens), so each peak is at least their size.
    logits_mib = vocab * seq * 4 / 2**20
    assert all(float(r["peak_mib"]) >= logits_mib for r in rows), (lines, logits_mib)


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
