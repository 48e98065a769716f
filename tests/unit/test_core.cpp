#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"

using namespace am;

TEST(DType, Bf16RoundTripAndRounding) {
  for (float f : {0.f, 1.f, -2.5f, 3.140625f, 1e-3f, 65504.f}) {
    EXPECT_EQ(bf16_to_f32(f32_to_bf16(bf16_to_f32(f32_to_bf16(f)))), bf16_to_f32(f32_to_bf16(f)));
  }
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
}

TEST(DType, F16RoundTrip) {
  for (float f : {0.f, 1.f, -2.5f, 0.333251953125f, 65504.f, 6.103515625e-05f, 5.960464477539063e-08f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(f)), f) << f;
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST(Tensor, ViewSliceAndPeak) {
  size_t before = cpu_allocator().current_bytes();
  {
    Tensor t = Tensor::zeros({4, 3}, DType::F32);
    EXPECT_EQ(cpu_allocator().current_bytes(), before + 48);
    EXPECT_GE(cpu_allocator().peak_bytes(), before + 48);
    t.f32()[5] = 7.f;
    Tensor r = t.slice_rows(1, 2);
    EXPECT_EQ(r.shape(), (Shape{1, 3}));
    EXPECT_EQ(r.f32()[2], 7.f);
    EXPECT_THROW(t.view({5, 3}), ShapeError);
    EXPECT_THROW(t.slice_rows(2, 5), ShapeError);
    Tensor b = t.to(DType::BF16);
    EXPECT_EQ(bf16_to_f32(b.data<uint16_t>()[5]), 7.f);
  }
  EXPECT_EQ(cpu_allocator().current_bytes(), before);
}

TEST(Errors, ExitCodes) {
  EXPECT_EQ(RecipeError("x").exit_code(), 2);
  EXPECT_EQ(UsageError("x").exit_code(), 2);
  EXPECT_EQ(IoError("x").exit_code(), 1);
  EXPECT_EQ(DataError("x").exit_code(), 1);
}
