"""tests/helpers.py: the accuracy rule's fp32 floor is machine-independent and leaves fp16/bf16 alone."""
import pytest
import torch

from helpers import FP32_FLOOR_ULPS, assert_close_rule, baseline_err

EPS32 = torch.finfo(torch.float32).eps


def test_fp32_baseline_is_floored_at_the_documented_ulps():
    ref = torch.tensor([4.0, -2.0], dtype=torch.float64)
    exact = ref.float()  # a baseline with no error at all, as a lucky BLAS might give
    assert baseline_err(exact, ref) == FP32_FLOOR_ULPS * EPS32 * 4.0
    # within 2x the floor passes, beyond it fails, whatever the baseline measured
    assert_close_rule(ref.float() + 1.9 * FP32_FLOOR_ULPS * EPS32 * 4.0, exact, ref, atol=0.0)
    with pytest.raises(AssertionError, match="error"):
        assert_close_rule(ref.float() + 2.1 * FP32_FLOOR_ULPS * EPS32 * 4.0, exact, ref, atol=0.0)


def test_a_larger_measured_baseline_still_counts():
    ref = torch.tensor([1.0], dtype=torch.float64)
    noisy = torch.tensor([1.0 + 1e-3], dtype=torch.float32)
    assert baseline_err(noisy, ref) == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_the_measured_baseline(dtype):
    ref = torch.tensor([1.0, 3.0], dtype=torch.float64)
    exact = ref.to(dtype)
    assert baseline_err(exact, ref) == 0.0
    with pytest.raises(AssertionError):
        assert_close_rule((ref + 0.01).to(dtype), exact, ref, atol=1e-4)
