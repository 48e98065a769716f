// Where a text dataset's rows come from, named as NeMo AutoModel recipes name them (`dataset_name`,
// `path_or_dataset`, `path_or_dataset_id` + `split` + `name`), and a streaming reader of those rows.
//
// A name is a local file (.json list or JSONL, .parquet, .arrow, optionally .bz2-compressed text), a local
// folder, or a Hugging Face dataset id ("org/name" or "name") looked up in the local caches and never
// downloaded: the hub cache (`datasets--org--name/snapshots/<rev>/...`) and the `datasets` library's Arrow
// cache (`org___name/<config>/<version>/<hash>/<name>-<split>.arrow`). A folder or snapshot is split into
// train / validation / test / named splits by its data files' names, as `datasets` does (its data_files.py
// patterns, or the `configs:` of the dataset card's YAML). The split expression is HF's: `train`,
// `validation[:10%]`, `train[-100:]`, `train+test`. docs/datasets.md describes all of it.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace am {

// One row of a data file: its origin ("file.jsonl:12", "file.json[3]", "file.parquet[row 12]") and value.
struct JsonRow {
  std::string at;
  nlohmann::ordered_json value;
};

enum class DataFormat {
  Json,     // a JSON list or JSON lines (decided by the content, as HF's json builder reads both)
  Parquet,
  Arrow,    // Arrow IPC (the `datasets` cache writes the stream format)
  Text,     // a local file that is neither: read as JSON lines by default (HellaSwag reads its text layout)
};

struct DataFile {
  std::string path;
  DataFormat format = DataFormat::Json;
};

// A resolved dataset: its splits and the files of each, in the order `datasets` gives them.
struct DataSource {
  std::string name;         // as the recipe gave it
  std::string key;          // the recipe key that named it ("dataset.dataset_name"), for messages
  std::string kind;         // "local file", "local folder", "HF hub cache", "HF datasets cache"
  std::string root;         // the file, folder, snapshot or Arrow cache folder that was read
  std::string config;       // the config (subset) chosen, "" when the data has none
  bool single_file = false; // one local file: it holds the one split there is, whatever its name
  std::vector<std::pair<std::string, std::vector<DataFile>>> splits;

  std::vector<std::string> split_names() const;
  const std::vector<DataFile>* files_of(const std::string& split) const;
  std::string describe() const;  // "rajpurkar/squad (HF hub cache /x/snapshots/abc, config plain_text)"
};

struct DataSourceOptions {
  std::string key = "dataset.path_or_dataset";  // names the value in messages
  std::string config;                           // `name`: config / subset ("" = the default one)
  std::string config_key = "dataset.name";
  std::string revision;                         // hub cache: a branch/tag under refs/ or a snapshot hash ("" = main)
  std::string revision_key = "dataset.revision";
};

// Resolves `name` (`local` is the same value with a recipe-relative path resolved; "" = `name`).
// Not found anywhere -> DataError (exit 1) that names the value, every place looked and how to get the data
// (hf download / huggingface-cli download on a machine with internet, or a local file). A config that does
// not exist, a folder with no data files, a dataset card with several configs and no `name` -> DataError.
DataSource resolve_data_source(const std::string& name, const std::string& local, const DataSourceOptions& o = {});

// The cache folders searched for hub ids, in order of precedence (duplicates removed):
// hub: $HF_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub;
// datasets: $HF_DATASETS_CACHE, $HF_HOME/datasets, $XDG_CACHE_HOME/huggingface/datasets, ~/.cache/huggingface/datasets.
std::vector<std::string> hub_cache_roots();
std::vector<std::string> datasets_cache_roots();

// One term of a split expression: `split[from:to]`, bounds absolute rows or percents (HF's ReadInstruction).
struct SplitSpec {
  std::string split;
  std::optional<int64_t> from, to;
  bool percent = false;             // either bound had '%': both are percents (as HF reads them)
  bool pct1_dropremainder = false;  // `(pct1_dropremainder)` rounding; default `closest`
  std::string text;                 // the term as written, for messages
};

// "train", "train[:256]", "validation[10%:20%]", "train[-5:]", "train[:50%](pct1_dropremainder)",
// "train+validation". Bad syntax -> RecipeError naming `key`.
std::vector<SplitSpec> parse_split(const std::string& text, const std::string& key = "dataset.split");
// [begin, end) rows of a split of `num_rows` rows for a term (HF's _rel_to_abs_instr: negative bounds count
// from the end, percents round to the closest row (ties to even, as Python's round), everything clamped).
std::pair<int64_t, int64_t> split_bounds(const SplitSpec& s, int64_t num_rows);
// Whether split_bounds needs the row count (percents or negative bounds).
bool split_needs_count(const SplitSpec& s);

// The rows of one data file, read in order.
class RowFile {
 public:
  virtual ~RowFile() = default;
  // Number of rows (JSON lines: one pass over the file, counting non-blank lines; remembered).
  virtual int64_t num_rows() = 0;
  // fn(row) for rows [begin, end) of the file (end < 0: to its end), in order, until fn returns false.
  // Returns the file's row count when the read reached its end, -1 when it stopped before (at `end` or
  // because fn returned false). Rows before `begin` are skipped without being parsed where possible.
  virtual int64_t read(int64_t begin, int64_t end, const std::function<bool(JsonRow&&)>& fn) = 0;
};

// JSON list / JSON lines (bz2 too), parquet or Arrow. Missing file -> IoError, bad content -> DataError /
// FormatError naming the file (and line or row).
std::unique_ptr<RowFile> open_row_file(const DataFile& f);

// Opens a file with a dataset's own reader (SQuAD's nested JSON, HellaSwag's text layout); nullptr = the
// default reader above.
using RowFileOpener = std::function<std::unique_ptr<RowFile>(const DataFile&)>;

// What to read: a source, the split expression and the recipe key it came from, a row limit.
struct RowQuery {
  std::string split = "train";
  std::string split_key = "dataset.split";
  int64_t limit = 0;  // limit_dataset_samples / num_samples_limit: the first N rows of the expression (0 = all)
};

// fn(row) for every row of the split expression, in order, with slices and the limit applied; stops when fn
// returns false. Streams: one row (one parquet row group) at a time beyond what fn keeps. A split the
// source does not have -> DataError naming the split key and the splits there are.
void for_each_row(const DataSource& src, const RowQuery& q, const std::function<bool(JsonRow&&)>& fn,
                  const RowFileOpener& opener = {});

// The source as one file reads it: a local file with every split name meaning the whole file.
DataSource single_file_source(const std::string& path);

}  // namespace am
