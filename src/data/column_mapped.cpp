// `column_mapped`: JSON list or JSONL rows whose columns are mapped by `column_mapping: {context, question,
// answer}` (dest -> source column), as AutoModel's ColumnMappedTextInstructionDataset: with a chat template,
// [system: context or "", user: question or "", assistant: answer]; without, prompt = the present of
// (context, question, "") joined by " ", then answer + eos. `answer_only_loss_mask` (default true) limits
// the loss to the answer.
#include "core/error.h"
#include "data/datasets_impl.h"
#include "data/text_common.h"

namespace am {

std::unique_ptr<Dataset> make_column_mapped(const TextDatasetOptions& o, const std::map<std::string, std::string>& mapping,
                                            bool answer_only) {
  std::string params = std::string("answer_only_loss_mask=") + (answer_only ? "true" : "false") + "; column_mapping:";
  for (const auto& [dest, src] : mapping) params += " " + dest + "=" + nlohmann::json(src).dump();
  auto samples = tokenise_cached(o, "column_mapped", params, true, [&] {
    const auto ttp = TextTokenizer::shared(o);
    const TextTokenizer& tt = *ttp;
    auto col = [&](const nlohmann::ordered_json& row, const char* dest, const std::string& at) -> std::optional<std::string> {
      auto it = mapping.find(dest);
      if (it == mapping.end() || !row.contains(it->second) || row[it->second].is_null()) return std::nullopt;
      const auto& v = row[it->second];
      if (!v.is_string()) throw DataError(at + ": column \"" + it->second + "\" must be a string");
      return v.get<std::string>();
    };
    return map_json_rows(o, [&](const JsonRow& r) -> Sample {
      const std::string& at = r.at;
      const auto& row = r.value;
      if (!row.is_object()) throw DataError(at + ": expected a JSON object");
      auto context = col(row, "context", at), question = col(row, "question", at), answer = col(row, "answer", at);
      if (!answer) throw DataError(at + ": missing answer column \"" + mapping.at("answer") + "\"");
      if (tt.tmpl) {
        nlohmann::ordered_json msgs = nlohmann::ordered_json::array();
        msgs.push_back({{"role", "system"}, {"content", context.value_or("")}});
        msgs.push_back({{"role", "user"}, {"content", question.value_or("")}});
        msgs.push_back({{"role", "assistant"}, {"content", *answer}});
        Sample s = encode_chat(tt, msgs, nlohmann::ordered_json::object(), at, !answer_only);
        append_eos_if_missing(tt, s);
        return s;
      } else {
        std::string prompt;
        bool first = true;
        for (const std::optional<std::string>& part : {context, question, std::optional<std::string>("")}) {
          if (!part) continue;
          prompt += (first ? "" : " ") + *part;
          first = false;
        }
        return encode_prompt_completion(tt, prompt, *answer, answer_only);
      }
    });
  });
  return finish_text_dataset("column_mapped(" + o.path + ")", std::move(samples), o);
}

}  // namespace am
