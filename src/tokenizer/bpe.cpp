// BPE model of tokenizer.json: merges applied lowest rank first (ties: leftmost) with a binary heap over
// a linked list of symbols, as HF tokenizers does, plus ignore_merges, byte_fallback, unk/fuse_unk,
// continuing_subword_prefix / end_of_word_suffix and a thread-safe word cache.
#include <algorithm>
#include <atomic>
#include <unordered_map>
#include <cstdio>
#include <stdexcept>

#include "tokenizer/tok_components.h"

namespace am::tok {

namespace {
constexpr uint64_t kEmpty = ~0ull;
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}
struct Symbol {
  int32_t c;
  int32_t prev, next;
  uint32_t len;
};
struct Merge {
  uint32_t rank;
  int32_t pos;
  int32_t new_id;
};
// std heap is a max-heap: "less" means lower priority, i.e. higher rank or, on ties, larger pos.
struct MergeLess {
  bool operator()(const Merge& x, const Merge& y) const {
    if (x.rank != y.rank) return x.rank > y.rank;
    return x.pos > y.pos;
  }
};
}  // namespace

BPE::~BPE() = default;

const std::string* BPE::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_r_.size() || !has_id_[id]) return nullptr;
  return &vocab_r_[id];
}

bool BPE::merge_lookup(int32_t a, int32_t b, uint32_t* rank, int32_t* new_id) const {
  if (mkeys_.empty()) return false;
  uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  size_t i = mix64(key) & mmask_;
  while (true) {
    uint64_t k = mkeys_[i];
    if (k == key) {
      uint64_t v = mvals_[i];
      *rank = static_cast<uint32_t>(v >> 32);
      *new_id = static_cast<int32_t>(static_cast<uint32_t>(v));
      return true;
    }
    if (k == kEmpty) return false;
    i = (i + 1) & mmask_;
  }
}

std::unique_ptr<BPE> BPE::from_json(const json& j) {
  auto m = std::unique_ptr<BPE>(new BPE());
  if (j.contains("type") && j["type"].is_string() && j["type"].get<std::string>() != "BPE")
    throw ComponentError{"unsupported model type '" + j["type"].get<std::string>() + "'"};
  if (!j.contains("vocab") || !j["vocab"].is_object()) throw ComponentError{"BPE model: 'vocab' must be an object"};
  const json& vocab = j["vocab"];
  m->vocab_.reserve(vocab.size());
  int64_t max_id = -1;
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) throw ComponentError{"BPE model: vocab id of '" + it.key() + "' is not an integer"};
    int64_t id = it.value().get<int64_t>();
    if (id < 0 || id > INT32_MAX) throw ComponentError{"BPE model: vocab id out of range for '" + it.key() + "'"};
    max_id = std::max(max_id, id);
  }
  m->vocab_r_.assign(static_cast<size_t>(max_id + 1), std::string());
  m->has_id_.assign(static_cast<size_t>(max_id + 1), 0);
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    int32_t id = it.value().get<int32_t>();
    m->vocab_.set(it.key(), id);
    m->vocab_r_[id] = it.key();
    m->has_id_[id] = 1;
  }
  auto opt_str = [&](const char* k, std::string* dst) -> bool {
    if (!j.contains(k) || j[k].is_null()) return false;
    if (!j[k].is_string()) throw ComponentError{std::string("BPE model: '") + k + "' must be a string"};
    *dst = j[k].get<std::string>();
    return true;
  };
  auto opt_bool = [&](const char* k) -> bool { return j.contains(k) && j[k].is_boolean() && j[k].get<bool>(); };
  m->has_unk_ = opt_str("unk_token", &m->unk_token_);
  m->has_prefix_ = opt_str("continuing_subword_prefix", &m->prefix_) && !m->prefix_.empty();
  m->has_suffix_ = opt_str("end_of_word_suffix", &m->suffix_) && !m->suffix_.empty();
  m->fuse_unk_ = opt_bool("fuse_unk");
  m->byte_fallback_ = opt_bool("byte_fallback");
  m->ignore_merges_ = opt_bool("ignore_merges");
  if (m->has_unk_) m->unk_id_ = m->vocab_.get(m->unk_token_);
  m->all_bytes_ = true;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    m->byte_ids_[b] = m->vocab_.get(name);
    if (m->byte_ids_[b] < 0) m->all_bytes_ = false;
  }

  // merges
  const json empty = json::array();
  const json& merges = j.contains("merges") && j["merges"].is_array() ? j["merges"] : empty;
  size_t cap = 16;
  while (cap < merges.size() * 2 + 16) cap <<= 1;
  m->mkeys_.assign(cap, kEmpty);
  m->mvals_.assign(cap, 0);
  m->mmask_ = cap - 1;
  std::string a, b, ab;
  uint32_t rank = 0;
  for (const json& mg : merges) {
    if (mg.is_string()) {
      const std::string& s = mg.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        throw ComponentError{"BPE model: bad merge \"" + s + "\""};
      a.assign(s, 0, sp);
      b.assign(s, sp + 1, std::string::npos);
    } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
      a = mg[0].get<std::string>();
      b = mg[1].get<std::string>();
    } else {
      throw ComponentError{"BPE model: bad merge " + mg.dump()};
    }
    int32_t ia = m->vocab_.get(a), ib = m->vocab_.get(b);
    if (ia < 0) throw ComponentError{"BPE model: merge token '" + a + "' is not in the vocabulary"};
    if (ib < 0) throw ComponentError{"BPE model: merge token '" + b + "' is not in the vocabulary"};
    size_t plen = m->prefix_.size();
    if (plen > b.size()) plen = b.size();
    ab = a;
    ab.append(b, plen, std::string::npos);
    int32_t inew = m->vocab_.get(ab);
    if (inew < 0) throw ComponentError{"BPE model: merged token '" + ab + "' is not in the vocabulary"};
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia)) << 32) | static_cast<uint32_t>(ib);
    uint64_t val = (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(inew);
    size_t i = mix64(key) & m->mmask_;
    while (m->mkeys_[i] != kEmpty && m->mkeys_[i] != key) i = (i + 1) & m->mmask_;
    m->mkeys_[i] = key;  // a repeated pair keeps the last rank (as a map collect does)
    m->mvals_[i] = val;
    ++rank;
  }
  // Metaspace segmentation is exact when every token holding U+2581 has it only as a leading run.
  if (!m->has_prefix_ && !m->has_suffix_) {
    static const std::string kMeta = "\xE2\x96\x81";
    bool any = false, ok = true;
    for (size_t id = 0; id < m->vocab_r_.size() && ok; ++id) {
      if (!m->has_id_[id]) continue;
      const std::string& t = m->vocab_r_[id];
      size_t k = 0;
      while (t.compare(k, 3, kMeta) == 0) k += 3;
      if (k) any = true;
      if (t.find(kMeta, k) != std::string::npos) ok = false;
    }
    m->seg_metaspace_ = any && ok;
  }
  static std::atomic<uint64_t> next_instance{1};
  m->instance_id_ = next_instance.fetch_add(1);
  return m;
}

void BPE::merge_word(std::string_view w, std::vector<int32_t>& out) const {
  thread_local std::vector<Symbol> sym;
  thread_local std::vector<Merge> heap;
  thread_local std::string tmp;
  sym.clear();
  heap.clear();
  auto add = [&](int32_t c, uint32_t len) {
    int32_t n = static_cast<int32_t>(sym.size());
    int32_t prev = -1;
    if (n > 0) {
      sym.back().next = n;
      prev = n - 1;
    }
    sym.push_back({c, prev, -1, len});
  };
  bool have_unk = false;
  int32_t unk_c = -1;
  uint32_t unk_len = 0;
  size_t i = 0;
  while (i < w.size()) {
    size_t st = i;
    i += utf8_len(static_cast<unsigned char>(w[i]));
    if (i > w.size()) i = w.size();
    bool is_first = st == 0, is_last = i >= w.size();
    std::string_view piece = w.substr(st, i - st);
    uint32_t byte_len = static_cast<uint32_t>(i - st);
    if ((has_prefix_ && !is_first) || (has_suffix_ && is_last)) {
      tmp.clear();
      if (has_prefix_ && !is_first) tmp += prefix_;
      tmp.append(piece);
      if (has_suffix_ && is_last) tmp += suffix_;
      piece = tmp;
    }
    int32_t id = vocab_.get(piece);
    if (id >= 0) {
      if (have_unk) {
        add(unk_c, unk_len);
        have_unk = false;
      }
      add(id, byte_len);
      continue;
    }
    if (byte_fallback_) {
      bool ok = true;
      for (unsigned char c : piece)
        if (byte_ids_[c] < 0) { ok = false; break; }
      if (ok) {
        for (unsigned char c : piece) add(byte_ids_[c], 1);
        continue;
      }
    }
    if (has_unk_) {
      if (unk_id_ < 0) throw std::runtime_error("unk_token '" + unk_token_ + "' is not in the vocabulary");
      if (have_unk && fuse_unk_) {
        unk_len += byte_len;
      } else {
        if (have_unk) add(unk_c, unk_len);
        have_unk = true;
        unk_c = unk_id_;
        unk_len = byte_len;
      }
    }
  }
  if (have_unk) add(unk_c, unk_len);

  MergeLess less;
  uint32_t rank;
  int32_t nid;
  for (size_t k = 0; k + 1 < sym.size(); ++k)
    if (merge_lookup(sym[k].c, sym[k + 1].c, &rank, &nid)) heap.push_back({rank, static_cast<int32_t>(k), nid});
  std::make_heap(heap.begin(), heap.end(), less);
  const int32_t n = static_cast<int32_t>(sym.size());
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), less);
    Merge top = heap.back();
    heap.pop_back();
    Symbol& cur = sym[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    int32_t next_pos = cur.next;
    Symbol right = sym[next_pos];
    if (!merge_lookup(cur.c, right.c, &rank, &nid) || nid != top.new_id) continue;
    // merge right into cur
    cur.c = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    sym[next_pos].len = 0;
    if (right.next > -1 && right.next < n) sym[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (merge_lookup(sym[cur.prev].c, cur.c, &rank, &nid)) {
        heap.push_back({rank, cur.prev, nid});
        std::push_heap(heap.begin(), heap.end(), less);
      }
    }
    if (cur.next >= 0 && cur.next < n) {
      if (merge_lookup(cur.c, sym[cur.next].c, &rank, &nid)) {
        heap.push_back({rank, top.pos, nid});
        std::push_heap(heap.begin(), heap.end(), less);
      }
    }
  }
  for (const Symbol& s : sym)
    if (s.len != 0) out.push_back(s.c);
}

void BPE::tokenize(std::string_view s, std::vector<int32_t>& out) const {
  if (s.empty()) return;
  if (ignore_merges_) {
    int32_t id = vocab_.get(s);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  if (seg_metaspace_ && s.size() > 16) {
    // split before every U+2581 run that follows another character
    size_t start = 0, i = 0;
    const size_t n = s.size();
    while (i + 3 <= n) {
      if (static_cast<unsigned char>(s[i]) == 0xE2 && static_cast<unsigned char>(s[i + 1]) == 0x96 &&
          static_cast<unsigned char>(s[i + 2]) == 0x81) {
        bool prev_meta = i >= 3 && static_cast<unsigned char>(s[i - 3]) == 0xE2 &&
                         static_cast<unsigned char>(s[i - 2]) == 0x96 && static_cast<unsigned char>(s[i - 1]) == 0x81;
        if (i > start && !prev_meta) {
          merge_cached(s.substr(start, i - start), out);
          start = i;
        }
        i += 3;
      } else {
        ++i;
      }
    }
    merge_cached(s.substr(start), out);
    return;
  }
  merge_cached(s, out);
}

void BPE::merge_cached(std::string_view s, std::vector<int32_t>& out) const {
  if (s.size() >= kMaxCachedLen) {
    merge_word(s, out);
    return;
  }
  struct SvHash {
    using is_transparent = void;
    size_t operator()(std::string_view v) const { return static_cast<size_t>(hash_bytes(v)); }
  };
  using Map = std::unordered_map<std::string, std::vector<int32_t>, SvHash, std::equal_to<>>;
  struct Entry {
    uint64_t owner = 0;
    Map map;
  };
  thread_local std::vector<Entry> caches;  // a few tokenizers per thread, most recent first
  Map* map = nullptr;
  for (size_t k = 0; k < caches.size(); ++k) {
    if (caches[k].owner == instance_id_) {
      if (k) std::swap(caches[k], caches[0]);
      map = &caches[0].map;
      break;
    }
  }
  if (!map) {
    if (caches.size() >= 4) caches.pop_back();
    caches.insert(caches.begin(), Entry{instance_id_, Map()});
    map = &caches[0].map;
  }
  auto it = map->find(s);
  if (it != map->end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  size_t before = out.size();
  merge_word(s, out);
  if (map->size() >= kCacheCapacity) map->clear();
  map->emplace(std::string(s), std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(before), out.end()));
}

}  // namespace am::tok
