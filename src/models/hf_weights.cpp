#include "models/hf_weights.h"

#include "core/hash.h"
#include "io/json_bounded.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <thread>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "core/error.h"
#include "core/log.h"
#include "io/nf4.h"
#include "io/safetensors.h"
#include "models/mxfp4.h"
#include "ops/nf4_ops.h"

namespace am {
namespace fs = std::filesystem;

// The first of the parameter's candidate layouts whose tensors are all in the checkpoint, or -1.
static int pick_layout(const Param& p, const io::SafeTensors& st) {
  for (size_t i = 0; i < p.layouts.size(); ++i) {
    bool all = true;
    for (const SourceSlice& s : p.layouts[i]) all = all && st.has(s.name);
    if (all) return static_cast<int>(i);
  }
  return -1;
}

// Every parameter's layout against the checkpoint's headers: the first layout whose tensors are all there,
// each slice with the shape the config implies and a float dtype shared by the parameter's slices. Throws
// FormatError naming the tensor (and both shapes); returns the chosen layout per parameter.
static std::vector<size_t> check_layouts(const CausalLM& model, const io::SafeTensors& st, const std::string& dir) {
  std::vector<size_t> chosen;
  for (const auto& p : const_cast<CausalLM&>(model).params().all()) {
    const int li = pick_layout(p, st);
    if (li < 0) {
      // Name the first missing tensor of the preferred layout (and of the alternative, if any).
      std::string miss;
      for (size_t i = 0; i < p.layouts.size() && i < 2; ++i)
        for (const SourceSlice& s : p.layouts[i])
          if (!st.has(s.name)) {
            miss += (miss.empty() ? "'" : " (or '") + s.name + (i ? "')" : "'");
            break;
          }
      throw FormatError(dir + ": tensor " + miss + " is missing from the checkpoint (model_type " +
                        model.config().model_type + ")");
    }
    const SourceLayout& layout = p.layouts[static_cast<size_t>(li)];
    for (const SourceSlice& s : layout) {
      const auto& info = st.info(s.name);
      if (info.shape != s.shape)
        throw FormatError(info.file + ": tensor '" + s.name + "' has shape " + shape_str(info.shape) +
                          " but config.json implies " + shape_str(s.shape));
      if (info.dtype != DType::F32 && info.dtype != DType::BF16 && info.dtype != DType::F16)
        throw FormatError(info.file + ": tensor '" + s.name + "' has non-float dtype " + dtype_name(info.dtype));
      const auto& first = st.info(layout.front().name);
      if (info.dtype != first.dtype)
        throw FormatError(info.file + ": tensor '" + s.name + "' is " + dtype_name(info.dtype) + " but '" +
                          layout.front().name + "' is " + dtype_name(first.dtype) +
                          " (the slices of one parameter must share a dtype)");
    }
    chosen.push_back(static_cast<size_t>(li));
  }
  return chosen;
}

void check_hf_weights_against_config(const std::string& dir, const io::ModelConfig& cfg) {
  // The model's own registration (names, shapes, candidate layouts) without allocating a parameter: the
  // same description the loader uses, so the pre-check cannot disagree with it.
  ModelParallel shapes;
  shapes.shapes_only = true;
  auto model = build_model(cfg, shapes);
  if (is_mxfp4_checkpoint(cfg)) return load_mxfp4_weights(*model, dir, /*check_only=*/true);  // uint8 blocks
  if (is_fp8_checkpoint(cfg)) return check_fp8_weights(*model, dir);  // F8_E4M3: io::SafeTensors has no such dtype
  check_layouts(*model, io::SafeTensors::open(dir), dir);  // headers only
}

void load_hf_weights(CausalLM& model, const std::string& dir) {
  if (is_mxfp4_checkpoint(model.config())) return load_mxfp4_weights(model, dir);  // dequantised at load
  if (is_fp8_checkpoint(model.config())) return load_fp8_weights(model, dir);
  auto st = io::SafeTensors::open(dir);
  const std::vector<size_t> chosen = check_layouts(model, st, dir);  // everything checked before any copy
  std::set<std::string> used;
  size_t i = 0;
  for (auto& p : model.params().all()) {
    p.layout = chosen[i++];
    // Copy slice by slice straight from the mmapped file into the (fused) parameter: no second full-size
    // copy of a layer's experts ever exists.
    for (const SourceSlice& s : p.source()) {
      copy_slice_in(s, st.get(s.name), p.value.f32());
      p.source_dtype = st.info(s.name).dtype;
      used.insert(s.name);
    }
  }
  // Expert parallelism: the other ranks' experts are in the file but not this rank's to read.
  bool ep = false;
  for (auto& p : model.params().all()) ep = ep || (p.expert && p.global_numel != shape_numel(p.shape));
  std::vector<std::string> unused;
  // DeepSeek's multi-token-prediction layers (num_nextn_predict_layers; tensors of layer index
  // num_hidden_layers and up) are not part of DeepseekV3ForCausalLM: skipped, and said once.
  const auto& cfg = model.config();
  const std::string mtp_prefix = "model.layers." + std::to_string(cfg.num_hidden_layers) + ".";
  int64_t mtp = 0;
  for (auto& n : st.names()) {
    if (used.count(n) || (ep && n.find(".experts.") != std::string::npos)) continue;
    if (cfg.deepseek && n.rfind("model.layers.", 0) == 0 && n.size() > 13 && std::isdigit(static_cast<unsigned char>(n[13])) &&
        std::stoll(n.substr(13)) >= cfg.num_hidden_layers) {
      ++mtp;
      continue;
    }
    unused.push_back(n);
  }
  if (mtp > 0)
    log::warn(dir + ": skipping " + std::to_string(mtp) + " tensor(s) of the multi-token-prediction layer(s) from '" +
              mtp_prefix + "' on (not trained; not written on export)");
  if (!unused.empty()) {
    // A tied lm_head stored anyway is expected; anything else is worth a warning.
    bool only_tied_head = unused.size() == 1 && unused[0] == "lm_head.weight" && model.config().tie_word_embeddings;
    if (!only_tied_head)
      log::warn(dir + ": " + std::to_string(unused.size()) + " tensor(s) in the checkpoint are not used, e.g. '" +
                unused[0] + "'");
  }
}


bool is_bnb_4bit_checkpoint(const io::ModelConfig& cfg) {
  const auto& q = cfg.raw.contains("quantization_config") ? cfg.raw["quantization_config"] : nlohmann::json();
  return q.is_object() && q.value("quant_method", std::string()) == "bitsandbytes" && q.value("load_in_4bit", false);
}

void load_bnb_4bit_weights(CausalLM& model, const std::string& dir) {
  auto src = io::RawSafetensors::open(dir);
  for (auto& p : model.params().all()) {
    if (p.source().size() == 1 && io::is_bnb_4bit(*src, p.source().front().name)) {
      const std::string& name = p.source().front().name;
      auto w = std::make_shared<Nf4Weight>(io::read_bnb_4bit(*src, name));
      if (w->shape != p.shape)
        throw FormatError(src->where() + ": 4-bit tensor '" + name + "' has shape " + shape_str(w->shape) +
                          " (quant_state) but config.json implies " + shape_str(p.shape));
      p.source_dtype = w->dtype;
      p.nf4 = std::move(w);
      ParamStore::freeze(p);
      p.value = p.work = Tensor();
      continue;
    }
    for (const SourceSlice& sl : p.source()) {
      if (!src->has(sl.name))
        throw FormatError(dir + ": tensor '" + sl.name + "' is missing from the checkpoint (model_type " +
                          model.config().model_type + ")");
      const io::RawTensor t = src->get(sl.name);
      const DType dt = dtype_from_safetensors(t.dtype);
      if (dt != DType::F32 && dt != DType::BF16 && dt != DType::F16)
        throw FormatError(src->where() + ": tensor '" + sl.name + "' has dtype " + t.dtype + " (expected a float, or "
                          "bitsandbytes' 4-bit entries with a quant_state)");
      if (t.shape != sl.shape)
        throw FormatError(src->where() + ": tensor '" + sl.name + "' has shape " + shape_str(t.shape) +
                          " but config.json implies " + shape_str(sl.shape));
      copy_slice_in(sl, Tensor::wrap(const_cast<uint8_t*>(t.data), t.shape, dt, nullptr), p.value.f32());
      p.source_dtype = dt;
    }
  }
}

void init_random_weights(CausalLM& model, uint64_t seed, DType dtype) {
  // normal(0, initializer_range) for matrices (and gpt_oss's sinks and router bias), 1 for norms (0 when zero-centred), 0 for biases. The values are a function of
  // (seed, parameter name, element index in the whole parameter) only: each parameter is cut into chunks of
  // 2^20 elements with their own generator, filled in parallel (an 8B model in seconds, not minutes), and an
  // expert-parallel rank's slice gets exactly the elements one rank would have.
  const float std_dev = static_cast<float>(model.config().raw.value("initializer_range", 0.02));
  constexpr int64_t kChunk = int64_t(1) << 20;
  struct Task {
    Param* p;
    int64_t chunk;
  };
  std::vector<Task> tasks;
  for (auto& p : model.params().all()) {
    p.source_dtype = p.name.find("e_score_correction_bias") != std::string::npos ? DType::F32 : dtype;
    const int64_t n = p.value.numel();
    if (n == 0) continue;
    for (int64_t c = p.global_offset / kChunk; c * kChunk < p.global_offset + n; ++c) tasks.push_back({&p, c});
  }
  auto fill = [&](const Task& t) {
    Param& p = *t.p;
    const std::string& nm = p.name;
    const bool is_norm = nm.find("norm.weight") != std::string::npos || nm.find("layernorm.weight") != std::string::npos;
    // gpt_oss's router bias is drawn like a weight, as HF's _init_weights does (its other biases start at 0);
    // deepseek_v3's e_score_correction_bias is a buffer HF initialises to zeros (and keeps in fp32).
    const bool is_bias = (nm.size() > 5 && nm.compare(nm.size() - 5, 5, ".bias") == 0 &&
                          nm.find(".mlp.router.bias") == std::string::npos) ||
                         nm.find("e_score_correction_bias") != std::string::npos;
    float* v = p.value.f32();
    const int64_t g0 = t.chunk * kChunk, g1 = g0 + kChunk;                      // global element range of the chunk
    const int64_t lo = std::max(g0, p.global_offset), hi = std::min(g1, p.global_offset + p.value.numel());
    if (is_norm || is_bias) {
      // Zero-centred norms (Gemma: y = x_hat * (1 + w)) start at 0, as HF's _init_weights does.
      const float one = model.config().norm_plus_one ? 0.f : 1.f;
      std::fill(v + (lo - p.global_offset), v + (hi - p.global_offset), is_norm ? one : 0.f);
      return;
    }
    std::mt19937_64 rng(seed ^ fnv1a(nm) ^ (static_cast<uint64_t>(t.chunk) * 0x9e3779b97f4a7c15ULL));
    std::normal_distribution<float> normal(0.f, std_dev);
    for (int64_t g = g0; g < lo; ++g) (void)normal(rng);  // a slice that starts inside the chunk
    for (int64_t g = lo; g < hi; ++g) v[g - p.global_offset] = normal(rng);
  };
  const size_t nt = std::max<size_t>(1, std::min<size_t>(std::thread::hardware_concurrency(), tasks.size()));
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  for (size_t w = 0; w < nt; ++w)
    pool.emplace_back([&] {
      for (size_t i; (i = next.fetch_add(1)) < tasks.size();) fill(tasks[i]);
    });
  for (auto& th : pool) th.join();
  // nn.Embedding(padding_idx=pad_token_id) starts with the pad row at zero (HF _init_weights).
  const auto pad = model.config().pad_token_id;
  auto& ps = model.params();
  if (pad && *pad >= 0 && *pad < model.config().vocab_size && ps.has("model.embed_tokens.weight")) {
    Param& e = ps.get("model.embed_tokens.weight");
    const int64_t H = e.value.dim(1);
    std::fill(e.value.f32() + *pad * H, e.value.f32() + (*pad + 1) * H, 0.f);
  }
}

static void copy_atomic(const fs::path& src, const fs::path& dst) {
  fs::path tmp = dst;
  tmp += ".tmp";
  fs::copy_file(src, tmp, fs::copy_options::overwrite_existing);
  fs::rename(tmp, dst);
}

void append_hf_tensors(const Param& p, std::vector<std::pair<std::string, Tensor>>& out) {
  if (is_adapter_param(p)) return;  // LoRA pairs go to the adapter folder (train/peft.h)
  // A frozen weight on the GPU (LoRA base) keeps only its working copy; a QLoRA one only its 4-bit form.
  Tensor host = p.nf4 ? ops::nf4_dequantize(ops::nf4_to_device(*p.nf4, DeviceType::CPU), DType::F32)
                      : ExecContext::download(p.value.defined() ? p.value : p.work);
  if (host.dtype() != DType::F32) host = host.to(DType::F32);
  // Back in the layout and dtype it was read from (per-expert stays per-expert): slice views of the
  // fused parameter, converted per slice.
  for (const SourceSlice& s : p.source()) {
    Tensor part = copy_slice_out(s, host.f32());
    out.emplace_back(s.name, p.source_dtype == DType::F32 ? part : part.to(p.source_dtype));
  }
}

void write_hf_side_files(const CausalLM& model, const std::string& out_dir, const std::string& source_dir) {
  fs::create_directories(out_dir);
  // config.json: the source's JSON as read (so every key the user had survives), written atomically. A model
  // held 4-bit is written dequantised: its quantization_config no longer describes the files.
  nlohmann::json cfg_json = model.config().raw;
  if (is_mxfp4_checkpoint(model.config())) cfg_json.erase("quantization_config");  // loaded dequantised (mxfp4.h)
  for (const auto& p : const_cast<CausalLM&>(model).params().all())
    if (p.nf4) {
      cfg_json.erase("quantization_config");
      break;
    }
  if (is_fp8_checkpoint(model.config())) cfg_json.erase("quantization_config");  // FP8: saved dequantised
  {
    fs::path tmp = fs::path(out_dir) / "config.json.tmp";
    std::ofstream f(tmp);
    f << io::unquote_nonfinite(cfg_json.dump(2)) << "\n";  // Python's bare Infinity / NaN back
    f.close();
    if (!f) throw IoError("cannot write " + tmp.string());
    fs::rename(tmp, fs::path(out_dir) / "config.json");
  }
  if (!source_dir.empty()) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                             "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
                             "chat_template.json", "added_tokens.json"}) {
      fs::path src = fs::path(source_dir) / name;
      if (fs::exists(src)) copy_atomic(src, fs::path(out_dir) / name);
    }
  }
}

void save_hf_model(const CausalLM& model, const std::string& out_dir, const std::string& source_dir,
                   size_t max_shard_bytes) {
  write_hf_side_files(model, out_dir, source_dir);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto& p : const_cast<CausalLM&>(model).params().all()) append_hf_tensors(p, tensors);
  io::SaveOptions opt;
  opt.max_shard_bytes = max_shard_bytes;
  io::save_safetensors_dir(out_dir, tensors, opt);
}

}  // namespace am
