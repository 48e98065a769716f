// safetensors throughput (bytes/s) on a 64 MiB checkpoint: 32 bf16 tensors of [1024, 1024].
//   Write        save_safetensors_file (header + data, fsync, rename)
//   WriteSharded save_safetensors_dir with 16 MiB shards + index
//   Read         open + get() every tensor + read every byte (mmap, page cache warm)
//   ReadCopy     open + get() + clone(): what a loader that owns its weights pays
//   Open         header parse and validation only
//   ./build/bin/am_microbench --benchmark_filter=SafeTensors
// Env: TMPDIR picks the folder (use one on the disk you care about; /tmp may be tmpfs).
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace {

namespace fs = std::filesystem;
using am::DType;
using am::Tensor;

constexpr int kTensors = 32;
constexpr int64_t kRows = 1024, kCols = 1024;  // bf16: 2 MiB each, 64 MiB in all

struct Fixture {
  fs::path dir;
  std::vector<std::pair<std::string, Tensor>> tensors;  // [kRows, kCols] bf16 each
  size_t bytes = 0;

  Fixture() {
    dir = fs::temp_directory_path() / ("am_bench_io_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    for (int i = 0; i < kTensors; ++i) {
      Tensor t = Tensor::empty({kRows, kCols}, DType::BF16);
      auto* p = t.data<uint16_t>();
      for (int64_t k = 0; k < t.numel(); ++k) p[k] = static_cast<uint16_t>(k * 2654435761u >> 16);
      bytes += t.nbytes();
      tensors.push_back({"model.layers." + std::to_string(i) + ".mlp.up_proj.weight", t});
    }
    am::io::save_safetensors_file(file(), tensors);
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string file() const { return (dir / "model.safetensors").string(); }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_SafeTensorsWrite(benchmark::State& st) {
  Fixture& f = fixture();
  const std::string out = (f.dir / "w.safetensors").string();
  for (auto _ : st) am::io::save_safetensors_file(out, f.tensors);
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations()) * static_cast<int64_t>(f.bytes));
}

void BM_SafeTensorsWriteSharded(benchmark::State& st) {
  Fixture& f = fixture();
  am::io::SaveOptions opt;
  opt.max_shard_bytes = size_t(16) << 20;
  const std::string out = (f.dir / "sharded").string();
  for (auto _ : st) am::io::save_safetensors_dir(out, f.tensors, opt);
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations()) * static_cast<int64_t>(f.bytes));
}

void BM_SafeTensorsRead(benchmark::State& st) {
  Fixture& f = fixture();
  for (auto _ : st) {
    auto s = am::io::SafeTensors::open(f.file());
    uint64_t acc = 0;
    for (const auto& name : s.names()) {
      Tensor t = s.get(name);
      const auto* w = static_cast<const uint64_t*>(t.raw());
      const size_t words = t.nbytes() / 8;
      for (size_t i = 0; i < words; ++i) acc += w[i];
    }
    benchmark::DoNotOptimize(acc);
  }
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations()) * static_cast<int64_t>(f.bytes));
}

void BM_SafeTensorsReadCopy(benchmark::State& st) {
  Fixture& f = fixture();
  for (auto _ : st) {
    auto s = am::io::SafeTensors::open(f.file());
    for (const auto& name : s.names()) {
      Tensor t = s.get(name).clone();
      benchmark::DoNotOptimize(t.raw());
    }
  }
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations()) * static_cast<int64_t>(f.bytes));
}

void BM_SafeTensorsOpen(benchmark::State& st) {
  Fixture& f = fixture();
  for (auto _ : st) {
    auto s = am::io::SafeTensors::open(f.file());
    benchmark::DoNotOptimize(s.names().size());
  }
}

}  // namespace

BENCHMARK(BM_SafeTensorsWrite)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SafeTensorsWriteSharded)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SafeTensorsRead)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SafeTensorsReadCopy)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SafeTensorsOpen)->Unit(benchmark::kMicrosecond);
