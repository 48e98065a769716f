// CUDA 4-bit kernels (src/backend/cuda/nf4.cu through src/ops/nf4_ops.h) against the CPU reference
// (src/backend/cpu/nf4.cpp):
//  * dequantisation bit for bit: NF4/FP4, plain and double-quantised absmax, blocksizes 32..4096, bf16/fp32/
//    fp16 outputs, sizes that are not multiples of the 16-element vector groups, odd sizes, a misaligned
//    output view; outputs are poisoned first so unwritten elements fail
//  * quantisation: absmax and offset bit for bit; the GPU uses bitsandbytes' reciprocal instruction
//    (rcp.approx.ftz.f32) where the CPU divides correctly rounded, so a code may differ only where a one-ulp
//    change of the reciprocal moves it (checked element by element, and counted)
//  * the bitsandbytes goldens (tests/fixtures/nf4, when present): GPU codes equal bitsandbytes' exactly
//  * dequantisation bandwidth for a 4096 x 14336 projection (printed)
// Runs only where a CUDA device is visible (GTEST_SKIP otherwise).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/nf4.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/cuda_ops.h"
#include "core/tensor.h"
#include "io/nf4.h"
#include "ops/nf4_ops.h"

namespace {

using namespace am;
namespace cu = am::cuda;
namespace fs = std::filesystem;

bool have_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  cudaGetLastError();
  return ok;
}

#define REQUIRE_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device visible"

Tensor randn_host(int64_t n, float scale, uint32_t seed, DType dt) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.f, scale);
  Tensor t = Tensor::empty({n}, DType::F32);
  for (int64_t i = 0; i < n; ++i) t.f32()[i] = d(rng);
  return dt == DType::F32 ? t : t.to(dt);
}

int code_at(const uint8_t* p, int64_t i) { return (i & 1) ? (p[i / 2] & 15) : (p[i / 2] >> 4); }

float load(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F32 ? t.f32()[i] : bf16_to_f32(t.data<uint16_t>()[i]);
}

uint8_t code4(float x, float r, Quant4Type t) {
  const float p = cpu::ftz(cpu::ftz(x) * r);
  return t == Quant4Type::NF4 ? cpu::nf4_code(p) : cpu::fp4_code(p);
}

// True when `got` is what the CPU computes with the reciprocal one ulp up or down.
bool explained_by_rcp_ulp(float x, float absmax, Quant4Type t, int got) {
  const float r = cpu::bnb_reciprocal(absmax);
  return code4(x, std::nextafter(r, INFINITY), t) == got || code4(x, std::nextafter(r, 0.f), t) == got;
}

}  // namespace

TEST(CudaNf4, DequantBitIdenticalToCpu) {
  REQUIRE_DEVICE();
  int cases = 0;
  for (int64_t n : {int64_t(64 * 37), int64_t(4096 * 3 + 16 * 5 + 7), int64_t(1000), int64_t(33)}) {
    for (int64_t bs : {32, 64, 128, 4096}) {
      for (bool dq : {false, true}) {
        for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4}) {
          const Tensor w = randn_host(n, 0.03f, static_cast<uint32_t>(n + bs), DType::BF16);
          const Nf4Weight q = ops::nf4_quantize(w, {.blocksize = bs, .double_quant = dq, .type = type});
          const Nf4Weight qd = ops::nf4_to_device(q, DeviceType::CUDA);
          for (DType dt : {DType::BF16, DType::F32, DType::F16}) {
            for (bool misaligned : {false, true}) {
              SCOPED_TRACE("n " + std::to_string(n) + " bs " + std::to_string(bs) + " nested " + std::to_string(dq) +
                           " " + quant4_type_name(type) + " " + dtype_name(dt) + (misaligned ? " misaligned" : ""));
              const Tensor want = ops::nf4_dequantize(q, dt);
              Tensor buf = cu::empty({n + 1, 1}, dt);
              cu::fill_(buf, NAN);
              Tensor out = misaligned ? buf.slice_rows(1, n + 1) : buf.slice_rows(0, n);
              ops::nf4_dequantize(qd, out);
              const Tensor got = cu::to_host(out);
              ASSERT_EQ(got.nbytes(), want.nbytes());
              ASSERT_EQ(std::memcmp(got.raw(), want.raw(), want.nbytes()), 0);
              ++cases;
            }
          }
        }
      }
    }
  }
  std::printf("dequant: %d cases bit-identical\n", cases);
}

TEST(CudaNf4, QuantizeMatchesCpu) {
  REQUIRE_DEVICE();
  int64_t elements = 0, diff4 = 0, blocks8 = 0, diff8 = 0;
  for (int64_t n : {int64_t(1) << 20, int64_t(64 * 1000 + 17)}) {
    for (int64_t bs : {64, 128, 32}) {
      for (DType dt : {DType::BF16, DType::F32}) {
        for (Quant4Type type : {Quant4Type::NF4, Quant4Type::FP4}) {
          SCOPED_TRACE("n " + std::to_string(n) + " bs " + std::to_string(bs) + " " + dtype_name(dt) + " " +
                       quant4_type_name(type));
          const Tensor w = randn_host(n, 0.02f, static_cast<uint32_t>(n * 3 + bs), dt);
          const ops::Nf4QuantizeOptions opt{.blocksize = bs, .double_quant = true, .type = type};
          const Nf4Weight cpu_q = ops::nf4_quantize(w, opt);
          const Nf4Weight gpu_q = ops::nf4_to_device(ops::nf4_quantize(cu::to_device(w), opt), DeviceType::CPU);
          const Nf4Weight cpu_plain = ops::nf4_quantize(w, {.blocksize = bs, .type = type});
          // codes
          for (int64_t i = 0; i < n; ++i) {
            const int a = code_at(cpu_q.packed.data(), i), b = code_at(gpu_q.packed.data(), i);
            if (a != b) {
              ++diff4;
              ASSERT_TRUE(explained_by_rcp_ulp(load(w, i), cpu_plain.absmax.f32()[i / bs], type, b))
                  << "element " << i << " x " << load(w, i) << " cpu code " << a << " gpu code " << b;
            }
          }
          if (n % 2) {
            ASSERT_EQ(cpu_q.packed.data()[n / 2] & 15, gpu_q.packed.data()[n / 2] & 15) << "padding";
          }
          elements += n;
          // double quantisation: same offset (the mean of identical absmax), nested absmax identical, codes
          // up to the reciprocal's ulp
          ASSERT_EQ(cpu_q.nested->offset, gpu_q.nested->offset);
          ASSERT_EQ(std::memcmp(cpu_q.nested->absmax.raw(), gpu_q.nested->absmax.raw(), cpu_q.nested->absmax.nbytes()),
                    0);
          ASSERT_EQ(std::memcmp(cpu_q.nested->map.raw(), gpu_q.nested->map.raw(), 1024), 0);
          const int64_t nb = cpu_q.nblocks();
          for (int64_t b = 0; b < nb; ++b) {
            const int a = cpu_q.nested->codes.data()[b], g = gpu_q.nested->codes.data()[b];
            if (a == g) continue;
            ++diff8;
            const float y = cpu_plain.absmax.f32()[b] - cpu_q.nested->offset;
            const float r = cpu::bnb_reciprocal(cpu_q.nested->absmax.f32()[b / 256]);
            const float* m = cpu_q.nested->map.f32();
            ASSERT_TRUE(cpu::quantize_8bit_code(m, cpu::ftz(y * std::nextafter(r, INFINITY))) == g ||
                        cpu::quantize_8bit_code(m, cpu::ftz(y * std::nextafter(r, 0.f))) == g)
                << "absmax block " << b;
          }
          blocks8 += nb;
        }
      }
    }
  }
  std::printf("quantise: %lld of %lld 4-bit codes and %lld of %lld 8-bit absmax codes differ from the CPU "
              "reference, each explained by a one-ulp reciprocal difference\n",
              (long long)diff4, (long long)elements, (long long)diff8, (long long)blocks8);
}

TEST(CudaNf4, GoldensOnGpu) {
  REQUIRE_DEVICE();
  const fs::path dir = fs::path(AM_SOURCE_DIR) / "tests" / "fixtures" / "nf4";
  std::vector<fs::path> files;
  std::error_code ec;
  if (fs::is_directory(dir, ec))
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".safetensors" && e.path().stem() != "dynamic_map") files.push_back(e.path());
  if (files.empty()) GTEST_SKIP() << "no bitsandbytes goldens in " << dir << " (tools/make_nf4_golden.py)";
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files) {
    SCOPED_TRACE(f.filename().string());
    auto src = io::RawSafetensors::open(f.string());
    const io::RawTensor in = src->get("input");
    Tensor input = Tensor::empty(in.shape, in.dtype == "BF16" ? DType::BF16 : DType::F32);
    std::memcpy(input.raw(), in.data, in.nbytes);
    const Nf4Weight theirs = io::read_bnb_4bit(*src, "w.weight");
    const Nf4Weight ours = ops::nf4_to_device(
        ops::nf4_quantize(cu::to_device(input),
                          {.blocksize = theirs.blocksize, .double_quant = theirs.is_nested(), .type = theirs.type}),
        DeviceType::CPU);
    EXPECT_EQ(std::memcmp(ours.packed.data(), theirs.packed.data(), ours.packed.nbytes), 0) << "packed codes";
    if (!theirs.is_nested()) {
      EXPECT_EQ(std::memcmp(ours.absmax.raw(), theirs.absmax.raw(), ours.absmax.nbytes()), 0) << "absmax";
    } else if (ours.nested->offset == theirs.nested->offset) {
      EXPECT_EQ(std::memcmp(ours.nested->codes.data(), theirs.nested->codes.data(), theirs.nblocks()), 0);
      EXPECT_EQ(std::memcmp(ours.nested->absmax.raw(), theirs.nested->absmax.raw(), ours.nested->absmax.nbytes()), 0);
    }
    for (const char* key : {"dequant_bf16", "dequant_f32"}) {
      const io::RawTensor want = src->get(key);
      const DType dt = want.dtype == "BF16" ? DType::BF16 : DType::F32;
      Tensor out = cu::empty(theirs.shape, dt);
      ops::nf4_dequantize(ops::nf4_to_device(theirs, DeviceType::CUDA), out);
      const Tensor got = cu::to_host(out);
      ASSERT_EQ(got.nbytes(), want.nbytes);
      EXPECT_EQ(std::memcmp(got.raw(), want.data, want.nbytes), 0) << key;
    }
  }
}

TEST(CudaNf4, DequantBandwidth) {
  REQUIRE_DEVICE();
  const int64_t rows = 4096, cols = 14336, n = rows * cols;
  const Tensor w = cu::to_device(randn_host(n, 0.02f, 1, DType::BF16));
  for (bool dq : {false, true}) {
    const Nf4Weight q = ops::nf4_quantize(w.view({rows, cols}), {.double_quant = dq});
    Tensor out = cu::empty({rows, cols}, DType::BF16);
    ops::nf4_dequantize(q, out);  // warm-up
    cudaEvent_t a, b;
    AM_CUDA_CHECK(cudaEventCreate(&a));
    AM_CUDA_CHECK(cudaEventCreate(&b));
    const int iters = 50;
    AM_CUDA_CHECK(cudaEventRecord(a, cu::default_context().stream()));
    for (int i = 0; i < iters; ++i) ops::nf4_dequantize(q, out);
    AM_CUDA_CHECK(cudaEventRecord(b, cu::default_context().stream()));
    AM_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    AM_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    const double us = 1000.0 * ms / iters;
    const double bytes = double(n) / 2 + double(n) * 2 + double(q.nblocks()) * (dq ? 1 : 4);
    std::printf("dequant %lld x %lld -> bf16 (%s absmax): %.1f us, %.0f GB/s\n", (long long)rows, (long long)cols,
                dq ? "double-quantised" : "fp32", us, bytes / us * 1e-3);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
}
