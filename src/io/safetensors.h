// safetensors reader (mmap; single file or sharded with model.safetensors.index.json) and writer
// (shards above a size limit, with an index). Format: 8-byte little-endian header length N, N bytes of
// JSON {name: {dtype, shape, data_offsets: [begin, end)}, "__metadata__": {...}}, then the data.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace am::io {

struct TensorInfo {
  std::string name;
  DType dtype;
  Shape shape;
  std::string file;  // the shard file it lives in (full path)
};

// A read-only view over one safetensors file or a sharded set. Tensors returned by get() alias the
// mapping (zero-copy) and keep it alive; the mapping is read-only, so clone() a tensor before writing to it.
// (A tensor that another writer stored at an address not aligned to its element size is returned as an
// aligned copy instead.) The whole header is validated by open(), so get() never reads out of bounds.
class SafeTensors {
 public:
  // `path` is a .safetensors file, a model.safetensors.index.json, or a folder holding either.
  // Throws IoError (missing/unreadable) or FormatError (truncated, bad header, offsets out of range),
  // always naming the file (and the tensor where one is at fault).
  static SafeTensors open(const std::string& path);

  bool has(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws FormatError naming the tensor
  std::vector<std::string> names() const;                 // sorted
  Tensor get(const std::string& name) const;              // zero-copy view in the stored dtype
  std::map<std::string, std::string> metadata() const;    // __metadata__ of the first file

 private:
  struct File;
  std::vector<std::shared_ptr<File>> files_;
  std::map<std::string, std::pair<TensorInfo, std::pair<std::shared_ptr<File>, size_t>>> index_;
};

struct SaveOptions {
  size_t max_shard_bytes = size_t(5) << 30;  // HF's default "5GB"-ish split
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
};

// Writes `tensors` (name -> tensor, any dtype, host) into `dir` as model.safetensors, or as
// model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger than max_shard_bytes (split
// as huggingface_hub splits, in the given order). Each file is written to a temporary name and renamed
// when complete; shards and index of an earlier save with another split are then removed. The header
// lists tensors in sorted key order; data is laid out widest dtype first so every tensor is aligned.
void save_safetensors_dir(const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
                          const SaveOptions& opt = {}, const std::string& basename = "model");
// Writes one file (atomic rename).
void save_safetensors_file(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                           const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace am::io
