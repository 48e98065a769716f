// bitsandbytes 4-bit weights (QLoRA's NF4, also FP4): the in-memory form and the on-disk layout that
// bitsandbytes' Linear4bit / transformers save in safetensors.
//
// On disk, for a Linear weight named W (e.g. "model.layers.0.self_attn.q_proj.weight"), as
// bitsandbytes' QuantState.as_dict(packed=True) writes it (bitsandbytes/functional.py, nn/modules.py
// Linear4bit._save_to_state_dict):
//   W                                    packed codes, uint8 [(n+1)/2, 1]: element 2i in the high nibble of
//                                        byte i, 2i+1 in the low nibble (with bnb_4bit_quant_storage=bf16 etc.
//                                        the same bytes are stored as that dtype, [(n+1)/(2*itemsize), 1])
//   W.absmax                             fp32 [nblocks]; uint8 [nblocks] codes when double-quantised
//   W.quant_map                          fp32 [16], the code values (bitsandbytes itself ignores it and uses
//                                        its built-in table; we check it equals that table)
//   W.nested_absmax                      fp32 [ceil(nblocks / nested_blocksize)]      (double quant only)
//   W.nested_quant_map                   fp32 [256], the 8-bit dynamic map            (double quant only)
//   W.quant_state.bitsandbytes__nf4      uint8 bytes of a UTF-8 JSON object: quant_type ("nf4"/"fp4"),
//   (or __fp4)                           blocksize, dtype (of the original weight: "bfloat16", "float32",
//                                        "float16"), shape (list), and with double quant nested_blocksize,
//                                        nested_dtype ("float32"), nested_offset (a number)
// with n = prod(shape), nblocks = ceil(n / blocksize).
//
// Memory of an Nf4Weight: n/2 bytes of codes + 4 bytes per block (0.0625 byte/param at blocksize 64) or,
// double-quantised, 1 byte per block + 4 per 256 blocks (~0.0158 byte/param): ~0.52 byte/param in all.
//
// core/dtype has no 8-bit type yet (and io::SafeTensors refuses "U8" tensors), so:
//   * byte buffers are ByteTensor: an I32 tensor of ceil(nbytes/4) words holding the bytes in order;
//   * files are read through RawTensorSource, which RawSafetensors implements for any safetensors dtype.
// Both become plain U8 Tensors / io::SafeTensors once DType gains U8.
#pragma once
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace am {

// bitsandbytes' two 4-bit data types (quant_type).
enum class Quant4Type : uint8_t { NF4, FP4 };
const char* quant4_type_name(Quant4Type t);  // "nf4" / "fp4"

// Bytes on one device (see the header comment: an I32 tensor of ceil(nbytes/4) words; the bytes past
// nbytes in the last word are zero when made here and never read).
struct ByteTensor {
  Tensor words;        // I32 [ceil(nbytes / 4)]
  int64_t nbytes = 0;

  static ByteTensor empty(int64_t nbytes, Allocator& alloc = cpu_allocator());  // zeroed on the host
  static ByteTensor from_host(const void* data, int64_t nbytes);                // host copy
  bool defined() const { return words.defined(); }
  DeviceType device() const { return words.device(); }
  uint8_t* data() const { return words.defined() ? words.data<uint8_t>() : nullptr; }
};

// Double quantisation of the absmax (bnb_4bit_use_double_quant / compress_statistics=True):
//   absmax[b] = fp32(fp32(map[codes[b]] * absmax2[b / blocksize]) + offset)
struct Nf4Nested {
  ByteTensor codes;      // uint8 [nblocks]
  Tensor absmax;         // fp32 [ceil(nblocks / blocksize)]  ("nested_absmax")
  Tensor map;            // fp32 [256]                        ("nested_quant_map", create_dynamic_map(signed=True))
  float offset = 0.f;    // mean of the fp32 absmax, subtracted before quantising ("nested_offset")
  int64_t blocksize = 256;
};

// One 4-bit weight. All tensors live on one device (host after reading or quantising on the CPU).
struct Nf4Weight {
  Shape shape;                        // the original weight's shape, e.g. Linear [out, in]
  int64_t blocksize = 64;             // elements per absmax block: 32, 64, ..., 4096 (bitsandbytes' set)
  Quant4Type type = Quant4Type::NF4;
  DType dtype = DType::BF16;          // the original weight's dtype (quant_state "dtype")
  ByteTensor packed;                  // uint8 [ceil(numel/2)]
  Tensor absmax;                      // fp32 [nblocks]; undefined when nested
  std::optional<Nf4Nested> nested;    // set when double-quantised

  int64_t numel() const { return shape_numel(shape); }
  int64_t nblocks() const { return (numel() + blocksize - 1) / blocksize; }
  bool is_nested() const { return nested.has_value(); }
  DeviceType device() const { return packed.device(); }
  size_t nbytes() const;  // memory held (codes + absmax [+ nested parts])
};

// Throws ShapeError naming `what` (a tensor or weight name) if the parts of `w` are inconsistent: packed
// bytes != ceil(numel/2), absmax / codes count != nblocks, nested absmax count, map size, dtypes, devices,
// blocksize outside bitsandbytes' set (32..4096, powers of two), nested blocksize <= 0.
void check_nf4_weight(const Nf4Weight& w, const std::string& what);

namespace io {

// One tensor as stored: safetensors dtype string ("U8", "F32", "BF16", ...), shape, and the bytes
// (aliasing a mapping kept alive by `keepalive`).
struct RawTensor {
  std::string dtype;
  Shape shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::shared_ptr<const void> keepalive;
};

// Named tensors of any dtype.
class RawTensorSource {
 public:
  virtual ~RawTensorSource() = default;
  virtual bool has(const std::string& name) const = 0;
  virtual RawTensor get(const std::string& name) const = 0;  // throws FormatError naming the tensor if absent
  virtual std::string where() const = 0;                     // the file(s), for messages
};

// A read-only safetensors file (or a sharded set through model.safetensors.index.json) with tensors of any
// dtype (BOOL, U8, I8, F8_*, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64), mmapped. The header is
// validated before any tensor is handed out: offsets inside the data region, no overlaps, byte size =
// numel * dtype size (FormatError naming the file and tensor).
class RawSafetensors : public RawTensorSource {
 public:
  // `path`: a .safetensors file, a model.safetensors.index.json, or a folder holding either.
  static std::shared_ptr<RawSafetensors> open(const std::string& path);
  bool has(const std::string& name) const override;
  RawTensor get(const std::string& name) const override;
  std::string where() const override { return where_; }
  std::vector<std::string> names() const;
  std::map<std::string, std::string> metadata() const;  // __metadata__ of the first file

 private:
  struct File;
  std::string where_;
  std::vector<std::shared_ptr<File>> files_;
  std::map<std::string, std::pair<std::shared_ptr<File>, size_t>> index_;  // name -> (file, entry)
};

// The bitsandbytes quant_state JSON of a 4-bit weight.
struct Bnb4bitState {
  Quant4Type type = Quant4Type::NF4;
  int64_t blocksize = 64;
  DType dtype = DType::BF16;
  Shape shape;
  bool nested = false;
  int64_t nested_blocksize = 256;
  float nested_offset = 0.f;
};
// Parses the JSON bytes; `what` names the tensor in errors (FormatError).
Bnb4bitState parse_bnb_quant_state(const std::string& json_text, const std::string& what);

// True when `weight_name` has a "<weight_name>.quant_state.bitsandbytes__nf4" (or __fp4) entry.
bool is_bnb_4bit(const RawTensorSource& src, const std::string& weight_name);

// Reads the 4-bit weight `weight_name` (e.g. "model.layers.0.mlp.down_proj.weight") into host memory,
// checking every part against the quant_state (FormatError naming the tensor and both sizes on any
// mismatch: missing parts, byte counts, absmax count, nested sizes, an unexpected quant_map, unknown
// quant_type or dtype).
Nf4Weight read_bnb_4bit(const RawTensorSource& src, const std::string& weight_name);

// The entries bitsandbytes saves for `w` (host) under `weight_name`, in its order: weight, absmax,
// quant_map, [nested_absmax, nested_quant_map,] quant_state.bitsandbytes__<type>. Owned host bytes.
struct OwnedRawTensor {
  std::string name;
  std::string dtype;
  Shape shape;
  std::vector<uint8_t> bytes;
};
std::vector<OwnedRawTensor> bnb_4bit_state_dict(const Nf4Weight& w, const std::string& weight_name);

// Writes tensors of any dtype as one safetensors file (header in sorted key order, 8-byte aligned data).
void save_raw_safetensors(const std::string& path, const std::vector<OwnedRawTensor>& tensors,
                          const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace io
}  // namespace am
