// Rotary position embedding of q and k in one launch, out of place.
//
// Pair (x1, x2) at angle a becomes (x1 cos a - x2 sin a, x2 cos a + x1 sin a). Rotate-half layout
// (HF Llama): x1 = x[j], x2 = x[j + head_dim / 2]; interleaved layout (Meta): x1 = x[2j],
// x2 = x[2j + 1]. The backward is the same kernel rotating by -a (sin negated): the rotation is
// orthogonal, so its transpose is its inverse.
//
// Work item = NP consecutive pairs of one head of one token; q heads and k heads of a token are
// items of the same block, so GQA needs nothing special and the token's cos/sin row (read once
// from DRAM, then from L1) is shared by all its heads.
#include "common.cuh"
#include "kernels.h"

namespace mk {

constexpr int kRotaryThreads = 256;
constexpr int kRotaryItemsPerBlock = 1024;  // about four items per thread

struct RotaryDims {
  int64_t q_stride[3];  // batch, seq, head strides of q in elements (head_dim is contiguous)
  int64_t k_stride[3];
  int64_t batch;
  int64_t seq;
  int64_t n_positions;  // rows of the cos/sin tables
  int n_heads;
  int n_kv_heads;
  int head_dim;
  int tokens_per_block;  // consecutive positions of one sequence per block
  float sin_sign;        // +1 forward, -1 backward
};

// VECTOR: every access is 16 bytes (NP pairs span 16 bytes of x1 in the rotate-half layout, or 16
// bytes of interleaved pairs); otherwise one pair per item, element by element.
template <typename T, bool VECTOR, bool INTERLEAVED, typename P>
__global__ void __launch_bounds__(kRotaryThreads)
rotary_kernel(const T* __restrict__ q,        // (batch, seq, n_heads, head_dim), strided
              const T* __restrict__ k,        // (batch, seq, n_kv_heads, head_dim), strided
              T* __restrict__ q_out,          // contiguous
              T* __restrict__ k_out,          // contiguous
              const float* __restrict__ cos,  // (n_positions, head_dim / 2), contiguous
              const float* __restrict__ sin,
              const P* __restrict__ pos,      // (batch, seq) contiguous, or nullptr for 0..seq-1
              RotaryDims d) {
  constexpr int NP = !VECTOR ? 1 : (INTERLEAVED ? kVec<T> / 2 : kVec<T>);
  constexpr int NX = VECTOR && INTERLEAVED ? 2 * NP : NP;  // elements per x access
  const int half = d.head_dim / 2;
  const int chunks = half / NP;
  const int items = (d.n_heads + d.n_kv_heads) * chunks;
  const int work = d.tokens_per_block * items;
  for (int64_t b = blockIdx.y; b < d.batch; b += gridDim.y) {
    const int64_t s0 = static_cast<int64_t>(blockIdx.x) * d.tokens_per_block;
    for (int w = threadIdx.x; w < work; w += kRotaryThreads) {
      const int t = w / items;
      const int it = w - t * items;
      const int64_t s = s0 + t;
      if (s >= d.seq) break;  // w only grows, so every later item is past the end too
      const int head = it / chunks;
      const int j = (it - head * chunks) * NP;  // first pair of the item

      const int64_t p = pos != nullptr ? static_cast<int64_t>(load1(pos + b * d.seq + s)) : s;
      float c[NP], sn[NP];
      if (p >= 0 && p < d.n_positions) {
        const Vec<float, NP> cv = load<float, NP>(cos + p * half + j);
        const Vec<float, NP> sv = load<float, NP>(sin + p * half + j);
#pragma unroll
        for (int e = 0; e < NP; ++e) {
          c[e] = cv.v[e];
          sn[e] = d.sin_sign * sv.v[e];
        }
      } else {
        // A position outside the tables: NaN rows make the bad input visible; the alternative, a
        // bounds check on the host, would cost a device-to-host sync per call.
#pragma unroll
        for (int e = 0; e < NP; ++e) c[e] = sn[e] = __int_as_float(0x7fc00000);
      }

      const T* src;
      T* dst;
      if (head < d.n_heads) {
        src = q + b * d.q_stride[0] + s * d.q_stride[1] + head * d.q_stride[2];
        dst = q_out + ((b * d.seq + s) * d.n_heads + head) * d.head_dim;
      } else {
        const int kh = head - d.n_heads;
        src = k + b * d.k_stride[0] + s * d.k_stride[1] + kh * d.k_stride[2];
        dst = k_out + ((b * d.seq + s) * d.n_kv_heads + kh) * d.head_dim;
      }

      if constexpr (!INTERLEAVED) {
        const Vec<T, NX> x1 = load<T, NX>(src + j);
        const Vec<T, NX> x2 = load<T, NX>(src + half + j);
        Vec<T, NX> o1, o2;
#pragma unroll
        for (int e = 0; e < NP; ++e) {
          const float a = to_float(x1.v[e]), bb = to_float(x2.v[e]);
          o1.v[e] = from_float<T>(a * c[e] - bb * sn[e]);
          o2.v[e] = from_float<T>(bb * c[e] + a * sn[e]);
        }
        store<T, NX>(dst + j, o1);
        store<T, NX>(dst + half + j, o2);
      } else if constexpr (VECTOR) {
        const Vec<T, NX> x = load<T, NX>(src + 2 * j);
        Vec<T, NX> o;
#pragma unroll
        for (int e = 0; e < NP; ++e) {
          const float a = to_float(x.v[2 * e]), bb = to_float(x.v[2 * e + 1]);
          o.v[2 * e] = from_float<T>(a * c[e] - bb * sn[e]);
          o.v[2 * e + 1] = from_float<T>(bb * c[e] + a * sn[e]);
        }
        store<T, NX>(dst + 2 * j, o);
      } else {
        // Element by element: a strided head may start at an odd element, so even a pair is not
        // known to be 2-element aligned.
        const float a = to_float(load1(src + 2 * j)), bb = to_float(load1(src + 2 * j + 1));
        store1(dst + 2 * j, from_float<T>(a * c[0] - bb * sn[0]));
        store1(dst + 2 * j + 1, from_float<T>(bb * c[0] + a * sn[0]));
      }
    }
  }
}

namespace {

template <typename T, typename P>
cudaError_t launch(const RotaryArgs& a, RotaryDims d, cudaStream_t stream) {
  constexpr int V = kVec<T>;
  const int half = a.head_dim / 2;
  bool vec = (a.interleaved ? a.head_dim % V == 0 : half % V == 0);
  for (const void* p : {static_cast<const void*>(a.q), static_cast<const void*>(a.k), static_cast<const void*>(a.q_out),
                        static_cast<const void*>(a.k_out), static_cast<const void*>(a.cos),
                        static_cast<const void*>(a.sin)})
    vec = vec && aligned16(p);
  for (int i = 0; i < 3; ++i) vec = vec && a.q_stride[i] % V == 0 && a.k_stride[i] % V == 0;

  const int np = !vec ? 1 : (a.interleaved ? V / 2 : V);
  const int items = (a.n_heads + a.n_kv_heads) * (half / np);
  int tpb = (kRotaryItemsPerBlock + items - 1) / items;
  if (tpb > a.seq) tpb = static_cast<int>(a.seq);
  d.tokens_per_block = tpb;
  const int64_t gx = (a.seq + tpb - 1) / tpb;
  if (gx > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  T* qo = static_cast<T*>(a.q_out);
  T* ko = static_cast<T*>(a.k_out);
  const P* pos = static_cast<const P*>(a.position_ids);
  if (vec && a.interleaved) {
    rotary_kernel<T, true, true, P><<<grid, kRotaryThreads, 0, stream>>>(q, k, qo, ko, a.cos, a.sin, pos, d);
  } else if (vec) {
    rotary_kernel<T, true, false, P><<<grid, kRotaryThreads, 0, stream>>>(q, k, qo, ko, a.cos, a.sin, pos, d);
  } else if (a.interleaved) {
    rotary_kernel<T, false, true, P><<<grid, kRotaryThreads, 0, stream>>>(q, k, qo, ko, a.cos, a.sin, pos, d);
  } else {
    rotary_kernel<T, false, false, P><<<grid, kRotaryThreads, 0, stream>>>(q, k, qo, ko, a.cos, a.sin, pos, d);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pos(const RotaryArgs& a, const RotaryDims& d, cudaStream_t stream) {
  return a.position_ids_int64 ? launch<T, int64_t>(a, d, stream) : launch<T, int32_t>(a, d, stream);
}

}  // namespace

cudaError_t rotary(const RotaryArgs& a, cudaStream_t stream) {
  if (a.batch < 0 || a.seq < 0 || a.n_heads < 1 || a.n_kv_heads < 1 || a.head_dim < 2 || a.head_dim % 2 ||
      a.n_positions < 0 || static_cast<int64_t>(a.n_heads + a.n_kv_heads) * a.head_dim > (1 << 24))
    return cudaErrorInvalidValue;
  if (a.batch == 0 || a.seq == 0) return cudaSuccess;
  RotaryDims d;
  for (int i = 0; i < 3; ++i) {
    d.q_stride[i] = a.q_stride[i];
    d.k_stride[i] = a.k_stride[i];
  }
  d.batch = a.batch;
  d.seq = a.seq;
  d.n_positions = a.n_positions;
  d.n_heads = a.n_heads;
  d.n_kv_heads = a.n_kv_heads;
  d.head_dim = a.head_dim;
  d.tokens_per_block = 1;
  d.sin_sign = a.conjugate ? -1.f : 1.f;
  switch (a.dtype) {
    case DType::kFloat32: return launch_pos<float>(a, d, stream);
    case DType::kFloat16: return launch_pos<__half>(a, d, stream);
    case DType::kBFloat16: return launch_pos<__nv_bfloat16>(a, d, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mk
