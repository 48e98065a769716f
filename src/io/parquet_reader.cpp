// ParquetReader: the footer is read and checked once (magic, FileMetaData, schema, every column chunk's byte
// range); read_rows then decodes one row group's selected columns at a time and assembles rows from them.
#include "io/parquet.h"

#include <algorithm>
#include <new>

#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io {

using namespace pq;

struct ParquetReader::Impl {
  std::unique_ptr<MappedFile> file;
  FileMeta meta;
  std::vector<Shape> fields;        // top-level fields
  std::vector<LeafInfo> leaves;     // leaf columns in file order
  std::vector<std::string> names;   // fields' names
  std::vector<int64_t> group_start; // first row of each row group
  int64_t footer_start = 0;

  const std::string& path() const { return file->path(); }
  [[noreturn]] void fail(const std::string& what) const { throw FormatError(path() + ": " + what); }

  void read_footer() {
    const std::string_view b = file->bytes();
    if (b.size() < 12) fail("not a Parquet file (" + std::to_string(b.size()) + " bytes)");
    if (b.substr(b.size() - 4) == "PARE" || b.substr(0, 4) == "PARE")
      fail("encrypted Parquet files are not supported");
    if (b.substr(0, 4) != "PAR1") fail("not a Parquet file (no PAR1 magic at the start)");
    if (b.substr(b.size() - 4) != "PAR1") fail("truncated or not a Parquet file (no PAR1 magic at the end)");
    const uint32_t len = load_le<uint32_t>(b.data() + b.size() - 8);
    if (len > b.size() - 12) fail("footer length " + std::to_string(len) + " exceeds the file");
    footer_start = static_cast<int64_t>(b.size() - 8 - len);
    try {
      meta = parse_file_meta(b.substr(static_cast<size_t>(footer_start), len));
    } catch (const FormatError& e) {
      fail(std::string("corrupt footer: ") + e.what());
    }
    if (meta.encrypted) fail("encrypted Parquet files are not supported");
    try {
      fields = build_shapes(meta.schema, &leaves);
    } catch (const FormatError& e) {
      fail(std::string("schema: ") + e.what());
    }
    for (const Shape& f : fields) names.push_back(f.name);
  }

  void check_row_groups() {
    int64_t rows = 0;
    for (size_t g = 0; g < meta.row_groups.size(); ++g) {
      const RowGroup& rg = meta.row_groups[g];
      const std::string where = "row group " + std::to_string(g) + ": ";
      if (rg.num_rows < 0 || rg.num_rows > meta.num_rows - rows) fail(where + "row count out of range");
      if (rg.columns.size() != leaves.size())
        fail(where + std::to_string(rg.columns.size()) + " column chunks for " + std::to_string(leaves.size()) +
             " leaf columns");
      for (size_t c = 0; c < leaves.size(); ++c) {
        const ColumnChunk& cc = rg.columns[c];
        const std::string col = where + "column '" + leaves[c].dotted + "': ";
        if (cc.encrypted) fail(col + "encrypted columns are not supported");
        if (cc.has_file_path) fail(col + "data in an external file is not supported");
        if (!cc.has_meta) fail(col + "no column metadata");
        std::string dotted;
        for (const auto& p : cc.meta.path) dotted += (dotted.empty() ? "" : ".") + p;
        if (dotted != leaves[c].dotted) fail(col + "metadata names the column '" + dotted + "'");
        chunk_bytes(cc.meta, col);
      }
      group_start.push_back(rows);
      rows += rg.num_rows;
    }
    if (rows != meta.num_rows || meta.num_rows < 0)
      fail("row groups hold " + std::to_string(rows) + " rows, the footer says " + std::to_string(meta.num_rows));
  }

  // The byte range of a column chunk: from its dictionary page (if any) or first data page, of its stored size.
  std::string_view chunk_bytes(const ColumnMeta& m, const std::string& col) const {
    int64_t start = m.data_page_offset;
    if (m.dictionary_page_offset > 0 && m.dictionary_page_offset < start) start = m.dictionary_page_offset;
    if (start < 4 || start > footer_start || m.total_compressed_size < 0 ||
        m.total_compressed_size > footer_start - start)
      fail(col + "byte range [" + std::to_string(start) + ", +" + std::to_string(m.total_compressed_size) +
           ") outside the data");
    return file->bytes().substr(static_cast<size_t>(start), static_cast<size_t>(m.total_compressed_size));
  }

  void check_supported(const LeafInfo& l) const {
    const SchemaElement& e = *l.elem;
    const std::string col = "column '" + l.dotted + "': ";
    if (e.type == static_cast<int>(Type::kInt96))
      fail(col + "INT96 (legacy timestamp) values are not supported; rewrite the file with INT64 timestamps");
    if (e.converted_type == kDecimal || e.logical.kind == kLtDecimal)
      fail(col + "DECIMAL values are not supported; cast the column to float64 or string");
  }

  std::vector<int> select(const std::vector<std::string>& columns) const {
    std::vector<int> out;
    if (columns.empty()) {
      for (size_t i = 0; i < fields.size(); ++i) out.push_back(static_cast<int>(i));
      return out;
    }
    for (const std::string& c : columns) {
      const auto it = std::find(names.begin(), names.end(), c);
      if (it == names.end()) {
        std::string all;
        for (const auto& n : names) all += (all.empty() ? "" : ", ") + n;
        fail("no column '" + c + "' (columns: " + all + ")");
      }
      const int i = static_cast<int>(it - names.begin());
      if (std::find(out.begin(), out.end(), i) == out.end()) out.push_back(i);
    }
    return out;
  }

  // Returns false when fn asked to stop.
  bool read_group(size_t g, int64_t lo, int64_t hi, const std::vector<int>& sel,
                  const std::function<bool(int64_t, nlohmann::ordered_json&&)>& fn) const {
    const RowGroup& rg = meta.row_groups[g];
    const std::string where = "row group " + std::to_string(g) + ": ";
    std::vector<std::unique_ptr<ColumnData>> data(leaves.size());
    std::vector<RowAssembler> assemblers;
    for (int f : sel) {
      const Shape& s = fields[f];
      std::vector<const ColumnData*> cols;
      for (int l = s.first_leaf; l < s.end_leaf; ++l) {
        const std::string col = "column '" + leaves[l].dotted + "', " + where;
        check_supported(leaves[l]);
        data[l] = std::make_unique<ColumnData>();
        try {
          read_column_chunk(chunk_bytes(rg.columns[l].meta, col), rg.columns[l].meta, leaves[l], rg.num_rows,
                            data[l].get());
        } catch (const FormatError& e) {
          fail(col + e.what());
        } catch (const std::bad_alloc&) {
          fail(col + "out of memory decoding the column chunk (corrupt sizes?)");
        }
        cols.push_back(data[l].get());
      }
      assemblers.emplace_back(s, leaves, cols);
    }
    try {
      for (auto& a : assemblers) a.skip_rows(lo);
    } catch (const FormatError& e) {
      fail(where + e.what());
    }
    for (int64_t r = lo; r < hi; ++r) {
      nlohmann::ordered_json row = nlohmann::ordered_json::object();
      try {  // errors of fn itself pass through untouched
        for (size_t i = 0; i < sel.size(); ++i) row[names[sel[i]]] = assemblers[i].next_row();
      } catch (const FormatError& e) {
        fail(where + e.what());
      }
      if (!fn(group_start[g] + r, std::move(row))) return false;
    }
    return true;
  }
};

ParquetReader::ParquetReader(const std::string& path) {
  auto impl = std::make_shared<Impl>();
  impl->file = std::make_unique<MappedFile>(path);
  try {
    impl->read_footer();
    impl->check_row_groups();
  } catch (const std::bad_alloc&) {
    throw FormatError(path + ": footer too large to load (corrupt?)");
  }
  impl_ = std::move(impl);
}

int64_t ParquetReader::num_rows() const { return impl_->meta.num_rows; }

const std::vector<std::string>& ParquetReader::column_names() const { return impl_->names; }

void ParquetReader::read_rows(int64_t begin, int64_t end,
                              const std::function<bool(int64_t, nlohmann::ordered_json&&)>& fn,
                              const std::vector<std::string>& columns) const {
  const Impl& m = *impl_;
  const std::vector<int> sel = m.select(columns);
  begin = std::max<int64_t>(begin, 0);
  end = std::min(end, m.meta.num_rows);
  for (size_t g = 0; g < m.meta.row_groups.size() && begin < end; ++g) {
    const int64_t g0 = m.group_start[g], g1 = g0 + m.meta.row_groups[g].num_rows;
    if (g1 <= begin || g0 >= end || g0 == g1) continue;
    if (!m.read_group(g, std::max(begin, g0) - g0, std::min(end, g1) - g0, sel, fn)) return;
  }
}

}  // namespace am::io
