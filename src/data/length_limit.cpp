#include "data/length_limit.h"

#include "core/error.h"
#include "core/log.h"
#include "config/recipe.h"

namespace am {

LengthLimit read_length_limit(const Recipe& r, const std::string& sec) {
  LengthLimit lim;
  for (const char* k : {"seq_length", "max_length"}) {
    const std::string key = sec + "." + k;
    if (!r.has(key)) continue;
    const int64_t v = r.get_int(key, 0);
    if (v <= 0) r.fail(key, "must be a positive number of tokens, got " + std::to_string(v));
    if (lim.max_len == 0) {  // seq_length wins over max_length (both checked)
      lim.max_len = v;
      lim.key = key;
    }
  }
  const std::string dkey = sec + ".drop_long_samples";
  lim.drop_long = r.get_bool(dkey, false);
  const std::string tkey = sec + ".truncation";
  if (r.has(tkey)) {
    const auto& t = r.node(tkey);
    if (t.is_boolean()) {
      lim.truncate = t.get<bool>();
    } else if (t.is_string()) {
      const std::string s = t.get<std::string>();
      if (s == "longest_first" || s == "only_first" || s == "only_second" || s == "true") lim.truncate = true;
      else if (s == "do_not_truncate" || s == "false") lim.truncate = false;
      else r.fail(tkey, "expected true, false, longest_first, only_first, only_second or do_not_truncate, got '" + s + "'");
    } else {
      r.fail(tkey, "expected true, false or a truncation strategy (longest_first, do_not_truncate, ...)");
    }
  }
  return lim;
}

std::optional<int64_t> read_sample_count(const Recipe& r, const std::string& key, bool allow_zero) {
  if (!r.has(key)) return std::nullopt;
  const int64_t v = r.get_int(key, 0);
  if (v < 0 || (!allow_zero && v == 0))
    r.fail(key, std::string("must be ") + (allow_zero ? ">= 0 (0 = all)" : ">= 1") + ", got " + std::to_string(v));
  return v;
}

bool limit_sample(Sample& s, const LengthLimit& lim, LengthLimitStats& st) {
  ++st.seen;
  if (lim.max_len <= 0 || static_cast<int64_t>(s.input_ids.size()) <= lim.max_len) return true;
  if (lim.drop_long) {
    ++st.dropped;
    return false;
  }
  if (!lim.truncate) {
    ++st.kept_long;
    return true;
  }
  s.input_ids.resize(static_cast<size_t>(lim.max_len));
  if (s.labels.size() > s.input_ids.size()) s.labels.resize(s.input_ids.size());
  ++st.truncated;
  return true;
}

void report_length_limit(const LengthLimitStats& st, const LengthLimit& lim, const std::string& name, size_t kept) {
  const std::string L = std::to_string(lim.max_len);
  if (st.truncated > 0)
    log::info(name + ": truncated " + std::to_string(st.truncated) + " of " + std::to_string(st.seen) +
              " samples to " + lim.key + " " + L);
  if (st.dropped > 0)
    log::warn(name + ": dropped " + std::to_string(st.dropped) + " of " + std::to_string(st.seen) +
              " samples longer than " + lim.key + " " + L + " (drop_long_samples: true)");
  if (st.kept_long > 0)
    log::warn(name + ": " + std::to_string(st.kept_long) + " of " + std::to_string(st.seen) +
              " samples are longer than " + lim.key + " " + L + " and kept whole (truncation: false)");
  if (kept == 0 && st.dropped > 0)
    throw DataError(name + ": every sample (" + std::to_string(st.dropped) + ") is longer than " + lim.key + " " + L +
                    " and drop_long_samples is true: no samples left");
}

LengthLimitStats apply_length_limit(std::vector<Sample>& samples, const LengthLimit& lim, const std::string& name) {
  LengthLimitStats st;
  size_t w = 0;
  for (size_t i = 0; i < samples.size(); ++i) {
    if (!limit_sample(samples[i], lim, st)) continue;
    if (w != i) samples[w] = std::move(samples[i]);
    ++w;
  }
  samples.resize(w);
  report_length_limit(st, lim, name, samples.size());
  return st;
}

}  // namespace am
