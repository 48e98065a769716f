// Small stable hashes (the same value on every machine, run and rank: they seed per-parameter RNG streams, so a
// resumed or resharded run draws the same numbers).
#pragma once
#include <cstdint>
#include <string_view>

namespace am {

// 64-bit FNV-1a of the bytes of s.
inline uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ULL;
  return h;
}

}  // namespace am
