// Device helpers shared by the kernels: element conversions, aligned vectors, warp reductions.
// Torch-free on purpose: nvcc alone compiles every .cu file (the static tests rely on it).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace mk {

// ---------------------------------------------------------------------------------------------
// fp32 is the arithmetic type for every storage type. The explicit intrinsics keep these valid
// under -D__CUDA_NO_HALF_CONVERSIONS__ / -D__CUDA_NO_BFLOAT16_CONVERSIONS__, which torch's
// extension build passes to nvcc.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// N elements moved as one unit through 16-byte (or narrower) integer accesses. The explicit
// __ldg/__stwb intrinsics pin the width: a plain struct or uint4 assignment lets nvcc split the
// store into 2-byte pieces (seen in the PTX of the first version of these kernels). Alignment is
// capped at 16 bytes, the widest global access on sm_80/sm_90, so a 32-byte Vec (8 fp32 cos
// values) is two 128-bit accesses needing only 16-byte alignment. Callers guarantee that
// alignment before choosing N > 1 (see the launchers). Loads take the read-only path: no kernel
// here writes memory that it also reads.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Vec {
  T v[N];
};

template <int BYTES> struct Raw;
template <> struct Raw<16> { using type = uint4; };
template <> struct Raw<8> { using type = uint2; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<2> { using type = unsigned short; };

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load(const T* p) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  using R = typename Raw<kChunk>::type;
  Vec<T, N> out;
#pragma unroll
  for (int i = 0; i < kBytes / kChunk; ++i) {
    const R r = __ldg(reinterpret_cast<const R*>(p) + i);
    memcpy(reinterpret_cast<char*>(&out) + i * kChunk, &r, kChunk);
  }
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Vec<T, N>& v) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  using R = typename Raw<kChunk>::type;
#pragma unroll
  for (int i = 0; i < kBytes / kChunk; ++i) {
    R r;
    memcpy(&r, reinterpret_cast<const char*>(&v) + i * kChunk, kChunk);
    __stwb(reinterpret_cast<R*>(p) + i, r);
  }
}

// Scalar accesses for the unaligned paths and row tails, through the same read-only path.
template <typename T>
__device__ __forceinline__ T load1(const T* p) {
  return load<T, 1>(p).v[0];
}

template <typename T>
__device__ __forceinline__ void store1(T* p, T v) {
  Vec<T, 1> w;
  w.v[0] = v;
  store<T, 1>(p, w);
}

// Elements per 16-byte access.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---------------------------------------------------------------------------------------------
// Butterfly sum over a full warp. Every lane ends with the same bits: at each step the two
// partners add the same two values, and fp32 addition is commutative.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float2 warp_sum(float2 v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  return v;
}

}  // namespace mk
