// safetensors reader/writer: round trips for every dtype, HF's sharded layout, and every malformed-input
// case (each must throw an am::Error naming the file, and the tensor where one is at fault).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/tensor.h"
#include "io/safetensors.h"

using namespace am;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// A fresh folder per test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = fs::temp_directory_path() /
           ("am_st_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string operator/(const std::string& f) const { return (path / f).string(); }
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}
void spit(const std::string& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
// A raw safetensors file from a header text and a data blob (no validation: used to build bad files).
std::string raw_file(const std::string& header, const std::string& data) {
  std::string s(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s + header + data;
}

Tensor filled(const Shape& shape, DType dt, int seed) {
  Tensor t = Tensor::empty(shape, dt);
  auto* b = static_cast<unsigned char*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) b[i] = static_cast<unsigned char>((i * 131 + seed * 17 + 7) & 0xff);
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Expects `fn` to throw an am::Error whose message contains every one of `needles`.
template <typename Fn>
void expect_error(Fn fn, std::initializer_list<std::string> needles) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << *needles.begin();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "non-am exception: " << e.what();
  }
}

std::vector<std::pair<std::string, Tensor>> all_dtypes() {
  return {
      {"model.embed_tokens.weight", filled({5, 3}, DType::BF16, 1)},  // odd byte count: alignment matters
      {"a.f32", filled({2, 3}, DType::F32, 2)},
      {"b.f16", filled({3, 1}, DType::F16, 3)},
      {"c.i32", filled({4}, DType::I32, 4)},
      {"d.i64", filled({2, 2}, DType::I64, 5)},
      {"e.scalar", filled({}, DType::F32, 6)},
      {"f.empty", filled({0, 4}, DType::BF16, 7)},
      {"g.bf16", filled({3}, DType::BF16, 8)},
  };
}

}  // namespace

TEST(SafeTensors, RoundTripAllDtypes) {
  TempDir d;
  auto ts = all_dtypes();
  io::save_safetensors_file(d / "x.safetensors", ts, {{"format", "pt"}, {"note", "ü"}});
  Tensor kept;
  {
    auto st = io::SafeTensors::open(d / "x.safetensors");
    auto names = st.names();
    ASSERT_EQ(names.size(), ts.size());
    EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
    for (const auto& [name, t] : ts) {
      ASSERT_TRUE(st.has(name)) << name;
      EXPECT_EQ(st.info(name).dtype, t.dtype());
      EXPECT_EQ(st.info(name).shape, t.shape());
      EXPECT_EQ(st.info(name).file, d / "x.safetensors");
      Tensor g = st.get(name);
      EXPECT_TRUE(same_bytes(g, t)) << name;
      EXPECT_EQ(reinterpret_cast<uintptr_t>(g.raw()) % dtype_size(g.dtype()), 0u) << name;
    }
    EXPECT_EQ(st.metadata().at("format"), "pt");
    EXPECT_EQ(st.metadata().at("note"), "ü");
    EXPECT_FALSE(st.has("nope"));
    kept = st.get("a.f32");
  }
  // The tensor keeps the mapping alive after the reader is gone.
  EXPECT_TRUE(same_bytes(kept, ts[1].second));
}

TEST(SafeTensors, ZeroCopyViewsShareTheMapping) {
  TempDir d;
  io::save_safetensors_file(d / "x.safetensors",
                            {{"a", filled({64}, DType::F32, 1)}, {"b", filled({8}, DType::F32, 2)}});
  auto st = io::SafeTensors::open(d / "x.safetensors");
  Tensor a = st.get("a"), b = st.get("b"), a2 = st.get("a");
  EXPECT_EQ(a.raw(), a2.raw());  // same bytes of the same mapping, no copy
  EXPECT_EQ(static_cast<char*>(a.raw()) + a.nbytes(), static_cast<char*>(b.raw()));  // data is contiguous
}

TEST(SafeTensors, HeaderLayoutAsTheFormatRequires) {
  TempDir d;
  io::save_safetensors_file(d / "x.safetensors", all_dtypes());
  std::string bytes = slurp(d / "x.safetensors");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);  // data starts 8-byte aligned
  std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.front(), '{');
  size_t last = header.find_last_not_of(' ');
  EXPECT_EQ(header[last], '}');
  EXPECT_LT(header.size() - last - 1, 8u);  // padded with fewer than 8 spaces
  // Keys are written in sorted order, and entries are compact JSON.
  auto oj = nlohmann::ordered_json::parse(header);
  std::vector<std::string> keys;
  for (auto it = oj.begin(); it != oj.end(); ++it) keys.push_back(it.key());
  EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end()));
  EXPECT_EQ(oj["__metadata__"]["format"], "pt");
  EXPECT_EQ(header.find("\n"), std::string::npos);
  EXPECT_NE(header.find(R"("a.f32":{"data_offsets":[)"), std::string::npos) << header;
  // Offsets tile the data exactly and every tensor is aligned to its element size.
  uint64_t total = 0;
  for (auto it = oj.begin(); it != oj.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    uint64_t b = it.value()["data_offsets"][0], e = it.value()["data_offsets"][1];
    total += e - b;
    std::string dt = it.value()["dtype"];
    size_t es = dt == "I64" ? 8 : (dt == "F32" || dt == "I32") ? 4 : 2;
    EXPECT_EQ(b % es, 0u) << it.key();
  }
  EXPECT_EQ(total, bytes.size() - 8 - n);
}

TEST(SafeTensors, ShardedWriteAndReadAsHF) {
  TempDir d;
  std::vector<std::pair<std::string, Tensor>> ts;
  for (int i = 0; i < 6; ++i) ts.push_back({"layers." + std::to_string(i) + ".w", filled({16, 4}, DType::F32, i)});
  ts.push_back({"big", filled({100, 4}, DType::F32, 9)});  // 1600 bytes: larger than a shard, alone in one
  ts.push_back({"tail", filled({3}, DType::BF16, 10)});
  io::SaveOptions opt;
  opt.max_shard_bytes = 600;  // each 256-byte tensor: two per shard
  io::save_safetensors_dir(d.path.string(), ts, opt);

  // huggingface_hub's greedy split: a tensor over the limit is emitted as its own shard at once, while the
  // current shard stays open: [0,1] [2,3] [big] [4,5,tail]
  const std::vector<std::string> files = {"model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                                          "model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"};
  for (const auto& f : files) EXPECT_TRUE(fs::exists(d / f)) << f;
  EXPECT_FALSE(fs::exists(d / "model.safetensors"));
  size_t n_files = 0;
  for (const auto& e : fs::directory_iterator(d.path)) ++n_files, (void)e;
  EXPECT_EQ(n_files, files.size() + 1);  // no temporaries left behind

  std::string text = slurp(d / "model.safetensors.index.json");
  json idx = json::parse(text);
  size_t total = 0, params = 0;
  for (const auto& [n, t] : ts) total += t.nbytes(), params += t.numel();
  EXPECT_EQ(idx["metadata"]["total_size"].get<size_t>(), total);
  EXPECT_EQ(idx["metadata"]["total_parameters"].get<size_t>(), params);
  EXPECT_EQ(idx["weight_map"]["layers.0.w"], files[0]);
  EXPECT_EQ(idx["weight_map"]["layers.3.w"], files[1]);
  EXPECT_EQ(idx["weight_map"]["big"], files[2]);
  EXPECT_EQ(idx["weight_map"]["layers.4.w"], files[3]);
  EXPECT_EQ(idx["weight_map"]["tail"], files[3]);
  // json.dumps(index, indent=2, sort_keys=True) + "\n", as save_pretrained writes it. (The shard assignment
  // above was checked against huggingface_hub.save_torch_state_dict(max_shard_size=600) on the same tensors.)
  const std::string head = "{\n  \"metadata\": {\n    \"total_parameters\": " + std::to_string(params) +
                           ",\n    \"total_size\": " + std::to_string(total) +
                           "\n  },\n  \"weight_map\": {\n    \"big\": \"" + files[2] + "\",\n";
  EXPECT_EQ(text.substr(0, head.size()), head);
  EXPECT_EQ(text.substr(text.size() - 6), "  }\n}\n");

  for (const std::string& src : {d.path.string(), d / "model.safetensors.index.json"}) {
    auto st = io::SafeTensors::open(src);
    EXPECT_EQ(st.names().size(), ts.size());
    for (const auto& [name, t] : ts) EXPECT_TRUE(same_bytes(st.get(name), t)) << name;
    EXPECT_EQ(st.info("big").file, d / files[2]);
    EXPECT_EQ(st.metadata().at("format"), "pt");
  }
  auto one = io::SafeTensors::open(d / files[1]);  // a single shard opens on its own
  EXPECT_EQ(one.names(), (std::vector<std::string>{"layers.2.w", "layers.3.w"}));

  // Saving again unsharded removes the old shards and index (a stale index would shadow the new file).
  io::save_safetensors_dir(d.path.string(), {{"only", filled({2}, DType::F32, 1)}});
  EXPECT_TRUE(fs::exists(d / "model.safetensors"));
  EXPECT_FALSE(fs::exists(d / "model.safetensors.index.json"));
  for (const auto& f : files) EXPECT_FALSE(fs::exists(d / f)) << f;
  EXPECT_EQ(io::SafeTensors::open(d.path.string()).names(), std::vector<std::string>{"only"});
}

TEST(SafeTensors, FolderWithOtherNames) {
  TempDir d;
  io::save_safetensors_file(d / "adapter_model.safetensors", {{"lora_A", filled({2, 2}, DType::F32, 1)}});
  EXPECT_EQ(io::SafeTensors::open(d.path.string()).names(), std::vector<std::string>{"lora_A"});
  fs::create_directories(d.path / "empty");
  expect_error([&] { io::SafeTensors::open((d.path / "empty").string()); }, {"empty", "no .safetensors"});
}

TEST(SafeTensors, WriterRejectsBadInput) {
  TempDir d;
  expect_error([&] { io::save_safetensors_file(d / "x.safetensors", {{"a", filled({1}, DType::F32, 1)},
                                                                     {"a", filled({1}, DType::F32, 2)}}); },
               {"x.safetensors", "'a'", "twice"});
  expect_error([&] { io::save_safetensors_file(d / "x.safetensors", {{"a", Tensor()}}); }, {"'a'", "undefined"});
  expect_error([&] { io::save_safetensors_file(d / "x.safetensors", {{"__metadata__", filled({1}, DType::F32, 1)}}); },
               {"__metadata__"});
  expect_error([&] { io::save_safetensors_file(d / "x.safetensors", {{"bad\xff", filled({1}, DType::F32, 1)}}); },
               {"x.safetensors", "UTF-8"});
  EXPECT_FALSE(fs::exists(d / "x.safetensors"));
  for (const auto& e : fs::directory_iterator(d.path)) ADD_FAILURE() << "left behind: " << e.path();
  spit(d / "plain", "not a folder");
  expect_error([&] { io::save_safetensors_file(d / "plain/x.safetensors", {}); }, {"x.safetensors"});
}

// ---- malformed input: each case names the file, and the tensor when one is at fault ----

TEST(SafeTensors, RejectsTruncatedAndMissingFiles) {
  TempDir d;
  const std::string p = d / "bad.safetensors";
  expect_error([&] { io::SafeTensors::open(d / "missing.safetensors"); }, {"missing.safetensors"});
  EXPECT_THROW(io::SafeTensors::open(d / "missing.safetensors"), IoError);
  spit(p, "");
  expect_error([&] { io::SafeTensors::open(p); }, {p, "truncated"});
  spit(p, std::string("\x10\x00\x00", 3));
  expect_error([&] { io::SafeTensors::open(p); }, {p, "truncated"});
  // Header length larger than the file.
  spit(p, raw_file("{}", "").substr(0, 9));
  expect_error([&] { io::SafeTensors::open(p); }, {p, "header length 2", "larger than the file"});
  std::string huge(8, '\xff');
  spit(p, huge + "{}");
  expect_error([&] { io::SafeTensors::open(p); }, {p, "larger than the file"});
  EXPECT_THROW(io::SafeTensors::open(p), FormatError);
  // Data cut short: the last tensor runs past the end.
  io::save_safetensors_file(p, {{"w", filled({8}, DType::F32, 1)}});
  std::string good = slurp(p);
  spit(p, good.substr(0, good.size() - 4));
  expect_error([&] { io::SafeTensors::open(p); }, {p, "'w'", "past the end"});
}

TEST(SafeTensors, RejectsBadHeaders) {
  TempDir d;
  const std::string p = d / "bad.safetensors";
  auto check = [&](const std::string& header, const std::string& data, std::initializer_list<std::string> needles) {
    spit(p, raw_file(header, data));
    std::vector<std::string> all = {p};
    all.insert(all.end(), needles.begin(), needles.end());
    try {
      io::SafeTensors::open(p);
      ADD_FAILURE() << "accepted header " << header;
    } catch (const FormatError& e) {
      for (const auto& n : all) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << n << " in " << e.what();
    }
  };
  std::string d8(8, '\0');
  check("{\"a\":", d8, {"not valid JSON"});
  check("[1,2]", "", {"JSON object"});
  check(R"({"w":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}})", d8, {"'w'", "F99"});
  check(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", d8, {"'w'", "past the end"});
  check(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", d8, {"'w'", "needs 12"});
  check(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", d8, {"'w'", "reversed"});
  check(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", d8, {"'w'", "shape"});
  check(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", d8, {"'w'", "too large"});
  check(R"({"w":{"dtype":"F32","shape":[2]}})", d8, {"'w'", "data_offsets"});
  check(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", d8, {"'w'", "dtype"});
  check(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", d8, {"'w'", "shape"});
  check(R"({"w":[1]})", d8, {"'w'"});
  check(R"({"__metadata__":{"k":1}})", "", {"__metadata__", "'k'"});
  check(R"({"u":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
        R"("v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
        d8, {"'v'", "overlap"});
  check(R"({"u":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
        R"("v":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}})",
        d8, {"'v'", "gap"});
  check(R"({"u":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", d8, {"cover 4", "holds 8"});
}

TEST(SafeTensors, RejectsBadIndex) {
  TempDir d;
  io::save_safetensors_file(d / "s1.safetensors", {{"a", filled({2}, DType::F32, 1)}});
  io::save_safetensors_file(d / "s2.safetensors",
                            {{"b", filled({2}, DType::F32, 2)}, {"a", filled({2}, DType::F32, 3)}});
  const std::string idx = d / "model.safetensors.index.json";
  spit(idx, R"({"weight_map": {"a": "s1.safetensors", "z": "gone.safetensors"}})");
  expect_error([&] { io::SafeTensors::open(d.path.string()); }, {idx, "'z'", "gone.safetensors"});
  EXPECT_THROW(io::SafeTensors::open(idx), IoError);
  spit(idx, R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  expect_error([&] { io::SafeTensors::open(idx); }, {idx, "'b'", "s1.safetensors"});
  spit(idx, R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { io::SafeTensors::open(idx); }, {"'a'", "twice", "s1.safetensors", "s2.safetensors"});
  spit(idx, R"({"metadata": {}})");
  expect_error([&] { io::SafeTensors::open(idx); }, {idx, "weight_map"});
  spit(idx, "{oops");
  expect_error([&] { io::SafeTensors::open(idx); }, {idx, "JSON"});
  spit(idx, R"({"weight_map": {"a": 3}})");
  expect_error([&] { io::SafeTensors::open(idx); }, {idx, "'a'"});
}

TEST(SafeTensors, UnknownTensorNamed) {
  TempDir d;
  io::save_safetensors_file(d / "x.safetensors", {{"a", filled({2}, DType::F32, 1)}});
  auto st = io::SafeTensors::open(d / "x.safetensors");
  expect_error([&] { st.get("lm_head.weight"); }, {"'lm_head.weight'", "x.safetensors"});
  EXPECT_THROW(st.info("nope"), FormatError);
}

TEST(SafeTensors, MisalignedForeignTensorIsCopied) {
  // Another writer may put an F32 tensor right after a 1-element BF16 one (offset 2): still readable.
  TempDir d;
  const std::string p = d / "f.safetensors";
  std::string hdr = R"({"h":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},)"
                    R"("w":{"dtype":"F32","shape":[2],"data_offsets":[2,10]}})";
  hdr.append((8 - hdr.size() % 8) % 8, ' ');
  float w[2] = {1.5f, -2.25f};
  std::string data("\x80\x3f", 2);
  data.append(reinterpret_cast<const char*>(w), 8);
  spit(p, raw_file(hdr, data));
  auto st = io::SafeTensors::open(p);
  Tensor t = st.get("w");
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 4, 0u);
  EXPECT_EQ(t.f32()[0], 1.5f);
  EXPECT_EQ(t.f32()[1], -2.25f);
  EXPECT_EQ(bf16_to_f32(st.get("h").data<uint16_t>()[0]), 1.0f);
}

TEST(SafeTensors, FuzzedFilesNeverCrash) {
  // Every truncation and many random byte flips of a valid file either load or throw am::Error.
  TempDir d;
  const std::string p = d / "fz.safetensors";
  io::save_safetensors_file(p, {{"a", filled({3, 2}, DType::BF16, 1)}, {"b", filled({2}, DType::I64, 2)}});
  const std::string good = slurp(p);
  auto try_open = [&](const std::string& bytes) {
    spit(p, bytes);
    try {
      auto st = io::SafeTensors::open(p);
      for (const auto& n : st.names()) {
        Tensor t = st.get(n);
        volatile unsigned char sink = 0;
        for (size_t i = 0; i < t.nbytes(); ++i) sink = sink ^ static_cast<unsigned char*>(t.raw())[i];
      }
    } catch (const Error&) {
    }
  };
  for (size_t len = 0; len < good.size(); ++len) try_open(good.substr(0, len));
  std::mt19937 rng(1234);
  for (int it = 0; it < 400; ++it) {
    std::string b = good;
    int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) b[rng() % std::min<size_t>(b.size(), 200)] = static_cast<char>(rng() & 0xff);
    try_open(b);
  }
  SUCCEED();
}

TEST(SafeTensors, ReadsFileWrittenByHFSafetensors) {
  // Header exactly as safetensors 0.8 (Python) wrote it for all_dtypes(): entries in its own data order (widest
  // dtype first), keys dtype/shape/data_offsets, no padding needed. The data bytes are filled()'s pattern.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"d.i64":{"dtype":"I64","shape":[2,2],"data_offsets":[0,32]},)"
      R"("a.f32":{"dtype":"F32","shape":[2,3],"data_offsets":[32,56]},"e.scalar":{"dtype":"F32","shape":[],)"
      R"("data_offsets":[56,60]},"c.i32":{"dtype":"I32","shape":[4],"data_offsets":[60,76]},"f.empty":{"dtype":)"
      R"("BF16","shape":[0,4],"data_offsets":[76,76]},"g.bf16":{"dtype":"BF16","shape":[3],"data_offsets":[76,82]},)"
      R"("model.embed_tokens.weight":{"dtype":"BF16","shape":[5,3],"data_offsets":[82,112]},"b.f16":{"dtype":)"
      R"("F16","shape":[3,1],"data_offsets":[112,118]}})";
  ASSERT_EQ(header.size(), 544u);
  auto ts = all_dtypes();
  const std::vector<std::pair<std::string, size_t>> order = {{"d.i64", 0}, {"a.f32", 32}, {"e.scalar", 56},
                                                             {"c.i32", 60}, {"f.empty", 76}, {"g.bf16", 76},
                                                             {"model.embed_tokens.weight", 82}, {"b.f16", 112}};
  std::string data(118, '\0');
  for (const auto& [name, off] : order)
    for (const auto& [n, t] : ts)
      if (n == name) std::memcpy(&data[off], t.raw(), t.nbytes());
  TempDir d;
  spit(d / "hf.safetensors", raw_file(header, data));
  auto st = io::SafeTensors::open(d / "hf.safetensors");
  EXPECT_EQ(st.names().size(), ts.size());
  for (const auto& [name, t] : ts) EXPECT_TRUE(same_bytes(st.get(name), t)) << name;
  EXPECT_EQ(st.metadata().at("format"), "pt");
}
