// Maps a recipe's dataset `_target_` (short name or NeMo AutoModel's dotted name) to a dataset, and reads
// where its data is as AutoModel's factories name it (data/source.h resolves the name).
#include <filesystem>

#include "config/recipe.h"
#include "core/error.h"
#include "core/log.h"
#include "data/datasets_impl.h"
#include "data/length_limit.h"
#include "data/source.h"
#include "data/text_common.h"
#include "io/model_config.h"

namespace am {

static std::string short_target(const std::string& t) {
  if (t == "tokenized_jsonl" || t == "mock" || t == "squad" || t == "column_mapped" || t == "chat" || t == "hellaswag")
    return t;
  if (t.find("make_squad_dataset") != std::string::npos || t.find(".squad.") != std::string::npos) return "squad";
  if (t.find("ColumnMappedTextInstructionDataset") != std::string::npos || t.find("column_mapped") != std::string::npos)
    return "column_mapped";
  if (t.find("ChatDataset") != std::string::npos || t.find(".chat_dataset") != std::string::npos) return "chat";
  if (t.find("HellaSwag") != std::string::npos || t.find("hellaswag") != std::string::npos) return "hellaswag";
  if (t.find("MockIterableDataset") != std::string::npos || t.find("mock") != std::string::npos) return "mock";
  if (t.find("tokenized_jsonl") != std::string::npos) return "tokenized_jsonl";
  return "";
}

namespace {

// The data of a text dataset. AutoModel's factories name it with different keys: make_squad_dataset
// `dataset_name` (default "squad", which the hub serves as rajpurkar/squad), HellaSwag `path_or_dataset`,
// ColumnMappedTextInstructionDataset and ChatDataset `path_or_dataset_id` (a string, or a list of local
// JSON/JSONL files). Any of the three is accepted for any kind; two that disagree are a recipe error.
struct DataName {
  std::string key, value;
  std::vector<std::string> files;  // a list of local files (path_or_dataset_id: [a.jsonl, b.jsonl])
};

DataName read_data_name(const Recipe& r, const std::string& sec, const std::string& kind) {
  std::optional<DataName> got;
  for (const char* k : {"dataset_name", "path_or_dataset", "path_or_dataset_id"}) {
    const std::string key = sec + "." + k;
    if (!r.has(key)) continue;
    DataName d;
    d.key = key;
    const auto& n = r.node(key);
    if (n.is_array()) {
      if (n.empty()) r.fail(key, "an empty list of data files");
      for (const auto& f : n) {
        if (!f.is_string() || f.get<std::string>().empty()) r.fail(key, "expected a list of data file paths");
        d.files.push_back(f.get<std::string>());
        d.value += (d.value.empty() ? "" : ", ") + f.get<std::string>();
      }
    } else {
      d.value = r.get_string(key, "");
      if (d.value.empty()) r.fail(key, "empty dataset name or path");
    }
    if (got && got->value != d.value)
      r.fail(key, "names the data '" + d.value + "' but " + got->key + " names it '" + got->value +
                      "': give only one of dataset_name / path_or_dataset / path_or_dataset_id");
    if (!got) got = std::move(d);
  }
  if (got) return *got;
  if (kind == "squad") return DataName{sec + ".dataset_name", "rajpurkar/squad", {}};  // AutoModel's default
  r.fail(sec + "." + (kind == "hellaswag" ? "path_or_dataset" : "path_or_dataset_id"),
         kind + " needs its data: " + sec + ".dataset_name, .path_or_dataset or .path_or_dataset_id (a local " +
             "JSON/JSONL/parquet file or folder, or a Hugging Face dataset id in the local cache)");
}

DataSource resolve_text_source(const Recipe& r, const std::string& sec, const DataName& d) {
  DataSourceOptions so;
  so.key = d.key;
  // `name` (AutoModel's ColumnMapped / Chat datasets) or `subset`: the config; `revision`: the snapshot.
  so.config_key = sec + ".name";
  so.config = r.get_string(sec + ".name", "");
  if (r.has(sec + ".subset")) {
    const std::string sub = r.get_string(sec + ".subset", "");
    if (!so.config.empty() && sub != so.config)
      r.fail(sec + ".subset", "'" + sub + "' disagrees with " + sec + ".name '" + so.config + "': give one of them");
    if (so.config.empty()) so.config_key = sec + ".subset";
    so.config = sub;
  }
  so.revision = r.get_string(sec + ".revision", "");
  so.revision_key = sec + ".revision";
  if (d.files.empty()) return resolve_data_source(d.value, r.resolve_path(d.value), so);
  // A list of local files is one split (AutoModel loads them with the json builder as "train").
  DataSource src;
  src.name = d.value;
  src.key = d.key;
  src.kind = "local files";
  src.single_file = true;
  std::vector<DataFile> files;
  for (const auto& f : d.files) {
    const std::string p = r.resolve_path(f);
    std::error_code ec;
    if (!std::filesystem::is_regular_file(p, ec)) throw DataError(d.key + ": no such file: " + p);
    files.push_back(single_file_source(p).splits.front().second.front());
  }
  src.splits.push_back({"train", std::move(files)});
  return src;
}

}  // namespace

// A section's own tokenizer: a folder, or a hub id in the local HF cache. AutoModel recipes often name the
// model's hub id here (dataset.tokenizer: Qwen/Qwen3-30B-A3B); when that is not on this machine but the model
// has a tokenizer of its own (e.g. the recipe was pointed at a local copy of the model), that one is used,
// with a warning, rather than stopping a recipe that would otherwise run as written.
static std::string section_tokenizer(const Recipe& r, const std::string& key, const std::string& model_tokenizer) {
  const std::string v = r.get_string(key, "");
  const std::string p = r.resolve_path(v);
  if (std::filesystem::is_directory(p)) return p;
  try {
    return io::resolve_model_path(p);
  } catch (const IoError& e) {
    if (model_tokenizer.empty() || !std::filesystem::exists(std::filesystem::path(model_tokenizer) / "tokenizer.json"))
      throw IoError(r.where(key) + ": " + e.what());
    log::warn(r.where(key) + " (" + v + ") is not on this machine; the model's tokenizer (" + model_tokenizer + ") is used");
    return model_tokenizer;
  }
}

std::unique_ptr<Dataset> make_dataset(const Recipe& r, const std::string& sec, const DatasetContext& ctx) {
  std::string target = r.get_string(sec + "._target_", "");
  if (target.empty()) r.fail(sec + "._target_", "missing dataset _target_ (e.g. tokenized_jsonl, mock, squad)");
  std::string kind = short_target(target);
  if (kind.empty())
    r.fail(sec + "._target_", "unknown dataset '" + target + "' (supported: tokenized_jsonl, mock, chat, squad, column_mapped, hellaswag)");
  // limit_dataset_samples (squad, column_mapped, chat) or num_samples_limit (AutoModel's HellaSwag); 0 = all.
  const auto lim_a = read_sample_count(r, sec + ".limit_dataset_samples", true);
  const auto lim_b = read_sample_count(r, sec + ".num_samples_limit", true);
  const int64_t limit = lim_a ? *lim_a : lim_b ? *lim_b : 0;
  // seq_length / max_length, drop_long_samples, truncation: the same for every kind (data/length_limit.h).
  const LengthLimit length = read_length_limit(r, sec);
  if (kind == "tokenized_jsonl") {
    std::string path = r.get_string(sec + ".path_or_dataset", "");
    if (path.empty()) r.fail(sec + ".path_or_dataset", "tokenized_jsonl needs a file path");
    return make_tokenized_jsonl(r.resolve_path(path), ctx, limit, length);
  }
  if (kind == "mock") {
    // seq_len (else seq_length) is the length generated; a seq_length / max_length below it is a limit.
    const std::string seq_key = r.has(sec + ".seq_len") ? sec + ".seq_len" : sec + ".seq_length";
    const int64_t seq = r.get_int(seq_key, ctx.default_seq_len);
    if (r.has(seq_key) && seq < 2) r.fail(seq_key, "must be >= 2 tokens, got " + std::to_string(seq));
    const auto n_opt = read_sample_count(r, sec + ".num_samples", false);
    const int64_t n = n_opt ? *n_opt : limit > 0 ? limit : 1024;
    int64_t vocab = r.get_int(sec + ".vocab_size", ctx.vocab_size);
    if (vocab > ctx.vocab_size) r.fail(sec + ".vocab_size", "larger than the model's vocab_size " + std::to_string(ctx.vocab_size));
    if (vocab < 1) r.fail(sec + ".vocab_size", "must be >= 1, got " + std::to_string(vocab));
    if (length.drop_long && length.max_len > 0 && seq > length.max_len)
      r.fail(length.key, "every mock sample (" + std::to_string(seq) + " tokens) is longer than " +
                             std::to_string(length.max_len) + " and drop_long_samples is true: nothing would be left");
    // The section's own `seed` (AutoModel's mock builders take one), else the run's seed (+1 for validation).
    const auto own_seed = r.get_opt_int(sec + ".seed");
    if (own_seed && *own_seed < 0) r.fail(sec + ".seed", "must be >= 0, got " + std::to_string(*own_seed));
    const uint64_t seed = own_seed ? static_cast<uint64_t>(*own_seed) : ctx.seed + (sec == "dataset" ? 0 : 1);
    return make_mock(seq, n, vocab, seed, length);
  }
  if (kind == "chat" || kind == "squad" || kind == "column_mapped" || kind == "hellaswag") {
    TextDatasetOptions o;
    const DataName name = read_data_name(r, sec, kind);
    // Every factory's default split is "train" (ChatDataset's None loads every split; one is what trains).
    o.split = r.get_string(sec + ".split", "train");
    o.split_key = sec + ".split";
    parse_split(o.split, o.split_key);  // a malformed split is a recipe error before anything is read
    o.tokenizer_dir = r.has(sec + ".tokenizer") ? section_tokenizer(r, sec + ".tokenizer", ctx.tokenizer_dir) : ctx.tokenizer_dir;
    if (o.tokenizer_dir.empty())
      r.fail(sec + "._target_", "dataset '" + kind + "' needs a tokenizer (model.tokenizer or " + sec + ".tokenizer)");
    o.limit = limit;
    o.length = length;
    o.vocab_size = ctx.vocab_size;
    o.num_threads = ctx.num_threads;
    // The tokenised-dataset cache (data/token_cache.h): `cache: false` in the section, or AM_DATASET_CACHE=0.
    o.cache = r.get_bool(sec + ".cache", true);
    if (r.has(sec + ".chat_template")) {
      std::string ct = r.get_string(sec + ".chat_template", "");
      const bool is_text = ct.find("{%") != std::string::npos || ct.find("{{") != std::string::npos;
      o.chat_template = is_text ? ct : r.resolve_path(ct);
      if (!is_text && !std::filesystem::is_regular_file(o.chat_template))
        throw IoError(r.where(sec + ".chat_template") + ": chat template file not found: " + ct +
                      " (a relative path is tried from the current folder, then from the recipe's folder)");
    }
    o.source = resolve_text_source(r, sec, name);
    o.path = o.source.kind == "local file" ? o.source.root : o.source.name + ":" + o.split;
    if (o.source.kind != "local file" && o.source.kind != "local files")
      log::info(sec + ": " + o.source.describe() + ", split " + o.split);
    if (kind == "chat") return make_chat(o);
    if (kind == "squad") return make_squad(o);
    if (kind == "hellaswag") return make_hellaswag(o);
    std::map<std::string, std::string> mapping;
    if (!r.has(sec + ".column_mapping") || !r.node(sec + ".column_mapping").is_object())
      r.fail(sec + ".column_mapping", "column_mapped needs column_mapping: {context, question, answer}");
    for (auto& [k, v] : r.node(sec + ".column_mapping").items()) {
      if (k != "context" && k != "question" && k != "answer")
        r.fail(sec + ".column_mapping." + k, "unknown column '" + k + "' (context, question, answer)");
      if (!v.is_string()) r.fail(sec + ".column_mapping." + k, "expected a column name");
      mapping[k] = v.get<std::string>();
    }
    if (!mapping.count("answer")) r.fail(sec + ".column_mapping", "column_mapping needs an 'answer' column");
    return make_column_mapped(o, mapping, r.get_bool(sec + ".answer_only_loss_mask", true));
  }
  r.fail(sec + "._target_", "dataset '" + kind + "' is not implemented");
}

}  // namespace am
