// Hugging Face tokenizer.json (+ tokenizer_config.json) loader with encode/decode that reproduce HF
// `tokenizers` (and transformers' add_special_tokens / decode conventions) token for token.
//
// Supported: model BPE (byte-level and SentencePiece-style with byte_fallback); normalizers NFC, NFD,
// NFKC, NFKD, Replace, Prepend, Lowercase, Strip, StripAccents, Sequence; pre-tokenizers Split,
// ByteLevel, Digits, Metaspace, Whitespace, WhitespaceSplit, Punctuation, Sequence; post-processors
// TemplateProcessing, ByteLevel, BertProcessing, RobertaProcessing, Sequence; decoders ByteLevel,
// Metaspace, ByteFallback, Fuse, Strip, Replace, BPEDecoder, Sequence. Added tokens are matched
// before normalization exactly like HF's AddedVocabulary. See docs/tokenizer.md.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace am::tok {

struct TokenizerImpl;  // defined in tokenizer.cpp

class Tokenizer {
 public:
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Loads DIR/tokenizer.json and (optionally) DIR/tokenizer_config.json.
  // Throws am::IoError (missing file), am::FormatError (bad JSON, unsupported component `type`).
  static Tokenizer from_dir(const std::string& dir);
  // tokenizer_json: the full tokenizer.json text; config may be null. `origin` names the source in errors.
  static Tokenizer from_json(const std::string& tokenizer_json, const nlohmann::json& config = nullptr,
                             const std::string& origin = "tokenizer.json");
  // The same from an already parsed tokenizer.json.
  static Tokenizer from_json_value(const nlohmann::json& tokenizer, const nlohmann::json& config = nullptr,
                                   const std::string& origin = "tokenizer.json");

  // add_special_tokens as in transformers: the post-processor's template (or, for Llama-style
  // tokenizer classes, add_bos_token/add_eos_token from tokenizer_config.json).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens) const;
  // Encodes every text, spread over `num_threads` threads (0 = all cores). Output order = input order.
  std::vector<std::vector<int32_t>> encode_batch(const std::vector<std::string>& texts,
                                                 bool add_special_tokens, int num_threads = 0) const;
  // Decodes like transformers: HF decoder chain, then clean_up_tokenization_spaces when the config
  // asks for it. Unknown ids are skipped.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;
  // The HF `tokenizers` decode alone (no transformers clean-up).
  std::string decode_raw(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // 1 + the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;  // "" when unknown
  bool is_special_id(int32_t id) const;

  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  std::optional<int32_t> pad_id() const;
  std::optional<int32_t> unk_id() const;
  // Special token strings from tokenizer_config.json ("" when absent).
  const std::string& bos_token() const;
  const std::string& eos_token() const;
  const std::string& pad_token() const;

  const nlohmann::json& tokenizer_config() const;
  bool loaded() const { return impl_ != nullptr; }

 private:
  std::unique_ptr<TokenizerImpl> impl_;
};

}  // namespace am::tok
