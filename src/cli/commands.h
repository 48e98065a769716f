// Subcommand entry points; argv[0] is the subcommand name. Each throws am::Error subclasses on failure.
#pragma once

namespace am {
int cmd_finetune(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_dataset(int argc, char** argv);  // automodel dataset (src/cli/cmd_train.cpp)
int cmd_info(int argc, char** argv);
int cmd_tokenize(int argc, char** argv);  // automodel tokenize (src/cli/cmd_tokenize.cpp)
int cmd_chat_template(int argc, char** argv);  // automodel chat-template (src/cli/cmd_chat_template.cpp)
int cmd_merge_lora(int argc, char** argv);  // automodel merge-lora (src/cli/cmd_merge_lora.cpp)
int cmd_generate(int argc, char** argv);  // automodel generate (src/cli/cmd_generate.cpp)
int cmd_plot(int argc, char** argv);  // automodel plot (src/cli/cmd_plot.cpp)
}  // namespace am
