// Host API of the kernels in csrc/*.cu: plain pointers, sizes and a stream, no torch types, so
// the .cu files build with nvcc alone and bindings.cpp is the only file that sees torch.
//
// Every entry point checks its own limits and returns cudaErrorInvalidValue (launching nothing)
// when they are not met; the Python launchers check the same limits first with a clear message.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// ------------------------------------------------------------------------------------ RMSNorm
// A row lives in registers between its two passes: 512 threads per row, each holding at most 16
// 32-bit registers per operand (the backward holds h, dy and the weight at once; more made ptxas
// spill under the 128-register cap of 512 threads). That bounds the row length: 16384 for 16-bit
// rows on the 16-byte path, 8192 for fp32 rows and for rows on the element-wise path, which runs
// when hidden is not a multiple of 16 bytes or a pointer is not 16-byte aligned.
constexpr int kRmsMaxThreads = 512;
constexpr int kRmsRegsPerOperand = 16;

inline int rms_norm_max_hidden(DType dtype, bool vectorized) {
  return kRmsMaxThreads * kRmsRegsPerOperand * (vectorized ? 4 / dtype_size(dtype) : 1);
}

struct RmsNormFwdArgs {
  const void* x;         // (rows, hidden), contiguous
  const void* residual;  // (rows, hidden) or nullptr
  const void* weight;    // (hidden,), dtype or float32
  void* y;               // (rows, hidden)
  void* h;               // (rows, hidden) = x + residual; nullptr when residual is nullptr
  int64_t rows;
  int hidden;
  float eps;
  DType dtype;   // of x, residual, y, h
  DType wdtype;  // of weight
};

struct RmsNormBwdArgs {
  const void* dy;      // (rows, hidden)
  const void* h;       // (rows, hidden): the forward's normalised input (x, or x + residual)
  const void* weight;  // (hidden,)
  const void* dh;      // (rows, hidden) gradient reaching h directly (fused residual), or nullptr
  void* dx;            // (rows, hidden)
  void* dweight;       // (hidden,) in wdtype, or nullptr when not needed
  float* partials;     // (n_partials, hidden) fp32 scratch, from rms_norm_bwd_partials()
  int64_t rows;
  int hidden;
  float eps;
  DType dtype;
  DType wdtype;
};

// Rows of fp32 dweight partials the backward writes for these arguments (0 when dweight is null).
int64_t rms_norm_bwd_partials(const RmsNormBwdArgs& a);

cudaError_t rms_norm_fwd(const RmsNormFwdArgs& a, cudaStream_t stream);
cudaError_t rms_norm_bwd(const RmsNormBwdArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------------------------- rotary
struct RotaryArgs {
  const void* q;       // (batch, seq, n_heads, head_dim), strides below, last dim contiguous
  const void* k;       // (batch, seq, n_kv_heads, head_dim)
  void* q_out;         // contiguous
  void* k_out;         // contiguous
  const float* cos;    // (n_positions, head_dim / 2) fp32, contiguous
  const float* sin;
  const void* position_ids;  // (batch, seq) contiguous int32/int64, or nullptr for 0..seq-1
  bool position_ids_int64;
  int64_t q_stride[3];  // batch, seq, head strides in elements
  int64_t k_stride[3];
  int64_t batch;
  int64_t seq;
  int64_t n_positions;
  int n_heads;
  int n_kv_heads;
  int head_dim;
  bool interleaved;  // adjacent pairs (Meta) instead of rotate-half (HF)
  bool conjugate;    // rotate by -angle: the backward of the rotation
  DType dtype;
};

cudaError_t rotary(const RotaryArgs& a, cudaStream_t stream);

// ------------------------------------------------------------------------------------- SwiGLU
// A (rows, cols) problem over row-strided operands: out = silu(gate) * up. For the separate entry
// rows = 1 and cols = numel; for the packed [gate | up] entry, up = gate + ffn and both operands
// advance 2 * ffn per row.
struct SwigluArgs {
  const void* gate;
  const void* up;
  const void* dout;  // backward only
  void* out;         // forward only
  void* dgate;       // backward only
  void* dup;         // backward only
  int64_t rows;
  int64_t cols;
  int64_t in_row_stride;   // gate, up, dgate, dup
  int64_t out_row_stride;  // out, dout
  DType dtype;
};

cudaError_t swiglu_fwd(const SwigluArgs& a, cudaStream_t stream);
cudaError_t swiglu_bwd(const SwigluArgs& a, cudaStream_t stream);

}  // namespace mk
