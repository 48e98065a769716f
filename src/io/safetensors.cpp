// safetensors reader: mmap each file, validate its header completely up front (so get() never reads out of
// bounds), and hand out tensors that alias the mapping. Layout of one file:
//   [8 bytes: N, little-endian u64][N bytes: JSON header, space padded][data: tensors back to back]
// Validation follows the reference (Rust) implementation: offsets must tile the data region exactly, with
// no gap or overlap, and each tensor's byte size must equal numel * dtype size.
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_bounded.h"

namespace am::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The reference implementation refuses headers above 100 MB; a larger one is corruption, not a model.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

std::string qname(const std::string& s) { return "'" + s + "'"; }

// One mapped file. Tensors returned by get() hold a shared_ptr to it, so the mapping outlives the
// SafeTensors object when needed.
struct MappedFile {
  std::string path;
  void* base = nullptr;  // the whole file, mapped read-only
  size_t size = 0;
  size_t data_start = 0;  // 8 + N
  std::map<std::string, std::string> metadata;
  std::vector<TensorInfo> tensors;
  std::vector<size_t> offsets;  // byte offset of each tensor from `base`

  MappedFile() = default;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() {
    if (base) munmap(base, size);
  }
};

// Checked a * b for sizes computed from untrusted shapes.
bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

uint64_t json_u64(const json& v, const std::string& what, const std::string& file) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  throw FormatError(file + ": " + what + " must be a non-negative integer, got " + v.dump());
}

// Parses and validates the header of a mapped file (fills tensors/offsets/metadata).
void parse_header(MappedFile& f) {
  const std::string& p = f.path;
  if (f.size < 8)
    throw FormatError(p + ": truncated safetensors file (" + std::to_string(f.size) +
                      " bytes; the 8-byte header length alone needs 8)");
  uint64_t n = 0;
  const auto* b = static_cast<const unsigned char*>(f.base);
  for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
  if (n > f.size - 8)
    throw FormatError(p + ": header length " + std::to_string(n) + " is larger than the file (" +
                      std::to_string(f.size) + " bytes): truncated or not a safetensors file");
  if (n > kMaxHeaderBytes) throw FormatError(p + ": header length " + std::to_string(n) + " is implausibly large");
  f.data_start = 8 + static_cast<size_t>(n);
  const char* hs = reinterpret_cast<const char*>(b + 8);
  json h;
  try {
    h = parse_json_bounded(std::string_view(hs, n), p + ": header is not valid JSON");
  } catch (const json::exception& e) {
    throw FormatError(p + ": header is not valid JSON: " + e.what());
  }
  if (!h.is_object()) throw FormatError(p + ": header must be a JSON object");

  const uint64_t data_size = f.size - f.data_start;
  struct Span {
    uint64_t begin, end;
    size_t idx;
  };
  std::vector<Span> spans;
  for (auto it = h.begin(); it != h.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (v.is_null()) continue;
      if (!v.is_object()) throw FormatError(p + ": __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw FormatError(p + ": __metadata__ value for " + qname(m.key()) + " must be a string");
        f.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor " + qname(name);
    if (!v.is_object()) throw FormatError(p + ": " + where + ": entry must be an object");
    if (!v.contains("dtype") || !v["dtype"].is_string())
      throw FormatError(p + ": " + where + ": missing or non-string 'dtype'");
    if (!v.contains("shape") || !v["shape"].is_array())
      throw FormatError(p + ": " + where + ": missing or non-array 'shape'");
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      throw FormatError(p + ": " + where + ": 'data_offsets' must be [begin, end]");
    TensorInfo ti;
    ti.name = name;
    ti.file = p;
    const std::string ds = v["dtype"].get<std::string>();
    try {
      ti.dtype = dtype_from_safetensors(ds);
    } catch (const FormatError& e) {
      throw FormatError(p + ": " + where + ": " + e.what());
    }
    uint64_t numel = 1;
    for (const json& d : v["shape"]) {
      uint64_t dim = json_u64(d, where + " shape", p);
      if (mul_overflows(numel, dim, &numel) || numel > (uint64_t(1) << 62))
        throw FormatError(p + ": " + where + ": shape " + v["shape"].dump() + " is too large");
      ti.shape.push_back(static_cast<int64_t>(dim));
    }
    uint64_t begin = json_u64(v["data_offsets"][0], where + " data_offsets", p);
    uint64_t end = json_u64(v["data_offsets"][1], where + " data_offsets", p);
    if (begin > end)
      throw FormatError(p + ": " + where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                        "] are reversed");
    if (end > data_size)
      throw FormatError(p + ": " + where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                        "] run past the end of the data (" + std::to_string(data_size) + " bytes): truncated file?");
    uint64_t want = 0;
    if (mul_overflows(numel, dtype_size(ti.dtype), &want) || want != end - begin)
      throw FormatError(p + ": " + where + ": data_offsets span " + std::to_string(end - begin) + " bytes but " + ds +
                        " " + shape_str(ti.shape) + " needs " + std::to_string(numel * dtype_size(ti.dtype)));
    spans.push_back({begin, end, f.tensors.size()});
    f.tensors.push_back(std::move(ti));
    f.offsets.push_back(f.data_start + static_cast<size_t>(begin));
  }
  // The data region must be tiled exactly: no overlap (corruption) and no gap or trailing bytes.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const Span& s : spans) {
    if (s.begin != pos)
      throw FormatError(p + ": tensor " + qname(f.tensors[s.idx].name) + ": data_offsets start at " +
                        std::to_string(s.begin) + " but the previous tensor ends at " + std::to_string(pos) +
                        (s.begin < pos ? " (overlap)" : " (gap)"));
    pos = s.end;
  }
  if (pos != data_size)
    throw FormatError(p + ": tensors cover " + std::to_string(pos) + " data bytes but the file holds " +
                      std::to_string(data_size) + " after the header");
}

// Maps `path` into `*f` (read-only: tensors from get() must be cloned before being written to).
void map_file(const std::string& path, MappedFile* f) {
  f->path = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw IoError(path + ": not a regular file");
  }
  f->size = static_cast<size_t>(st.st_size);
  if (f->size > 0) {
    void* p = mmap(nullptr, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw IoError(path + ": mmap failed: " + std::strerror(e));
    }
    f->base = p;
  }
  ::close(fd);
  parse_header(*f);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open: " + std::strerror(errno));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

}  // namespace

struct SafeTensors::File : MappedFile {};

SafeTensors SafeTensors::open(const std::string& path) {
  std::error_code ec;
  std::vector<std::string> shard_paths;
  std::string index_path;
  std::map<std::string, std::string> weight_map;  // from the index: tensor -> shard path

  if (fs::is_directory(path, ec)) {
    fs::path d(path);
    if (fs::exists(d / "model.safetensors.index.json", ec)) {
      index_path = (d / "model.safetensors.index.json").string();
    } else if (fs::exists(d / "model.safetensors", ec)) {
      shard_paths.push_back((d / "model.safetensors").string());
    } else {
      // Any other layout (adapter_model.safetensors, a lone *.index.json): take what is there.
      std::vector<std::string> idx, st;
      for (const auto& e : fs::directory_iterator(d, ec)) {
        std::string n = e.path().filename().string();
        if (ends_with(n, ".safetensors.index.json")) idx.push_back(e.path().string());
        else if (ends_with(n, ".safetensors") && e.is_regular_file(ec)) st.push_back(e.path().string());
      }
      std::sort(idx.begin(), idx.end());
      std::sort(st.begin(), st.end());
      if (idx.size() == 1) index_path = idx[0];
      else if (idx.size() > 1) throw IoError(path + ": several *.safetensors.index.json files; name one");
      else if (!st.empty()) shard_paths = st;
      else throw IoError(path + ": no .safetensors file or model.safetensors.index.json in this folder");
    }
  } else if (ends_with(path, ".json")) {
    index_path = path;
  } else {
    if (!fs::exists(path, ec)) throw IoError(path + ": no such file or folder");
    shard_paths.push_back(path);
  }

  if (!index_path.empty()) {
    json j;
    try {
      j = parse_json_bounded(read_text(index_path), index_path + ": not valid JSON");
    } catch (const json::exception& e) {
      throw FormatError(index_path + ": not valid JSON: " + e.what());
    }
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw FormatError(index_path + ": missing 'weight_map' object");
    fs::path dir = fs::path(index_path).parent_path();
    std::vector<std::string> files;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw FormatError(index_path + ": weight_map entry for tensor " + qname(it.key()) + " must be a file name");
      std::string fn = it.value().get<std::string>();
      std::string full = (dir / fn).string();
      if (!fs::exists(full, ec))
        throw IoError(index_path + ": tensor " + qname(it.key()) + " is in shard " + qname(fn) +
                      ", which does not exist (" + full + ")");
      weight_map[it.key()] = full;
      files.push_back(full);
    }
    std::sort(files.begin(), files.end());
    files.erase(std::unique(files.begin(), files.end()), files.end());
    shard_paths = files;
    if (shard_paths.empty()) throw FormatError(index_path + ": 'weight_map' is empty");
  }

  SafeTensors st;
  for (const std::string& sp : shard_paths) {
    auto f = std::make_shared<File>();
    map_file(sp, f.get());
    for (size_t i = 0; i < f->tensors.size(); ++i) {
      const TensorInfo& ti = f->tensors[i];
      auto [it, fresh] = st.index_.emplace(ti.name, std::make_pair(ti, std::make_pair(f, f->offsets[i])));
      if (!fresh)
        throw FormatError("tensor " + qname(ti.name) + " is stored twice: in " + it->second.first.file + " and in " +
                          sp);
    }
    st.files_.push_back(std::move(f));
  }
  for (const auto& [name, file] : weight_map) {
    auto it = st.index_.find(name);
    if (it == st.index_.end())
      throw FormatError(index_path + ": tensor " + qname(name) + " is mapped to " + file + ", which does not hold it");
    if (it->second.first.file != file)
      throw FormatError(index_path + ": tensor " + qname(name) + " is mapped to " + file + " but is stored in " +
                        it->second.first.file);
  }
  return st;
}

bool SafeTensors::has(const std::string& name) const { return index_.count(name) != 0; }

const TensorInfo& SafeTensors::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    std::string where = files_.empty() ? std::string("(no file)") : files_.front()->path;
    if (files_.size() > 1) where += " and " + std::to_string(files_.size() - 1) + " other shard(s)";
    throw FormatError("tensor " + qname(name) + " not found in " + where);
  }
  return it->second.first;
}

std::vector<std::string> SafeTensors::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

Tensor SafeTensors::get(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const auto& loc = index_.find(name)->second.second;
  const std::shared_ptr<File>& f = loc.first;
  char* p = static_cast<char*>(f->base) + loc.second;
  // Files from other writers may place a tensor at an address that is not a multiple of its element
  // size; such a tensor is copied so that typed access through Tensor::data<T>() stays well defined.
  if (reinterpret_cast<uintptr_t>(p) % dtype_size(ti.dtype) != 0) {
    Tensor t = Tensor::empty(ti.shape, ti.dtype);
    std::memcpy(t.raw(), p, t.nbytes());
    return t;
  }
  return Tensor::wrap(p, ti.shape, ti.dtype, std::static_pointer_cast<void>(f));
}

std::map<std::string, std::string> SafeTensors::metadata() const {
  return files_.empty() ? std::map<std::string, std::string>{} : files_.front()->metadata;
}

}  // namespace am::io
