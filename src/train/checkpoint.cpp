#include "train/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "dist/data_parallel.h"
#include "io/json_bounded.h"
#include "io/lora_adapter.h"
#include "io/lora_merge.h"
#include "models/blocks/lora.h"
#include "train/peft.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"
#include "ops/ops.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

void write_text_atomic(const fs::path& p, const std::string& text) {
  fs::path tmp = p;
  tmp += ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text;
    f.flush();
    if (!f) throw IoError("cannot write " + tmp.string());
  }
  fs::rename(tmp, p);
}

// LATEST -> name, as a symbolic link swapped in by rename (atomic: a reader sees the old or the new one).
void point_latest(const fs::path& ckpt_dir, const std::string& name) {
  const fs::path tmp = ckpt_dir / ".LATEST.tmp";
  std::error_code ec;
  fs::remove(tmp, ec);
  fs::create_directory_symlink(name, tmp);
  fs::rename(tmp, ckpt_dir / "LATEST");
}

// What this rank holds of the optimizer's state: the data-parallel slots, or (one rank) one slot per parameter.
std::vector<dist::StateSlot> local_slots(CausalLM& model, dist::DataParallel* dp) {
  if (dp) return dp->slots();
  std::vector<dist::StateSlot> out;
  for (const OptSlot& o : Optimizer::slots_of(model.params())) {
    const Param& p = model.params().get(o.key);
    out.push_back({o, {{p.name, p.global_offset, p.global_offset + shape_numel(p.shape), 0}}, true});
  }
  return out;
}

std::string state_kind(const Optimizer& optim, int which) {
  if (which < 0) return "master";
  if (which == 1) return "exp_avg_sq";
  return optim.config().kind == "sgd" ? "momentum_buffer" : "exp_avg";
}

std::string rank_file(int rank, int world) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "rank_%05d-of-%05d.safetensors", rank, world);
  return buf;
}

std::string model_shard_file(int i, int n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i, n);
  return buf;
}

// The consolidated export under data parallelism: every rank writes the whole parameters it is the writer
// of (dense unit u: rank u % world; experts: the first rank of each expert replica group, i.e. every
// expert once) into its own shard; rank 0 then writes the index over all shards, config and tokenizer.
void write_consolidated_sharded(const fs::path& out, CausalLM& model, const std::string& source_dir,
                                dist::DataParallel& dp, dist::Groups& g) {
  const int rank = g.world->rank(), world = g.world->size();
  fs::create_directories(out);
  std::vector<std::pair<std::string, Tensor>> mine;
  for (int u = 0; u < dp.num_units(); ++u) {
    dp.gather_unit(u);  // collective under fsdp2
    for (Param* p : dp.unit_params(u)) {
      const bool writer = p->expert ? g.ep_replica->rank() == 0 : u % world == rank;
      if (writer) append_hf_tensors(*p, mine);
    }
    dp.release_unit(u);
  }
  io::save_safetensors_file((out / model_shard_file(rank + 1, world)).string(), mine);
  g.world->barrier();
  if (rank != 0) return;
  write_hf_side_files(model, out.string(), source_dir);
  json weight_map = json::object();
  int64_t total_size = 0, total_params = 0;
  for (int r = 0; r < world; ++r) {
    const std::string f = model_shard_file(r + 1, world);
    auto st = io::SafeTensors::open((out / f).string());
    for (auto& n : st.names()) {
      const auto& info = st.info(n);
      weight_map[n] = f;
      total_params += shape_numel(info.shape);
      total_size += shape_numel(info.shape) * static_cast<int64_t>(dtype_size(info.dtype));
    }
  }
  json index = {{"metadata", {{"total_parameters", total_params}, {"total_size", total_size}}}, {"weight_map", weight_map}};
  write_text_atomic(out / "model.safetensors.index.json", index.dump(2) + "\n");
}

// One piece of stored state: elements [begin, end) of a whole parameter, in `tensor` of `file`.
struct StoredPiece {
  int64_t begin = 0, end = 0;
  std::shared_ptr<io::SafeTensors> file;
  std::string tensor;
};
using StoredIndex = std::map<std::string, std::vector<StoredPiece>>;  // "<kind>/<param>" -> pieces

StoredIndex index_state(const fs::path& dir) {
  StoredIndex idx;
  if (fs::is_directory(dir / "state")) {
    std::vector<fs::path> files;
    for (auto& e : fs::directory_iterator(dir / "state"))
      if (e.path().extension() == ".safetensors") files.push_back(e.path());
    for (auto& f : files) {
      auto st = std::make_shared<io::SafeTensors>(io::SafeTensors::open(f.string()));
      for (auto& n : st->names()) {
        const size_t at = n.rfind('@');
        int64_t begin = -1;
        if (at != std::string::npos) {
          const char* b = n.data() + at + 1;
          auto [end, ec] = std::from_chars(b, n.data() + n.size(), begin);
          if (ec != std::errc() || end != n.data() + n.size()) begin = -1;
        }
        if (begin < 0) throw FormatError(f.string() + ": unexpected tensor '" + n + "' (expected <kind>/<parameter>@<first element>)");
        idx[n.substr(0, at)].push_back({begin, begin + shape_numel(st->info(n).shape), st, n});
      }
    }
    return idx;
  }
  // The single-rank layout of earlier versions: whole tensors by name.
  const fs::path master = dir / "model" / "master.safetensors", optim = dir / "optim" / "optimizer.safetensors";
  if (!fs::exists(master)) throw IoError("restore_from: " + dir.string() + " has no state/ (nor model/master.safetensors)");
  auto ms = std::make_shared<io::SafeTensors>(io::SafeTensors::open(master.string()));
  for (auto& n : ms->names()) idx["master/" + n].push_back({0, shape_numel(ms->info(n).shape), ms, n});
  if (fs::exists(optim)) {
    auto os = std::make_shared<io::SafeTensors>(io::SafeTensors::open(optim.string()));
    for (auto& n : os->names()) {
      const size_t dot = n.rfind('.');
      idx[n.substr(dot + 1) + "/" + n.substr(0, dot)].push_back({0, shape_numel(os->info(n).shape), os, n});
    }
  }
  return idx;
}

// Fills host [n] from the stored pieces of `kind` for each of the slot's pieces. Returns false when the
// checkpoint has none of this kind for the slot; throws when it has some but not all.
bool fill_slot(const StoredIndex& idx, const std::string& kind, const dist::StateSlot& slot, Tensor& host,
               const fs::path& dir) {
  int64_t covered = 0, wanted = 0;
  bool any_name = false;
  for (const dist::StatePiece& pc : slot.pieces) {
    wanted += pc.end - pc.begin;
    auto it = idx.find(kind + "/" + pc.param);
    if (it == idx.end()) continue;
    any_name = true;
    for (const StoredPiece& sp : it->second) {
      const int64_t a = std::max(pc.begin, sp.begin), b = std::min(pc.end, sp.end);
      if (a >= b) continue;
      Tensor src = sp.file->get(sp.tensor);
      if (src.dtype() != DType::F32) src = src.to(DType::F32);
      std::copy(src.f32() + (a - sp.begin), src.f32() + (b - sp.begin), host.f32() + pc.at + (a - pc.begin));
      covered += b - a;
    }
  }
  if (!any_name && kind != "master") return false;
  if (covered != wanted) {
    std::string which = slot.pieces.empty() ? slot.opt.key : slot.pieces.front().param;
    throw FormatError(dir.string() + ": the checkpoint's " + kind + " state does not cover tensor '" + which + "' (" +
                      std::to_string(covered) + " of " + std::to_string(wanted) + " elements found)");
  }
  return true;
}

}  // namespace

std::string resolve_latest(const std::string& ckpt_dir) {
  const fs::path latest = fs::path(ckpt_dir) / "LATEST";
  std::error_code ec;
  if (fs::is_symlink(latest, ec)) {
    fs::path target = fs::read_symlink(latest, ec);
    return (target.is_absolute() ? target : fs::path(ckpt_dir) / target).string();
  }
  std::ifstream f(latest);
  if (!f) return "";
  std::string name;
  std::getline(f, name);
  return (fs::path(ckpt_dir) / name).string();
}

std::vector<std::string> prune_checkpoints(const std::string& ckpt_dir, int64_t keep) {
  std::vector<std::string> removed;
  if (keep <= 0 || !fs::is_directory(ckpt_dir)) return removed;
  std::vector<std::pair<int64_t, fs::path>> found;  // (step, folder)
  for (auto& e : fs::directory_iterator(ckpt_dir)) {
    const std::string n = e.path().filename().string();
    long long ep = 0, step = 0;
    char tail = 0;
    if (e.is_directory() && !e.is_symlink() && std::sscanf(n.c_str(), "epoch_%lld_step_%lld%c", &ep, &step, &tail) == 2)
      found.emplace_back(step, e.path());
  }
  std::sort(found.begin(), found.end());
  std::error_code ec;
  const fs::path latest = fs::weakly_canonical(fs::path(ckpt_dir) / "LATEST", ec);
  for (size_t i = 0; i + static_cast<size_t>(keep) < found.size(); ++i) {
    if (!ec && fs::weakly_canonical(found[i].second, ec) == latest) continue;
    fs::remove_all(found[i].second, ec);
    if (!ec) removed.push_back(found[i].second.string());
  }
  return removed;
}

namespace {

// The LoRA run's model/ folder: the adapter (whole, from every rank's share: gathered unit by unit under
// data parallelism, a collective) written by rank 0, and with `consolidated` the merged model.
void write_peft_model(const fs::path& model_dir, CausalLM& model, const PeftCheckpoint& peft, bool consolidated,
                      const std::string& source_dir, dist::DataParallel* dp, int rank) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  if (dp) {
    std::map<std::string, Tensor> host;  // internal layout, by parameter name
    for (int u = 0; u < dp->num_units(); ++u) {
      dp->gather_unit(u);
      if (rank == 0)
        for (Param* p : dp->unit_params(u))
          if (is_adapter_param(*p)) host[p->name] = ExecContext::download(p->value);
      dp->release_unit(u);
    }
    if (rank == 0)
      for (const LoraAdapter* a : model.lora_adapters()) {
        auto [A, B] = lora_file_tensors(*a, host.at(a->A->name), host.at(a->B->name));
        tensors.emplace_back(a->A->name, A);
        tensors.emplace_back(a->B->name, B);
      }
  } else {
    tensors = lora_tensors(model);
  }
  if (rank != 0) return;
  write_lora_adapter(model_dir.string(), *peft.spec, model.lora_adapters(), tensors, peft.base_weights_dir);
  if (!consolidated) return;
  const fs::path cons = model_dir / "consolidated";
  const io::LoraAdapter adapter = io::LoraAdapter::load(model_dir.string());
  if (!peft.base_weights_dir.empty()) {
    // Streamed from the base folder, one tensor at a time, exactly as `automodel merge-lora` (PEFT's
    // merge_and_unload rule, in the base's dtype and layout).
    io::merge_lora(peft.base_weights_dir, adapter, cons.string());
  } else {
    // A random init has no base folder: write the in-memory base first, then merge from it.
    const fs::path base = model_dir / ".base";
    save_hf_model(model, base.string(), source_dir);
    io::merge_lora(base.string(), adapter, cons.string());
    fs::remove_all(base);
  }
  write_hf_side_files(model, cons.string(), source_dir);  // config.json as trained (model.config overrides)
}

}  // namespace

std::string write_checkpoint(const std::string& ckpt_dir, const CheckpointState& st, CausalLM& model,
                             const Optimizer& optim, bool consolidated, const std::string& source_dir,
                             dist::DataParallel* dp, dist::Groups* groups, const PeftCheckpoint& peft) {
  const int rank = groups ? groups->world->rank() : 0, world = groups ? groups->world->size() : 1;
  auto barrier = [&] {
    if (groups) groups->world->barrier();
  };
  const std::string name = "epoch_" + std::to_string(st.epoch) + "_step_" + std::to_string(st.step);
  const fs::path final_dir = fs::path(ckpt_dir) / name;
  const fs::path tmp_dir = fs::path(ckpt_dir) / (".tmp_" + name);
  if (rank == 0) {
    std::error_code ec;
    fs::remove_all(tmp_dir, ec);
    fs::create_directories(tmp_dir / "state");
    fs::create_directories(tmp_dir / "model");
  }
  barrier();
  // This rank's state, as pieces of whole parameters (replicated slots are written by one rank only).
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const dist::StateSlot& slot : local_slots(model, dp)) {
    if (!slot.canonical) continue;
    Tensor bufs[3];
    bufs[0] = ExecContext::download(*slot.opt.value);
    for (int w = 0; w < 2; ++w)
      if (const Tensor* t = optim.state(slot.opt.key, w)) bufs[w + 1] = ExecContext::download(*t);
    for (const dist::StatePiece& pc : slot.pieces)
      for (int w = -1; w < 2; ++w) {
        const Tensor& b = bufs[w + 1];
        if (!b.defined()) continue;
        Tensor flat = b.view({b.numel()}).slice_rows(pc.at, pc.at + (pc.end - pc.begin)).clone();
        tensors.emplace_back(state_kind(optim, w) + "/" + pc.param + "@" + std::to_string(pc.begin), flat);
      }
  }
  io::save_safetensors_file((tmp_dir / "state" / rank_file(rank, world)).string(), tensors);
  if (peft.spec) {
    write_peft_model(tmp_dir / "model", model, peft, consolidated, source_dir, dp, rank);
  } else if (consolidated) {
    const fs::path cons = tmp_dir / "model" / "consolidated";
    if (dp && groups) write_consolidated_sharded(cons, model, source_dir, *dp, *groups);
    else save_hf_model(model, cons.string(), source_dir);
  }
  barrier();
  if (rank == 0) {
    json j = {{"step", st.step},
              {"epoch", st.epoch},
              {"seed", st.seed},
              {"optimizer_steps", st.optimizer_steps},
              {"optimizer", optim.config().kind},
              {"model_type", model.config().model_type},
              {"world_size", st.world_size},
              {"ep_size", st.ep_size},
              {"strategy", st.strategy}};
    if (st.last_grad_norm && std::isfinite(*st.last_grad_norm)) j["grad_norm"] = *st.last_grad_norm;
    write_text_atomic(tmp_dir / "train_state.json", j.dump(2) + "\n");
    // Replace an older checkpoint of the same name only once the new one is complete.
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp_dir, final_dir);
    point_latest(ckpt_dir, name);
  }
  barrier();
  return final_dir.string();
}

CheckpointState read_checkpoint(const std::string& ckpt_dir, const std::string& from, CausalLM& model, Optimizer& optim,
                                dist::DataParallel* dp) {
  fs::path dir;
  if (from == "LATEST" || from == "latest") {
    const std::string d = resolve_latest(ckpt_dir);
    if (d.empty())
      throw IoError("restore_from: LATEST: no " + (fs::path(ckpt_dir) / "LATEST").string() +
                    " (no checkpoint has been written there)");
    dir = d;
  } else {
    dir = from;
  }
  fs::path state = dir / "train_state.json";
  if (!fs::exists(state)) throw IoError("restore_from: " + dir.string() + " is not a complete checkpoint (no train_state.json)");
  // train_state.json names itself in every error: empty (a crash while writing), truncated, not an object,
  // a field missing or of the wrong type.
  const std::string sp = state.string();
  std::string text;
  {
    std::ifstream f(state, std::ios::binary);
    if (!f) throw IoError(sp + ": cannot read");
    text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  if (text.find_first_not_of(" \t\r\n") == std::string::npos)
    throw FormatError(sp + ": empty file (the checkpoint was not completely written)");
  const json j = io::parse_json_bounded(text, sp + ": not valid JSON (truncated?)");
  if (!j.is_object()) throw FormatError(sp + ": expected a JSON object with 'step' and 'epoch'");
  auto int_field = [&](const char* k, std::optional<int64_t> def) -> int64_t {
    if (!j.contains(k)) {
      if (def) return *def;
      throw FormatError(sp + ": missing '" + k + "'");
    }
    const json& v = j[k];
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)))
      throw FormatError(sp + ": '" + k + "' must be an integer, got " + v.dump());
    return v.get<int64_t>();
  };
  CheckpointState st;
  st.step = int_field("step", std::nullopt);
  st.epoch = int_field("epoch", std::nullopt);
  if (st.step < 0 || st.epoch < 0) throw FormatError(sp + ": 'step' and 'epoch' must be >= 0");
  if (j.contains("seed")) {
    const json& v = j["seed"];
    if (!v.is_number_integer()) throw FormatError(sp + ": 'seed' must be an integer, got " + v.dump());
    st.seed = v.get<uint64_t>();  // written as uint64; a negative seed read back wraps as the trainer's cast does
  }
  st.optimizer_steps = int_field("optimizer_steps", st.step);
  const int64_t world = int_field("world_size", 1), ep = int_field("ep_size", 1);
  if (world < 1 || ep < 1 || world > (1 << 24) || ep > world)
    throw FormatError(sp + ": implausible world_size " + std::to_string(world) + " / ep_size " + std::to_string(ep));
  st.world_size = static_cast<int>(world);
  st.ep_size = static_cast<int>(ep);
  if (j.contains("strategy") && !j["strategy"].is_string())
    throw FormatError(sp + ": 'strategy' must be a string, got " + j["strategy"].dump());
  st.strategy = j.value("strategy", std::string("none"));
  if (j.contains("grad_norm")) {
    if (!j["grad_norm"].is_number()) throw FormatError(sp + ": 'grad_norm' must be a number, got " + j["grad_norm"].dump());
    st.last_grad_norm = j["grad_norm"].get<double>();
  }
  const StoredIndex idx = index_state(dir);
  const ExecContext& ex = model.exec();
  for (const dist::StateSlot& slot : local_slots(model, dp)) {
    const int64_t n = slot.opt.value->numel();
    for (int w = -1; w < 2; ++w) {
      Tensor host = Tensor::zeros({n}, DType::F32);
      if (!fill_slot(idx, state_kind(optim, w), slot, host, dir)) continue;
      Tensor dev = ex.upload(host);
      if (w < 0) {
        Tensor dst = slot.opt.value->view({n});
        ops::copy_(dst, dev);
        if (slot.opt.work) {
          Tensor wk = slot.opt.work->view({n});
          ops::copy_(wk, dst);
        }
      } else {
        optim.set_state(slot.opt.key, w, dev.view(slot.opt.value->shape()));
      }
    }
  }
  optim.set_step_count(st.optimizer_steps);
  return st;
}

}  // namespace am
