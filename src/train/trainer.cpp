#include "train/trainer.h"

#include <algorithm>
#include <atomic>
#include <optional>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "dist/communicator.h"
#include "io/model_config.h"
#include "train/model_source.h"
#include "io/json_bounded.h"
#include "io/safetensors.h"
#include "models/decoder.h"
#include "ops/device.h"
#include "ops/trace.h"
#include "models/hf_weights.h"
#include "ops/ops.h"
#include "train/checkpoint.h"
#include "train/peft.h"
#include "train/progress.h"
#include "io/svg_plot.h"
#include "io/tensorboard.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;
using clock_t_ = std::chrono::steady_clock;

static double seconds_since(clock_t_::time_point t0) {
  return std::chrono::duration<double>(clock_t_::now() - t0).count();
}

// SIGTERM / SIGINT / SIGUSR1 (Slurm's warning before preemption) / SIGHUP (as SIGTERM): finish the step,
// save, exit 0 (SPEC §4). A second SIGINT exits at once.
static std::atomic<int> g_stop_signal{0};
static void on_stop_signal(int sig) {
  if (sig == SIGINT && g_stop_signal.load() == SIGINT) std::_Exit(130);
  g_stop_signal.store(sig);
}

void arm_stop_signals() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  for (int sig : {SIGTERM, SIGINT, SIGUSR1, SIGHUP}) sigaction(sig, &sa, nullptr);
}

// One metrics line, flushed and closed at once (a killed run keeps every finished step); a line that
// cannot be written (full disk, read-only folder) stops the run naming the file instead of losing metrics.
static void append_jsonl(const fs::path& path, const json& j) {
  std::error_code ec;
  fs::create_directories(path.parent_path(), ec);
  std::ofstream f(path, std::ios::app);
  f << j.dump() << "\n";
  f.close();
  if (f.fail()) throw IoError(path.string() + ": cannot append the step's metrics (disk full or not writable?)");
}

// The sample a rank without a share of a (last, short) global batch feeds through forward/backward so that
// its collectives still match the other ranks': one token, no label, so no loss and no gradient.
static const Sample& padding_sample() {
  static const Sample s{{0}, {-100}, {}};
  return s;
}

// A dataset section's padding (`padding: max_length` or `pad_to_max_length: true` pad every row to its
// seq_length / max_length) and the loader's collate_fn.pad_seq_len_divisible, as collate options.
static CollateOptions collate_options(const Recipe& r, const std::string& ds, const std::string& dl) {
  CollateOptions o;
  bool to_max = r.get_bool(ds + ".pad_to_max_length", false);
  if (r.has(ds + ".padding")) {
    const json& p = r.node(ds + ".padding");
    if (p.is_boolean()) {
      // true = "longest" (HF): what collation does anyway.
    } else if (p.is_string()) {
      const std::string v = p.get<std::string>();
      if (v == "max_length") to_max = true;
      else if (v != "do_not_pad" && v != "longest")
        r.fail(ds + ".padding", "expected max_length, longest, do_not_pad, true or false, got '" + v + "'");
    } else {
      r.fail(ds + ".padding", "expected max_length, longest, do_not_pad, true or false");
    }
  }
  if (to_max) {
    std::string key;
    for (const char* k : {".seq_length", ".max_length", ".seq_len"})
      if (r.has(ds + k)) { key = ds + k; break; }
    if (key.empty()) log::warn(r.where(r.has(ds + ".padding") ? ds + ".padding" : ds + ".pad_to_max_length") +
                               ": padding to max_length needs " + ds + ".seq_length; rows are padded to the longest of each micro-batch");
    else o.pad_to = std::max<int64_t>(0, r.get_int(key, 0));
  }
  const std::string div = dl + ".collate_fn.pad_seq_len_divisible";
  if (r.has(div)) {
    o.multiple_of = r.get_int(div, 1);
    if (o.multiple_of < 1) r.fail(div, "must be >= 1, got " + std::to_string(o.multiple_of));
  }
  return o;
}

Trainer::Trainer(const Recipe& recipe, TrainerOptions opt) : r_(recipe), opt_(opt) { setup(); }

void Trainer::setup_lora() {
  std::vector<std::string> warnings;
  lora_spec_ = lora_spec_from_recipe(r_, &warnings);
  try {
    model_->enable_lora(*lora_spec_, seed_, &warnings);
  } catch (const UsageError& e) {
    throw UsageError(r_.path() + ": " + e.what());
  }
  if (!opt_.quiet)
    for (const auto& w : warnings) log::warn(w);
  if (r_.has("peft.adapter_path"))
    load_lora_adapter(*model_, *lora_spec_, r_.resolve_path(r_.get_string("peft.adapter_path", "")),
                      r_.where("peft.adapter_path"));
  int64_t trainable = 0;
  for (const Param& p : model_->params().all())
    if (p.trainable) trainable += p.global_numel;
  const int64_t total = model_->params().global_numel();
  if (!opt_.quiet) {
    char pct[32], alpha[32];
    std::snprintf(pct, sizeof pct, "%.3f%%", 100.0 * static_cast<double>(trainable) / static_cast<double>(total - trainable));
    std::snprintf(alpha, sizeof alpha, "%g", lora_spec_->alpha);
    log::info("LoRA r=" + std::to_string(lora_spec_->dim) + " alpha=" + alpha + " on " +
              std::to_string(model_->lora_adapters().size()) + " modules: " + std::to_string(trainable) +
              " trainable parameters (" + pct + " of the base)" +
              (r_.has("peft.adapter_path") ? ", starting from " + r_.get_string("peft.adapter_path", "") : ""));
  }
}
Trainer::~Trainer() = default;

std::string Trainer::model_source_dir() const { return source_dir_; }

void Trainer::setup() {
  auto t_phase = clock_t_::now();
  auto mark = [&](std::string name) {  // ends the current start-up phase
    const auto now = clock_t_::now();
    startup_.emplace_back(std::move(name), std::chrono::duration<double>(now - t_phase).count());
    t_phase = now;
  };
  rank_ = opt_.launch.rank;
  world_ = opt_.launch.world_size;
  log::set_rank(rank_);
  for (auto& w : r_.warnings()) log::warn(w);
  // AutoModel seeds its StatefulRNG (model init) from rng.seed and its data loaders from the top-level seed;
  // each falls back to the other, then 42. Random init and mock data use seed_; shuffling uses data_seed_.
  for (const char* k : {"seed", "rng.seed"})
    if (auto v = r_.get_opt_int(k); v && *v < 0) r_.fail(k, "must be >= 0, got " + std::to_string(*v));
  seed_ = static_cast<uint64_t>(r_.get_int("rng.seed", r_.get_int("seed", 42)));
  data_seed_ = static_cast<uint64_t>(r_.get_int("seed", r_.get_int("rng.seed", 42)));
  std::string device = r_.get_string("device", "auto");
  if (device != "auto" && device != "cpu" && device != "cuda")
    r_.fail("device", "expected auto, cpu or cuda, got '" + device + "'");
  device_name_ = "cpu";
  if (device != "cpu") {
    std::string why;
    auto devs = ops::list_gpus(&why);
    if (!devs.empty()) {
      device_name_ = "cuda";
      // Rank i of a node uses GPU local_rank (SPEC §1), chosen before anything touches the device; a launcher
      // that binds one GPU per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES per rank) leaves one: use it.
      const int dev = devs.size() == 1 ? 0 : opt_.launch.local_rank;
      if (dev >= static_cast<int>(devs.size()))
        throw UsageError("local rank " + std::to_string(dev) + " needs GPU " + std::to_string(dev) + " but only " +
                         std::to_string(devs.size()) + " GPU(s) are visible");
      ops::use_gpu(dev);
      gpu_name_ = devs[static_cast<size_t>(dev)].name;
    } else if (device == "cuda") {
      throw DeviceError(r_.where("device") + ": cuda requested but no GPU is usable (" + why + ")");
    }
  }

  mark(device_name_ == "cuda" ? "cuda init" : "recipe");
  // ---- model ----
  io::ModelConfig cfg;
  DType init_dtype = DType::F32;
  std::string dtype_s = r_.get_string("model.dtype", r_.get_string("model.torch_dtype", "auto"));
  {
    ModelSource src = resolve_model_source(r_);
    cfg = std::move(src.cfg);
    source_dir_ = src.weights_dir;
    tokenizer_dir_ = src.tokenizer_dir;
    // Random init saves in the config's dtype unless model.dtype says otherwise (below).
    if (source_dir_.empty() && !cfg.torch_dtype.empty()) init_dtype = dtype_from_name(cfg.torch_dtype);
  }
  if (!is_supported_model_type(cfg.model_type)) {
    std::string list;
    for (auto& t : supported_model_types()) list += (list.empty() ? "" : ", ") + t;
    throw FormatError("config.json: model_type '" + cfg.model_type + "' is not supported (supported: " + list + ")");
  }
  // A checkpoint bitsandbytes saved 4-bit (QLoRA base): its own loader; only LoRA can train over it.
  const bool bnb4 = !source_dir_.empty() && is_bnb_4bit_checkpoint(cfg);
  if (bnb4 && !r_.has("peft"))
    throw UsageError(source_dir_ + ": a 4-bit bitsandbytes checkpoint (config.json quantization_config) can only be "
                     "trained through LoRA adapters: add a peft section");
  if (!source_dir_.empty() && !bnb4) check_hf_weights_against_config(source_dir_, cfg);  // headers only: fails before allocating
  setup_distributed(cfg);
  ModelParallel mp;
  if (groups_) mp = ModelParallel{groups_->ep->rank(), ep_size_, groups_->ep.get(), groups_->world.get()};
  // Gradients live on the GPU (to_device) or in the data-parallel buckets: no host copy at load.
  mp.host_grads = device_name_ != "cuda" && !groups_;
  model_ = build_model(cfg, mp);
  // Each rank reads only the tensors (and, expert-parallel, only the experts) it holds.
  bnb4_base_ = bnb4;
  if (bnb4) load_bnb_4bit_weights(*model_, source_dir_);
  else if (!source_dir_.empty()) load_hf_weights(*model_, source_dir_);
  else init_random_weights(*model_, seed_, init_dtype);
  mark(bnb4 || !source_dir_.empty() ? "model (load)" : "model (random init)");
  if (r_.has("peft")) setup_lora();  // freezes the base: before to_device, so it never gets an fp32 master there
  if (r_.get_bool("quantization.load_in_4bit", false)) {
    std::vector<std::string> warnings;
    const int64_t n = setup_4bit(r_, *model_, &warnings);
    for (const auto& w : warnings)
      if (!opt_.quiet) log::warn(w);
    if (device_name_ == "cpu") model_->params().quantize_marked();  // CUDA: in to_device, weight by weight
    if (!opt_.quiet)
      log::info("QLoRA: " + std::to_string(n) + " frozen Linear weights held in " +
                (model_->params().quant4.fp4 ? "FP4" : "NF4") + " (blocksize " + std::to_string(model_->params().quant4.blocksize) +
                (model_->params().quant4.double_quant ? ", double-quantised absmax)" : ")"));
  }
  // model.dtype: bfloat16 trains in pure bf16 for full fine-tuning: train/pure_bf16.h on one rank, the bf16
  // buckets of dist/data_parallel.h under data parallelism. (LoRA keeps its frozen base in its dtype anyway.)
  DType model_dtype = DType::F32;
  if (dtype_s != "auto") {
    try {
      model_dtype = dtype_from_name(dtype_s);
    } catch (const RecipeError& e) {
      r_.fail("model.dtype", e.what());
    }
  }
  const std::string dtype_key = r_.has("model.dtype") ? "model.dtype" : "model.torch_dtype";
  const bool want_pure_bf16 = model_dtype == DType::BF16 && !r_.has("peft") && !bnb4 &&
                              !r_.get_bool("quantization.load_in_4bit", false);
  const bool pure_bf16 = want_pure_bf16;
  {
    // Residual stream dtype under bf16 compute (docs/performance.md, "fp32 residual stream"): float32 keeps
    // the residual adds, RMSNorm inputs/weights and the embedding lookup in fp32 as HF's autocast does.
    // The CPU reference computes everything in fp32 whatever this says.
    // Pure bf16 computes the residual stream in bf16 too, as HF does with a bf16 model.
    const std::string rs = r_.get_string("model.backend.residual_dtype", pure_bf16 ? "bfloat16" : "float32");
    DType rd = DType::F32;
    try {
      rd = dtype_from_name(rs);
    } catch (const RecipeError& e) {
      r_.fail("model.backend.residual_dtype", e.what());
    }
    if (rd != DType::BF16 && rd != DType::F32)
      r_.fail("model.backend.residual_dtype", "expected bfloat16 or float32, got '" + rs + "'");
    if (device_name_ == "cuda") {
      // Under data parallelism the trainable parameters stay on the host here; DataParallel uploads each
      // rank's part (its shard under fsdp2), so the whole model never sits on one GPU.
      if (groups_) model_->params().set_defer_trainable_to_device(true);
      model_->to_device(ExecContext::cuda_bf16(rd));
      model_->params().set_defer_trainable_to_device(false);
    }
  }
  if (dtype_s != "auto") {
    // A random init saves in model.dtype; a pretrained checkpoint keeps its own dtype, as HF does.
    if (source_dir_.empty())
      for (auto& p : model_->params().all()) p.source_dtype = model_dtype;
    if (pure_bf16 && device_name_ == "cpu" && !opt_.quiet)
      log::info(r_.where(dtype_key) + " (bfloat16): parameters, gradients and AdamW state are held as bf16 values; the "
                "CPU computes in fp32");
    else if (pure_bf16 && !opt_.quiet)
      log::info(r_.where(dtype_key) + " (bfloat16): pure bf16 training: bf16 parameters, gradients and AdamW state, no "
                "fp32 master copy (docs/precision.md)");
  }
  if (groups_)
    dp_ = std::make_unique<dist::DataParallel>(*model_, *groups_, dist::parse_strategy(strategy_name_), model_->exec(), pure_bf16);
  // optimizer_in_bwd (train/optimizer_in_bwd.h): checked here, made with the optimizer below.
  bool in_bwd = r_.get_bool("optimizer_in_bwd", false);
  // Unset, it is on where it changes no update (one GPU, one micro-batch per step, no clipping: the updates are
  // the ordinary step's bit for bit) and saves the whole-model fp32 gradient (W1: 3.4 GiB) and its passes.
  const bool in_bwd_auto = !r_.present("optimizer_in_bwd") && !groups_ && optimizer_in_bwd_is_exact(r_, device_name_, world_);
  if (in_bwd_auto) {
    in_bwd = true;
    if (!opt_.quiet)
      log::info("optimizer_in_bwd: on (one GPU, one micro-batch per step, no clip_grad_norm): each layer is updated "
                "as its backward ends, the same updates without a whole-model gradient; optimizer_in_bwd: false turns "
                "it off");
  }
  if (in_bwd && groups_)
    r_.fail("optimizer_in_bwd", "is not implemented with data parallelism yet (world size " + std::to_string(world_) +
                                "); set it to false or run on one rank");
  if (pure_bf16 && !groups_) pure_ = std::make_unique<PureBf16>(*model_, /*accumulators=*/!in_bwd);
  fwd_opt_.activation_checkpointing = r_.get_bool("distributed.activation_checkpointing", false);
  fwd_opt_.fake_balanced_gate = r_.get_bool("model.backend.fake_balanced_gate", false);
  if (fwd_opt_.fake_balanced_gate && !cfg.is_moe())
    log::warn(r_.path() + ": model.backend.fake_balanced_gate has no effect on a dense model");
  std::string loss = r_.get_string("loss_fn._target_", "masked_cross_entropy");
  if (loss.find("cross_entropy") == std::string::npos && loss.find("CrossEntropy") == std::string::npos)
    r_.fail("loss_fn._target_", "unsupported loss '" + loss + "' (masked_cross_entropy, fused_linear_cross_entropy)");
  if (r_.get_bool("quantization.load_in_8bit", false))
    r_.fail("quantization.load_in_8bit", "8-bit loading is not supported; remove it to train in the model's dtype");

  mark(device_name_ == "cuda" ? "to cuda" : "model setup");
  // ---- data ----
  DatasetContext dctx;
  dctx.vocab_size = cfg.vocab_size;
  dctx.seed = seed_;
  dctx.tokenizer_dir = tokenizer_dir_;
  dctx.default_seq_len = std::min<int64_t>(cfg.max_position_embeddings > 0 ? cfg.max_position_embeddings : 2048, 2048);
  if (!r_.has("dataset")) throw RecipeError(r_.path() + ": the recipe has no dataset section");
  train_ds_ = make_dataset(r_, "dataset", dctx);
  if (r_.has("validation_dataset")) val_ds_ = make_dataset(r_, "validation_dataset", dctx);
  collate_ = collate_options(r_, "dataset", "dataloader");
  val_collate_ = collate_options(r_, "validation_dataset", "validation_dataloader");
  if (int64_t pack_size = r_.get_int("packed_sequence.packed_sequence_size", 0); pack_size > 0) {
    train_ds_ = pack_dataset(*train_ds_, pack_size);  // a packed row counts as one sample (as AutoModel)
    collate_.pad_to = 0;  // packed rows fill the pack already
  }

  mark("datasets");
  // ---- schedule ----
  {
    const BatchShape bs = batch_shape(r_);
    gbs_ = bs.gbs;
    lbs_ = bs.lbs;
    val_lbs_ = bs.val_lbs;
    if (!bs.note.empty() && !opt_.quiet) log::warn(bs.note);
  }
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
  log_every_ = r_.get_int("step_scheduler.log_every_steps", 1);
  if (r_.present("tensorboard") && !(r_.node("tensorboard").is_boolean() && !r_.get_bool("tensorboard", false)))
    tb_dir_ = r_.has("tensorboard.log_dir") ? r_.resolve_path(r_.get_string("tensorboard.log_dir", ""))
                                            : (fs::path(r_.get_string("checkpoint.checkpoint_dir", "checkpoints/")) / "tensorboard").string();
  if (log_every_ < 1) r_.fail("step_scheduler.log_every_steps", "must be >= 1, got " + std::to_string(log_every_));
  val_every_ = r_.get_int("step_scheduler.val_every_steps", 0);

  // ---- optimizer ----
  auto ocfg = OptimizerConfig::from_recipe(r_);
  ocfg.seed = seed_;
  if (ocfg.stochastic_rounding && !pure_ && !(dp_ && dp_->pure_bf16()) && !opt_.quiet)
    log::warn(r_.where("optimizer.stochastic_rounding") + ": has no effect here (it rounds bf16 parameters: "
              "model.dtype bfloat16, full fine-tuning)");
  optim_ = std::make_unique<Optimizer>(ocfg);
  if (in_bwd) {
    if (gbs_ != lbs_)
      r_.fail("optimizer_in_bwd", "updates each layer as soon as its backward is done, so a step must be one micro-batch "
                                  "(global_batch_size " + std::to_string(gbs_) + " != local_batch_size " +
                                  std::to_string(lbs_) + ": gradient accumulation)");
    in_bwd_opt_ = std::make_unique<OptimizerInBackward>(*model_, *optim_, pure_ != nullptr);
  }
  sched_ = LrScheduler::from_recipe(r_, ocfg.lr, ocfg.weight_decay, total_steps_);
  if (r_.present("clip_grad_norm")) {
    max_norm_ = r_.get_opt_double("clip_grad_norm.max_norm");
  } else {
    max_norm_ = std::nullopt;
  }
  if (max_norm_ && *max_norm_ <= 0) r_.fail("clip_grad_norm.max_norm", "must be > 0 (or null for no clipping)");
  if (in_bwd && max_norm_ && !opt_.quiet)
    log::warn(r_.where("clip_grad_norm.max_norm") + " with optimizer_in_bwd: a step is clipped with the previous step's "
              "grad norm (its own is known only after its update); step 1 is not clipped");

  // ---- checkpoints ----
  ckpt_enabled_ = r_.get_bool("checkpoint.enabled", true);
  ckpt_dir_ = r_.get_string("checkpoint.checkpoint_dir", "checkpoints/");
  keep_last_n_ = r_.get_int("checkpoint.keep_last_n", 0);
  ckpt_every_epoch_ = r_.get_bool("step_scheduler.save_checkpoint_every_epoch", true);  // AutoModel's default
  const auto& sc = r_.present("checkpoint.save_consolidated") ? r_.node("checkpoint.save_consolidated") : json("final");
  if (sc.is_boolean()) save_consolidated_ = sc.get<bool>() ? "always" : "never";
  else if (sc.is_string()) save_consolidated_ = sc.get<std::string>();
  if (save_consolidated_ != "always" && save_consolidated_ != "final" && save_consolidated_ != "never")
    r_.fail("checkpoint.save_consolidated", "expected true, false or final");
  std::string restore_from = r_.get_string("checkpoint.restore_from", "");
  if (!restore_from.empty()) restore(restore_from);
  mark(restore_from.empty() ? "optimizer and schedule" : "optimizer, schedule and resume");
}

double Trainer::peak_mem_gib() const {
  if (device_name_ == "cuda") return static_cast<double>(ops::gpu_peak_bytes()) / (1ull << 30);
  return static_cast<double>(cpu_allocator().peak_bytes()) / (1ull << 30);
}

void Trainer::reset_peak_mem() {
  if (device_name_ == "cuda") ops::reset_gpu_peak();
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
  // Scores q.k (D) and probabilities . v (Dv): 6 flops per (head, key) and dim, forward + backward.
  // DeepSeek's MLA: D = qk_nope + qk_rope, Dv = v_head_dim (head_dim is only the rotary part there).
  const double qk_plus_v = c.deepseek ? static_cast<double>(c.ds.qk_head_dim() + c.ds.v_head_dim) : 2.0 * c.head_dim;
  const double attention = 6.0 * c.num_hidden_layers * c.num_attention_heads * qk_plus_v * seq_len;
  const double base = static_cast<double>(model_->matmul_params_per_token());
  const auto adapters = model_->lora_adapters();
  if (adapters.empty()) return 6.0 * base + attention;
  // LoRA: the frozen base runs its forward (2 per weight) and its input gradient (2) but no weight gradient;
  // the adapters run all three (6). An experts' adapter counts the top-k experts a token reaches.
  double lora = 0.0;
  for (const LoraAdapter* a : adapters) {
    double n = static_cast<double>(a->A->value.defined() ? a->A->value.numel() : a->A->work.numel()) +
               static_cast<double>(a->B->value.defined() ? a->B->value.numel() : a->B->work.numel());
    if (a->grouped && c.num_experts > 0) n *= static_cast<double>(c.num_experts_per_tok) / static_cast<double>(c.num_experts);
    lora += n;
  }
  return 4.0 * base + 6.0 * lora + attention;
}

const std::vector<size_t>& Trainer::epoch_order(int64_t epoch) {
  if (epoch == order_epoch_) return order_;
  std::vector<size_t> order(train_ds_->size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (shuffle_) {
    // Fisher-Yates with a per-epoch seeded generator: the order depends only on (seed, epoch), so a
    // resumed run sees exactly the samples it would have seen.
    std::mt19937_64 rng(data_seed_ * 1000003ULL + static_cast<uint64_t>(epoch));
    for (size_t i = order.size(); i > 1; --i) {
      std::uniform_int_distribution<size_t> d(0, i - 1);
      std::swap(order[i - 1], order[d(rng)]);
    }
  }
  order_ = std::move(order);
  order_epoch_ = epoch;
  return order_;
}

bool optimizer_in_bwd_is_exact(const Recipe& r, const std::string& device, int world) {
  if (device != "cuda" || world != 1) return false;  // the host keeps the reference path; ranks: data parallelism
  if (r.has("peft")) return false;  // adapters: their gradients are a few MB, nothing to save
  const BatchShape bs = batch_shape(r);
  if (bs.gbs != bs.lbs) return false;  // gradient accumulation: a layer's gradient is final only at the last micro-batch
  // Clipping needs the step's whole norm before any update (optimizer_in_bwd would clip with the previous step's).
  return !(r.present("clip_grad_norm") && r.get_opt_double("clip_grad_norm.max_norm"));
}

BatchShape batch_shape(const Recipe& r) {
  BatchShape b;
  b.gbs = r.get_int("step_scheduler.global_batch_size", 32);
  const auto lbs = r.get_opt_int("step_scheduler.local_batch_size");
  b.lbs = lbs ? *lbs : std::min<int64_t>(b.gbs, 8);
  if (b.gbs < 1) r.fail("step_scheduler.global_batch_size", "must be >= 1");
  if (b.lbs < 1) r.fail("step_scheduler.local_batch_size", "must be >= 1");
  auto check_multiple = [&] {
    if (b.gbs % b.lbs != 0)
      r.fail("step_scheduler.global_batch_size", "must be a multiple of local_batch_size (" + std::to_string(b.lbs) + ")");
  };
  // AutoModel's loader yields batches of dataloader.batch_size (default: local_batch_size; null with a mock
  // dataset that batches itself: the dataset's batch_size) and a step takes gbs / (lbs x dp) of them.
  std::string key = "dataloader.batch_size";
  std::optional<int64_t> bs = r.get_opt_int(key);
  if (!bs && r.present("dataloader.batch_size") && r.has("dataset.batch_size")) key = "dataset.batch_size", bs = r.get_opt_int(key);
  if (bs) {
    if (*bs < 1) r.fail(key, "must be >= 1, got " + std::to_string(*bs));
    if (!lbs) {
      b.lbs = *bs;
      if (b.gbs % b.lbs != 0) r.fail(key, "global_batch_size " + std::to_string(b.gbs) + " is not a multiple of it");
    } else if (*bs != b.lbs) {
      check_multiple();
      b.note = r.where(key) + " (" + std::to_string(*bs) + ") differs from step_scheduler.local_batch_size (" +
               std::to_string(b.lbs) + "): as AutoModel, micro-batches have " + std::to_string(*bs) + " samples and a step takes " +
               std::to_string(b.gbs / b.lbs) + " of them (" + std::to_string(b.gbs / b.lbs * *bs) + " samples)";
      b.gbs = b.gbs / b.lbs * *bs;
      b.lbs = *bs;
    }
  }
  check_multiple();
  b.val_lbs = b.lbs;
  if (auto v = r.get_opt_int("validation_dataloader.batch_size")) {
    if (*v < 1) r.fail("validation_dataloader.batch_size", "must be >= 1, got " + std::to_string(*v));
    b.val_lbs = *v;
  }
  return b;
}

void check_distributed_recipe(const Recipe& r, int world, const io::ModelConfig* cfg) {
  // distributed: (SPEC §2). Checked at any world size, so a recipe fails the same way on 1 rank as on N, and
  // by the supervisor before it starts any worker.
  const int64_t ep = r.get_int("distributed.ep_size", 1);
  if (ep < 1) r.fail("distributed.ep_size", "must be >= 1");
  if (world % ep != 0) r.fail("distributed.ep_size", std::to_string(ep) + " does not divide the world size " + std::to_string(world));
  if (cfg && ep > 1 && !cfg->is_moe())
    r.fail("distributed.ep_size", std::to_string(ep) + ": model_type '" + cfg->model_type + "' has no experts");
  if (cfg && ep > 1 && cfg->num_experts % ep != 0)
    r.fail("distributed.ep_size", std::to_string(ep) + " does not divide the " + std::to_string(cfg->num_experts) +
                                      " experts of config.json");
  // tp / cp / pp sizes above 1 are accepted with a warning (config/schema_table.cpp) and every rank runs data
  // parallel instead; a dp_size that is what AutoModel would derive from them (world / (tp x cp x pp)) is
  // accepted too. Any other dp_size contradicts the world size.
  int64_t model_parallel = 1;
  for (const char* k : {"distributed.tp_size", "distributed.cp_size", "distributed.pp_size"})
    if (auto v = r.get_opt_int(k); v && *v > 1) model_parallel *= *v;
  // A recipe written for more (or fewer) GPUs than this run has keeps working: one line says what runs.
  if (auto dp = r.get_opt_int("distributed.dp_size"); dp && *dp > 0 && *dp != world &&
                                                      !(model_parallel > 1 && *dp * model_parallel == world))
    log::warn(r.where("distributed.dp_size") + " (" + std::to_string(*dp) + "): the world has " + std::to_string(world) +
              (world == 1 ? " rank" : " ranks") + "; every rank runs data parallel (dp_size " + std::to_string(world) + ")");
  const std::string strategy = r.get_string("distributed.strategy", "fsdp2");
  if (strategy == "megatron_fsdp")
    log::warn(r.where("distributed.strategy") + " (megatron_fsdp): runs as fsdp2 (sharded weights, gradients and "
                                                 "optimizer state; same results)");
  else if (strategy != "fsdp2" && strategy != "fsdp" && strategy != "ddp" && strategy != "megatron_fsdp")
    r.fail("distributed.strategy", "expected fsdp2 or ddp, got '" + strategy + "'");
  const BatchShape bs = batch_shape(r);
  const int64_t gbs = bs.gbs, lbs = bs.lbs;
  if (world > 1 && gbs % (lbs * world) != 0)
    r.fail("step_scheduler.global_batch_size",
           "must be a multiple of local_batch_size x data-parallel ranks (" + std::to_string(lbs) + " x " +
               std::to_string(world) + ")" +
               (model_parallel > 1 ? "; tensor/context/pipeline parallelism is not supported, so all " +
                                         std::to_string(world) + " ranks are data parallel" : ""));
}

void check_distributed_recipe(const Recipe& r, int world) {
  // The model's config, when it can be found; anything wrong with it is left to the workers to report.
  std::optional<io::ModelConfig> cfg;
  try {
    cfg = resolve_model_source(r).cfg;
  } catch (const Error&) {
  }
  check_distributed_recipe(r, world, cfg ? &*cfg : nullptr);
}

void Trainer::setup_distributed(const io::ModelConfig& cfg) {
  check_distributed_recipe(r_, world_, &cfg);
  ep_size_ = static_cast<int>(r_.get_int("distributed.ep_size", 1));
  strategy_name_ = r_.get_string("distributed.strategy", "fsdp2");
  // AUTOMODEL_FORCE_DIST=1: the data-parallel path (and on CUDA the NCCL communicator) at world 1, to check
  // it on one GPU against the plain path (bench/dist_device_check.sh).
  const char* force = std::getenv("AUTOMODEL_FORCE_DIST");
  if (world_ == 1 && !opt_.force_distributed && !(force && std::string(force) == "1")) {
    strategy_name_ = "none";
    return;
  }
  std::unique_ptr<dist::Communicator> world;
  const auto& L = opt_.launch;
  if (device_name_ == "cuda") {
    world = dist::make_nccl_world(rank_, world_, L.local_rank, L.mpi, L.master_addr, L.master_port, 600.0);
  } else if (world_ == 1) {
    world = dist::make_self_communicator();
  } else {
    if (!L.mpi)
      throw UsageError("device cpu with " + std::to_string(world_) + " ranks (" + L.launcher +
                       "): CPU ranks talk through MPI; start them with `automodel finetune R.yaml --nproc-per-node " +
                       std::to_string(world_) + "` (which runs mpirun) or under mpirun");
    world = dist::make_mpi_world();
  }
  if (world->size() != world_ || world->rank() != rank_)
    throw DeviceError("communicator: rank " + std::to_string(world->rank()) + " of " + std::to_string(world->size()) +
                      " but the launcher said rank " + std::to_string(rank_) + " of " + std::to_string(world_));
  groups_ = std::make_unique<dist::Groups>(dist::Groups::make(std::move(world), ep_size_));
}

std::vector<std::vector<const Sample*>> Trainer::my_micro_batches(const std::vector<const Sample*>& samples, int rank,
                                                                  int64_t micro) const {
  const size_t n = samples.size(), W = static_cast<size_t>(world_), lbs = static_cast<size_t>(micro > 0 ? micro : lbs_);
  const size_t per = (n + W - 1) / W, n_micro = (per + lbs - 1) / lbs;
  const size_t b = std::min(n, static_cast<size_t>(rank) * per), e = std::min(n, b + per);
  std::vector<std::vector<const Sample*>> out(n_micro);
  for (size_t m = 0; m < n_micro; ++m)
    for (size_t i = b + m * lbs; i < std::min(e, b + (m + 1) * lbs); ++i) out[m].push_back(samples[i]);
  return out;
}

// torch.nn.utils.clip_grad_norm_'s coefficient: max_norm / (total_norm + 1e-6), clamped to 1.
static double clip_coef(double max_norm, double total_norm) { return std::min(1.0, max_norm / (total_norm + 1e-6)); }

StepStats Trainer::train_step(int64_t step) {
  auto t0 = clock_t_::now();
  StepStats st;
  st.step = step;
  st.epoch = (step - 1) / steps_per_epoch_;
  const int64_t in_epoch = (step - 1) % steps_per_epoch_;
  const auto& order = epoch_order(st.epoch);
  const size_t begin = static_cast<size_t>(in_epoch * gbs_);
  const size_t end = std::min(order.size(), begin + static_cast<size_t>(gbs_));
  // Datasets hand out samples by value (a lazy one makes them on demand): they live here for the step.
  std::vector<Sample> held;
  held.reserve(end > begin ? end - begin : 0);
  for (size_t i = begin; i < end; ++i) held.push_back(train_ds_->get(order[i]));
  std::vector<const Sample*> global;
  for (const auto& s : held) global.push_back(&s);
  // Every rank sees the whole global batch's sample list (cheap), so the label count that normalises the
  // loss is global without a collective.
  for (auto* s : global) st.num_label_tokens += count_label_tokens(*s);
  if (st.num_label_tokens == 0)
    log::warn("step " + std::to_string(step) + ": the global batch has no label tokens; the update is a no-op for the loss");
  const float scale = st.num_label_tokens > 0 ? 1.0f / static_cast<float>(st.num_label_tokens) : 0.f;
  double loss_sum = 0.0;
  st.lr = sched_.lr_at(step);
  if (dp_) dp_->begin_step();
  else if (in_bwd_opt_) {
    // Clipping with the previous step's norm (train/optimizer_in_bwd.h); torch's coefficient formula.
    const double coef = max_norm_ && last_grad_norm_ ? clip_coef(*max_norm_, *last_grad_norm_) : 1.0;
    in_bwd_opt_->begin_step(st.lr, sched_.wd_at(step), coef);
  } else if (pure_) pure_->begin_step();
  else model_->params().zero_grad();
  const auto micro = my_micro_batches(global, rank_);
  // The router aux loss of a step is the mean over the global batch's real micro-batches (every rank's).
  size_t n_real = 0;
  for (int r = 0; r < world_; ++r)
    for (const auto& mb : my_micro_batches(global, r)) n_real += !mb.empty();
  for (size_t m = 0; m < micro.size(); ++m) {
    ops::TimedRange tr("micro_batch", static_cast<int64_t>(m), "fwd+bwd");
    const bool pad_only = micro[m].empty();
    const std::vector<const Sample*> mb = pad_only ? std::vector<const Sample*>{&padding_sample()} : micro[m];
    Batch b = upload_batch(collate(mb, pad_only ? CollateOptions{} : collate_), model_->exec());
    if (!pad_only) {
      st.num_tokens += b.num_real_tokens;
      st.padded_tokens += b.B * b.T;
    }
    ForwardOptions o = fwd_opt_;
    o.aux_loss_scale = pad_only || n_real == 0 ? 0.0f : 1.0f / static_cast<float>(n_real);
    o.count_metrics = !pad_only;
    // LoRA dropout masks: a pure function of (seed, step, micro-batch, rank), so resuming repeats them.
    o.dropout_seed = seed_ * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(step) * 0x100000001b3ULL +
                     static_cast<uint64_t>(m) * 0x1000193ULL + static_cast<uint64_t>(rank_);
    if (dp_) dp_->set_sync(m + 1 == micro.size());  // ddp all-reduces once per step, in the last backward
    loss_sum += model_->forward_backward(b, scale, o);
    if (pure_ && !in_bwd_opt_) pure_->end_micro_batch();
  }
  if (pure_ && !in_bwd_opt_) pure_->expose_accumulators();
  if (dp_) {
    ops::TraceRange tr("finish_grads (reduce)");
    dp_->finish_grads();
  }
  model_->exec().synchronize();  // device work is asynchronous: time it, not its enqueueing
  st.fwd_bwd_s = seconds_since(t0);
  auto t1 = clock_t_::now();
  double aux = model_->take_aux_loss();  // MoE router aux loss (mean over micro-batches), when configured
  if (groups_) {
    double v[4] = {loss_sum, aux, static_cast<double>(st.num_tokens), static_cast<double>(st.padded_tokens)};
    groups_->world->all_reduce_host(v, 4);
    loss_sum = v[0];
    aux = v[1];
    st.num_tokens = static_cast<int64_t>(v[2]);
    st.padded_tokens = static_cast<int64_t>(v[3]);
  }
  st.loss = st.num_label_tokens > 0 ? loss_sum / static_cast<double>(st.num_label_tokens) : 0.0;
  st.loss += aux;
  st.extra = model_->take_step_metrics();
  // Total L2 norm of all gradients (before clipping), as torch.nn.utils.clip_grad_norm_ returns it.
  double sq = 0.0;
  if (in_bwd_opt_) {
    sq = in_bwd_opt_->end_step();  // every unit is updated already
  } else if (dp_) {
    sq = dp_->grad_sq_norm();
  } else {
    std::vector<const Tensor*> grads;
    for (auto& p : model_->params().all())
      if (p.trainable) grads.push_back(&p.grad);
    sq = ops::sum_squares_multi(grads);
  }
  st.grad_norm = std::sqrt(sq);
  if (!std::isfinite(st.loss) || !std::isfinite(st.grad_norm))
    log::warn("step " + std::to_string(step) + ": non-finite loss or grad_norm");
  if (max_norm_ && !in_bwd_opt_) {
    const double coef = clip_coef(*max_norm_, st.grad_norm);  // applied to every gradient
    if (coef < 1.0) {
      if (dp_) dp_->scale_grads(static_cast<float>(coef));
      else
        for (auto& p : model_->params().all())
          if (p.trainable) ops::scale_(p.grad, static_cast<float>(coef));
    }
  }
  if (!in_bwd_opt_) {
    ops::TimedRange tr("optimizer");
    if (dp_) optim_->step(dp_->opt_slots(), st.lr, sched_.wd_at(step));
    else optim_->step(model_->params(), st.lr, sched_.wd_at(step));
    model_->exec().synchronize();
  }
  last_grad_norm_ = st.grad_norm;
  st.opt_s = seconds_since(t1);
  st.time_s = seconds_since(t0);
  st.mem_gib = peak_mem_gib();
  if (groups_) {
    double v[2] = {st.mem_gib, st.time_s};
    groups_->world->all_reduce_host(v, 2, dist::ReduceOp::Max);
    st.mem_gib = v[0];
    st.time_s = v[1];
  }
  return st;
}

void Trainer::log_step(const StepStats& s) {
  if (rank_ != 0) return;  // rank 0 speaks for the job; the numbers are already global
  const double tps = s.time_s > 0 ? s.num_tokens / s.time_s : 0.0;
  const double tps_gpu = tps / world_;
  const double mem = s.mem_gib;
  const double mfu = mfu_of(tps_gpu, s);
  json j = {{"step", s.step},       {"epoch", s.epoch}, {"loss", s.loss}, {"grad_norm", s.grad_norm}, {"lr", s.lr},
            {"num_label_tokens", s.num_label_tokens}, {"num_tokens", s.num_tokens}, {"tps", tps},
            {"tps_per_gpu", tps_gpu}, {"mem_gib", mem}, {"mfu", mfu},    {"time_s", s.time_s},
            {"device", device_name_}, {"world_size", world_}};
  for (auto& [k, v] : s.extra.items()) j[k] = v;
  append_jsonl(fs::path(ckpt_dir_) / "training.jsonl", j);  // written even with checkpoints disabled (SPEC §4)
  run_tokens_ += s.num_tokens;
  run_time_s_ += s.time_s;
  run_mfu_time_ += mfu * s.time_s;
  last_loss_ = s.loss;
  peak_mem_ = std::max(peak_mem_, mem);
  if (!opt_.quiet && (s.step % log_every_ == 0 || s.step == total_steps_ || s.step == start_step_)) {
    if (bar_) bar_->clear();
    char line[256];
    std::snprintf(line, sizeof line,
                  "step %lld | epoch %lld | loss %.4f | grad_norm %.3f | lr %.2e | mem %.2f GiB | tps %.0f (%.0f/gpu) | mfu %.1f%%",
                  static_cast<long long>(s.step), static_cast<long long>(s.epoch), s.loss, s.grad_norm, s.lr, mem, tps, tps_gpu,
                  100.0 * mfu);
    std::printf("%s\n", line);
    std::fflush(stdout);
  }
  if (bar_) bar_->update(s, tps, mem);
  if (tb_) {
    std::vector<std::pair<std::string, double>> v = {{"train/loss", s.loss},         {"train/grad_norm", s.grad_norm},
                                                     {"train/lr", s.lr},             {"train/tokens_per_s", tps},
                                                     {"train/tokens_per_s_per_gpu", tps_gpu}, {"train/mem_gib", mem},
                                                     {"train/mfu", mfu},             {"train/num_label_tokens", static_cast<double>(s.num_label_tokens)}};
    for (auto& [k, val] : s.extra.items())
      if (val.is_number()) v.emplace_back("train/" + k, val.get<double>());
    tb_->add_scalars(v, s.step);
  }
}

double Trainer::validate(int64_t* num_label_tokens) {
  if (!val_ds_) throw RecipeError(r_.path() + ": no validation_dataset section");
  std::vector<Sample> held;  // samples come by value (data/dataset.h); they live for this validation
  held.reserve(val_ds_->size());
  for (size_t i = 0; i < val_ds_->size(); ++i) held.push_back(val_ds_->get(i));
  std::vector<const Sample*> all;
  for (const auto& s : held) all.push_back(&s);
  double total = 0.0;
  int64_t count = 0;
  // This rank's share; every rank runs as many micro-batches as any other (padding-only ones if short).
  for (const auto& micro : my_micro_batches(all, rank_, val_lbs_)) {
    const bool pad_only = micro.empty();
    Batch b = upload_batch((pad_only ? collate({&padding_sample()}) : collate(micro, val_collate_)),
                           model_->exec());
    count += b.num_label_tokens;
    total += model_->forward_loss(b, fwd_opt_);
  }
  if (groups_) {
    double v[2] = {total, static_cast<double>(count)};
    groups_->world->all_reduce_host(v, 2);
    total = v[0];
    count = static_cast<int64_t>(v[1]);
  }
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
  if (start_step_ == 1 && rank_ == 0) {
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
  if (!opt_.quiet && !startup_.empty()) {
    double total = 0;
    std::string parts;
    char buf[96];
    for (const auto& [name, s] : startup_) {
      total += s;
      std::snprintf(buf, sizeof buf, "%s%s %.2f s", parts.empty() ? "" : ", ", name.c_str(), s);
      parts += buf;
    }
    std::snprintf(buf, sizeof buf, "start-up %.2f s: ", total);
    log::info(buf + parts);
  }
  if (!opt_.quiet)
    log::info("training " + model_->config().model_type + " (" + std::to_string(model_->params().global_numel()) +
              " parameters) on " + device_name_ + (world_ > 1 ? " x " + std::to_string(world_) + " ranks (" + strategy_name_ +
              (ep_size_ > 1 ? ", ep_size " + std::to_string(ep_size_) : "") + ")" : "") + " for " +
              std::to_string(total_steps_) + " steps, " + std::to_string(gbs_ / (lbs_ * world_)) +
              " micro-batch(es) of " + std::to_string(lbs_) + " per rank per step");
  // Preemption: finish the step, save, exit 0. Installed for the training loop only.
  struct sigaction sa {}, old_term {}, old_int {}, old_usr1 {}, old_hup {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGUSR1, &sa, &old_usr1);
  sigaction(SIGHUP, &sa, &old_hup);
  // No reset here: a signal armed earlier (arm_stop_signals) and received during setup still counts. The flag
  // is cleared when this loop ends, so that a later Trainer in the same process starts clean.
  struct Restore {
    struct sigaction t, i, u, h;
    ~Restore() {
      g_stop_signal.store(0);
      sigaction(SIGTERM, &t, nullptr);
      sigaction(SIGINT, &i, nullptr);
      sigaction(SIGUSR1, &u, nullptr);
      sigaction(SIGHUP, &h, nullptr);
    }
  } restore_handlers{old_term, old_int, old_usr1, old_hup};
  if (rank_ == 0 && !tb_dir_.empty()) {
    tb_ = std::make_unique<io::TensorBoardWriter>(tb_dir_);
    if (!opt_.quiet) log::info("TensorBoard events: " + tb_->path() + " (tensorboard --logdir " + tb_dir_ + ")");
  }
  // The bar is for a person at this process's terminal: not under mpirun / srun, which give their
  // workers a pty of their own whatever the user's stdout is (and whose output they relay or interleave).
  const bool launched = opt_.launch.mpi || std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") ||
                        std::getenv("PMIX_RANK") || std::getenv("SLURM_PROCID");
  ProgressBar bar(start_step_, total_steps_, rank_ == 0 && !opt_.quiet && !launched);
  bar_ = bar.active() ? &bar : nullptr;
  struct Unset {
    ProgressBar*& b;
    ~Unset() { b = nullptr; }
  } unset_bar{bar_};
  run_tokens_ = 0;
  run_time_s_ = run_mfu_time_ = 0;
  peak_mem_ = 0;
  val_s_ = ckpt_s_ = 0;
  val_runs_ = ckpt_runs_ = 0;
  const auto run_t0 = clock_t_::now();
  for (int64_t step = start_step_; step <= total_steps_; ++step) {
    StepStats s = train_step(step);
    log_step(s);
    out.push_back(s);
    if (val_ds_ && val_every_ > 0 && step % val_every_ == 0) {
      int64_t nt = 0;
      if (bar_) bar_->status("validating...");
      const auto v0 = clock_t_::now();
      double vl = validate(&nt);
      val_s_ += seconds_since(v0);
      ++val_runs_;
      last_val_loss_ = vl;
      if (tb_) tb_->add_scalar("val/loss", vl, step);
      if (bar_) bar_->clear();
      if (rank_ == 0) {
        json j = {{"step", step}, {"val_loss", vl}, {"num_label_tokens", nt}};
        append_jsonl(fs::path(ckpt_dir_) / "validation.jsonl", j);
        if (!opt_.quiet) std::printf("validation step %lld | val_loss %.4f\n", static_cast<long long>(step), vl);
      }
    }
    const bool last = step == total_steps_;
    // A stop signal on any rank stops every rank at this same step boundary.
    double stop = static_cast<double>(g_stop_signal.load());
    if (groups_) groups_->world->all_reduce_host(&stop, 1, dist::ReduceOp::Max);
    const bool periodic = (ckpt_every_ > 0 && step % ckpt_every_ == 0) || (ckpt_every_epoch_ && step % steps_per_epoch_ == 0);
    if (ckpt_enabled_ && (last || periodic || stop > 0)) {
      if (bar_) bar_->status("saving checkpoint...");
      const auto c0 = clock_t_::now();
      save_checkpoint(step, last);
      ckpt_s_ += seconds_since(c0);
      ++ckpt_runs_;
    }
    if (stop > 0 && !last) {
      log::info("received signal " + std::to_string(static_cast<int>(stop)) + ": stopped after step " + std::to_string(step) +
                (ckpt_enabled_ ? " with a checkpoint; resume with checkpoint.restore_from=LATEST" : " (checkpoints are disabled)"));
      break;
    }
  }
  bar.clear();
  if (!out.empty()) write_plot();
  if (rank_ == 0 && !opt_.quiet && !out.empty()) print_summary(seconds_since(run_t0), out.back().step);
  return out;
}

void Trainer::write_plot() const {
  // checkpoint_dir/training.svg: loss / val loss, lr, tokens/s and grad norm against step (io/svg_plot.h).
  // A plot that cannot be written costs a warning, never the run.
  if (rank_ != 0) return;
  try {
    io::plot_run_dir(ckpt_dir_);
  } catch (const Error& e) {
    log::warn(std::string("training.svg not written: ") + e.what());
  }
}

void Trainer::print_summary(double wall_s, int64_t last_step) const {
  // What happened, and the one command to try the result (issue 18).
  const double tps = run_time_s_ > 0 ? static_cast<double>(run_tokens_) / run_time_s_ : 0.0;
  const double mfu = run_time_s_ > 0 ? run_mfu_time_ / run_time_s_ : 0.0;  // time-weighted mean of the steps' MFU
  char line[512];
  char toks[32];
  if (run_tokens_ >= 1000000) std::snprintf(toks, sizeof toks, "%.2fM", static_cast<double>(run_tokens_) / 1e6);
  else std::snprintf(toks, sizeof toks, "%lld", static_cast<long long>(run_tokens_));
  std::snprintf(line, sizeof line, "done: step %lld of %lld in %s | %s tokens | %.0f tok/s%s | peak %.2f GiB | loss %.4f",
                static_cast<long long>(last_step), static_cast<long long>(total_steps_), format_duration(wall_s).c_str(),
                toks, tps,
                mfu > 0 ? (" (mfu " + std::to_string(static_cast<int>(std::lround(100 * mfu))) + "%)").c_str() : "",
                peak_mem_, last_loss_);
  std::string out = line;
  if (last_val_loss_) {
    char v[64];
    std::snprintf(v, sizeof v, " | val_loss %.4f", *last_val_loss_);
    out += v;
  }
  std::printf("%s\n", out.c_str());
  // Where the wall time went: the steps (their own timers), validation, checkpoints, start-up, and the cuDNN
  // attention plans built on the way (inside the steps or validation that first met their shapes).
  {
    auto secs = [](double x) {
      char b[32];
      std::snprintf(b, sizeof b, "%.1f s", x);
      return std::string(b);
    };
    double startup = 0;
    for (const auto& [name, sec] : startup_) startup += sec;
    std::string t = "time: steps " + secs(run_time_s_);
    if (val_runs_) t += ", validation " + secs(val_s_) + " (" + std::to_string(val_runs_) + " runs)";
    if (ckpt_runs_) t += ", checkpoints " + secs(ckpt_s_) + " (" + std::to_string(ckpt_runs_) + ")";
    t += ", start-up " + secs(startup);
    const ops::AttentionPlanStats ap = ops::attention_plan_stats();
    if (ap.plans > 0) {
      char b[96];
      std::snprintf(b, sizeof b, "; cuDNN attention plans: %lld built in %.1f s", static_cast<long long>(ap.plans), ap.seconds);
      t += b;
    }
    std::printf("%s\n", t.c_str());
  }
  if (!ckpt_enabled_) {
    std::printf("checkpoints are disabled: nothing was saved (metrics: %s)\n", (fs::path(ckpt_dir_) / "training.jsonl").c_str());
    std::fflush(stdout);
    return;
  }
  const std::string latest = (fs::path(ckpt_dir_) / "LATEST").string();
  std::printf("curves: %s\n", (fs::path(ckpt_dir_) / "training.svg").c_str());
  if (lora_spec_) {
    const std::string base = source_dir_.empty() ? latest + "/model/consolidated" : source_dir_;
    std::printf("adapter (HF PEFT): %s/model\n", latest.c_str());
    std::printf("try it:  automodel generate --model %s --adapter %s/model --chat \"Hello\"\n", base.c_str(), latest.c_str());
    if (!source_dir_.empty() && !bnb4_base_)
      std::printf("merge:   automodel merge-lora --base %s --adapter %s/model --out merged/\n", source_dir_.c_str(), latest.c_str());
  } else if (fs::exists(fs::path(latest) / "model" / "consolidated")) {
    std::printf("model (HF folder): %s/model/consolidated\n", latest.c_str());
    if (dynamic_cast<const DecoderLM*>(model_.get()))  // nemotron_h has no incremental decode: generate refuses it
      std::printf("try it:  automodel generate --model %s/model/consolidated --chat \"Hello\"\n", latest.c_str());
  } else {
    std::printf("checkpoint: %s (no consolidated HF folder: checkpoint.save_consolidated is %s)\n", latest.c_str(),
                save_consolidated_.c_str());
  }
  std::fflush(stdout);
}

void Trainer::save_checkpoint(int64_t step, bool final) {
  CheckpointState st;
  st.step = step;
  st.epoch = (step - 1) / steps_per_epoch_;
  st.seed = seed_;
  st.optimizer_steps = optim_->step_count();
  st.world_size = world_;
  st.ep_size = ep_size_;
  st.strategy = strategy_name_;
  st.last_grad_norm = last_grad_norm_;
  bool consolidated = save_consolidated_ == "always" || (save_consolidated_ == "final" && final);
  std::string dir = write_checkpoint(ckpt_dir_, st, *model_, *optim_, consolidated,
                                     source_dir_.empty() ? tokenizer_dir_ : source_dir_, dp_.get(), groups_.get(),
                                     // a 4-bit base folder cannot be merged into: the merge goes into the
                                     // dequantised weights in memory instead (AutoModel's merge_lora --qlora)
                                     PeftCheckpoint{lora_spec_ ? &*lora_spec_ : nullptr, bnb4_base_ ? std::string() : source_dir_});
  if (!opt_.quiet) log::info("saved checkpoint " + dir);
  write_plot();
  if (rank_ == 0 && keep_last_n_ > 0)  // every rank has finished writing (write_checkpoint ends with a barrier)
    for (const auto& gone : prune_checkpoints(ckpt_dir_, keep_last_n_))
      if (!opt_.quiet) log::info("removed old checkpoint " + gone + " (checkpoint.keep_last_n " + std::to_string(keep_last_n_) + ")");
}

void Trainer::restore(const std::string& from) {
  CheckpointState st = read_checkpoint(ckpt_dir_, from, *model_, *optim_, dp_.get());
  // A checkpoint of an fp32-master run resumed in bf16 (on the host: fp32 storage).
  if (pure_) pure_->round_values();
  if (dp_) dp_->round_values();
  if (st.seed != seed_) log::warn("resuming with seed " + std::to_string(seed_) + " but the checkpoint used " + std::to_string(st.seed));
  if (st.world_size != world_ || st.ep_size != ep_size_)
    log::info("resharding a checkpoint of world size " + std::to_string(st.world_size) + " (ep_size " +
              std::to_string(st.ep_size) + ") onto " + std::to_string(world_) + " (ep_size " + std::to_string(ep_size_) + ")");
  start_step_ = st.step + 1;
  last_grad_norm_ = st.last_grad_norm;
  if (in_bwd_opt_ && max_norm_ && !last_grad_norm_ && st.step > 0)
    log::warn("optimizer_in_bwd: the checkpoint does not record its step's grad norm; the first resumed step is not clipped");
  if (rank_ != 0) return;
  // Keep training.jsonl consistent with the resumed position: drop entries after the checkpoint's step.
  for (const char* name : {"training.jsonl", "validation.jsonl"}) {
    const fs::path log_path = fs::path(ckpt_dir_) / name;
    if (!fs::exists(log_path)) continue;
    std::ifstream in(log_path);
    std::string line, kept;
    while (std::getline(in, line)) {
      try {
        if (io::parse_json_bounded(line, log_path.string()).value("step", int64_t(0)) <= st.step) kept += line + "\n";
      } catch (...) {
      }
    }
    in.close();
    std::ofstream(log_path, std::ios::trunc) << kept;
  }
  if (!opt_.quiet) log::info("resumed from step " + std::to_string(st.step));
}

}  // namespace am
