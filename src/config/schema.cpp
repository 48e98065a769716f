// Matching recipe keys against the key table (schema_table.cpp): which row covers a key, whether a key is a
// section, the warning a value triggers, and the nearest known key for a typo.
#include "config/schema.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>
#include <sstream>

namespace am::config {
using json = nlohmann::json;

namespace {

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> out;
  std::string part;
  std::stringstream ss(s);
  while (std::getline(ss, part, '.')) out.push_back(part);
  return out;
}

bool is_ds_section(const std::string& s) {
  return s == "dataset" || s == "validation_dataset" || s.rfind("validation_dataset_", 0) == 0;
}
bool is_dl_section(const std::string& s) { return s == "dataloader" || s == "validation_dataloader"; }

// One pattern segment against one key segment.
bool segment_matches(const std::string& p, const std::string& k) {
  if (p == "*") return true;
  if (p == "@ds") return is_ds_section(k);
  if (p == "@dl") return is_dl_section(k);
  if (p.size() > 1 && p.back() == '*') return k.rfind(p.substr(0, p.size() - 1), 0) == 0 && k.size() >= p.size();
  return p == k;
}

// `**` (last) covers everything below its section (not the section itself, which stays a section: a
// catch-all row such as `optimizer.**` must not swallow `optimizer`).
bool pattern_matches(const std::vector<std::string>& p, const std::vector<std::string>& k) {
  for (size_t i = 0; i < p.size(); ++i) {
    if (p[i] == "**") return k.size() > i;
    if (i >= k.size() || !segment_matches(p[i], k[i])) return false;
  }
  return p.size() == k.size();
}

struct CompiledRule {
  std::vector<std::string> segs;
  const KeyRule* rule;
};

const std::vector<CompiledRule>& compiled() {
  static const std::vector<CompiledRule> c = [] {
    std::vector<CompiledRule> out;
    for (const KeyRule& r : key_table()) out.push_back({split_dots(r.pattern), &r});
    return out;
  }();
  return c;
}

const CompiledRule* find_rule(const std::vector<std::string>& k) {
  for (const CompiledRule& c : compiled())
    if (pattern_matches(c.segs, k)) return &c;
  return nullptr;
}

// True when some row names a key below `k` (so `k` is a section).
bool is_section(const std::vector<std::string>& k) {
  for (const CompiledRule& c : compiled()) {
    if (c.segs.size() <= k.size()) continue;
    bool ok = true;
    for (size_t i = 0; i < k.size() && ok; ++i) ok = c.segs[i] == "**" ? true : segment_matches(c.segs[i], k[i]);
    if (ok) return true;
  }
  return false;
}

std::string value_text(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::floor(d) == d && std::fabs(d) < 1e15) {
      std::ostringstream o;
      o << static_cast<long long>(d) << ".0";
      return o.str();
    }
  }
  return v.dump();
}

bool section_enabled(const json& v) {
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_null()) return false;
  if (!v.is_object()) return true;
  for (const char* k : {"enabled", "enable"})
    if (v.contains(k) && v[k].is_boolean()) return v[k].get<bool>();
  return true;  // a section without an enabled switch is on when present (as AutoModel's builders read it)
}

bool warns(const KeyRule& r, const json& v) {
  if (r.use != KeyUse::kWarn) return false;
  switch (r.when) {
    case WarnWhen::kAlways: return !v.is_null();
    case WarnWhen::kTrue: return section_enabled(v);
    case WarnWhen::kAbove1: return v.is_number() && v.get<double>() > 1;
    case WarnWhen::kNotIn: {
      if (v.is_null()) return false;
      const std::string s = value_text(v);
      std::string allowed = r.allowed;
      std::stringstream ss(allowed);
      std::string a;
      while (std::getline(ss, a, '|'))
        if (a == s) return false;
      return true;
    }
  }
  return false;
}

std::string short_value(const json& v) {
  if (v.is_object()) return "";
  std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
      // Adjacent transposition (Damerau): "laerning" is one edit from "learning".
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) cur[j] = std::min(cur[j], prev[j - 1]);
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Every concrete key the table names, with '@ds' / '@dl' expanded to their usual sections and wildcard rows left
// out, for suggestions.
const std::vector<std::string>& concrete_keys() {
  static const std::vector<std::string> keys = [] {
    std::set<std::string> out;
    for (const KeyRule& r : key_table()) {
      std::string p = r.pattern;
      if (p.find('*') != std::string::npos) {
        // A section row ("wandb.**") still names its section.
        auto star = p.find(".**");
        if (star != std::string::npos && p.find('*') == star + 1) p = p.substr(0, star);
        else continue;
      }
      std::vector<std::string> expanded{p};
      for (auto [tag, a, b] : {std::tuple{"@ds", "dataset", "validation_dataset"},
                               std::tuple{"@dl", "dataloader", "validation_dataloader"}}) {
        if (p.rfind(tag, 0) == 0) expanded = {a + p.substr(3), b + p.substr(3)};
      }
      for (auto& e : expanded) {
        out.insert(e);
        // Every enclosing section is a known key too.
        for (auto d = e.rfind('.'); d != std::string::npos; d = e.rfind('.', d - 1)) {
          out.insert(e.substr(0, d));
          if (d == 0) break;
        }
      }
    }
    return std::vector<std::string>(out.begin(), out.end());
  }();
  return keys;
}

}  // namespace

std::string nearest_key(const std::string& key) {
  const auto ks = split_dots(key);
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const std::string& cand : concrete_keys()) {
    const auto cs = split_dots(cand);
    size_t d;
    if (cs.size() == ks.size() && cs.size() > 1 &&
        std::equal(cs.begin(), cs.end() - 1, ks.begin(), [](const std::string& a, const std::string& b) {
          return a == b || (is_ds_section(a) && is_ds_section(b)) || (is_dl_section(a) && is_dl_section(b));
        })) {
      d = edit_distance(ks.back(), cs.back());  // same section: compare the last segment
    } else {
      d = edit_distance(key, cand);
    }
    if (d < best_d) best_d = d, best = cand;
  }
  // Plausible typos only: up to a third of the name's length, at least 1 and at most 3 edits.
  const size_t last = ks.empty() ? key.size() : ks.back().size();
  const size_t limit = std::clamp<size_t>(last / 3, 1, 3);
  if (best_d > limit) return "";
  // Keep the user's section name when the candidate came from the other dataset/dataloader section.
  const auto bs = split_dots(best);
  if (!ks.empty() && !bs.empty() && bs.size() == ks.size() && bs[0] != ks[0] &&
      ((is_ds_section(bs[0]) && is_ds_section(ks[0])) || (is_dl_section(bs[0]) && is_dl_section(ks[0])))) {
    std::string out = ks[0];
    for (size_t i = 1; i < bs.size(); ++i) out += "." + bs[i];
    return out;
  }
  return best;
}

SchemaCheck check_keys(const json& root) {
  SchemaCheck out;
  std::set<std::string> warned_sections;  // a '**' row warns once for its section, not once per key below it
  std::function<void(const json&, const std::string&)> walk = [&](const json& v, const std::string& key) {
    if (!key.empty()) {
      const auto segs = split_dots(key);
      const CompiledRule* c = find_rule(segs);
      const bool section = is_section(segs);
      if (!c && !section) {
        out.unknown.push_back({key, nearest_key(key)});
        return;
      }
      if (c) {
        if (warns(*c->rule, v)) {
          if (!c->segs.empty() && c->segs.back() == "**") {
            std::string section = segs[0];
            for (size_t i = 1; i + 1 < c->segs.size(); ++i) section += "." + segs[i];
            if (warned_sections.insert(section).second) out.warnings.emplace_back(section, ": " + std::string(c->rule->reason));
          } else {
            const std::string sv = short_value(v);
            out.warnings.emplace_back(key, (sv.empty() ? ": " : " (" + sv + "): ") + c->rule->reason);
          }
        }
        if (!c->segs.empty() && c->segs.back() == "**") return;  // the row covers the whole subtree
        if (!(v.is_object() && section)) return;                 // a leaf (its value may be anything)
      } else if (!v.is_object() && !v.is_null()) {
        const char* t = v.is_boolean() ? "a boolean" : v.is_number() ? "a number" : v.is_string() ? "a string" : "a list";
        out.not_a_section.emplace_back(key, t);
        return;
      }
    }
    if (v.is_object())
      for (auto it = v.begin(); it != v.end(); ++it) walk(it.value(), key.empty() ? it.key() : key + "." + it.key());
  };
  walk(root, "");
  return out;
}

std::string key_table_markdown() {
  std::ostringstream o;
  o << "| key | what happens here |\n|---|---|\n";
  for (const KeyRule& r : key_table()) {
    std::string p = r.pattern;
    for (auto [tag, rep] : {std::pair{"@ds", "(validation_)dataset"}, std::pair{"@dl", "(validation_)dataloader"}})
      if (p.rfind(tag, 0) == 0) p = rep + p.substr(3);
    std::string what;
    switch (r.use) {
      case KeyUse::kHonoured: what = "honoured"; break;
      case KeyUse::kInert: what = "accepted, no effect here"; break;
      case KeyUse::kWarn:
        what = r.when == WarnWhen::kAlways  ? "warning"
               : r.when == WarnWhen::kTrue  ? "warning when enabled"
               : r.when == WarnWhen::kAbove1 ? "warning when > 1"
                                             : std::string("warning unless ") + r.allowed;
        break;
    }
    std::string reason = r.reason;
    for (size_t i = 0; (i = reason.find('|', i)) != std::string::npos; i += 2) reason.replace(i, 1, "\\|");
    std::string allowed_note = what;
    for (size_t i = 0; (i = allowed_note.find('|', i)) != std::string::npos; i += 2) allowed_note.replace(i, 1, "\\|");
    o << "| `" << p << "` | " << allowed_note << (reason.empty() ? "" : ": " + reason) << " |\n";
  }
  return o.str();
}

}  // namespace am::config
