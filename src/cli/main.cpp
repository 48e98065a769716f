// automodel CLI entry point: parses the subcommand and maps errors to exit codes (SPEC §1).
#include <cstdio>
int main(int argc, char** argv) {
  std::fprintf(stderr, "automodel: not yet wired\n");
  return 1;
}
