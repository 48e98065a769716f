// Record assembly: the flat schema list -> a tree of field shapes, and decoded level/value streams -> nested
// JSON rows (the Dremel model: a definition level says how deep the path to a value is defined, a repetition
// level at which repeated ancestor a new element starts).
//
// A shape is assembled by looking at the next level entry of its first leaf (every leaf below a node agrees on
// that node's nullness and repetition) and consuming entries of all its leaves. Each value consumes at least
// one entry of its first leaf, so assembly always progresses; every access is bounds-checked, so inconsistent
// levels from a corrupt file give a FormatError, never a read out of bounds.
#include "core/error.h"
#include "io/parquet_internal.h"

namespace am::io::pq {
namespace {

using Json = nlohmann::ordered_json;

struct Node {
  const SchemaElement* e;
  std::vector<Node> kids;
};

class TreeBuilder {
 public:
  explicit TreeBuilder(const std::vector<SchemaElement>& s) : s_(s) {}

  Node parse(int depth) {
    if (next_ >= s_.size()) throw FormatError("schema ends inside a group");
    if (depth > kMaxSchemaDepth) throw FormatError("schema nested deeper than " + std::to_string(kMaxSchemaDepth));
    Node n{&s_[next_++], {}};
    const int32_t k = n.e->num_children;
    if (k < 0 || static_cast<size_t>(k) > s_.size() - next_)
      throw FormatError("schema element '" + n.e->name + "' claims " + std::to_string(k) + " children");
    if (depth > 0 && (n.e->repetition < kRequired || n.e->repetition > kRepeated))
      throw FormatError("schema element '" + n.e->name + "' has no valid repetition");
    if (k == 0 && depth > 0 && (n.e->type < 0 || n.e->type > static_cast<int>(Type::kFixedLenByteArray)))
      throw FormatError("schema element '" + n.e->name + "' is an empty group or has an unknown type");
    for (int32_t i = 0; i < k; ++i) n.kids.push_back(parse(depth + 1));
    return n;
  }
  size_t consumed() const { return next_; }

 private:
  const std::vector<SchemaElement>& s_;
  size_t next_ = 0;
};

bool is_list(const SchemaElement& e) { return e.converted_type == kList || e.logical.kind == kLtList; }
bool is_map(const SchemaElement& e) {
  return e.converted_type == kMap || e.converted_type == kMapKeyValue || e.logical.kind == kLtMap;
}

class ShapeBuilder {
 public:
  explicit ShapeBuilder(std::vector<LeafInfo>* leaves) : leaves_(leaves) {}

  // A field whose parent is defined at (def, rep).
  Shape field(const Node& n, int def, int rep) {
    if (n.e->repetition == kRepeated) {  // a bare repeated field: a non-null list of required elements
      Shape s;
      s.kind = Shape::kList;
      s.name = n.e->name;
      s.def_present = def;
      s.rep_level = rep + 1;
      s.def_elements = def + 1;
      s.first_leaf = static_cast<int>(leaves_->size());
      s.children.push_back(element(n, def + 1, rep + 1));  // the node itself is the element
      s.end_leaf = static_cast<int>(leaves_->size());
      return s;
    }
    const bool optional = n.e->repetition == kOptional;
    Shape s = body(n, def + optional, rep);
    s.nullable = optional;
    return s;
  }

 private:
  Shape start(const Node& n, Shape::Kind kind, int def_present) {
    Shape s;
    s.kind = kind;
    s.name = n.e->name;
    s.def_present = def_present;
    s.first_leaf = static_cast<int>(leaves_->size());
    path_.push_back(n.e->name);
    return s;
  }
  Shape finish(Shape s) {
    s.end_leaf = static_cast<int>(leaves_->size());
    path_.pop_back();
    return s;
  }

  // The element of a repeated node that is itself the element (its levels are already in def/rep).
  Shape element(const Node& n, int def, int rep) { return body(n, def, rep); }

  // Node `n` (levels counted in def/rep) as a list, map, struct or leaf.
  Shape body(const Node& n, int def, int rep) {
    if (n.kids.empty()) {
      Shape s = start(n, Shape::kLeaf, def);
      s.leaf = static_cast<int>(leaves_->size());
      std::string dotted;
      for (const auto& p : path_) dotted += (dotted.empty() ? "" : ".") + p;
      leaves_->push_back(LeafInfo{dotted, n.e, def, rep});
      return finish(std::move(s));
    }
    const Node* rpt = n.kids.size() == 1 && n.kids[0].e->repetition == kRepeated ? &n.kids[0] : nullptr;
    if (rpt && is_list(*n.e)) {
      Shape s = start(n, Shape::kList, def);
      s.rep_level = rep + 1;
      s.def_elements = def + 1;
      if (repeated_is_element(n, *rpt)) s.children.push_back(element(*rpt, def + 1, rep + 1));
      else {
        path_.push_back(rpt->e->name);
        s.children.push_back(field(rpt->kids[0], def + 1, rep + 1));
        path_.pop_back();
      }
      return finish(std::move(s));
    }
    if (rpt && is_map(*n.e) && (rpt->kids.size() == 1 || rpt->kids.size() == 2)) {
      Shape s = start(n, Shape::kMap, def);
      s.rep_level = rep + 1;
      s.def_elements = def + 1;
      path_.push_back(rpt->e->name);
      for (const Node& kv : rpt->kids) s.children.push_back(field(kv, def + 1, rep + 1));
      path_.pop_back();
      return finish(std::move(s));
    }
    Shape s = start(n, Shape::kStruct, def);
    for (const Node& k : n.kids) s.children.push_back(field(k, def, rep));
    return finish(std::move(s));
  }

  // LogicalTypes.md backward-compatibility rules: is the repeated child of a LIST the element itself (2-level
  // layouts) or the wrapper of a single element field (the standard 3-level layout)?
  static bool repeated_is_element(const Node& list, const Node& rpt) {
    if (rpt.kids.size() != 1) return true;                         // a primitive, or a group of several fields
    if (rpt.kids[0].e->repetition == kRepeated) return true;       // a nested 2-level list
    return rpt.e->name == "array" || rpt.e->name == list.e->name + "_tuple";
  }

  std::vector<LeafInfo>* leaves_;
  std::vector<std::string> path_;
};

bool is_unsigned(const SchemaElement& e) {
  if (e.logical.kind == kLtInteger) return !e.logical.is_signed;
  return e.converted_type >= kUint8 && e.converted_type <= kUint64;
}

std::string uuid_text(std::string_view b) {
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < b.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s += '-';
    s += hex[static_cast<uint8_t>(b[i]) >> 4];
    s += hex[static_cast<uint8_t>(b[i]) & 15];
  }
  return s;
}

Json leaf_json(const SchemaElement& e, const Values& v, size_t i) {
  switch (static_cast<Type>(e.type)) {
    case Type::kBoolean: return v.ints[i] != 0;
    case Type::kInt32:
      if (is_unsigned(e)) return static_cast<uint32_t>(v.ints[i]);
      return v.ints[i];
    case Type::kInt64:
      if (is_unsigned(e)) return static_cast<uint64_t>(v.ints[i]);
      return v.ints[i];
    case Type::kFloat:
    case Type::kDouble: return v.reals[i];
    case Type::kFixedLenByteArray:
      if (e.logical.kind == kLtFloat16 && v.bytes[i].size() == 2)
        return half_to_float(load_le<uint16_t>(v.bytes[i].data()));
      if (e.logical.kind == kLtUuid && v.bytes[i].size() == 16) return uuid_text(v.bytes[i]);
      return std::string(v.bytes[i]);
    default: return std::string(v.bytes[i]);
  }
}

std::string key_text(const Json& k) { return k.is_string() ? k.get<std::string>() : k.dump(); }

}  // namespace

std::vector<Shape> build_shapes(const std::vector<SchemaElement>& schema, std::vector<LeafInfo>* leaves) {
  if (schema.empty()) throw FormatError("empty schema");
  TreeBuilder tb(schema);
  const Node root = tb.parse(0);
  if (tb.consumed() != schema.size())
    throw FormatError("schema has " + std::to_string(schema.size() - tb.consumed()) + " elements outside the root");
  if (root.kids.empty()) throw FormatError("schema has no columns");
  ShapeBuilder sb(leaves);
  std::vector<Shape> fields;
  for (const Node& k : root.kids) fields.push_back(sb.field(k, 0, 0));
  return fields;
}

RowAssembler::RowAssembler(const Shape& shape, const std::vector<LeafInfo>& leaves,
                           const std::vector<const ColumnData*>& cols)
    : shape_(shape), leaves_(leaves), base_(shape.first_leaf) {
  for (const ColumnData* c : cols) cursors_.push_back(Cursor{c});
}

uint8_t RowAssembler::def_at(const Shape& s) {
  const Cursor& c = first(s);
  if (c.level >= c.col->def.size())
    throw FormatError("column '" + leaves_[s.first_leaf].dotted + "' ends before its row group's rows");
  return c.col->def[c.level];
}

void RowAssembler::skip_entry(const Shape& s) {
  for (int l = s.first_leaf; l < s.end_leaf; ++l) {
    Cursor& c = cursors_[l - base_];
    if (c.level >= c.col->def.size())
      throw FormatError("column '" + leaves_[l].dotted + "' ends before its row group's rows");
    if (c.col->def[c.level++] == leaves_[l].max_def) ++c.value;
  }
}

Json RowAssembler::leaf_value(const Shape& s) {
  Cursor& c = cursors_[s.leaf - base_];
  const LeafInfo& leaf = leaves_[s.leaf];
  if (c.level >= c.col->def.size() || c.col->def[c.level] != leaf.max_def || c.value >= c.col->values.size())
    throw FormatError("levels of column '" + leaf.dotted + "' are inconsistent");
  ++c.level;
  return leaf_json(*leaf.elem, c.col->values, c.value++);
}

Json RowAssembler::value(const Shape& s) {
  const uint8_t d = def_at(s);
  if (d < s.def_present) {
    if (!s.nullable) throw FormatError("a required field of '" + leaves_[s.first_leaf].dotted + "' is undefined");
    skip_entry(s);
    return nullptr;
  }
  switch (s.kind) {
    case Shape::kLeaf: return leaf_value(s);
    case Shape::kStruct: {
      Json obj = Json::object();
      for (const Shape& c : s.children) obj[c.name] = value(c);
      return obj;
    }
    case Shape::kList:
    case Shape::kMap: {
      const bool map = s.kind == Shape::kMap;
      Json out = map ? Json::object() : Json::array();
      if (d < s.def_elements) {  // defined but empty
        skip_entry(s);
        return out;
      }
      for (;;) {
        if (map) {
          const std::string key = key_text(value(s.children[0]));
          out[key] = s.children.size() > 1 ? value(s.children[1]) : Json(nullptr);
        } else {
          out.push_back(value(s.children[0]));
        }
        const Cursor& c = first(s);
        if (c.level >= c.col->rep.size() || c.col->rep[c.level] != s.rep_level) break;
      }
      return out;
    }
  }
  return nullptr;
}

void RowAssembler::skip_rows(int64_t n) {
  for (size_t i = 0; i < cursors_.size(); ++i) {
    Cursor& c = cursors_[i];
    const int max_def = leaves_[base_ + i].max_def;
    for (int64_t r = 0; r < n; ++r) {
      if (c.level >= c.col->def.size())
        throw FormatError("column '" + leaves_[base_ + i].dotted + "' ends before its row group's rows");
      do {
        if (c.col->def[c.level] == max_def) ++c.value;
        ++c.level;
      } while (c.level < c.col->rep.size() && c.col->rep[c.level] != 0);
    }
  }
}

Json RowAssembler::next_row() {
  Json v = value(shape_);
  for (size_t i = 0; i < cursors_.size(); ++i) {
    const Cursor& c = cursors_[i];
    if (c.level < c.col->rep.size() && c.col->rep[c.level] != 0)
      throw FormatError("repetition levels of column '" + leaves_[base_ + i].dotted + "' do not line up");
  }
  return v;
}

}  // namespace am::io::pq
