// The dropout keep-mask shared by the CPU reference (elementwise.cpp) and the CUDA kernel
// (backend/cuda/dropout.cu): a counter-based hash, so the mask is a pure function of (seed, element index),
// bit-identical on both backends and recomputable in the backward (contract in src/ops/ops.h, dropout_).
// Integer-only up to one exact int -> float conversion and one fp32 compare, so host and device agree.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define AM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AM_HOST_DEVICE inline
#endif

namespace am::dropout_mask {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

// The i-th output (from 0) of a splitmix64 stream seeded with `seed` (Steele, Lea, Flood 2014; the
// finaliser of java.util.SplittableRandom).
AM_HOST_DEVICE uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [0, 1) on the 2^-24 grid: the top 24 bits of the hash (exact in fp32).
AM_HOST_DEVICE float uniform(uint64_t seed, uint64_t i) {
  return static_cast<float>(static_cast<uint32_t>(splitmix64(seed, i) >> 40)) * (1.0f / 16777216.0f);
}

AM_HOST_DEVICE bool keep(uint64_t seed, uint64_t i, float p) { return uniform(seed, i) >= p; }

}  // namespace am::dropout_mask
