// The GPU micro-benchmarks linked into am_gpu_microbench. Each lives in its own bench/gpu/*.cu file as
// `int NAME_bench_main(int argc, char** argv)` (argv[0] = its name, the rest its own arguments) and is
// listed once here; the main in bench_cuda_ops.cu dispatches on argv[1] (no argument: the core-op benchmarks).
#pragma once

int attention_bench_main(int argc, char** argv);
int attention_generic_bench_main(int argc, char** argv);  // bench_attention_generic.cu: the CUDA-core path
int attention_sinks_bench_main(int argc, char** argv);  // bench_attention_sinks.cu: gpt_oss sinks, flash vs generic
int moe_bench_main(int argc, char** argv);  // bench_moe.cu: MoE ops at the W2 shape
int gemma2_deepseek_bench_main(int argc, char** argv);  // bench_gemma2_deepseek.cu: softcap, MLA columns, router
int gpt_oss_bench_main(int argc, char** argv);  // bench_gpt_oss.cu: gpt_oss expert kernels (gpt-oss-20b layer)
int mamba2_bench_main(int argc, char** argv);  // bench_mamba2.cu: Nemotron-H conv + selective scan
int fused_proj_bench_main(int argc, char** argv);  // bench_fused_proj.cu: one q|k|v / gate|up GEMM vs separate ones
int lora_bench_main(int argc, char** argv);  // bench_lora.cu: LoRA scale / add in the GEMMs (alpha, beta = 1) at W5
int add_norm_bench_main(int argc, char** argv);  // bench_add_norm.cu: fused residual add + RMSNorm vs separate, W1
int attention_cudnn_bench_main(int argc, char** argv);  // bench_attention_cudnn.cu: cuDNN fused attention vs flash
int gemm_algos_bench_main(int argc, char** argv);  // bench_gemm_algos.cu: cuBLASLt's candidates at W1's GEMMs

struct GpuBench {
  const char* name;
  int (*run)(int argc, char** argv);
};

inline constexpr GpuBench kGpuBenches[] = {
    {"attention", attention_bench_main},
    {"attention_generic", attention_generic_bench_main},
    {"attention_sinks", attention_sinks_bench_main},
    {"moe", moe_bench_main},
    {"gemma2_deepseek", gemma2_deepseek_bench_main},
    {"gpt_oss", gpt_oss_bench_main},
    {"mamba2", mamba2_bench_main},
    {"fused_proj", fused_proj_bench_main},
    {"lora", lora_bench_main},
    {"add_norm", add_norm_bench_main},
    {"attention_cudnn", attention_cudnn_bench_main},
    {"gemm_algos", gemm_algos_bench_main},
};
