// Streaming LoRA merge into an HF model folder (see lora_merge.h).
//
// Each output shard is the base shard with the adapted tensors' bytes replaced: the header (8-byte length +
// JSON) is copied verbatim, since names, dtypes, shapes and offsets do not change, and the data region is
// copied in order, the untouched runs file to file and each adapted tensor read, merged in place and written.
// So the shard split, the index (copied as is) and even the data order of the base are kept exactly.
#include "io/lora_merge.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/fd.h"
#include "io/json_bounded.h"
#include "io/model_config.h"

namespace am::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }


// Appends bytes [off, off + n) of `in` to `out`: in the kernel (copy_file_range) where the file systems allow,
// else through a bounded buffer.
void copy_range(const Fd& in, uint64_t off, uint64_t n, Fd& out) {
  bool kernel = true;
  while (n > 0 && kernel) {
    loff_t o = static_cast<loff_t>(off);
    ssize_t c = ::copy_file_range(in.get(), &o, out.get(), nullptr, std::min<uint64_t>(n, uint64_t(1) << 30), 0);
    if (c < 0 && errno == EINTR) continue;
    if (c <= 0) {
      if (c < 0 && errno != ENOSYS && errno != EXDEV && errno != EINVAL && errno != EOPNOTSUPP && errno != EPERM)
        throw IoError(in.path() + " -> " + out.path() + ": copy failed: " + std::strerror(errno));
      kernel = false;  // unsupported here (or EOF, which the buffered path reports as truncation)
      break;
    }
    off += static_cast<uint64_t>(c);
    n -= static_cast<uint64_t>(c);
  }
  if (n == 0) return;
  std::vector<char> buf(static_cast<size_t>(std::min<uint64_t>(n, uint64_t(16) << 20)));
  while (n > 0) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(n, buf.size()));
    in.pread_all(buf.data(), k, off);
    out.write_all(buf.data(), k);
    off += k;
    n -= k;
  }
}

// ---- safetensors header (own parse: offsets are needed, and tensors of dtypes this engine does not compute
// with, e.g. F8_E4M3 or U8, must still be copied)

struct StTensor {
  std::string name, dtype;
  Shape shape;
  uint64_t begin = 0, end = 0;  // relative to the data start
};
struct Shard {
  std::string path, file;  // full path, file name
  uint64_t data_start = 0, size = 0;
  std::vector<StTensor> tensors;  // sorted by begin
};

int64_t st_dtype_bytes(const std::string& d) {  // 0: unknown or sub-byte (size not checked)
  static const std::map<std::string, int64_t> m = {
      {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2},  {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"I64", 8}, {"U64", 8}, {"F64", 8}};
  auto it = m.find(d);
  return it == m.end() ? 0 : it->second;
}

Shard read_shard(const std::string& path) {
  Shard s;
  s.path = path;
  s.file = fs::path(path).filename().string();
  Fd f(path, O_RDONLY);
  s.size = f.size();
  if (s.size < 8) throw FormatError(path + ": truncated safetensors file (" + std::to_string(s.size) + " bytes)");
  unsigned char lenb[8];
  f.pread_all(lenb, 8, 0);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenb[i];
  if (n > s.size - 8 || n > (uint64_t(100) << 20))
    throw FormatError(path + ": header length " + std::to_string(n) + " does not fit the file: truncated or not safetensors");
  s.data_start = 8 + n;
  std::string h(static_cast<size_t>(n), '\0');
  f.pread_all(h.data(), h.size(), 8);
  json j = parse_json_bounded(h, path + ": header");
  if (!j.is_object()) throw FormatError(path + ": header must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& v = it.value();
    const std::string where = path + ": tensor " + q(it.key());
    if (!v.is_object() || !v.contains("dtype") || !v["dtype"].is_string() || !v.contains("shape") ||
        !v["shape"].is_array() || !v.contains("data_offsets") || !v["data_offsets"].is_array() ||
        v["data_offsets"].size() != 2)
      throw FormatError(where + ": entry needs dtype, shape and data_offsets [begin, end]");
    StTensor t;
    t.name = it.key();
    t.dtype = v["dtype"].get<std::string>();
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
        throw FormatError(where + ": shape must hold non-negative integers");
      t.shape.push_back(d.get<int64_t>());
    }
    for (int k = 0; k < 2; ++k)
      if (!v["data_offsets"][k].is_number_unsigned() && !(v["data_offsets"][k].is_number_integer() && v["data_offsets"][k].get<int64_t>() >= 0))
        throw FormatError(where + ": data_offsets must be non-negative integers");
    t.begin = v["data_offsets"][0].get<uint64_t>();
    t.end = v["data_offsets"][1].get<uint64_t>();
    if (t.end < t.begin || t.end > s.size - s.data_start)
      throw FormatError(where + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                        ") out of the data region (" + std::to_string(s.size - s.data_start) + " bytes)");
    if (int64_t eb = st_dtype_bytes(t.dtype)) {
      uint64_t want = static_cast<uint64_t>(eb);
      for (int64_t d : t.shape)
        if (__builtin_mul_overflow(want, static_cast<uint64_t>(d), &want))
          throw FormatError(where + ": shape " + shape_str(t.shape) + " overflows");
      if (want != t.end - t.begin)
        throw FormatError(where + ": " + std::to_string(t.end - t.begin) + " bytes for " + t.dtype + " " +
                          shape_str(t.shape) + " (want " + std::to_string(want) + ")");
    }
    s.tensors.push_back(std::move(t));
  }
  std::sort(s.tensors.begin(), s.tensors.end(), [](const StTensor& a, const StTensor& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 1; i < s.tensors.size(); ++i)
    if (s.tensors[i].begin < s.tensors[i - 1].end)
      throw FormatError(path + ": tensors " + q(s.tensors[i - 1].name) + " and " + q(s.tensors[i].name) + " overlap");
  return s;
}

// Weight files of the base: the index's shards, or model.safetensors (the index first, as SafeTensors::open).
std::vector<std::string> base_weight_files(const fs::path& dir, std::string* index_file,
                                           std::map<std::string, std::string>* weight_map) {
  std::error_code ec;
  const fs::path idx = dir / "model.safetensors.index.json";
  if (fs::exists(idx, ec)) {
    std::ifstream f(idx, std::ios::binary);
    if (!f) throw IoError(idx.string() + ": cannot read");
    std::stringstream ss;
    ss << f.rdbuf();
    json j = parse_json_bounded(ss.str(), idx.string());
    if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      throw FormatError(idx.string() + ": missing 'weight_map' object");
    std::set<std::string> files;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw FormatError(idx.string() + ": weight_map entry for " + q(it.key()) + " must be a file name");
      const std::string fn = it.value().get<std::string>();
      if (fn.empty() || fn.find('/') != std::string::npos || fn == "." || fn == "..")
        throw FormatError(idx.string() + ": weight_map entry for " + q(it.key()) + ": " + q(fn) +
                          " is not a file name in this folder");
      files.insert(fn);
      (*weight_map)[it.key()] = fn;
    }
    if (files.empty()) throw FormatError(idx.string() + ": weight_map is empty");
    *index_file = idx.filename().string();
    std::vector<std::string> out;
    for (const auto& fn : files) {
      if (!fs::is_regular_file(dir / fn, ec))
        throw IoError((dir / fn).string() + ": shard named by " + idx.string() + " not found");
      out.push_back((dir / fn).string());
    }
    return out;
  }
  if (fs::exists(dir / "model.safetensors", ec)) return {(dir / "model.safetensors").string()};
  for (const char* pickle : {"pytorch_model.bin", "pytorch_model.bin.index.json"})
    if (fs::exists(dir / pickle, ec))
      throw IoError(dir.string() + ": the base has only PyTorch pickle weights (" + pickle +
                    "), which are not read (unsafe, needs Python); convert them to safetensors first");
  throw IoError(dir.string() + ": no model.safetensors or model.safetensors.index.json in the base folder");
}

// Files of the base folder that are not weights: copied to the output as they are.
bool is_weight_file(const std::string& fn) {
  static const char* exts[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                               ".onnx", ".npz", ".pkl", ".pickle", ".tflite", ".ot"};
  for (const char* e : exts)
    if (fn.ends_with(e)) return true;
  // Indexes of other weight formats (pytorch_model.bin.index.json, tf_model.h5.index.json, ...).
  return fn.ends_with(".index.json");
}

// The user-facing names of the base: folder name and, for a hub-cache snapshot, the hub id.
bool same_base(const std::string& named, const std::string& given, const std::string& resolved) {
  if (named.empty()) return true;
  auto strip = [](std::string s) {
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    return s;
  };
  const std::string n = strip(named), g = strip(given);
  if (n == g) return true;
  std::error_code ec;
  if (fs::exists(n, ec) && fs::exists(resolved, ec) && fs::equivalent(n, resolved, ec)) return true;
  // ".../models--org--name/snapshots/<hash>" <-> "org/name"
  fs::path r = fs::path(resolved);
  if (r.parent_path().filename() == "snapshots") {
    std::string repo = r.parent_path().parent_path().filename().string();
    if (repo.rfind("models--", 0) == 0) {
      std::string id = repo.substr(8);
      for (size_t i = id.find("--"); i != std::string::npos; i = id.find("--", i + 1)) id.replace(i, 2, "/");
      if (id == n) return true;
    }
  }
  // Same last path component ("meta-llama/Llama-3.2-1B" vs "/models/Llama-3.2-1B").
  return fs::path(n).filename() == fs::path(strip(resolved)).filename() || fs::path(n).filename() == fs::path(g).filename();
}

// Removes the temporary output folder unless released.
struct TmpDirGuard {
  fs::path path;
  bool keep = false;
  ~TmpDirGuard() {
    if (!keep && !path.empty()) {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  }
};

}  // namespace

LoraMergeResult merge_lora(const LoraMergeOptions& opt, const std::function<void(const std::string&)>& log) {
  if (opt.base.empty() || opt.adapter.empty() || opt.out.empty())
    throw UsageError("merge-lora: --base, --adapter and --out are all required");
  const std::string base_dir = resolve_model_path(opt.base);
  LoraAdapter adapter = LoraAdapter::load(opt.adapter);
  if (!same_base(adapter.base_model_name_or_path, opt.base, base_dir))
    adapter.warnings.push_back("the adapter was trained on " + q(adapter.base_model_name_or_path) + " (" +
                               adapter.config_path + ": base_model_name_or_path) but is merged into " + q(opt.base) +
                               (opt.base == base_dir ? "" : " (" + base_dir + ")"));
  return merge_lora(base_dir, adapter, opt.out, log);
}

LoraMergeResult merge_lora(const std::string& base_dir, const LoraAdapter& adapter, const std::string& out_dir,
                           const std::function<void(const std::string&)>& log) {
  auto say = [&](const std::string& s) {
    if (log) log(s);
  };
  LoraMergeResult res;
  res.base_dir = base_dir;
  res.out_dir = out_dir;
  std::error_code ec;
  const fs::path bdir(base_dir);
  if (!fs::is_directory(bdir, ec)) throw IoError(base_dir + ": base model folder not found");
  if (!fs::exists(bdir / "config.json", ec))
    throw IoError((bdir / "config.json").string() + ": not found (the base must be an HF model folder)");

  // ---- the output folder: absent or empty (checked first: cheap, and a usage error)
  fs::path out = fs::path(out_dir).lexically_normal();
  if (out.filename().empty()) out = out.parent_path();  // "out/" -> "out"
  if (fs::exists(out, ec) || fs::is_symlink(out, ec)) {
    if (!fs::is_directory(out, ec)) throw UsageError("merge-lora: --out " + out_dir + " exists and is not a folder");
    if (!fs::is_empty(out, ec)) throw UsageError("merge-lora: --out " + out_dir + " exists and is not empty; give a new or empty folder");
  }

  // ---- base headers, and every adapter target checked against them before anything is written
  std::string index_file;
  std::map<std::string, std::string> weight_map;
  const std::vector<std::string> files = base_weight_files(bdir, &index_file, &weight_map);
  std::vector<Shard> shards;
  std::map<std::string, std::pair<size_t, size_t>> where;  // tensor -> (shard, index in shard)
  for (const auto& f : files) {
    shards.push_back(read_shard(f));
    const Shard& s = shards.back();
    for (size_t i = 0; i < s.tensors.size(); ++i) {
      auto [it, fresh] = where.emplace(s.tensors[i].name, std::make_pair(shards.size() - 1, i));
      if (!fresh)
        throw FormatError("base tensor " + q(s.tensors[i].name) + " is stored twice, in " + shards[it->second.first].path +
                          " and " + s.path);
    }
  }
  for (const auto& [name, fn] : weight_map) {
    auto it = where.find(name);
    if (it == where.end() || shards[it->second.first].file != fn)
      throw FormatError((bdir / index_file).string() + ": weight_map puts " + q(name) + " in " + fn + ", which does not hold it");
  }
  std::string base_files_str;
  for (size_t i = 0; i < files.size() && i < 3; ++i) base_files_str += (i ? ", " : "") + files[i];
  if (files.size() > 3) base_files_str += ", ... (" + std::to_string(files.size()) + " files)";

  if (!adapter.expert_params.empty()) {
    // LoRA on fused experts assumes transformers 5's [E, out, in] experts (PEFT's ParamWrapper swaps in/out for
    // them). Models whose experts are stored [E, in, out] (`is_transposed`, delta "e i o") would need the other
    // orientation, which the shapes alone cannot tell when in == out.
    std::string model_type;
    try {
      std::ifstream f(bdir / "config.json", std::ios::binary);
      std::stringstream ss;
      ss << f.rdbuf();
      const json c = parse_json_bounded(ss.str(), (bdir / "config.json").string());
      if (c.is_object() && c.contains("model_type") && c["model_type"].is_string()) model_type = c["model_type"].get<std::string>();
    } catch (const Error&) {
    }
    static const std::set<std::string> transposed = {"gpt_oss", "llama4", "llama4_text"};
    if (transposed.count(model_type))
      throw UsageError("merge-lora: " + adapter.config_path + ": LoRA on the fused expert parameters (target_parameters, e.g. " +
                       adapter.expert_params.begin()->first + ") of a " + model_type + " base is not supported: its experts "
                       "are stored [experts, in, out]; only [experts, out, in] (qwen2_moe, qwen3_moe, olmoe, mixtral, ...) merges");
  }
  // Expert parameters are looked up in the base's layout: the fused tensor, or the hub's per-expert tensors.
  const std::map<std::string, std::string> touched =
      adapter.touched([&](const std::string& n) { return where.count(n) > 0; });
  for (const auto& [name, key] : touched) {
    auto it = where.find(name);
    if (it == where.end()) {
      std::string hint;
      if (name == "lm_head.weight")
        hint = " (a model with tied embeddings stores no lm_head.weight; LoRA on a tied lm_head is not supported)";
      else if (auto ep = adapter.expert_params.find(name); ep != adapter.expert_params.end())
        hint = " (LoRA on the fused expert parameter; the base has neither it nor per-expert tensors like " +
               ep->second.module + ".0." + (ep->second.param == "down_proj" ? "down_proj" : "gate_proj") +
               ".weight or Mixtral's block_sparse_moe.experts.0." + (ep->second.param == "down_proj" ? "w2" : "w1") + ".weight)";
      else if (auto sl = adapter.expert_slice(name); sl && sl->expert >= 0)
        hint = " (" + sl->param->target + " has " + std::to_string(sl->param->num_experts) +
               " experts in the adapter: does the base have fewer?)";
      else if (name.find(".experts.") != std::string::npos)
        hint = " (a base that stores its experts fused, as transformers 5 saves them, has no per-expert tensors)";
      throw FormatError("adapter tensor " + q(key) + " (" + adapter.weights_path + ") targets base tensor " + q(name) +
                        ", which the base does not have (" + base_files_str + ")" + hint);
    }
    const StTensor& t = shards[it->second.first].tensors[it->second.second];
    adapter.check_base_tensor(name, t.dtype, t.shape, shards[it->second.first].path);
  }
  // Every base tensor the merge will change, also those touched() does not list (an expert index beyond the
  // adapter's experts): checked now, before anything is written.
  for (const auto& [name, loc] : where)
    if (!touched.count(name) && adapter.touches(name)) {
      const StTensor& t = shards[loc.first].tensors[loc.second];
      adapter.check_base_tensor(name, t.dtype, t.shape, shards[loc.first].path);
    }
  for (const auto& w : adapter.warnings) {
    res.warnings.push_back(w);
    say("warning: " + w);
  }

  // ---- write OUT.tmp-XXXXXX
  fs::path parent = out.parent_path();
  if (parent.empty()) parent = ".";
  fs::create_directories(parent, ec);
  std::string tmpl = (parent / (out.filename().string() + ".tmp-XXXXXX")).string();
  std::vector<char> tbuf(tmpl.begin(), tmpl.end());
  tbuf.push_back('\0');
  if (!::mkdtemp(tbuf.data())) throw IoError(tmpl + ": cannot create the temporary output folder: " + std::strerror(errno));
  TmpDirGuard guard{fs::path(tbuf.data())};
  const fs::path tmp = guard.path;
  {  // mkdtemp makes it 0700; the published folder gets the usual permissions (0777 less the umask)
    const mode_t mask = ::umask(0);
    ::umask(mask);
    ::chmod(tmp.c_str(), 0777 & ~mask);
  }

  for (size_t si = 0; si < shards.size(); ++si) {
    const Shard& s = shards[si];
    Fd in(s.path, O_RDONLY);
    if (in.size() != s.size) throw IoError(s.path + ": changed while being read");
    Fd o((tmp / s.file).string(), O_WRONLY | O_CREAT | O_EXCL);
    copy_range(in, 0, s.data_start, o);  // header, verbatim
    uint64_t cursor = s.data_start;
    size_t n_merged = 0;
    for (const StTensor& t : s.tensors) {
      if (!adapter.touches(t.name)) continue;
      copy_range(in, cursor, s.data_start + t.begin - cursor, o);
      Tensor buf = Tensor::empty(t.shape, dtype_from_safetensors(t.dtype));
      in.pread_all(buf.raw(), buf.nbytes(), s.data_start + t.begin);
      adapter.merge_inplace(t.name, buf);
      o.write_all(buf.raw(), buf.nbytes());
      cursor = s.data_start + t.end;
      ++n_merged;
      if (adapter.replaced.count(t.name) && !adapter.modules.count(t.name) && !adapter.bias_owner.count(t.name)) ++res.replaced;
      else ++res.merged;
    }
    copy_range(in, cursor, s.size - cursor, o);
    o.sync_close();
    res.tensors += s.tensors.size();
    res.bytes += s.size;
    say("merge-lora: [" + std::to_string(si + 1) + "/" + std::to_string(shards.size()) + "] " + s.file + ": " +
        std::to_string(n_merged) + " of " + std::to_string(s.tensors.size()) + " tensors changed");
  }

  // ---- the index and the side files (config, generation config, tokenizer, ...): copied as they are
  std::set<std::string> written;
  for (const auto& s : shards) written.insert(s.file);
  std::vector<fs::directory_entry> entries;
  for (const auto& e : fs::directory_iterator(bdir, ec)) entries.push_back(e);
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) { return a.path() < b.path(); });
  for (const auto& e : entries) {
    const std::string fn = e.path().filename().string();
    if (written.count(fn)) continue;
    const bool keep_index = fn == index_file && !index_file.empty();
    std::string why;
    if (fn.empty() || fn[0] == '.') continue;  // .gitattributes, .cache, ...
    if (!e.is_regular_file(ec)) why = "not a regular file";
    else if (!keep_index && is_weight_file(fn)) why = "weights in another file or format";
    else if (fn.rfind("adapter_", 0) == 0) why = "adapter file";
    else if (e.file_size(ec) > (uint64_t(1) << 30)) why = "larger than 1 GiB";
    if (!why.empty()) {
      res.skipped.push_back(fn + " (" + why + ")");
      continue;
    }
    Fd in(e.path().string(), O_RDONLY);
    Fd o((tmp / fn).string(), O_WRONLY | O_CREAT | O_EXCL);
    copy_range(in, 0, in.size(), o);
    o.sync_close();
    ++res.files_copied;
  }
  if (!res.skipped.empty()) {
    std::string s;
    for (const auto& k : res.skipped) s += (s.empty() ? "" : ", ") + k;
    say("merge-lora: not copied from the base folder: " + s);
  }

  // ---- publish: rename onto OUT (an empty folder there is replaced)
  if (std::rename(tmp.c_str(), out.c_str()) != 0)
    throw IoError("cannot rename " + tmp.string() + " to " + out_dir + ": " + std::strerror(errno));
  guard.keep = true;
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return res;
}

}  // namespace am::io
