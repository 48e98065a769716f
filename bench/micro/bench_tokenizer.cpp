// Tokenizer encode throughput (MB/s of UTF-8 input) on GSM8K text (questions and answers of
// shared/datasets/gsm8k/train.jsonl, one encode call per field), for the real tokenizers fetched by
// tools/fetch_tokenizers.sh. Skipped (with a message) when a tokenizer or the data is absent.
//
//   ./build/bin/am_microbench --benchmark_filter=Tokenizer
// Env: AM_TOKENIZER_CACHE (default <src>/.cache/tokenizers), AM_BENCH_TEXT (a JSONL file with
// "question"/"answer" fields or plain JSON strings; default <src>/../shared/datasets/gsm8k/train.jsonl).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace {

std::string source_dir() {
  // bench binaries do not get AM_SOURCE_DIR; find the repo from the working directory or the env.
  if (const char* e = std::getenv("AM_SOURCE_DIR")) return e;
  namespace fs = std::filesystem;
  fs::path p = fs::current_path();
  for (int i = 0; i < 4; ++i) {
    if (fs::exists(p / "src" / "tokenizer" / "tokenizer.h")) return p.string();
    p = p.parent_path();
  }
  return ".";
}

const std::vector<std::string>& texts() {
  static std::vector<std::string> t = [] {
    std::vector<std::string> out;
    std::string path;
    if (const char* e = std::getenv("AM_BENCH_TEXT")) path = e;
    else {
      path = source_dir() + "/../shared/datasets/gsm8k/train.jsonl";
      if (!std::filesystem::exists(path)) path = "/work/shared/datasets/gsm8k/train.jsonl";
    }
    std::ifstream f(path);
    std::string line;
    while (std::getline(f, line)) {
      if (line.empty()) continue;
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_string()) out.push_back(j.get<std::string>());
      else if (j.is_object()) {
        for (const char* k : {"question", "answer", "text"})
          if (j.contains(k) && j[k].is_string()) out.push_back(j[k].get<std::string>());
      }
    }
    return out;
  }();
  return t;
}

size_t total_bytes() {
  size_t n = 0;
  for (auto& s : texts()) n += s.size();
  return n;
}

am::tok::Tokenizer* get_tokenizer(const std::string& name) {
  static std::map<std::string, std::unique_ptr<am::tok::Tokenizer>> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second.get();
  const char* env = std::getenv("AM_TOKENIZER_CACHE");
  std::string dir = (env ? std::string(env) : source_dir() + "/.cache/tokenizers") + "/" + name;
  std::unique_ptr<am::tok::Tokenizer> tk;
  if (std::filesystem::exists(dir + "/tokenizer.json"))
    tk = std::make_unique<am::tok::Tokenizer>(am::tok::Tokenizer::from_dir(dir));
  return (cache[name] = std::move(tk)).get();
}

void BM_TokenizerEncode(benchmark::State& st, const std::string& name) {
  auto* tk = get_tokenizer(name);
  if (!tk || texts().empty()) {
    st.SkipWithError("tokenizer or text missing: run tools/fetch_tokenizers.sh");
    return;
  }
  size_t ntok = 0;
  for (auto& s : texts()) ntok += tk->encode(s, false).size();  // warm the word cache, like HF's
  for (auto _ : st) {
    for (auto& s : texts()) benchmark::DoNotOptimize(tk->encode(s, false));
  }
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * total_bytes()));
  st.counters["tokens/s"] = benchmark::Counter(static_cast<double>(ntok), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_TokenizerEncodeBatch(benchmark::State& st, const std::string& name) {
  auto* tk = get_tokenizer(name);
  if (!tk || texts().empty()) {
    st.SkipWithError("tokenizer or text missing: run tools/fetch_tokenizers.sh");
    return;
  }
  tk->encode_batch(texts(), false);
  for (auto _ : st) benchmark::DoNotOptimize(tk->encode_batch(texts(), false));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * total_bytes()));
  st.counters["threads"] = std::thread::hardware_concurrency();
}

void BM_TokenizerDecode(benchmark::State& st, const std::string& name) {
  auto* tk = get_tokenizer(name);
  if (!tk || texts().empty()) {
    st.SkipWithError("tokenizer or text missing: run tools/fetch_tokenizers.sh");
    return;
  }
  std::vector<std::vector<int32_t>> ids;
  for (auto& s : texts()) ids.push_back(tk->encode(s, false));
  for (auto _ : st)
    for (auto& v : ids) benchmark::DoNotOptimize(tk->decode(v));
  st.SetBytesProcessed(static_cast<int64_t>(st.iterations() * total_bytes()));
}

const char* kNames[] = {"llama3_1", "qwen3", "deepseek_v3", "gptoss", "llama2"};

int register_all() {
  for (const char* n : kNames) {
    benchmark::RegisterBenchmark((std::string("TokenizerEncode/") + n).c_str(), BM_TokenizerEncode, std::string(n))
        ->Unit(benchmark::kMillisecond)
        ->MinTime(1.0);
    benchmark::RegisterBenchmark((std::string("TokenizerEncodeBatch/") + n).c_str(), BM_TokenizerEncodeBatch,
                                 std::string(n))
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime()
        ->MinTime(1.0);
    benchmark::RegisterBenchmark((std::string("TokenizerDecode/") + n).c_str(), BM_TokenizerDecode, std::string(n))
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.5);
  }
  return 0;
}
const int kRegistered = register_all();

}  // namespace
