#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "backend/cuda/device_info.h"
#include "core/error.h"
#ifdef AM_WITH_CUDA
#include "backend/cuda/cuda_ops.h"
#endif
#include "core/log.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "ops/ops.h"
#include "train/checkpoint.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;
using clock_t_ = std::chrono::steady_clock;

static double seconds_since(clock_t_::time_point t0) {
  return std::chrono::duration<double>(clock_t_::now() - t0).count();
}

Trainer::Trainer(const Recipe& recipe, TrainerOptions opt) : r_(recipe), opt_(opt) { setup(); }
Trainer::~Trainer() = default;

std::string Trainer::model_source_dir() const { return source_dir_; }

void Trainer::setup() {
  for (auto& w : r_.warnings()) log::warn(w);
  seed_ = static_cast<uint64_t>(r_.get_int("seed", 42));
  std::string device = r_.get_string("device", "auto");
  if (device != "auto" && device != "cpu" && device != "cuda")
    r_.fail("device", "expected auto, cpu or cuda, got '" + device + "'");
  device_name_ = "cpu";
  if (device != "cpu") {
    std::string why;
    auto devs = cuda::list_devices(&why);
    if (!devs.empty()) {
      device_name_ = "cuda";
      gpu_name_ = devs[0].name;
    } else if (device == "cuda") {
      throw DeviceError(r_.where("device") + ": cuda requested but no GPU is usable (" + why + ")");
    }
  }

  // ---- model ----
  io::ModelConfig cfg;
  DType init_dtype = DType::F32;
  std::string dtype_s = r_.get_string("model.dtype", r_.get_string("model.torch_dtype", "auto"));
  if (r_.has("model.pretrained_model_name_or_path")) {
    std::string name = r_.get_string("model.pretrained_model_name_or_path", "");
    try {
      source_dir_ = io::resolve_model_path(r_.resolve_path(name));
    } catch (const IoError& e) {
      throw IoError(r_.where("model.pretrained_model_name_or_path") + ": " + e.what());
    }
    if (!fs::exists(fs::path(source_dir_) / "config.json"))
      throw IoError(r_.where("model.pretrained_model_name_or_path") + ": no config.json in model folder '" + source_dir_ + "'");
    cfg = io::load_model_config((fs::path(source_dir_) / "config.json").string());
    tokenizer_dir_ = source_dir_;
  } else if (r_.has("model.config")) {
    std::string p = r_.resolve_path(r_.get_string("model.config", ""));
    if (fs::is_directory(p)) p = (fs::path(p) / "config.json").string();
    if (!fs::exists(p)) throw IoError(r_.where("model.config") + ": config file not found: " + p);
    cfg = io::load_model_config(p);
    if (r_.has("model.tokenizer")) tokenizer_dir_ = r_.resolve_path(r_.get_string("model.tokenizer", ""));
    if (!cfg.torch_dtype.empty()) init_dtype = dtype_from_name(cfg.torch_dtype);
  } else {
    throw RecipeError(r_.path() + ": the recipe needs model.pretrained_model_name_or_path or model.config");
  }
  if (!is_supported_model_type(cfg.model_type)) {
    std::string list;
    for (auto& t : supported_model_types()) list += (list.empty() ? "" : ", ") + t;
    throw FormatError("config.json: model_type '" + cfg.model_type + "' is not supported (supported: " + list + ")");
  }
  model_ = build_model(cfg);
  if (!source_dir_.empty()) load_hf_weights(*model_, source_dir_);
  else init_random_weights(*model_, seed_, init_dtype);
  {
    // Residual stream dtype under bf16 compute (docs/performance.md, "fp32 residual stream"): float32 keeps
    // the residual adds, RMSNorm inputs/weights and the embedding lookup in fp32 as HF's autocast does.
    // The CPU reference computes everything in fp32 whatever this says.
    const std::string rs = r_.get_string("model.backend.residual_dtype", "float32");
    DType rd = DType::F32;
    try {
      rd = dtype_from_name(rs);
    } catch (const RecipeError& e) {
      r_.fail("model.backend.residual_dtype", e.what());
    }
    if (rd != DType::BF16 && rd != DType::F32)
      r_.fail("model.backend.residual_dtype", "expected bfloat16 or float32, got '" + rs + "'");
    if (device_name_ == "cuda") model_->to_device(ExecContext::cuda_bf16(rd));
  }
  if (dtype_s != "auto") {
    DType d;
    try {
      d = dtype_from_name(dtype_s);
    } catch (const RecipeError& e) {
      r_.fail("model.dtype", e.what());
    }
    // On the CPU reference path compute is fp32 whatever the dtype; bfloat16 only changes what is saved
    // for a random init (a pretrained checkpoint keeps its own dtype, as HF does).
    if (source_dir_.empty())
      for (auto& p : model_->params().all()) p.source_dtype = d;
  }
  fwd_opt_.activation_checkpointing = r_.get_bool("distributed.activation_checkpointing", false);
  fwd_opt_.fake_balanced_gate = r_.get_bool("model.backend.fake_balanced_gate", false);
  if (fwd_opt_.fake_balanced_gate && !cfg.is_moe())
    log::warn(r_.path() + ": model.backend.fake_balanced_gate has no effect on a dense model");
  std::string loss = r_.get_string("loss_fn._target_", "masked_cross_entropy");
  if (loss.find("cross_entropy") == std::string::npos && loss.find("CrossEntropy") == std::string::npos)
    r_.fail("loss_fn._target_", "unsupported loss '" + loss + "' (masked_cross_entropy, fused_linear_cross_entropy)");
  if (r_.has("peft")) r_.fail("peft", "LoRA fine-tuning is not implemented yet; remove the peft section for a full fine-tune");

  // ---- data ----
  DatasetContext dctx;
  dctx.vocab_size = cfg.vocab_size;
  dctx.seed = seed_;
  dctx.tokenizer_dir = tokenizer_dir_;
  dctx.default_seq_len = std::min<int64_t>(cfg.max_position_embeddings > 0 ? cfg.max_position_embeddings : 2048, 2048);
  if (!r_.has("dataset")) throw RecipeError(r_.path() + ": the recipe has no dataset section");
  train_ds_ = make_dataset(r_, "dataset", dctx);
  if (r_.has("validation_dataset")) val_ds_ = make_dataset(r_, "validation_dataset", dctx);
  if (int64_t pack_size = r_.get_int("packed_sequence.packed_sequence_size", 0); pack_size > 0)
    train_ds_ = pack_dataset(*train_ds_, pack_size);  // a packed row counts as one sample (as AutoModel)

  // ---- schedule ----
  gbs_ = r_.get_int("step_scheduler.global_batch_size", 32);
  lbs_ = r_.get_int("step_scheduler.local_batch_size", std::min<int64_t>(gbs_, 8));
  if (gbs_ < 1) r_.fail("step_scheduler.global_batch_size", "must be >= 1");
  if (lbs_ < 1) r_.fail("step_scheduler.local_batch_size", "must be >= 1");
  if (gbs_ % lbs_ != 0)
    r_.fail("step_scheduler.global_batch_size", "must be a multiple of local_batch_size (" + std::to_string(lbs_) + ")");
  epochs_ = r_.get_int("step_scheduler.num_epochs", 1);
  shuffle_ = r_.get_bool("dataloader.shuffle", false);
  drop_last_ = r_.get_bool("dataloader.drop_last", false);
  const int64_t n = static_cast<int64_t>(train_ds_->size());
  steps_per_epoch_ = drop_last_ ? n / gbs_ : (n + gbs_ - 1) / gbs_;
  if (steps_per_epoch_ == 0)
    throw DataError(train_ds_->name() + ": " + std::to_string(n) + " samples is fewer than one global batch (" +
                    std::to_string(gbs_) + ") with drop_last");
  total_steps_ = steps_per_epoch_ * epochs_;
  if (auto ms = r_.get_opt_int("step_scheduler.max_steps")) {
    if (*ms < 1) r_.fail("step_scheduler.max_steps", "must be >= 1");
    // Training stops at whichever comes first: max_steps or num_epochs (num_epochs <= 0: max_steps alone).
    total_steps_ = epochs_ > 0 ? std::min(total_steps_, *ms) : *ms;
  }
  ckpt_every_ = r_.get_int("step_scheduler.ckpt_every_steps", 0);
  val_every_ = r_.get_int("step_scheduler.val_every_steps", 0);

  // ---- optimizer ----
  auto ocfg = OptimizerConfig::from_recipe(r_);
  optim_ = std::make_unique<Optimizer>(ocfg);
  sched_ = LrScheduler::from_recipe(r_, ocfg.lr, ocfg.weight_decay, total_steps_);
  if (r_.present("clip_grad_norm")) {
    max_norm_ = r_.get_opt_double("clip_grad_norm.max_norm");
  } else {
    max_norm_ = std::nullopt;
  }
  if (max_norm_ && *max_norm_ <= 0) r_.fail("clip_grad_norm.max_norm", "must be > 0 (or null for no clipping)");

  // ---- checkpoints ----
  ckpt_enabled_ = r_.get_bool("checkpoint.enabled", true);
  ckpt_dir_ = r_.get_string("checkpoint.checkpoint_dir", "checkpoints/");
  const auto& sc = r_.present("checkpoint.save_consolidated") ? r_.node("checkpoint.save_consolidated") : json("final");
  if (sc.is_boolean()) save_consolidated_ = sc.get<bool>() ? "always" : "never";
  else if (sc.is_string()) save_consolidated_ = sc.get<std::string>();
  if (save_consolidated_ != "always" && save_consolidated_ != "final" && save_consolidated_ != "never")
    r_.fail("checkpoint.save_consolidated", "expected true, false or final");
  std::string restore_from = r_.get_string("checkpoint.restore_from", "");
  if (!restore_from.empty()) restore(restore_from);
}

double Trainer::peak_mem_gib() const {
#ifdef AM_WITH_CUDA
  if (device_name_ == "cuda") return static_cast<double>(cuda::default_context().allocator().peak_bytes()) / (1ull << 30);
#endif
  return static_cast<double>(cpu_allocator().peak_bytes()) / (1ull << 30);
}

void Trainer::reset_peak_mem() {
#ifdef AM_WITH_CUDA
  if (device_name_ == "cuda") cuda::default_context().allocator().reset_peak();
#endif
  cpu_allocator().reset_peak();
}

double Trainer::peak_flops() const {
  // Dense bf16 peak of the device (SPEC §5: H100/H200 SXM 989 TFLOP/s). 0 = unknown (CPU).
  if (device_name_ != "cuda") return 0.0;
  return 989e12;
}

double Trainer::mfu_of(double tps, const StepStats& s) const {
  const double pf = peak_flops();
  if (pf <= 0 || s.num_tokens == 0) return 0.0;
  const double seq = static_cast<double>(s.padded_tokens) / static_cast<double>(gbs_);  // mean padded length
  return tps * flops_per_token(seq) / pf;
}

double Trainer::flops_per_token(double seq_len) const {
  const auto& c = model_->config();
  return 6.0 * static_cast<double>(model_->matmul_params_per_token()) +
         12.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len;
}

const std::vector<size_t>& Trainer::epoch_order(int64_t epoch) {
  if (epoch == order_epoch_) return order_;
  std::vector<size_t> order(train_ds_->size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (shuffle_) {
    // Fisher-Yates with a per-epoch seeded generator: the order depends only on (seed, epoch), so a
    // resumed run sees exactly the samples it would have seen.
    std::mt19937_64 rng(seed_ * 1000003ULL + static_cast<uint64_t>(epoch));
    for (size_t i = order.size(); i > 1; --i) {
      std::uniform_int_distribution<size_t> d(0, i - 1);
      std::swap(order[i - 1], order[d(rng)]);
    }
  }
  order_ = std::move(order);
  order_epoch_ = epoch;
  return order_;
}

StepStats Trainer::train_step(int64_t step) {
  auto t0 = clock_t_::now();
  StepStats st;
  st.step = step;
  st.epoch = (step - 1) / steps_per_epoch_;
  const int64_t in_epoch = (step - 1) % steps_per_epoch_;
  const auto& order = epoch_order(st.epoch);
  const size_t begin = static_cast<size_t>(in_epoch * gbs_);
  const size_t end = std::min(order.size(), begin + static_cast<size_t>(gbs_));
  std::vector<const Sample*> global;
  for (size_t i = begin; i < end; ++i) global.push_back(&train_ds_->get(order[i]));
  for (auto* s : global) st.num_label_tokens += count_label_tokens(*s);
  if (st.num_label_tokens == 0)
    log::warn("step " + std::to_string(step) + ": the global batch has no label tokens; the update is a no-op for the loss");
  const float scale = st.num_label_tokens > 0 ? 1.0f / static_cast<float>(st.num_label_tokens) : 0.f;
  double loss_sum = 0.0;
  model_->params().zero_grad();
  const size_t n_micro = (global.size() + static_cast<size_t>(lbs_) - 1) / static_cast<size_t>(lbs_);
  fwd_opt_.aux_loss_scale = n_micro > 0 ? 1.0f / static_cast<float>(n_micro) : 1.0f;
  for (size_t m = 0; m < global.size(); m += static_cast<size_t>(lbs_)) {
    std::vector<const Sample*> micro(global.begin() + m, global.begin() + std::min(global.size(), m + lbs_));
    Batch b = upload_batch(collate(micro), model_->exec());
    st.num_tokens += b.num_real_tokens;
    st.padded_tokens += b.B * b.T;
    loss_sum += model_->forward_backward(b, scale, fwd_opt_);
  }
  model_->exec().synchronize();  // device work is asynchronous: time it, not its enqueueing
  st.fwd_bwd_s = seconds_since(t0);
  auto t1 = clock_t_::now();
  st.loss = st.num_label_tokens > 0 ? loss_sum / static_cast<double>(st.num_label_tokens) : 0.0;
  st.loss += model_->take_aux_loss();  // MoE router aux loss (mean over micro-batches), when configured
  st.extra = model_->take_step_metrics();
  // Total L2 norm of all gradients (before clipping), as torch.nn.utils.clip_grad_norm_ returns it.
  double sq = 0.0;
#ifdef AM_WITH_CUDA
  if (model_->exec().on_cuda()) {
    std::vector<const Tensor*> grads;
    for (auto& p : model_->params().all())
      if (p.trainable) grads.push_back(&p.grad);
    sq = cuda::sum_squares_multi(grads);
  } else
#endif
  {
    for (auto& p : model_->params().all())
      if (p.trainable) sq += ops::sum_squares(p.grad);
  }
  st.grad_norm = std::sqrt(sq);
  if (!std::isfinite(st.loss) || !std::isfinite(st.grad_norm))
    log::warn("step " + std::to_string(step) + ": non-finite loss or grad_norm");
  if (max_norm_) {
    // torch: coef = max_norm / (total_norm + 1e-6), clamped to 1, applied to every gradient.
    const double coef = std::min(1.0, *max_norm_ / (st.grad_norm + 1e-6));
    if (coef < 1.0)
      for (auto& p : model_->params().all()) ops::scale_(p.grad, static_cast<float>(coef));
  }
  st.lr = sched_.lr_at(step);
  optim_->step(model_->params(), st.lr, sched_.wd_at(step));
  model_->exec().synchronize();
  st.opt_s = seconds_since(t1);
  st.time_s = seconds_since(t0);
  return st;
}

void Trainer::log_step(const StepStats& s) {
  const double tps = s.time_s > 0 ? s.num_tokens / s.time_s : 0.0;
  const double mem = peak_mem_gib();
  const double mfu = mfu_of(tps, s);
  json j = {{"step", s.step},       {"epoch", s.epoch}, {"loss", s.loss}, {"grad_norm", s.grad_norm}, {"lr", s.lr},
            {"num_label_tokens", s.num_label_tokens}, {"num_tokens", s.num_tokens}, {"tps", tps},
            {"tps_per_gpu", tps},   {"mem_gib", mem},   {"mfu", mfu},    {"time_s", s.time_s},
            {"device", device_name_}};
  for (auto& [k, v] : s.extra.items()) j[k] = v;
  {  // training.jsonl is written even with checkpoints disabled (SPEC §4)
    fs::create_directories(ckpt_dir_);
    std::ofstream f(fs::path(ckpt_dir_) / "training.jsonl", std::ios::app);
    f << j.dump() << "\n";
  }
  if (!opt_.quiet) {
    char line[256];
    std::snprintf(line, sizeof line,
                  "step %lld | epoch %lld | loss %.4f | grad_norm %.3f | lr %.2e | mem %.2f GiB | tps %.0f (%.0f/gpu) | mfu %.1f%%",
                  static_cast<long long>(s.step), static_cast<long long>(s.epoch), s.loss, s.grad_norm, s.lr, mem, tps, tps,
                  100.0 * mfu);
    std::printf("%s\n", line);
    std::fflush(stdout);
  }
}

double Trainer::validate(int64_t* num_label_tokens) {
  if (!val_ds_) throw RecipeError(r_.path() + ": no validation_dataset section");
  double total = 0.0;
  int64_t count = 0;
  std::vector<const Sample*> micro;
  auto flush = [&] {
    if (micro.empty()) return;
    Batch b = upload_batch(collate(micro), model_->exec());
    count += b.num_label_tokens;
    total += model_->forward_loss(b, fwd_opt_);
    micro.clear();
  };
  for (size_t i = 0; i < val_ds_->size(); ++i) {
    micro.push_back(&val_ds_->get(i));
    if (static_cast<int64_t>(micro.size()) == lbs_) flush();
  }
  flush();
  if (num_label_tokens) *num_label_tokens = count;
  return count > 0 ? total / static_cast<double>(count) : 0.0;
}

std::vector<StepStats> Trainer::run_steps(int64_t n) {
  std::vector<StepStats> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(train_step(((start_step_ - 1 + i) % total_steps_) + 1));
  return out;
}

std::vector<StepStats> Trainer::train() {
  std::vector<StepStats> out;
  if (ckpt_enabled_) fs::create_directories(ckpt_dir_);
  if (start_step_ == 1) {
    // A fresh (not resumed) run starts its logs afresh.
    std::error_code ec;
    fs::remove(fs::path(ckpt_dir_) / "training.jsonl", ec);
    fs::remove(fs::path(ckpt_dir_) / "validation.jsonl", ec);
  }
  if (start_step_ > total_steps_) {
    log::info("nothing to do: the checkpoint is already at step " + std::to_string(start_step_ - 1) + " of " +
              std::to_string(total_steps_));
    return out;
  }
  if (!opt_.quiet)
    log::info("training " + model_->config().model_type + " (" + std::to_string(model_->params().numel()) +
              " parameters) on " + device_name_ + " for " + std::to_string(total_steps_) + " steps, " +
              std::to_string(gbs_ / lbs_) + " micro-batch(es) of " + std::to_string(lbs_) + " per step");
  for (int64_t step = start_step_; step <= total_steps_; ++step) {
    StepStats s = train_step(step);
    log_step(s);
    out.push_back(s);
    if (val_ds_ && val_every_ > 0 && step % val_every_ == 0) {
      int64_t nt = 0;
      double vl = validate(&nt);
      json j = {{"step", step}, {"val_loss", vl}, {"num_label_tokens", nt}};
      fs::create_directories(ckpt_dir_);
      std::ofstream f(fs::path(ckpt_dir_) / "validation.jsonl", std::ios::app);
      f << j.dump() << "\n";
      if (!opt_.quiet) std::printf("validation step %lld | val_loss %.4f\n", static_cast<long long>(step), vl);
    }
    const bool last = step == total_steps_;
    if (ckpt_enabled_ && (last || (ckpt_every_ > 0 && step % ckpt_every_ == 0))) save_checkpoint(step, last);
  }
  return out;
}

void Trainer::save_checkpoint(int64_t step, bool final) {
  CheckpointState st;
  st.step = step;
  st.epoch = (step - 1) / steps_per_epoch_;
  st.seed = seed_;
  st.optimizer_steps = optim_->step_count();
  bool consolidated = save_consolidated_ == "always" || (save_consolidated_ == "final" && final);
  std::string dir = write_checkpoint(ckpt_dir_, st, *model_, *optim_, consolidated, source_dir_.empty() ? tokenizer_dir_ : source_dir_);
  if (!opt_.quiet) log::info("saved checkpoint " + dir);
}

void Trainer::restore(const std::string& from) {
  CheckpointState st = read_checkpoint(ckpt_dir_, from, *model_, *optim_);
  if (st.seed != seed_) log::warn("resuming with seed " + std::to_string(seed_) + " but the checkpoint used " + std::to_string(st.seed));
  start_step_ = st.step + 1;
  // Keep training.jsonl consistent with the resumed position: drop entries after the checkpoint's step.
  for (const char* name : {"training.jsonl", "validation.jsonl"}) {
    const fs::path log_path = fs::path(ckpt_dir_) / name;
    if (!fs::exists(log_path)) continue;
    std::ifstream in(log_path);
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        if (json::parse(line).value("step", int64_t(0)) <= st.step) kept += line + "\n";
      } catch (...) {
      }
    }
    in.close();
    std::ofstream(log_path, std::ios::trunc) << kept;
  }
  if (!opt_.quiet) log::info("resumed from step " + std::to_string(st.step));
}

}  // namespace am
