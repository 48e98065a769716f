#include "train/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "models/hf_weights.h"

namespace am {
namespace fs = std::filesystem;
using json = nlohmann::json;

static void write_text_atomic(const fs::path& p, const std::string& text) {
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

std::string write_checkpoint(const std::string& ckpt_dir, const CheckpointState& st, const CausalLM& model,
                             const Optimizer& optim, bool consolidated, const std::string& source_dir) {
  const std::string name = "epoch_" + std::to_string(st.epoch) + "_step_" + std::to_string(st.step);
  const fs::path final_dir = fs::path(ckpt_dir) / name;
  const fs::path tmp_dir = fs::path(ckpt_dir) / (".tmp_" + name);
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  fs::create_directories(tmp_dir / "model");
  fs::create_directories(tmp_dir / "optim");
  auto& ps = const_cast<CausalLM&>(model).params();
  std::vector<std::pair<std::string, Tensor>> master;
  for (auto& p : ps.all()) master.emplace_back(p.name, ExecContext::download(p.value));
  io::save_safetensors_file((tmp_dir / "model" / "master.safetensors").string(), master);
  io::save_safetensors_file((tmp_dir / "optim" / "optimizer.safetensors").string(), optim.state_tensors());
  if (consolidated) save_hf_model(model, (tmp_dir / "model" / "consolidated").string(), source_dir);
  json j = {{"step", st.step}, {"epoch", st.epoch}, {"seed", st.seed}, {"optimizer_steps", st.optimizer_steps},
            {"optimizer", optim.config().kind}, {"model_type", model.config().model_type}};
  write_text_atomic(tmp_dir / "train_state.json", j.dump(2) + "\n");
  // Replace an older checkpoint of the same name only once the new one is complete.
  if (fs::exists(final_dir)) fs::remove_all(final_dir);
  fs::rename(tmp_dir, final_dir);
  write_text_atomic(fs::path(ckpt_dir) / "LATEST", name + "\n");
  return final_dir.string();
}

CheckpointState read_checkpoint(const std::string& ckpt_dir, const std::string& from, CausalLM& model, Optimizer& optim) {
  fs::path dir;
  if (from == "LATEST" || from == "latest") {
    fs::path latest = fs::path(ckpt_dir) / "LATEST";
    std::ifstream f(latest);
    if (!f) throw IoError("restore_from: LATEST: no " + latest.string() + " (no checkpoint has been written there)");
    std::string name;
    std::getline(f, name);
    dir = fs::path(ckpt_dir) / name;
  } else {
    dir = from;
  }
  fs::path state = dir / "train_state.json";
  if (!fs::exists(state)) throw IoError("restore_from: " + dir.string() + " is not a complete checkpoint (no train_state.json)");
  json j;
  try {
    std::ifstream f(state);
    j = json::parse(f);
  } catch (const std::exception& e) {
    throw FormatError(state.string() + ": " + e.what());
  }
  CheckpointState st;
  st.step = j.at("step").get<int64_t>();
  st.epoch = j.at("epoch").get<int64_t>();
  st.seed = j.value("seed", uint64_t(0));
  st.optimizer_steps = j.value("optimizer_steps", st.step);
  auto master = io::SafeTensors::open((dir / "model" / "master.safetensors").string());
  for (auto& p : model.params().all()) {
    if (!master.has(p.name)) throw FormatError(dir.string() + ": checkpoint has no tensor '" + p.name + "'");
    auto t = master.get(p.name);
    if (t.shape() != p.value.shape())
      throw FormatError(dir.string() + ": tensor '" + p.name + "' has shape " + shape_str(t.shape()) + ", model expects " +
                        shape_str(p.value.shape()));
    if (p.value.device() == DeviceType::CPU) {
      p.value.copy_from(t);
    } else {
      Tensor host = t.clone();
      p.value = model.exec().upload(host);
      p.work = model.exec().upload_as(host, model.exec().act_dtype);
    }
  }
  auto opt = io::SafeTensors::open((dir / "optim" / "optimizer.safetensors").string());
  std::map<std::string, Tensor> tensors;
  for (auto& n : opt.names()) tensors[n] = opt.get(n);
  optim.load_state(tensors, st.optimizer_steps, model.exec());
  return st;
}

}  // namespace am
