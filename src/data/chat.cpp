// `chat`: JSONL of {"messages": [{"role", "content"}...], "tools"?: [...]}, rendered by the tokenizer
// folder's chat template (as transformers' apply_chat_template(tokenize=False)) and tokenized without
// adding special tokens; loss on assistant turns only.
#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/text_common.h"

namespace am {

std::unique_ptr<Dataset> make_chat(const TextDatasetOptions& o) {
  auto samples = tokenise_cached(o, "chat", "", true, [&] {
    const auto ttp = TextTokenizer::shared(o);
    const TextTokenizer& tt = *ttp;
    if (!tt.tmpl) throw DataError("chat dataset: the tokenizer folder '" + o.tokenizer_dir + "' has no chat template");
    // Rows are streamed; rendering + tokenizing run on every core (the compiled template and the tokenizer
    // are read-only), in file order.
    return map_json_rows(o, [&](const JsonRow& row) {
      const std::string& at = row.at;
      const auto& j = row.value;
      if (!j.is_object() || !j.contains("messages") || !j["messages"].is_array() || j["messages"].empty())
        throw DataError(at + ": expected an object with a non-empty \"messages\" list");
      for (size_t i = 0; i < j["messages"].size(); ++i) {
        const auto& m = j["messages"][i];
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
          throw DataError(at + ": messages[" + std::to_string(i) + "] needs a string \"role\"");
      }
      nlohmann::ordered_json extra = nlohmann::ordered_json::object();
      if (j.contains("tools") && !j["tools"].is_null()) {
        if (!j["tools"].is_array()) throw DataError(at + ": \"tools\" must be a list");
        extra["tools"] = j["tools"];
      }
      return encode_chat(tt, j["messages"], extra, at);
    });
  });
  return finish_text_dataset("chat(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
