// bitsandbytes 4-bit weights: ByteTensor, the consistency check, a safetensors reader for any dtype, the
// quant_state JSON, and reading/writing the layout bitsandbytes saves (nf4.h).
#include "io/nf4.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "backend/cpu/nf4.h"
#include "core/error.h"
#include "io/json_bounded.h"

namespace am {

namespace fs = std::filesystem;
using nlohmann::json;

const char* quant4_type_name(Quant4Type t) { return t == Quant4Type::NF4 ? "nf4" : "fp4"; }

ByteTensor ByteTensor::empty(int64_t nbytes, Allocator& alloc) {
  ByteTensor b;
  b.nbytes = nbytes;
  b.words = Tensor::empty({(nbytes + 3) / 4}, DType::I32, alloc);
  if (alloc.device_type() == DeviceType::CPU && b.words.nbytes()) std::memset(b.words.raw(), 0, b.words.nbytes());
  return b;
}

ByteTensor ByteTensor::from_host(const void* data, int64_t nbytes) {
  ByteTensor b = empty(nbytes);
  if (nbytes) std::memcpy(b.data(), data, static_cast<size_t>(nbytes));
  return b;
}

size_t Nf4Weight::nbytes() const {
  size_t s = packed.defined() ? packed.words.nbytes() : 0;
  if (absmax.defined()) s += absmax.nbytes();
  if (nested) {
    if (nested->codes.defined()) s += nested->codes.words.nbytes();
    if (nested->absmax.defined()) s += nested->absmax.nbytes();
    if (nested->map.defined()) s += nested->map.nbytes();
  }
  return s;
}

namespace {

[[noreturn]] void weight_error(const std::string& what, const std::string& msg) {
  throw ShapeError("4-bit weight '" + what + "': " + msg);
}

bool valid_blocksize(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

std::string desc(const Tensor& t) { return shape_str(t.shape()) + " " + dtype_name(t.dtype()); }

}  // namespace

void check_nf4_weight(const Nf4Weight& w, const std::string& what) {
  for (int64_t d : w.shape)
    if (d < 0) weight_error(what, "negative dimension in shape " + shape_str(w.shape));
  if (!valid_blocksize(w.blocksize))
    weight_error(what, "blocksize " + std::to_string(w.blocksize) +
                           " is not one bitsandbytes uses (32, 64, 128, ..., 4096)");
  const int64_t n = w.numel(), nb = w.nblocks();
  if (!w.packed.defined()) weight_error(what, "no packed codes");
  if (w.packed.nbytes != (n + 1) / 2)
    weight_error(what, "packed codes hold " + std::to_string(w.packed.nbytes) + " bytes but shape " +
                           shape_str(w.shape) + " needs ceil(" + std::to_string(n) + " / 2) = " +
                           std::to_string((n + 1) / 2));
  if (w.packed.words.dtype() != DType::I32 || w.packed.words.numel() * 4 < w.packed.nbytes)
    weight_error(what, "packed byte buffer " + desc(w.packed.words) + " is too small");
  const DeviceType dev = w.device();
  auto same_dev = [&](const char* part, DeviceType d) {
    if (d != dev) throw DeviceError("4-bit weight '" + what + "': " + part + " is not on the device of the codes");
  };
  if (w.dtype != DType::F32 && w.dtype != DType::BF16 && w.dtype != DType::F16)
    weight_error(what, std::string("original dtype ") + dtype_name(w.dtype) + " is not a float type");
  if (!w.nested) {
    if (!w.absmax.defined()) weight_error(what, "no absmax");
    if (w.absmax.dtype() != DType::F32 || w.absmax.numel() != nb)
      weight_error(what, "absmax is " + desc(w.absmax) + " but " + std::to_string(n) + " elements in blocks of " +
                             std::to_string(w.blocksize) + " need float32 [" + std::to_string(nb) + "]");
    same_dev("absmax", w.absmax.device());
    return;
  }
  const Nf4Nested& q = *w.nested;
  if (w.absmax.defined()) weight_error(what, "both a plain absmax and a double-quantised one");
  if (q.blocksize <= 0) weight_error(what, "nested blocksize " + std::to_string(q.blocksize) + " must be positive");
  if (!q.codes.defined() || q.codes.nbytes != nb)
    weight_error(what, "double-quantised absmax holds " + std::to_string(q.codes.defined() ? q.codes.nbytes : 0) +
                           " codes but there are " + std::to_string(nb) + " blocks");
  const int64_t nb2 = (nb + q.blocksize - 1) / q.blocksize;
  if (!q.absmax.defined() || q.absmax.dtype() != DType::F32 || q.absmax.numel() != nb2)
    weight_error(what, "nested_absmax is " + (q.absmax.defined() ? desc(q.absmax) : std::string("missing")) +
                           " but " + std::to_string(nb) + " blocks in nested blocks of " +
                           std::to_string(q.blocksize) + " need float32 [" + std::to_string(nb2) + "]");
  if (!q.map.defined() || q.map.dtype() != DType::F32 || q.map.numel() != 256)
    weight_error(what, "nested_quant_map is " + (q.map.defined() ? desc(q.map) : std::string("missing")) +
                           ", expected float32 [256]");
  same_dev("nested codes", q.codes.device());
  same_dev("nested_absmax", q.absmax.device());
  same_dev("nested_quant_map", q.map.device());
}

namespace io {
namespace {

std::string qname(const std::string& s) { return "'" + s + "'"; }

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

// Element size of a safetensors dtype, 0 if unknown.
size_t raw_dtype_size(const std::string& d) {
  if (d == "BOOL" || d == "U8" || d == "I8" || d == "F8_E4M3" || d == "F8_E5M2" || d == "F8_E8M0") return 1;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  return 0;
}

uint64_t json_u64(const json& v, const std::string& what) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  throw FormatError(what + " must be a non-negative integer, got " + v.dump());
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError(path + ": cannot open: " + std::strerror(errno));
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

}  // namespace

struct RawSafetensors::File {
  std::string path;
  void* base = nullptr;
  size_t size = 0;
  std::map<std::string, std::string> metadata;
  struct Entry {
    std::string name, dtype;
    Shape shape;
    size_t offset = 0, nbytes = 0;  // from `base`
  };
  std::vector<Entry> entries;
  File() = default;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    if (base) munmap(base, size);
  }

  void open(const std::string& p) {
    path = p;
    int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw IoError(p + ": cannot open: " + std::strerror(errno));
    struct stat st {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw IoError(p + ": not a regular file");
    }
    size = static_cast<size_t>(st.st_size);
    if (size > 0) {
      void* m = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      if (m == MAP_FAILED) {
        int e = errno;
        ::close(fd);
        throw IoError(p + ": mmap failed: " + std::strerror(e));
      }
      base = m;
    }
    ::close(fd);
    parse();
  }

  void parse() {
    if (size < 8) throw FormatError(path + ": truncated safetensors file (" + std::to_string(size) + " bytes)");
    const auto* b = static_cast<const unsigned char*>(base);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | b[i];
    if (n > size - 8 || n > (100ull << 20))
      throw FormatError(path + ": header length " + std::to_string(n) + " does not fit the file (" +
                        std::to_string(size) + " bytes)");
    const size_t data_start = 8 + static_cast<size_t>(n);
    json h = parse_json_bounded(std::string_view(reinterpret_cast<const char*>(b + 8), n),
                                path + ": header is not valid JSON");
    if (!h.is_object()) throw FormatError(path + ": header must be a JSON object");
    const uint64_t data_size = size - data_start;
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (v.is_object())
          for (auto m = v.begin(); m != v.end(); ++m)
            if (m.value().is_string()) metadata[m.key()] = m.value().get<std::string>();
        continue;
      }
      const std::string where = path + ": tensor " + qname(name);
      if (!v.is_object() || !v.contains("dtype") || !v["dtype"].is_string() || !v.contains("shape") ||
          !v["shape"].is_array() || !v.contains("data_offsets") || !v["data_offsets"].is_array() ||
          v["data_offsets"].size() != 2)
        throw FormatError(where + ": entry needs 'dtype', 'shape' and 'data_offsets' [begin, end]");
      Entry e;
      e.name = name;
      e.dtype = v["dtype"].get<std::string>();
      const size_t es = raw_dtype_size(e.dtype);
      if (!es) throw FormatError(where + ": unknown dtype '" + e.dtype + "'");
      uint64_t numel = 1;
      for (const json& d : v["shape"]) {
        uint64_t dim = json_u64(d, where + " shape");
        if (__builtin_mul_overflow(numel, dim, &numel) || numel > (uint64_t(1) << 62))
          throw FormatError(where + ": shape " + v["shape"].dump() + " is too large");
        e.shape.push_back(static_cast<int64_t>(dim));
      }
      const uint64_t begin = json_u64(v["data_offsets"][0], where + " data_offsets");
      const uint64_t end = json_u64(v["data_offsets"][1], where + " data_offsets");
      if (begin > end || end > data_size)
        throw FormatError(where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                          "] are reversed or run past the data (" + std::to_string(data_size) + " bytes)");
      if (numel * es != end - begin)
        throw FormatError(where + ": data_offsets span " + std::to_string(end - begin) + " bytes but " + e.dtype +
                          " " + shape_str(e.shape) + " needs " + std::to_string(numel * es));
      e.offset = data_start + static_cast<size_t>(begin);
      e.nbytes = static_cast<size_t>(end - begin);
      spans.emplace_back(begin, end);
      entries.push_back(std::move(e));
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i)
      if (spans[i].first < spans[i - 1].second) throw FormatError(path + ": tensors overlap in the data region");
  }
};

std::shared_ptr<RawSafetensors> RawSafetensors::open(const std::string& path) {
  std::error_code ec;
  std::vector<std::string> shards;
  std::string index_path;
  if (fs::is_directory(path, ec)) {
    fs::path d(path);
    if (fs::exists(d / "model.safetensors.index.json", ec)) index_path = (d / "model.safetensors.index.json").string();
    else if (fs::exists(d / "model.safetensors", ec)) shards.push_back((d / "model.safetensors").string());
    else throw IoError(path + ": no model.safetensors or model.safetensors.index.json in this folder");
  } else if (ends_with(path, ".json")) {
    index_path = path;
  } else {
    if (!fs::exists(path, ec)) throw IoError(path + ": no such file or folder");
    shards.push_back(path);
  }
  if (!index_path.empty()) {
    json j = parse_json_bounded(read_text(index_path), index_path + ": not valid JSON");
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw FormatError(index_path + ": missing 'weight_map' object");
    const fs::path dir = fs::path(index_path).parent_path();
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw FormatError(index_path + ": weight_map entry for " + qname(it.key()) + " must be a file name");
      shards.push_back((dir / it.value().get<std::string>()).string());
    }
    std::sort(shards.begin(), shards.end());
    shards.erase(std::unique(shards.begin(), shards.end()), shards.end());
    if (shards.empty()) throw FormatError(index_path + ": 'weight_map' is empty");
  }
  auto st = std::shared_ptr<RawSafetensors>(new RawSafetensors());
  st->where_ = index_path.empty() ? shards.front() : index_path;
  for (const std::string& sp : shards) {
    auto f = std::make_shared<File>();
    f->open(sp);
    for (size_t i = 0; i < f->entries.size(); ++i) {
      auto [it, fresh] = st->index_.emplace(f->entries[i].name, std::make_pair(f, i));
      if (!fresh)
        throw FormatError("tensor " + qname(f->entries[i].name) + " is stored twice: in " + it->second.first->path +
                          " and in " + sp);
    }
    st->files_.push_back(std::move(f));
  }
  return st;
}

bool RawSafetensors::has(const std::string& name) const { return index_.count(name) != 0; }

RawTensor RawSafetensors::get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw FormatError(where_ + ": tensor " + qname(name) + " not found");
  const auto& [f, i] = it->second;
  const File::Entry& e = f->entries[i];
  RawTensor r;
  r.dtype = e.dtype;
  r.shape = e.shape;
  r.data = static_cast<const uint8_t*>(f->base) + e.offset;
  r.nbytes = e.nbytes;
  r.keepalive = f;
  return r;
}

std::vector<std::string> RawSafetensors::names() const {
  std::vector<std::string> out;
  for (const auto& kv : index_) out.push_back(kv.first);
  return out;
}

std::map<std::string, std::string> RawSafetensors::metadata() const {
  return files_.empty() ? std::map<std::string, std::string>{} : files_.front()->metadata;
}

// ---------------- quant_state ----------------

namespace {

DType dtype_from_bnb(const std::string& s, const std::string& what) {
  if (s == "float32") return DType::F32;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  throw FormatError(what + ": dtype '" + s + "' is not float32, bfloat16 or float16");
}

int64_t json_int(const json& j, const char* key, const std::string& what) {
  if (!j.contains(key)) throw FormatError(what + ": missing '" + key + "'");
  const json& v = j[key];
  if (!v.is_number_integer()) throw FormatError(what + ": '" + key + "' must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

std::string json_str(const json& j, const char* key, const std::string& what) {
  if (!j.contains(key) || !j[key].is_string()) throw FormatError(what + ": missing or non-string '" + key + "'");
  return j[key].get<std::string>();
}

const char* const kQuantStateKey = ".quant_state.bitsandbytes__";

}  // namespace

Bnb4bitState parse_bnb_quant_state(const std::string& text, const std::string& what) {
  json j = parse_json_bounded(text, what + ": quant_state is not valid JSON");
  if (!j.is_object()) throw FormatError(what + ": quant_state must be a JSON object");
  Bnb4bitState s;
  const std::string qt = json_str(j, "quant_type", what);
  if (qt == "nf4") s.type = Quant4Type::NF4;
  else if (qt == "fp4") s.type = Quant4Type::FP4;
  else throw FormatError(what + ": quant_type '" + qt + "' is not nf4 or fp4");
  s.blocksize = json_int(j, "blocksize", what);
  if (!valid_blocksize(s.blocksize))
    throw FormatError(what + ": blocksize " + std::to_string(s.blocksize) + " is not 32, 64, ..., 4096");
  s.dtype = dtype_from_bnb(json_str(j, "dtype", what), what);
  if (!j.contains("shape") || !j["shape"].is_array())
    throw FormatError(what + ": quant_state has no 'shape' list (needed to know the weight's shape)");
  for (const json& d : j["shape"]) {
    if (!d.is_number_integer() || d.get<int64_t>() < 0)
      throw FormatError(what + ": shape " + j["shape"].dump() + " must hold non-negative integers");
    s.shape.push_back(d.get<int64_t>());
  }
  s.nested = j.contains("nested_blocksize") || j.contains("nested_offset");
  if (s.nested) {
    s.nested_blocksize = json_int(j, "nested_blocksize", what);
    if (s.nested_blocksize <= 0) throw FormatError(what + ": nested_blocksize must be positive");
    if (j.contains("nested_dtype") && json_str(j, "nested_dtype", what) != "float32")
      throw FormatError(what + ": nested_dtype '" + j["nested_dtype"].get<std::string>() + "' is not float32");
    if (!j.contains("nested_offset") || !j["nested_offset"].is_number())
      throw FormatError(what + ": missing or non-numeric 'nested_offset'");
    // Python wrote the fp32 offset as the double it converts to exactly; the cast back is exact.
    s.nested_offset = static_cast<float>(j["nested_offset"].get<double>());
  }
  return s;
}

bool is_bnb_4bit(const RawTensorSource& src, const std::string& w) {
  return src.has(w + kQuantStateKey + std::string("nf4")) || src.has(w + kQuantStateKey + std::string("fp4"));
}

namespace {

// A part of the weight: present, of the expected dtype and element count.
RawTensor need_part(const RawTensorSource& src, const std::string& name, const char* dtype, int64_t count,
                    const std::string& why) {
  if (!src.has(name)) throw FormatError(src.where() + ": 4-bit weight part " + qname(name) + " is missing");
  RawTensor r = src.get(name);
  if (r.dtype != dtype)
    throw FormatError(src.where() + ": tensor " + qname(name) + " is " + r.dtype + " " + shape_str(r.shape) +
                      ", expected " + dtype + " (" + why + ")");
  const int64_t n = shape_numel(r.shape);
  if (n != count)
    throw FormatError(src.where() + ": tensor " + qname(name) + " is " + r.dtype + " " + shape_str(r.shape) + " (" +
                      std::to_string(n) + " elements) but " + why + " needs " + std::to_string(count));
  return r;
}

Tensor f32_copy(const RawTensor& r) {
  Tensor t = Tensor::empty({static_cast<int64_t>(r.nbytes / 4)}, DType::F32);
  if (r.nbytes) std::memcpy(t.raw(), r.data, r.nbytes);
  return t;
}

}  // namespace

Nf4Weight read_bnb_4bit(const RawTensorSource& src, const std::string& wname) {
  std::string qs_name;
  for (const char* t : {"nf4", "fp4"})
    if (src.has(wname + kQuantStateKey + t)) {
      if (!qs_name.empty())
        throw FormatError(src.where() + ": weight " + qname(wname) + " has both an nf4 and an fp4 quant_state");
      qs_name = wname + kQuantStateKey + t;
    }
  if (qs_name.empty())
    throw FormatError(src.where() + ": weight " + qname(wname) + " is not a bitsandbytes 4-bit weight (no " +
                      qname(wname + kQuantStateKey + std::string("nf4")) + ")");
  const RawTensor qs = src.get(qs_name);
  if (qs.dtype != "U8" && qs.dtype != "I8")
    throw FormatError(src.where() + ": tensor " + qname(qs_name) + " is " + qs.dtype + ", expected U8 JSON bytes");
  const std::string what = src.where() + ": " + qname(qs_name);
  const Bnb4bitState s = parse_bnb_quant_state(std::string(reinterpret_cast<const char*>(qs.data), qs.nbytes), what);
  if (ends_with(qs_name, "nf4") != (s.type == Quant4Type::NF4))
    throw FormatError(what + ": quant_type '" + quant4_type_name(s.type) + "' disagrees with the key's suffix");

  Nf4Weight w;
  w.shape = s.shape;
  w.blocksize = s.blocksize;
  w.type = s.type;
  w.dtype = s.dtype;
  const int64_t n = w.numel(), nb = w.nblocks();
  const std::string shape_why = "shape " + shape_str(s.shape) + " in blocks of " + std::to_string(s.blocksize);

  // The packed codes: any storage dtype (bnb_4bit_quant_storage), ceil(n/2) bytes in all.
  if (!src.has(wname)) throw FormatError(src.where() + ": 4-bit weight " + qname(wname) + " is missing");
  const RawTensor p = src.get(wname);
  if (static_cast<int64_t>(p.nbytes) != (n + 1) / 2)
    throw FormatError(src.where() + ": tensor " + qname(wname) + " is " + p.dtype + " " + shape_str(p.shape) + " (" +
                      std::to_string(p.nbytes) + " bytes) but the quant_state shape " + shape_str(s.shape) +
                      " needs ceil(" + std::to_string(n) + " / 2) = " + std::to_string((n + 1) / 2) + " packed bytes");
  w.packed = ByteTensor::from_host(p.data, static_cast<int64_t>(p.nbytes));

  // quant_map: bitsandbytes dequantises with its built-in table, so a different map means a file we
  // would silently misread.
  const RawTensor qm = need_part(src, wname + ".quant_map", "F32", 16, "the 16 code values");
  const float* expect = cpu::quant4_code_values(s.type == Quant4Type::NF4 ? cpu::Quant4Type::NF4 : cpu::Quant4Type::FP4);
  for (int i = 0; i < 16; ++i) {
    float v;
    std::memcpy(&v, qm.data + 4 * i, 4);
    if (!(std::fabs(v - expect[i]) <= 1e-6f))
      throw FormatError(src.where() + ": tensor " + qname(wname + ".quant_map") + " entry " + std::to_string(i) +
                        " is " + std::to_string(v) + ", not bitsandbytes' " + quant4_type_name(s.type) + " value " +
                        std::to_string(expect[i]));
  }

  if (!s.nested) {
    w.absmax = f32_copy(need_part(src, wname + ".absmax", "F32", nb, shape_why));
  } else {
    Nf4Nested q;
    q.blocksize = s.nested_blocksize;
    q.offset = s.nested_offset;
    const RawTensor codes = need_part(src, wname + ".absmax", "U8", nb, shape_why + " (double-quantised)");
    q.codes = ByteTensor::from_host(codes.data, nb);
    const int64_t nb2 = (nb + q.blocksize - 1) / q.blocksize;
    q.absmax = f32_copy(need_part(src, wname + ".nested_absmax", "F32", nb2,
                                  std::to_string(nb) + " blocks in nested blocks of " + std::to_string(q.blocksize)));
    q.map = f32_copy(need_part(src, wname + ".nested_quant_map", "F32", 256, "the 8-bit dynamic map"));
    w.nested = std::move(q);
  }
  check_nf4_weight(w, wname);
  return w;
}

// ---------------- writing ----------------

std::vector<OwnedRawTensor> bnb_4bit_state_dict(const Nf4Weight& w, const std::string& wname) {
  check_nf4_weight(w, wname);
  if (w.device() != DeviceType::CPU) throw DeviceError("bnb_4bit_state_dict: 4-bit weight '" + wname + "' is not on the host");
  auto bytes_of = [](const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    return std::vector<uint8_t>(b, b + n);
  };
  std::vector<OwnedRawTensor> out;
  const int64_t n = w.numel();
  out.push_back({wname, "U8", {(n + 1) / 2, 1}, bytes_of(w.packed.data(), static_cast<size_t>(w.packed.nbytes))});
  if (w.nested)
    out.push_back({wname + ".absmax", "U8", {w.nblocks()}, bytes_of(w.nested->codes.data(), size_t(w.nblocks()))});
  else
    out.push_back({wname + ".absmax", "F32", {w.nblocks()}, bytes_of(w.absmax.raw(), w.absmax.nbytes())});
  const float* values = cpu::quant4_code_values(w.type == Quant4Type::NF4 ? cpu::Quant4Type::NF4 : cpu::Quant4Type::FP4);
  out.push_back({wname + ".quant_map", "F32", {16}, bytes_of(values, 64)});
  nlohmann::ordered_json j;
  j["quant_type"] = quant4_type_name(w.type);
  j["blocksize"] = w.blocksize;
  j["dtype"] = dtype_name(w.dtype);
  j["shape"] = w.shape;
  if (w.nested) {
    out.push_back({wname + ".nested_absmax", "F32", {w.nested->absmax.numel()},
                   bytes_of(w.nested->absmax.raw(), w.nested->absmax.nbytes())});
    out.push_back({wname + ".nested_quant_map", "F32", {256}, bytes_of(w.nested->map.raw(), 1024)});
    j["nested_blocksize"] = w.nested->blocksize;
    j["nested_dtype"] = "float32";
    j["nested_offset"] = static_cast<double>(w.nested->offset);
  }
  const std::string text = j.dump();
  out.push_back({wname + kQuantStateKey + quant4_type_name(w.type), "U8", {static_cast<int64_t>(text.size())},
                 bytes_of(text.data(), text.size())});
  return out;
}

void save_raw_safetensors(const std::string& path, const std::vector<OwnedRawTensor>& tensors,
                          const std::map<std::string, std::string>& metadata) {
  std::vector<const OwnedRawTensor*> order;
  for (const auto& t : tensors) {
    const size_t es = raw_dtype_size(t.dtype);
    if (!es) throw FormatError(path + ": tensor " + qname(t.name) + ": unknown dtype '" + t.dtype + "'");
    if (static_cast<uint64_t>(shape_numel(t.shape)) * es != t.bytes.size())
      throw ShapeError(path + ": tensor " + qname(t.name) + ": " + std::to_string(t.bytes.size()) + " bytes for " +
                       t.dtype + " " + shape_str(t.shape));
    order.push_back(&t);
  }
  // Widest dtype first, so that every tensor starts at a multiple of its element size.
  std::stable_sort(order.begin(), order.end(), [](const OwnedRawTensor* a, const OwnedRawTensor* b) {
    return raw_dtype_size(a->dtype) > raw_dtype_size(b->dtype);
  });
  json h = json::object();
  if (!metadata.empty()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const OwnedRawTensor* t : order) {
    h[t->name] = {{"dtype", t->dtype}, {"shape", t->shape}, {"data_offsets", {off, off + t->bytes.size()}}};
    off += t->bytes.size();
  }
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');
  const std::string tmp = path + ".tmp";
  {
    std::ofstream o(tmp, std::ios::binary | std::ios::trunc);
    if (!o) throw IoError(tmp + ": cannot create: " + std::strerror(errno));
    uint64_t n = hs.size();
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
    o.write(reinterpret_cast<const char*>(len), 8);
    o.write(hs.data(), static_cast<std::streamsize>(hs.size()));
    for (const OwnedRawTensor* t : order) o.write(reinterpret_cast<const char*>(t->bytes.data()), t->bytes.size());
    if (!o) throw IoError(tmp + ": write failed");
  }
  fs::rename(tmp, path);
}

}  // namespace io
}  // namespace am
