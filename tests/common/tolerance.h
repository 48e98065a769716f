// The one tolerance table every op test uses (DESIGN.md: fp32 tight, bf16 about 1e-2 relative).
// A value `got` matches a reference `want` when |got - want| <= atol + rtol * |want|.
#pragma once
#include <cmath>

#include "core/dtype.h"

namespace am::test {

struct Tolerance {
  double rtol = 0.0;
  double atol = 0.0;
};

// Op output (computed in `dtype`) against a reference computed in double from the same inputs. The
// atol covers fp32 sums of O(100) terms of size O(1) whose exact value is near 0.
inline Tolerance tolerance(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return {1e-4, 1e-5};
    case DType::BF16:
      return {1e-2, 1e-2};
    case DType::F16:
      return {2e-3, 2e-3};
    default:
      return {0.0, 0.0};  // integer results must match exactly
  }
}

// Analytic gradients against central finite differences of an objective evaluated with the op itself
// (so in `dtype`): the FD error is the step's truncation error plus the objective's rounding noise
// divided by the step, hence looser than `tolerance`.
inline Tolerance fd_tolerance(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return {5e-3, 5e-4};
    case DType::BF16:
      return {1e-1, 5e-2};
    case DType::F16:
      return {5e-2, 2e-2};
    default:
      return {0.0, 0.0};
  }
}

// Central-difference step for inputs of magnitude O(1), by dtype.
inline double fd_step(DType dtype) { return dtype == DType::F32 ? 1e-2 : 1e-1; }

inline bool within(double got, double want, Tolerance t) {
  return std::abs(got - want) <= t.atol + t.rtol * std::abs(want);
}

}  // namespace am::test
