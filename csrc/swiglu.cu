// SwiGLU: out = silu(gate) * up, and its backward. One kernel pair serves both entries:
// separate gate/up tensors (one row of numel elements) and the packed [gate | up] output of a
// fused w1|w3 GEMM (rows of 2 * ffn, up at +ffn).
//
// Purely bandwidth-bound: 3 accesses per element forward (gate, up, out), 5 backward (dout,
// gate, up, dgate, dup). Each thread keeps kFwdUnroll 16-byte loads per operand in flight.
#include "common.cuh"
#include "kernels.h"

namespace mk {

constexpr int kThreads = 128;
// 16-byte accesses in flight per operand per thread. The backward has three inputs, so it takes
// two per operand: four made ptxas spill on sm_90 under the 128-register cap of 4 blocks/SM.
constexpr int kFwdUnroll = 4;
constexpr int kBwdUnroll = 2;

// num / (1 + exp(-g)). 16-bit outputs take the fast exp/divide: their ~2 ulp fp32 error disappears in
// the final rounding to 8 or 11 mantissa bits. fp32 keeps IEEE division, as torch's silu does.
template <typename T>
__device__ __forceinline__ float div_1pe(float num, float g) {
  if constexpr (sizeof(T) == 2) {
    return __fdividef(num, 1.f + __expf(-g));  // 1 + e = inf gives 0, the limit of num / (1 + e)
  } else {
    return num / (1.f + expf(-g));
  }
}

// gate, up: (rows, cols) with row stride in_stride; out: row stride out_stride.
// grid.x tiles the columns (kThreads * kFwdUnroll vectors per block), grid.y strides over rows.
// VECTOR: every operand is 16-byte aligned and every row starts 16-byte aligned; the one
// thread whose vector crosses the end of a row finishes it element by element.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads, 4)
swiglu_fwd_kernel(const T* __restrict__ gate,  // silu's input
                  const T* __restrict__ up,    // the linear branch
                  T* __restrict__ out,         // silu(gate) * up
                  int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride) {
  constexpr int V = VECTOR ? kVec<T> : 1;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * (kThreads * kFwdUnroll * V);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* g = gate + r * in_stride;
    const T* u = up + r * in_stride;
    T* o = out + r * out_stride;
    Vec<T, V> gv[kFwdUnroll], uv[kFwdUnroll];
#pragma unroll
    for (int i = 0; i < kFwdUnroll; ++i) {
      const int64_t c = tile + static_cast<int64_t>(i * kThreads + threadIdx.x) * V;
      if (c + V <= cols) {
        gv[i] = load<T, V>(g + c);
        uv[i] = load<T, V>(u + c);
      }
    }
#pragma unroll
    for (int i = 0; i < kFwdUnroll; ++i) {
      const int64_t c = tile + static_cast<int64_t>(i * kThreads + threadIdx.x) * V;
      if (c + V <= cols) {
        Vec<T, V> ov;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float gf = to_float(gv[i].v[e]);
          ov.v[e] = from_float<T>(div_1pe<T>(gf, gf) * to_float(uv[i].v[e]));
        }
        store<T, V>(o + c, ov);
      } else if (VECTOR && c < cols) {
        for (int64_t t = c; t < cols; ++t) {
          const float gf = to_float(load1(g + t));
          store1(o + t, from_float<T>(div_1pe<T>(gf, gf) * to_float(load1(u + t))));
        }
      }
    }
  }
}

// dgate = dout * up * silu'(gate), dup = dout * silu(gate), with
// silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g): recomputed, never stored by the forward.
template <typename T>
__device__ __forceinline__ void swiglu_grad(float dout, float g, float u, float& dg, float& du) {
  const float s = div_1pe<T>(1.f, g);
  du = dout * (g * s);
  dg = dout * u * (s * (1.f + g * (1.f - s)));
}

template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads, 4)
swiglu_bwd_kernel(const T* __restrict__ dout,  // gradient of out, row stride out_stride
                  const T* __restrict__ gate,  // forward inputs, row stride in_stride
                  const T* __restrict__ up,
                  T* __restrict__ dgate,       // gradients, row stride in_stride
                  T* __restrict__ dup,
                  int64_t rows, int64_t cols, int64_t in_stride, int64_t out_stride) {
  constexpr int V = VECTOR ? kVec<T> : 1;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * (kThreads * kBwdUnroll * V);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* d = dout + r * out_stride;
    const T* g = gate + r * in_stride;
    const T* u = up + r * in_stride;
    T* dg = dgate + r * in_stride;
    T* du = dup + r * in_stride;
    Vec<T, V> dv[kBwdUnroll], gv[kBwdUnroll], uv[kBwdUnroll];
#pragma unroll
    for (int i = 0; i < kBwdUnroll; ++i) {
      const int64_t c = tile + static_cast<int64_t>(i * kThreads + threadIdx.x) * V;
      if (c + V <= cols) {
        dv[i] = load<T, V>(d + c);
        gv[i] = load<T, V>(g + c);
        uv[i] = load<T, V>(u + c);
      }
    }
#pragma unroll
    for (int i = 0; i < kBwdUnroll; ++i) {
      const int64_t c = tile + static_cast<int64_t>(i * kThreads + threadIdx.x) * V;
      if (c + V <= cols) {
        Vec<T, V> dgv, duv;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          float a, b;
          swiglu_grad<T>(to_float(dv[i].v[e]), to_float(gv[i].v[e]), to_float(uv[i].v[e]), a, b);
          dgv.v[e] = from_float<T>(a);
          duv.v[e] = from_float<T>(b);
        }
        store<T, V>(dg + c, dgv);
        store<T, V>(du + c, duv);
      } else if (VECTOR && c < cols) {
        for (int64_t t = c; t < cols; ++t) {
          float a, b;
          swiglu_grad<T>(to_float(load1(d + t)), to_float(load1(g + t)), to_float(load1(u + t)), a, b);
          store1(dg + t, from_float<T>(a));
          store1(du + t, from_float<T>(b));
        }
      }
    }
  }
}

template <typename T>
bool vector_ok(const SwigluArgs& a, std::initializer_list<const void*> ptrs) {
  constexpr int V = kVec<T>;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return a.rows == 1 || (a.in_row_stride % V == 0 && a.out_row_stride % V == 0);
}

dim3 grid_for(const SwigluArgs& a, int unroll, int elems_per_access) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * unroll * elems_per_access;
  const int64_t tiles = (a.cols + per_block - 1) / per_block;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(a.rows < 65535 ? a.rows : 65535));
}

bool bad_shape(const SwigluArgs& a) {
  const int64_t max_tiles = 0x7fffffffLL * kThreads * kBwdUnroll;
  return a.rows < 0 || a.cols < 0 || a.cols > max_tiles || (a.rows > 1 && (a.in_row_stride < a.cols));
}

template <typename T>
cudaError_t fwd(const SwigluArgs& a, cudaStream_t stream) {
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* o = static_cast<T*>(a.out);
  if (vector_ok<T>(a, {g, u, o})) {
    swiglu_fwd_kernel<T, true><<<grid_for(a, kFwdUnroll, kVec<T>), kThreads, 0, stream>>>(
        g, u, o, a.rows, a.cols, a.in_row_stride, a.out_row_stride);
  } else {
    swiglu_fwd_kernel<T, false><<<grid_for(a, kFwdUnroll, 1), kThreads, 0, stream>>>(
        g, u, o, a.rows, a.cols, a.in_row_stride, a.out_row_stride);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const SwigluArgs& a, cudaStream_t stream) {
  const T* d = static_cast<const T*>(a.dout);
  const T* g = static_cast<const T*>(a.gate);
  const T* u = static_cast<const T*>(a.up);
  T* dg = static_cast<T*>(a.dgate);
  T* du = static_cast<T*>(a.dup);
  if (vector_ok<T>(a, {d, g, u, dg, du})) {
    swiglu_bwd_kernel<T, true><<<grid_for(a, kBwdUnroll, kVec<T>), kThreads, 0, stream>>>(
        d, g, u, dg, du, a.rows, a.cols, a.in_row_stride, a.out_row_stride);
  } else {
    swiglu_bwd_kernel<T, false><<<grid_for(a, kBwdUnroll, 1), kThreads, 0, stream>>>(
        d, g, u, dg, du, a.rows, a.cols, a.in_row_stride, a.out_row_stride);
  }
  return cudaGetLastError();
}

cudaError_t swiglu_fwd(const SwigluArgs& a, cudaStream_t stream) {
  if (bad_shape(a)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return fwd<float>(a, stream);
    case DType::kFloat16: return fwd<__half>(a, stream);
    case DType::kBFloat16: return fwd<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t swiglu_bwd(const SwigluArgs& a, cudaStream_t stream) {
  if (bad_shape(a)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.cols == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return bwd<float>(a, stream);
    case DType::kFloat16: return bwd<__half>(a, stream);
    case DType::kBFloat16: return bwd<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mk
