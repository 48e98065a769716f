#include "data/token_cache.h"

#include <elf.h>
#include <link.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <system_error>

#include "core/error.h"
#include "core/log.h"
#include "data/source.h"

#ifndef AM_VERSION
#define AM_VERSION "unknown"
#endif

namespace am {

namespace fs = std::filesystem;

// ---- hashing ----

namespace {
constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull, kP2 = 0xC2B2AE3D27D4EB4Full, kP3 = 0x165667B19E3779F9ull,
                   kP4 = 0x85EBCA77C2B2AE63ull, kP5 = 0x27D4EB2F165667C5ull;
inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t round64(uint64_t acc, uint64_t w) { return rotl(acc + w * kP2, 31) * kP1; }
inline uint64_t fmix(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ull;
  h ^= h >> 33;
  return h;
}

// Four 64-bit lanes over 32-byte blocks (the last block zero-padded), the total length folded into both
// halves of the result.
class Hasher {
 public:
  void update(const char* p, size_t n) {
    len_ += n;
    if (fill_) {
      const size_t k = std::min(n, sizeof buf_ - fill_);
      std::memcpy(buf_ + fill_, p, k);
      fill_ += k;
      p += k;
      n -= k;
      if (fill_ < sizeof buf_) return;
      block(buf_);
      fill_ = 0;
    }
    for (; n >= 32; p += 32, n -= 32) block(p);
    std::memcpy(buf_, p, n);
    fill_ = n;
  }
  Hash128 finish() {
    if (fill_) {
      std::memset(buf_ + fill_, 0, sizeof buf_ - fill_);
      block(buf_);
    }
    Hash128 h;
    h.lo = fmix(rotl(v_[0], 1) + rotl(v_[1], 7) + rotl(v_[2], 12) + rotl(v_[3], 18) + len_ * kP5);
    h.hi = fmix((v_[0] * kP3) ^ rotl(v_[1] * kP4, 23) ^ rotl(v_[2] * kP5, 41) ^ rotl(v_[3] * kP1, 57) ^ (len_ + kP2));
    return h;
  }

 private:
  void block(const char* p) {
    uint64_t w[4];
    std::memcpy(w, p, 32);
    for (int i = 0; i < 4; ++i) v_[i] = round64(v_[i], w[i]);
  }
  uint64_t v_[4] = {kP1 + kP2, kP2, 0, 0 - kP1};
  char buf_[32];
  size_t fill_ = 0;
  uint64_t len_ = 0;
};
}  // namespace

std::string Hash128::hex() const {
  char s[33];
  std::snprintf(s, sizeof s, "%016llx%016llx", static_cast<unsigned long long>(hi), static_cast<unsigned long long>(lo));
  return s;
}

Hash128 hash128(std::string_view bytes) {
  Hasher h;
  h.update(bytes.data(), bytes.size());
  return h.finish();
}

std::optional<Hash128> hash_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::nullopt;
  Hasher h;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(buf.data(), static_cast<size_t>(f.gcount()));
  }
  if (f.bad()) return std::nullopt;
  return h.finish();
}

// ---- where ----

static std::string env_str(const char* k) {
  const char* v = std::getenv(k);
  return v ? std::string(v) : std::string();
}

std::string dataset_cache_dir() {
  if (auto d = env_str("AM_CACHE_DIR"); !d.empty()) return (fs::path(d) / "datasets").string();
  if (auto d = env_str("XDG_CACHE_HOME"); !d.empty()) return (fs::path(d) / "automodel" / "datasets").string();
  if (auto d = env_str("HOME"); !d.empty()) return (fs::path(d) / ".cache" / "automodel" / "datasets").string();
  return "";
}

bool dataset_cache_enabled_by_env() {
  std::string v = env_str("AM_DATASET_CACHE");
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return !(v == "0" || v == "false" || v == "off" || v == "no");
}

// ---- key ----

namespace {
// The running executable's GNU build-id (hex), else a hash of its bytes, else "unknown".
int note_cb(struct dl_phdr_info* info, size_t, void* data) {
  auto* out = static_cast<std::string*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    if (ph.p_type != PT_NOTE) continue;
    const char* p = reinterpret_cast<const char*>(info->dlpi_addr + ph.p_vaddr);
    const char* end = p + ph.p_memsz;
    while (p + sizeof(ElfW(Nhdr)) <= end) {
      ElfW(Nhdr) nh;
      std::memcpy(&nh, p, sizeof nh);
      const char* name = p + sizeof nh;
      const char* desc = name + ((nh.n_namesz + 3) & ~3u);
      const char* next = desc + ((nh.n_descsz + 3) & ~3u);
      if (next > end) break;
      if (nh.n_type == NT_GNU_BUILD_ID && nh.n_namesz == 4 && std::memcmp(name, "GNU", 4) == 0) {
        static const char* hx = "0123456789abcdef";
        for (uint32_t k = 0; k < nh.n_descsz; ++k) {
          const auto c = static_cast<unsigned char>(desc[k]);
          out->push_back(hx[c >> 4]);
          out->push_back(hx[c & 15]);
        }
        return 1;
      }
      p = next;
    }
  }
  return 1;  // only the first object (the executable) is looked at
}

const std::string& engine_build_id() {
  static const std::string id = [] {
    std::string s;
    dl_iterate_phdr(note_cb, &s);
    if (!s.empty()) return "build-id " + s;
    if (auto h = hash_file("/proc/self/exe")) return "exe " + h->hex();
    return std::string("unknown");
  }();
  return id;
}

const char* format_name(DataFormat f) {
  switch (f) {
    case DataFormat::Json: return "json";
    case DataFormat::Parquet: return "parquet";
    case DataFormat::Arrow: return "arrow";
    case DataFormat::Text: return "text";
  }
  return "?";
}

// "name: <hash> <size>" of a file that must exist; "name: absent" when it does not.
struct FileLine {
  std::string line;
  bool dated = false;  // the file mentions strftime_now (a template that renders today's date)
};
FileLine file_line(const fs::path& p, const std::string& label, bool scan_strftime) {
  std::error_code ec;
  if (!fs::is_regular_file(p, ec)) return {label + ": absent", false};
  if (scan_strftime) {  // a small file (a template or a tokenizer config): read whole and searched
    std::ifstream f(p, std::ios::binary);
    if (!f) throw IoError(p.string() + ": cannot read it (tokenised dataset cache key)");
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    return {label + ": " + hash128(text).hex() + " " + std::to_string(text.size()),
            text.find("strftime_now") != std::string::npos};
  }
  auto h = hash_file(p.string());
  if (!h) throw IoError(p.string() + ": cannot read it (tokenised dataset cache key)");
  return {label + ": " + h->hex() + " " + std::to_string(fs::file_size(p, ec)), false};
}

std::string today() {
  if (auto d = env_str("AM_CHAT_TEMPLATE_DATE"); !d.empty()) return "AM_CHAT_TEMPLATE_DATE=" + d;
  std::time_t t = std::time(nullptr);
  std::tm tm{};
  localtime_r(&t, &tm);
  char s[16];
  std::strftime(s, sizeof s, "%Y-%m-%d", &tm);
  return s;
}
}  // namespace

std::string token_cache_key(const TokenCacheKeyParts& p) {
  if (!p.source) throw Error("token_cache_key: no data source");
  std::string k = "automodel tokenised dataset\n";
  k += "engine: " AM_VERSION " " + engine_build_id() + "\n";
  k += "kind: " + p.kind + "\n";
  k += "params: " + p.params + "\n";
  const fs::path dir(p.tokenizer_dir);
  bool dated = false;
  auto add = [&](const fs::path& f, const std::string& label, bool scan) {
    FileLine l = file_line(f, label, scan);
    dated = dated || l.dated;
    k += "tokenizer " + l.line + "\n";
  };
  add(dir / "tokenizer.json", "tokenizer.json", false);
  add(dir / "tokenizer_config.json", "tokenizer_config.json", p.uses_chat_template);
  if (p.uses_chat_template) {
    add(dir / "special_tokens_map.json", "special_tokens_map.json", false);
    if (p.chat_template.empty()) {
      add(dir / "chat_template.jinja", "chat_template.jinja", true);
      add(dir / "chat_template.json", "chat_template.json", true);
      std::error_code ec;
      const fs::path extra = dir / "additional_chat_templates";
      if (fs::is_directory(extra, ec)) {
        std::vector<fs::path> files;
        for (const auto& e : fs::directory_iterator(extra, ec))
          if (e.path().extension() == ".jinja") files.push_back(e.path());
        std::sort(files.begin(), files.end());
        for (const auto& f : files) add(f, "additional_chat_templates/" + f.filename().string(), true);
      }
    } else {
      const bool is_text = p.chat_template.find("{%") != std::string::npos || p.chat_template.find("{{") != std::string::npos;
      if (is_text) {
        k += "chat_template override text: " + hash128(p.chat_template).hex() + "\n";
        dated = dated || p.chat_template.find("strftime_now") != std::string::npos;
      } else {
        FileLine l = file_line(p.chat_template, "chat_template override file", true);
        dated = dated || l.dated;
        k += l.line + "\n";
      }
    }
  }
  if (dated) k += "date: " + today() + "\n";
  k += "split: " + p.split + "\n";
  k += "limit: " + std::to_string(p.limit) + "\n";
  const DataSource& src = *p.source;
  k += "source: config '" + src.config + "'" + (src.single_file ? " single file" : "") + "\n";
  // The files of the splits the expression names (a single file is every split).
  std::vector<std::string> names;
  for (const auto& term : parse_split(p.split.empty() ? "train" : p.split)) names.push_back(term.split);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  for (const auto& n : names) {
    const std::vector<DataFile>* files = src.single_file && !src.splits.empty() ? &src.splits.front().second : src.files_of(n);
    if (!files) {
      k += "data " + n + ": none\n";
      continue;
    }
    for (const auto& f : *files) {
      FileLine l = file_line(f.path, std::string("data ") + n + " " + format_name(f.format), false);
      if (l.line.size() >= 7 && l.line.compare(l.line.size() - 7, 7, ": absent") == 0)
        throw IoError("dataset file not found or unreadable: " + f.path);
      k += l.line + "\n";
    }
  }
  return k;
}

std::string token_cache_path(const std::string& dir, const std::string& key) {
  return (fs::path(dir) / (hash128(key).hex() + ".tokds")).string();
}

// ---- file ----

namespace {
constexpr char kMagic[8] = {'A', 'M', 'T', 'O', 'K', 'D', 'S', '\0'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kMaxKey = 1 << 20;

template <class T>
void put(std::string& b, T v) {
  b.append(reinterpret_cast<const char*>(&v), sizeof v);
}
template <class T>
T get_at(const std::string& b, size_t off) {
  T v;
  std::memcpy(&v, b.data() + off, sizeof v);
  return v;
}
}  // namespace

std::optional<std::vector<Sample>> read_token_cache(const std::string& path, const std::string& key) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return std::nullopt;
  std::string b;
  {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      log::warn("tokenised dataset cache: cannot read " + path + "; rebuilding it");
      return std::nullopt;
    }
    const auto size = fs::file_size(path, ec);
    if (ec) return std::nullopt;
    b.resize(size);
    f.read(b.data(), static_cast<std::streamsize>(size));
    if (static_cast<size_t>(f.gcount()) != size) {
      log::warn("tokenised dataset cache: cannot read " + path + "; rebuilding it");
      return std::nullopt;
    }
  }
  auto bad = [&](const std::string& why) -> std::optional<std::vector<Sample>> {
    log::warn("tokenised dataset cache: ignoring " + path + " (" + why + "); rebuilding it");
    return std::nullopt;
  };
  const size_t head = sizeof kMagic + 4 + 4;
  if (b.size() < head || std::memcmp(b.data(), kMagic, sizeof kMagic) != 0) return bad("not a tokenised dataset file");
  const uint32_t version = get_at<uint32_t>(b, 8);
  if (version != kVersion)
    return bad("format version " + std::to_string(version) + ", this build reads " + std::to_string(kVersion));
  const uint64_t klen = get_at<uint32_t>(b, 12);
  if (klen > kMaxKey || b.size() < head + klen + 16) return bad("truncated");
  if (std::string_view(b.data() + head, klen) != key) return bad("made for another key");
  size_t off = head + klen;
  const uint64_t n = get_at<uint64_t>(b, off), tokens = get_at<uint64_t>(b, off + 8);
  off += 16;
  // Sizes checked before any multiplication can overflow: every count is bounded by the file size.
  if (n > b.size() / 4 || tokens > b.size() / 8 || b.size() != off + 4 * n + 8 * tokens + 16)
    return bad("truncated or corrupt (size " + std::to_string(b.size()) + " does not match its counts)");
  const size_t body = b.size() - 16;
  Hash128 want{get_at<uint64_t>(b, body), get_at<uint64_t>(b, body + 8)};
  if (!(hash128(std::string_view(b.data(), body)) == want)) return bad("corrupt (checksum mismatch)");
  std::vector<Sample> out(n);
  const size_t lens_off = off, ids_off = off + 4 * n, lab_off = ids_off + 4 * tokens;
  uint64_t at = 0;
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t len = get_at<uint32_t>(b, lens_off + 4 * i);
    if (len > tokens - at) return bad("corrupt (sample lengths exceed the token count)");
    Sample& s = out[i];
    s.input_ids.resize(len);
    s.labels.resize(len);
    std::memcpy(s.input_ids.data(), b.data() + ids_off + 4 * at, 4ull * len);
    std::memcpy(s.labels.data(), b.data() + lab_off + 4 * at, 4ull * len);
    at += len;
  }
  if (at != tokens) return bad("corrupt (sample lengths do not add up to the token count)");
  return out;
}

bool write_token_cache(const std::string& path, const std::string& key, const std::vector<Sample>& samples) {
  uint64_t tokens = 0;
  for (const auto& s : samples) {
    if (!s.seq_lens.empty() || s.labels.size() != s.input_ids.size() || s.input_ids.size() > UINT32_MAX) return false;
    tokens += s.input_ids.size();
  }
  if (key.size() > kMaxKey) return false;
  std::string b;
  b.reserve(sizeof kMagic + 8 + key.size() + 16 + 4 * samples.size() + 8 * tokens + 16);
  b.append(kMagic, sizeof kMagic);
  put<uint32_t>(b, kVersion);
  put<uint32_t>(b, static_cast<uint32_t>(key.size()));
  b += key;
  put<uint64_t>(b, samples.size());
  put<uint64_t>(b, tokens);
  for (const auto& s : samples) put<uint32_t>(b, static_cast<uint32_t>(s.input_ids.size()));
  for (const auto& s : samples) b.append(reinterpret_cast<const char*>(s.input_ids.data()), 4 * s.input_ids.size());
  for (const auto& s : samples) b.append(reinterpret_cast<const char*>(s.labels.data()), 4 * s.labels.size());
  const Hash128 h = hash128(b);
  put<uint64_t>(b, h.lo);
  put<uint64_t>(b, h.hi);

  const fs::path final_path(path);
  std::error_code ec;
  fs::create_directories(final_path.parent_path(), ec);
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
  auto fail = [&](const std::string& why) {
    fs::remove(tmp, ec);
    log::warn("tokenised dataset cache: cannot write " + path + " (" + why + "); continuing without it");
    return false;
  };
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return fail(std::strerror(errno));
    f.write(b.data(), static_cast<std::streamsize>(b.size()));
    f.flush();
    if (!f) return fail(std::strerror(errno));
  }
  fs::rename(tmp, final_path, ec);
  if (ec) return fail(ec.message());
  return true;
}

}  // namespace am
