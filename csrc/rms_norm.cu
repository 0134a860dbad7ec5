// RMSNorm, y = h * rsqrt(mean(h^2) + eps) * weight with h = x (+ residual), fp32 statistics.
//
// A group of blockDim.x threads owns one row (blockDim.y rows per block) and keeps the row in
// registers between its two passes, so every element is read from DRAM exactly once:
//   forward  reads x (+ residual), writes y (+ h);
//   backward reads h, dy (+ dh), writes dx, and recomputes rstd instead of storing it: the
//            sum of squares comes free in the same reduction as sum(dy * w * h).
// dweight is deterministic and atomic-free: each row group of the persistent backward grid
// accumulates its rows in fp32 (in shared memory) and writes one partial row; a second kernel
// sums the partials in a fixed order. The grid depends only on the device and the shape, so two
// runs on the same GPU give the same bits.
#include <type_traits>

#include "common.cuh"
#include "kernels.h"

namespace mk {

constexpr int kRmsBlockThreads = 256;  // short rows share a block up to this size
constexpr int kRmsMaxRowsPerBlock = kRmsBlockThreads / 32;

// Accesses per thread per operand allowed for (T, VEC) by the register budget of kernels.h.
template <typename T, int VEC>
constexpr int kRmsMaxVpt = VEC == 1 ? kRmsRegsPerOperand : kRmsRegsPerOperand * 4 / (VEC * static_cast<int>(sizeof(T)));

// Sum over the blockDim.x threads of this thread's row. Every thread of the block must call it
// (it synchronises the block). Every thread of the row receives the same bits, and the order of
// the additions depends only on the block shape: the result is reproducible run to run.
template <typename F>
__device__ __forceinline__ F row_sum(F v, F* smem /* [kRmsMaxRowsPerBlock * 32] */) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31;
  F* s = smem + threadIdx.y * 32;
  if (lane == 0) s[threadIdx.x >> 5] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? s[lane] : F{};
  return warp_sum(v);
}

// VEC elements per access (16 bytes, or 1 on the unaligned path), VPT accesses per thread per
// operand; the launcher picks blockDim.x so that blockDim.x * VPT * VEC >= hidden.
template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(kRmsMaxThreads, 1)
rms_norm_fwd_kernel(const T* __restrict__ x,         // (rows, hidden)
                    const T* __restrict__ residual,  // (rows, hidden), or nullptr
                    const W* __restrict__ weight,    // (hidden,)
                    T* __restrict__ y,               // (rows, hidden)
                    T* __restrict__ h_out,           // (rows, hidden) x + residual; unused without residual
                    int64_t rows, int hidden,
                    float inv_hidden,                // 1 / hidden, from the host: an IEEE division here
                                                     // compiles to a call whose ABI costs a stack frame
                    float eps) {
  __shared__ float smem[kRmsMaxRowsPerBlock * 32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < rows;  // no early return: dead rows still reach the barrier
  const int nvec = hidden / VEC;
  const int64_t base = row * hidden;

  Vec<T, VEC> hv[VPT];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (live && c < nvec) {
      hv[i] = load<T, VEC>(x + base + c * VEC);
      if (residual != nullptr) {
        const Vec<T, VEC> r = load<T, VEC>(residual + base + c * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) hv[i].v[e] = from_float<T>(to_float(hv[i].v[e]) + to_float(r.v[e]));
        store<T, VEC>(h_out + base + c * VEC, hv[i]);  // statistics use h rounded to T, as torch does
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f = to_float(hv[i].v[e]);
        ss = fmaf(f, f, ss);
      }
    }
  }
  ss = row_sum(ss, smem);
  const float rstd = rsqrtf(ss * inv_hidden + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (live && c < nvec) {
      const Vec<W, VEC> w = load<W, VEC>(weight + c * VEC);
      Vec<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = from_float<T>(to_float(hv[i].v[e]) * rstd * to_float(w.v[e]));
      store<T, VEC>(y + base + c * VEC, o);
    }
  }
}

// With g = dy * w and r = rstd:  dh = r * g - h * r^3 * mean(g * h);  dw = sum_rows dy * h * r.
// Persistent grid: block b handles row groups b, b + gridDim.x, ... and writes its dweight
// partial to partials[b * blockDim.y + threadIdx.y]. The partial accumulates in shared memory
// (each thread owns its own columns, so no barrier guards it): in registers it would add 32 live
// fp32 values per thread to the 48 the row already holds, and ptxas spilled at the 128-register
// cap that 512 threads impose.
template <int VEC>
__device__ __forceinline__ void smem_add(float* p, const float (&x)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      float4 a = *reinterpret_cast<float4*>(p + i);
      a.x += x[i];
      a.y += x[i + 1];
      a.z += x[i + 2];
      a.w += x[i + 3];
      *reinterpret_cast<float4*>(p + i) = a;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] += x[i];
  }
}

template <typename T, typename W, int VEC, int VPT>
__global__ void __launch_bounds__(kRmsMaxThreads, 1)
rms_norm_bwd_kernel(const T* __restrict__ dy,       // (rows, hidden)
                    const T* __restrict__ h,        // (rows, hidden) the forward's normalised input
                    const W* __restrict__ weight,   // (hidden,)
                    const T* __restrict__ dh,       // (rows, hidden) gradient reaching h directly, or nullptr
                    T* __restrict__ dx,             // (rows, hidden)
                    float* __restrict__ partials,   // (gridDim.x * blockDim.y, hidden), or nullptr; when
                                                    // set, dynamic shared memory holds blockDim.y * hidden floats
                    int64_t rows, int hidden, float inv_hidden, float eps) {
  // Two buffers, alternating per row group: a warp still reading group i's warp sums is never
  // overwritten by group i + 1, because group i + 1 passes a barrier before group i + 2 writes.
  __shared__ float2 red[2][kRmsMaxRowsPerBlock * 32];
  extern __shared__ float4 dyn_smem[];
  float* acc = reinterpret_cast<float*>(dyn_smem) + threadIdx.y * hidden;
  const int nvec = hidden / VEC;

  Vec<W, VEC> wv[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < nvec) {
      wv[i] = load<W, VEC>(weight + c * VEC);
      if (partials != nullptr) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[c * VEC + e] = 0.f;
      }
    }
  }

  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  int parity = 0;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < rows; row0 += step, parity ^= 1) {
    const int64_t row = row0 + threadIdx.y;
    const bool live = row < rows;
    const int64_t base = row * hidden;
    Vec<T, VEC> hv[VPT], gv[VPT];
    float2 sums = make_float2(0.f, 0.f);  // (sum h^2, sum g * h)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (live && c < nvec) {
        hv[i] = load<T, VEC>(h + base + c * VEC);
        gv[i] = load<T, VEC>(dy + base + c * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float hf = to_float(hv[i].v[e]);
          sums.x = fmaf(hf, hf, sums.x);
          sums.y = fmaf(to_float(gv[i].v[e]) * to_float(wv[i].v[e]), hf, sums.y);
        }
      }
    }
    sums = row_sum(sums, red[parity]);
    const float rstd = rsqrtf(sums.x * inv_hidden + eps);
    const float coef = sums.y * inv_hidden * rstd * rstd * rstd;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (live && c < nvec) {
        Vec<T, VEC> d;
        if (dh != nullptr) d = load<T, VEC>(dh + base + c * VEC);
        float dwv[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float hf = to_float(hv[i].v[e]);
          const float dyf = to_float(gv[i].v[e]);
          float g = rstd * (dyf * to_float(wv[i].v[e])) - coef * hf;
          if (dh != nullptr) g += to_float(d.v[e]);
          d.v[e] = from_float<T>(g);
          dwv[e] = dyf * (hf * rstd);
        }
        store<T, VEC>(dx + base + c * VEC, d);
        if (partials != nullptr) smem_add<VEC>(acc + c * VEC, dwv);
      }
    }
  }

  if (partials == nullptr) return;
  float* out = partials + (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * hidden;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < nvec) {
      Vec<float, VEC> a;
#pragma unroll
      for (int e = 0; e < VEC; ++e) a.v[e] = acc[c * VEC + e];
      store<float, VEC>(out + c * VEC, a);
    }
  }
}

// dweight[j] = sum_p partials[p, j], in a fixed order: threadIdx.y strides over p, then one
// thread adds the blockDim.y column sums in order. V columns per thread (4 when aligned).
constexpr int kDwCols = 32;   // threads across columns
constexpr int kDwRows = 16;   // threads across partial rows

template <typename W, int V>
__global__ void __launch_bounds__(kDwCols * kDwRows)
rms_norm_dweight_kernel(const float* __restrict__ partials,  // (n_partials, hidden)
                        W* __restrict__ dweight,             // (hidden,)
                        int n_partials, int hidden) {
  __shared__ float sums[kDwRows][kDwCols * V + 1];
  const int col = (blockIdx.x * kDwCols + threadIdx.x) * V;
  Vec<float, V> s;
#pragma unroll
  for (int e = 0; e < V; ++e) s.v[e] = 0.f;
  if (col < hidden) {
#pragma unroll 4
    for (int p = threadIdx.y; p < n_partials; p += kDwRows) {
      const Vec<float, V> v = load<float, V>(partials + static_cast<int64_t>(p) * hidden + col);
#pragma unroll
      for (int e = 0; e < V; ++e) s.v[e] += v.v[e];
    }
  }
#pragma unroll
  for (int e = 0; e < V; ++e) sums[threadIdx.y][threadIdx.x * V + e] = s.v[e];
  __syncthreads();
  if (threadIdx.y == 0 && col < hidden) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float t = 0.f;
#pragma unroll
      for (int r = 0; r < kDwRows; ++r) t += sums[r][threadIdx.x * V + e];
      dweight[col + e] = from_float<W>(t);
    }
  }
}

// ------------------------------------------------------------------------------------ launch
namespace {

struct RmsConfig {
  int vec;             // elements per access
  int vpt;             // accesses per thread per operand
  int threads;         // blockDim.x: threads per row
  int rows_per_block;  // blockDim.y
};

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The one place that shapes a launch; the forward and the backward share it so that both use the
// same row grouping. Four accesses per thread per operand give enough bytes in flight; past
// that, rows grow by threads up to 512, then by accesses per thread up to the register budget
// (rms_norm_max_hidden; the caller checks it).
RmsConfig rms_config(int hidden, DType dtype, bool aligned) {
  RmsConfig c;
  const int v16 = 16 / dtype_size(dtype);
  c.vec = (aligned && hidden % v16 == 0) ? v16 : 1;
  const int nvec = hidden / c.vec;
  c.threads = ceil_div(ceil_div(nvec, 4), 32) * 32;
  c.threads = c.threads < 32 ? 32 : (c.threads > kRmsMaxThreads ? kRmsMaxThreads : c.threads);
  c.vpt = 1;
  while (c.vpt * c.threads < nvec) c.vpt *= 2;
  c.rows_per_block = kRmsBlockThreads / c.threads > 1 ? kRmsBlockThreads / c.threads : 1;
  return c;
}

template <int N> using IntC = std::integral_constant<int, N>;

// Calls f(IntC<VPT>) for the runtime vpt, instantiating only what the register budget allows.
template <typename T, int VEC, typename F>
cudaError_t with_vpt(int vpt, F&& f) {
  constexpr int kMax = kRmsMaxVpt<T, VEC>;
  switch (vpt) {
    case 1: return f(IntC<1>{});
    case 2: if constexpr (2 <= kMax) return f(IntC<2>{}); break;
    case 4: if constexpr (4 <= kMax) return f(IntC<4>{}); break;
    case 8: if constexpr (8 <= kMax) return f(IntC<8>{}); break;
    case 16: if constexpr (16 <= kMax) return f(IntC<16>{}); break;
  }
  return cudaErrorInvalidValue;
}

// Calls f(T{}, W{}, IntC<VEC>, IntC<VPT>) for the storage types and the config.
template <typename F>
cudaError_t dispatch(DType dtype, DType wdtype, const RmsConfig& c, F&& f) {
  auto with_types = [&](auto t, auto w) -> cudaError_t {
    using T = decltype(t);
    constexpr int V16 = kVec<T>;
    if (c.vec == V16) return with_vpt<T, V16>(c.vpt, [&](auto vpt) { return f(t, w, IntC<V16>{}, vpt); });
    return with_vpt<T, 1>(c.vpt, [&](auto vpt) { return f(t, w, IntC<1>{}, vpt); });
  };
  const bool wf32 = wdtype == DType::kFloat32;
  switch (dtype) {
    case DType::kFloat32:
      if (wf32) return with_types(float{}, float{});
      break;
    case DType::kFloat16:
      return wf32 ? with_types(__half{}, float{}) : (wdtype == DType::kFloat16 ? with_types(__half{}, __half{})
                                                                              : cudaErrorInvalidValue);
    case DType::kBFloat16:
      return wf32 ? with_types(__nv_bfloat16{}, float{})
                  : (wdtype == DType::kBFloat16 ? with_types(__nv_bfloat16{}, __nv_bfloat16{})
                                                : cudaErrorInvalidValue);
  }
  return cudaErrorInvalidValue;
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

bool bad_sizes(int64_t rows, int hidden, DType dtype, const RmsConfig& c) {
  return rows < 0 || hidden < 0 || hidden > rms_norm_max_hidden(dtype, c.vec > 1);
}

RmsConfig bwd_config(const RmsNormBwdArgs& a) {
  return rms_config(a.hidden, a.dtype, all_aligned({a.dy, a.h, a.weight, a.dh, a.dx}));
}

// The backward's dweight accumulators: blockDim.y rows of hidden floats. At most 64 KB (one
// 512-thread row of 16384); above the 48 KB default the kernel must opt in.
size_t bwd_smem(const RmsNormBwdArgs& a, const RmsConfig& c) {
  return a.dweight != nullptr ? sizeof(float) * c.rows_per_block * a.hidden : 0;
}

// Calls f(kernel, smem bytes, T{}, W{}) with the backward kernel instantiated for the config,
// after opting it in to the shared memory it needs.
template <typename F>
cudaError_t with_bwd_kernel(const RmsNormBwdArgs& a, const RmsConfig& c, F&& f) {
  return dispatch(a.dtype, a.wdtype, c, [&](auto t, auto w, auto vec, auto vpt) {
    auto kernel = rms_norm_bwd_kernel<decltype(t), decltype(w), decltype(vec)::value, decltype(vpt)::value>;
    const size_t smem = bwd_smem(a, c);
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(smem));
      if (err != cudaSuccess) return err;
    }
    return f(kernel, smem, t, w);
  });
}

// Persistent backward grid: one full wave of resident blocks, or fewer when the rows run out.
cudaError_t bwd_grid(const RmsNormBwdArgs& a, const RmsConfig& c, int* grid) {
  const int64_t groups = (a.rows + c.rows_per_block - 1) / c.rows_per_block;
  *grid = 0;
  if (groups == 0) return cudaSuccess;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = with_bwd_kernel(a, c, [&](auto kernel, size_t smem, auto, auto) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, c.threads * c.rows_per_block, smem);
  });
  if (err != cudaSuccess) return err;
  const int64_t wave = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(groups < wave ? groups : wave);
  return cudaSuccess;
}

}  // namespace

cudaError_t rms_norm_fwd(const RmsNormFwdArgs& a, cudaStream_t stream) {
  const RmsConfig c = rms_config(a.hidden, a.dtype, all_aligned({a.x, a.residual, a.weight, a.y, a.h}));
  if (bad_sizes(a.rows, a.hidden, a.dtype, c) || (a.residual != nullptr) != (a.h != nullptr)) return cudaErrorInvalidValue;
  if (a.rows == 0 || a.hidden == 0) return cudaSuccess;
  const int64_t blocks = (a.rows + c.rows_per_block - 1) / c.rows_per_block;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 block(c.threads, c.rows_per_block);
  const float inv_hidden = 1.f / static_cast<float>(a.hidden);
  return dispatch(a.dtype, a.wdtype, c, [&](auto t, auto w, auto vec, auto vpt) {
    using T = decltype(t);
    using W = decltype(w);
    rms_norm_fwd_kernel<T, W, decltype(vec)::value, decltype(vpt)::value>
        <<<static_cast<unsigned>(blocks), block, 0, stream>>>(
            static_cast<const T*>(a.x), static_cast<const T*>(a.residual), static_cast<const W*>(a.weight),
            static_cast<T*>(a.y), static_cast<T*>(a.h), a.rows, a.hidden, inv_hidden, a.eps);
    return cudaGetLastError();
  });
}

int64_t rms_norm_bwd_partials(const RmsNormBwdArgs& a) {
  const RmsConfig c = bwd_config(a);
  if (a.dweight == nullptr || bad_sizes(a.rows, a.hidden, a.dtype, c) || a.hidden == 0) return 0;
  int grid = 0;
  if (bwd_grid(a, c, &grid) != cudaSuccess) return 0;
  return static_cast<int64_t>(grid) * c.rows_per_block;
}

cudaError_t rms_norm_bwd(const RmsNormBwdArgs& a, cudaStream_t stream) {
  const RmsConfig c = bwd_config(a);
  if (bad_sizes(a.rows, a.hidden, a.dtype, c)) return cudaErrorInvalidValue;
  if (a.hidden == 0) return cudaSuccess;
  int grid = 0;
  cudaError_t err = bwd_grid(a, c, &grid);
  if (err != cudaSuccess) return err;
  const int64_t n_partials = a.dweight != nullptr ? static_cast<int64_t>(grid) * c.rows_per_block : 0;
  if (n_partials > 0 && a.partials == nullptr) return cudaErrorInvalidValue;
  const float inv_hidden = 1.f / static_cast<float>(a.hidden);
  if (grid > 0) {
    const dim3 block(c.threads, c.rows_per_block);
    err = with_bwd_kernel(a, c, [&](auto kernel, size_t smem, auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      kernel<<<grid, block, smem, stream>>>(
          static_cast<const T*>(a.dy), static_cast<const T*>(a.h), static_cast<const W*>(a.weight),
          static_cast<const T*>(a.dh), static_cast<T*>(a.dx), a.dweight != nullptr ? a.partials : nullptr,
          a.rows, a.hidden, inv_hidden, a.eps);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  if (a.dweight == nullptr) return cudaSuccess;
  // With no rows there are no partials and the sum below writes zeros, the gradient of an empty sum.
  const bool v4 = a.hidden % 4 == 0 && aligned16(a.partials);
  const int cols_per_block = kDwCols * (v4 ? 4 : 1);
  const dim3 dgrid((a.hidden + cols_per_block - 1) / cols_per_block), dblock(kDwCols, kDwRows);
  const int np = static_cast<int>(n_partials);
  auto finish = [&](auto w) {
    using W = decltype(w);
    if (v4) {
      rms_norm_dweight_kernel<W, 4><<<dgrid, dblock, 0, stream>>>(a.partials, static_cast<W*>(a.dweight), np, a.hidden);
    } else {
      rms_norm_dweight_kernel<W, 1><<<dgrid, dblock, 0, stream>>>(a.partials, static_cast<W*>(a.dweight), np, a.hidden);
    }
    return cudaGetLastError();
  };
  switch (a.wdtype) {
    case DType::kFloat32: return finish(float{});
    case DType::kFloat16: return finish(__half{});
    case DType::kBFloat16: return finish(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace mk
