// Internal: the pipeline components of a tokenizer.json (normalizers, pre-tokenizers, BPE model,
// post-processors, decoders). Offsets are not tracked: only ids matter here, so a "normalized string"
// is its text plus whether it starts at offset 0 of the original input (Metaspace prepend_scheme=first).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tok_util.h"

namespace am::tok {

using json = nlohmann::json;

struct Piece {
  std::string text;
  bool first = false;  // starts at original offset 0
};

// Thrown by component factories; the caller turns it into am::FormatError naming the file.
struct ComponentError {
  std::string msg;
};

// ---------------- normalizers ----------------
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual void normalize(std::string& s) const = 0;
};
std::unique_ptr<Normalizer> make_normalizer(const json& j);  // j may be null -> nullptr

// ---------------- pre-tokenizers ----------------
enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces every piece by its sub-pieces (empty ones dropped).
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};
std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j);

// ---------------- model ----------------
class BPE {
 public:
  static std::unique_ptr<BPE> from_json(const json& j);
  // Appends the ids of one pre-token (non-empty).
  void tokenize(std::string_view s, std::vector<int32_t>& out) const;
  int32_t token_to_id(std::string_view s) const { return vocab_.get(s); }
  // nullptr when the id is not in the vocabulary.
  const std::string* id_to_token(int32_t id) const;
  int64_t max_id() const { return static_cast<int64_t>(vocab_r_.size()) - 1; }
  size_t size() const { return vocab_.size(); }
  const std::string& unk_token() const { return unk_token_; }
  ~BPE();

 private:
  void merge_word(std::string_view w, std::vector<int32_t>& out) const;
  void merge_cached(std::string_view w, std::vector<int32_t>& out) const;
  bool merge_lookup(int32_t a, int32_t b, uint32_t* rank, int32_t* new_id) const;

  StrMap vocab_;
  std::vector<std::string> vocab_r_;
  std::vector<uint8_t> has_id_;
  // pair (a<<32|b) -> (rank<<32 | new_id), open addressing
  std::vector<uint64_t> mkeys_, mvals_;
  uint64_t mmask_ = 0;
  std::string unk_token_, prefix_, suffix_;
  int32_t unk_id_ = -1;
  bool has_unk_ = false, fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  bool has_prefix_ = false, has_suffix_ = false;
  // SentencePiece-style vocabularies where U+2581 only ever starts a token: no merge can cross the
  // point where a non-U+2581 char is followed by U+2581, so long words are split there (and cached).
  bool seg_metaspace_ = false;
  int32_t byte_ids_[256];
  bool all_bytes_ = false;
  // Word cache: one per thread and tokenizer (no locks, so batch encoding scales), keyed by a unique
  // instance id so a cache can never outlive or be confused with its tokenizer.
  static constexpr size_t kCacheCapacity = 1 << 16;
  static constexpr size_t kMaxCachedLen = 256;
  uint64_t instance_id_ = 0;

};

// ---------------- post-processors ----------------
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  virtual void process(std::vector<int32_t>& ids, bool add_special_tokens) const = 0;
};
// token_to_id resolves names in Bert/Roberta processors.
std::unique_ptr<PostProcessor> make_post_processor(const json& j);
// bos? A eos? (transformers' LlamaTokenizerFast.update_post_processor)
std::unique_ptr<PostProcessor> make_bos_eos_processor(int32_t bos, int32_t eos);

// ---------------- decoders ----------------
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};
std::unique_ptr<Decoder> make_decoder(const json& j);

// The byte-level alphabet: byte -> UTF-8 of its visible char, and the inverse (-1 when not a mapped char).
const std::string& byte_to_unicode(uint8_t b);
int unicode_to_byte(char32_t c);

}  // namespace am::tok
