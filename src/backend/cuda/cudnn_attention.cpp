// cuDNN fused attention through the backend graph API: see cudnn_attention.h for the contract.
//
// The graphs are the pattern cuDNN's fused-attention runtime engines match (cuDNN developer guide, "Graph API",
// the flash fused attention fprop / bprop patterns), written out op by op:
//
//   forward                                       backward
//   S  = matmul(Q, K^T)            [B,nh,T,T]      Dsum = rowsum(dO * O) * 1         [B,nh,T,1] (workspace)
//   S *= scale (by-value scalar)                   S = matmul(Q, K^T) * scale - stats
//   S  = select(row >= col, S, -inf)               S = select(row >= col, S, -inf)   (+ window as forward)
//   (window: S = select(col + W > row, S, -inf))   P = exp(S)
//   M  = rowmax(S); E = exp(S - M)                 dV = matmul(P^T, dO)   (GQA: [B,nh,...] summed to nkv)
//   L  = rowsum(E); stats = M + log(L)             dP = matmul(dO, V^T)
//   P  = E / L (bf16)                              dS = P * (dP - Dsum) * scale
//   O  = matmul(P, V)                              dK = matmul(dS^T, Q)   (GQA: summed as dV)
//                                                  dQ = identity(matmul(dS, K) -> fp32 accumulator)
//
// Every step that can fail records the first failure (the call, cuDNN's status and cudnnGetLastErrorString);
// a failed build is cached too, so a shape that cuDNN rejects costs one attempt per process.
#include "backend/cuda/cudnn_attention.h"

#include <cuda_runtime.h>
#include <cudnn_graph.h>
#include <dlfcn.h>

#include <array>
#include <chrono>
#include <cmath>
#include <compare>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "core/log.h"

namespace am::cuda {
namespace {

// ---------------- the library, loaded at run time ----------------

struct Api {
  void* lib = nullptr;
  size_t version = 0;
  std::string why;  // why it is not usable ("" when it is)
  decltype(&cudnnGetVersion) GetVersion = nullptr;
  decltype(&cudnnGetErrorString) GetErrorString = nullptr;
  decltype(&cudnnGetLastErrorString) GetLastErrorString = nullptr;
  decltype(&cudnnCreate) Create = nullptr;
  decltype(&cudnnSetStream) SetStream = nullptr;
  decltype(&cudnnBackendCreateDescriptor) CreateDescriptor = nullptr;
  decltype(&cudnnBackendDestroyDescriptor) DestroyDescriptor = nullptr;
  decltype(&cudnnBackendSetAttribute) SetAttribute = nullptr;
  decltype(&cudnnBackendGetAttribute) GetAttribute = nullptr;
  decltype(&cudnnBackendFinalize) Finalize = nullptr;
  decltype(&cudnnBackendExecute) Execute = nullptr;
};

template <typename F>
bool load_sym(void* lib, const char* name, F* f, std::string* why) {
  *f = reinterpret_cast<F>(dlsym(lib, name));
  if (!*f && why->empty()) *why = std::string("libcudnn has no symbol ") + name;
  return *f != nullptr;
}

const Api& api() {
  static Api* a = [] {
    auto* r = new Api;  // never destroyed: descriptors may be released after static destructors ran
    for (const char* name : {"libcudnn.so.9", "libcudnn.so"}) {
      r->lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (r->lib) break;
    }
    if (!r->lib) {
      const char* e = dlerror();
      r->why = std::string("cannot load libcudnn.so.9 (") + (e ? e : "not found") +
               "); on the device source tools/device_env.sh";
      return r;
    }
    std::string why;
    load_sym(r->lib, "cudnnGetVersion", &r->GetVersion, &why);
    load_sym(r->lib, "cudnnGetErrorString", &r->GetErrorString, &why);
    load_sym(r->lib, "cudnnGetLastErrorString", &r->GetLastErrorString, &why);
    load_sym(r->lib, "cudnnCreate", &r->Create, &why);
    load_sym(r->lib, "cudnnSetStream", &r->SetStream, &why);
    load_sym(r->lib, "cudnnBackendCreateDescriptor", &r->CreateDescriptor, &why);
    load_sym(r->lib, "cudnnBackendDestroyDescriptor", &r->DestroyDescriptor, &why);
    load_sym(r->lib, "cudnnBackendSetAttribute", &r->SetAttribute, &why);
    load_sym(r->lib, "cudnnBackendGetAttribute", &r->GetAttribute, &why);
    load_sym(r->lib, "cudnnBackendFinalize", &r->Finalize, &why);
    load_sym(r->lib, "cudnnBackendExecute", &r->Execute, &why);
    if (!why.empty()) {
      r->why = why;
      return r;
    }
    r->version = r->GetVersion();
    if (r->version < 90000 || r->version >= 100000)
      r->why = "libcudnn version " + std::to_string(r->version) + " is not 9.x";
    return r;
  }();
  return *a;
}

std::string status_str(cudnnStatus_t s) {
  const Api& a = api();
  std::string r = std::to_string(static_cast<int>(s));
  if (a.GetErrorString) r += std::string(" ") + a.GetErrorString(s);
  if (a.GetLastErrorString) {
    char buf[512] = {0};
    a.GetLastErrorString(buf, sizeof buf);
    if (buf[0]) r += std::string(" (") + buf + ")";
  }
  return r;
}

// ---------------- small wrappers ----------------

// Owns one backend descriptor.
struct Desc {
  cudnnBackendDescriptor_t d = nullptr;
  Desc() = default;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  ~Desc() {
    if (d) api().DestroyDescriptor(d);
  }
};

using Dims = std::array<int64_t, 4>;

// Fixed unique ids of the tensors the caller provides (virtual tensors get ids from kFirstVirtual up).
enum Uid : int64_t {
  kQ = 1,
  kK,          // as K^T [B, nkv, D, T]
  kV,          // forward: [B, nkv, T, D]; backward: as V^T [B, nkv, D, T]
  kO,
  kStats,      // lse [B, nh, T, 1] fp32
  kScale,      // by value
  kWindow,     // by value (fp32), sliding window only
  kNegInf,     // by value
  kDO,
  kDQ,
  kDK,
  kDV,
  kDsum,       // backward: rowsum(dO * O), workspace
  kDQAccum,    // backward: fp32 dQ accumulator, workspace
  kOne,        // by value 1.0
  kFirstVirtual = 100,
};

// Builds one operation graph and its execution plan; keeps every descriptor alive (the plan refers to them).
class Builder {
 public:
  explicit Builder(const Api& a) : a_(a) {}

  bool ok() const { return err_.empty(); }
  const std::string& error() const { return err_; }
  std::vector<std::unique_ptr<Desc>>& owned() { return owned_; }

  cudnnBackendDescriptor_t create(cudnnBackendDescriptorType_t type, const char* what) {
    if (!ok()) return nullptr;
    auto d = std::make_unique<Desc>();
    const cudnnStatus_t s = a_.CreateDescriptor(type, &d->d);
    if (s != CUDNN_STATUS_SUCCESS) {
      fail(std::string("create ") + what, s);
      return nullptr;
    }
    owned_.push_back(std::move(d));
    return owned_.back()->d;
  }
  void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
           int64_t count, const void* value, const char* what) {
    if (!ok()) return;
    const cudnnStatus_t s = a_.SetAttribute(d, name, type, count, value);
    if (s != CUDNN_STATUS_SUCCESS) fail(std::string(what) + ": attribute " + std::to_string(name), s);
  }
  void finalize(cudnnBackendDescriptor_t d, const char* what) {
    if (!ok()) return;
    const cudnnStatus_t s = a_.Finalize(d);
    if (s != CUDNN_STATUS_SUCCESS) fail(std::string("finalize ") + what, s);
  }
  void fail(const std::string& what, cudnnStatus_t s) {
    if (err_.empty()) err_ = what + " failed: " + status_str(s);
  }

  // A tensor: uid 0 means a new virtual one.
  cudnnBackendDescriptor_t tensor(cudnnDataType_t dt, const Dims& dims, const Dims& strides, int64_t uid = 0,
                                  bool by_value = false) {
    const bool is_virtual = uid == 0;
    if (is_virtual) uid = next_uid_++;
    cudnnBackendDescriptor_t t = create(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "tensor");
    const int64_t align = 16;
    set(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, "tensor uid");
    set(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &dt, "tensor data type");
    set(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data(), "tensor dims");
    set(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data(), "tensor strides");
    set(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &align, "tensor alignment");
    set(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual, "tensor virtual");
    if (by_value) set(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value, "tensor by value");
    finalize(t, "tensor");
    return t;
  }
  // An fp32 scalar passed by value at execution (its pointer in the variant pack is a host pointer).
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor(CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, uid, true);
  }

  // y = op(x[, b[, t]]). GEN_INDEX takes `axis`.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t prec, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                 int64_t axis = -1) {
    cudnnBackendDescriptor_t pw = create(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "pointwise");
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode, "pointwise mode");
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec, "pointwise precision");
    if (mode == CUDNN_POINTWISE_GEN_INDEX)
      set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, 1, &axis, "pointwise axis");
    finalize(pw, "pointwise");
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "pointwise op");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &pw, "pointwise op");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, "pointwise x");
    if (b) set(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b, "pointwise b");
    if (t) set(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &t, "pointwise t");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, "pointwise y");
    const float one = 1.f;
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha1");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one, "pointwise alpha2");
    finalize(op, "pointwise op");
    add(op);
  }
  // c = a @ b over the last two dims (batch dims broadcast: GQA's nh vs nkv).
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    cudnnBackendDescriptor_t mm = create(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "matmul");
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32, "matmul compute type");
    finalize(mm, "matmul");
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "matmul op");
    set(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &a, "matmul a");
    set(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &b, "matmul b");
    set(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &c, "matmul c");
    set(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &mm, "matmul desc");
    finalize(op, "matmul op");
    add(op);
  }
  // y = reduce(x) over the dims where y has extent 1 (or, for the GQA sums, nh -> nkv).
  void reduction(cudnnReduceTensorOp_t mode, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t r = create(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "reduction");
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    set(r, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32, "reduction compute type");
    set(r, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode, "reduction operator");
    finalize(r, "reduction");
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "reduction op");
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &r, "reduction desc");
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, "reduction x");
    set(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, "reduction y");
    finalize(op, "reduction op");
    add(op);
  }
  // y = x seen with other dims / strides (the transposes of P, dS and K^T).
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    cudnnBackendDescriptor_t op = create(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "reshape op");
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x, "reshape x");
    set(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y, "reshape y");
    finalize(op, "reshape op");
    add(op);
  }

  // Operation graph -> heuristics (mode A, then fallback) -> the first engine config whose plan finalises.
  // Returns the plan (owned here) and its workspace size.
  cudnnBackendDescriptor_t build_plan(cudnnHandle_t handle, int64_t* workspace) {
    if (!ok()) return nullptr;
    cudnnBackendDescriptor_t graph = create(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "operation graph");
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops_.size()),
        ops_.data(), "operation graph ops");
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle, "operation graph handle");
    finalize(graph, "operation graph");
    if (!ok()) return nullptr;
    std::string tried;
    for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
      cudnnBackendDescriptor_t heur = create(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "engine heuristics");
      set(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph, "heuristics graph");
      set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode");
      finalize(heur, "engine heuristics");
      if (!ok()) return nullptr;
      int64_t count = 0;
      cudnnStatus_t s = a_.GetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                        &count, nullptr);
      if (s != CUDNN_STATUS_SUCCESS) {
        tried += " heuristics count: " + status_str(s) + ";";
        continue;
      }
      if (count <= 0) {
        tried += std::string(" heuristics ") + (mode == CUDNN_HEUR_MODE_A ? "A" : "fallback") + ": no engine;";
        continue;
      }
      std::vector<cudnnBackendDescriptor_t> cfgs(static_cast<size_t>(count));
      for (auto& c : cfgs) c = create(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "engine config");
      if (!ok()) return nullptr;
      int64_t got = 0;
      s = a_.GetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                          cfgs.data());
      if (s != CUDNN_STATUS_SUCCESS) {
        tried += " heuristics results: " + status_str(s) + ";";
        continue;
      }
      for (int64_t i = 0; i < got; ++i) {
        cudnnBackendDescriptor_t plan = create(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "execution plan");
        if (!ok()) return nullptr;
        // The plan's handle is deprecated in cuDNN 9 (needed by some 9.x releases, ignored by later ones).
        a_.SetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
        s = a_.SetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                            &cfgs[static_cast<size_t>(i)]);
        if (s == CUDNN_STATUS_SUCCESS) s = a_.Finalize(plan);
        if (s != CUDNN_STATUS_SUCCESS) {
          if (tried.size() < 600) tried += " engine config " + std::to_string(i) + ": " + status_str(s) + ";";
          continue;
        }
        int64_t ws = 0, n = 0;
        s = a_.GetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n, &ws);
        if (s != CUDNN_STATUS_SUCCESS) {
          tried += " workspace size: " + status_str(s) + ";";
          continue;
        }
        *workspace = ws;
        return plan;
      }
    }
    if (err_.empty()) err_ = "no execution plan finalised for the graph (" + std::to_string(ops_.size()) + " ops):" + tried;
    return nullptr;
  }

 private:
  void add(cudnnBackendDescriptor_t op) {
    if (ok() && op) ops_.push_back(op);
  }
  const Api& a_;
  std::string err_;
  int64_t next_uid_ = kFirstVirtual;
  std::vector<std::unique_ptr<Desc>> owned_;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

// ---------------- the two graphs ----------------

struct Shape4 {
  int64_t B, T, H, HK, D, window;
};

// Layout helpers: [B, T, heads, D] rows seen as [B, heads, T, D] (and transposed).
Dims bhsd_strides(const Shape4& s, int64_t heads) { return {s.T * heads * s.D, s.D, heads * s.D, 1}; }
Dims bhds_strides(const Shape4& s, int64_t heads) { return {s.T * heads * s.D, s.D, 1, heads * s.D}; }

// The mask on scores `x` [B, H, T, T]: causal (key <= query), then the sliding window (query - key < W).
// Returns the masked scores. Mirrors the diagonal-band mask cuDNN's fused engines expect: indices from
// GEN_INDEX (int32), a comparison to a boolean, and BINARY_SELECT(x, -inf, keep).
cudnnBackendDescriptor_t apply_mask(Builder& g, const Shape4& s, cudnnBackendDescriptor_t x,
                                    cudnnBackendDescriptor_t neg_inf, cudnnBackendDescriptor_t window) {
  const Dims sd{s.B, s.H, s.T, s.T}, ss{s.H * s.T * s.T, s.T * s.T, s.T, 1};
  {  // right bound: row >= col
    auto row = g.tensor(CUDNN_DATA_INT32, sd, ss), col = g.tensor(CUDNN_DATA_INT32, sd, ss);
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, row, 2);
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, col, 3);
    auto keep = g.tensor(CUDNN_DATA_BOOLEAN, sd, ss);
    g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, nullptr, keep);
    auto y = g.tensor(CUDNN_DATA_FLOAT, sd, ss);
    g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, neg_inf, keep, y);
    x = y;
  }
  if (window) {  // left bound: col + W > row
    auto row = g.tensor(CUDNN_DATA_INT32, sd, ss), col = g.tensor(CUDNN_DATA_INT32, sd, ss);
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, row, 2);
    g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, col, 3);
    auto colw = g.tensor(CUDNN_DATA_FLOAT, sd, ss);
    g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, col, window, nullptr, colw);
    auto keep = g.tensor(CUDNN_DATA_BOOLEAN, sd, ss);
    g.pointwise(CUDNN_POINTWISE_CMP_GT, CUDNN_DATA_BOOLEAN, colw, row, nullptr, keep);
    auto y = g.tensor(CUDNN_DATA_FLOAT, sd, ss);
    g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, neg_inf, keep, y);
    x = y;
  }
  return x;
}

void build_forward(Builder& g, const Shape4& s) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  auto q = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kQ);
  auto kt = g.tensor(bf16, {s.B, s.HK, s.D, s.T}, bhds_strides(s, s.HK), kK);
  auto v = g.tensor(bf16, {s.B, s.HK, s.T, s.D}, bhsd_strides(s, s.HK), kV);
  auto o = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kO);
  const Dims rd{s.B, s.H, s.T, 1}, rs{s.H * s.T, s.T, 1, 1};
  auto stats = g.tensor(f32, rd, rs, kStats);
  auto scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf);
  auto window = s.window > 0 ? g.scalar(kWindow) : nullptr;

  const Dims sd{s.B, s.H, s.T, s.T}, ss{s.H * s.T * s.T, s.T * s.T, s.T, 1};
  auto s1 = g.tensor(f32, sd, ss);
  g.matmul(q, kt, s1);
  auto s2 = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, s1, scale, nullptr, s2);
  auto sm = apply_mask(g, s, s2, neg_inf, window);
  // softmax with stats = max + log(sum exp(x - max))
  auto mx = g.tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, sm, mx);
  auto sub = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, sm, mx, nullptr, sub);
  auto e = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, f32, sub, nullptr, nullptr, e);
  auto sum = g.tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, e, sum);
  auto lg = g.tensor(f32, rd, rs);
  g.pointwise(CUDNN_POINTWISE_LOG, f32, sum, nullptr, nullptr, lg);
  g.pointwise(CUDNN_POINTWISE_ADD, f32, mx, lg, nullptr, stats);
  auto p = g.tensor(bf16, sd, ss);  // the second matmul takes P in the i/o type
  g.pointwise(CUDNN_POINTWISE_DIV, f32, e, sum, nullptr, p);
  g.matmul(p, v, o);
}

void build_backward(Builder& g, const Shape4& s) {
  const cudnnDataType_t bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  const bool gqa = s.H != s.HK;
  auto q = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kQ);
  auto kt = g.tensor(bf16, {s.B, s.HK, s.D, s.T}, bhds_strides(s, s.HK), kK);
  auto vt = g.tensor(bf16, {s.B, s.HK, s.D, s.T}, bhds_strides(s, s.HK), kV);
  auto o = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kO);
  auto dout = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kDO);
  auto dq = g.tensor(bf16, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H), kDQ);
  auto dk = g.tensor(bf16, {s.B, s.HK, s.T, s.D}, bhsd_strides(s, s.HK), kDK);
  auto dv = g.tensor(bf16, {s.B, s.HK, s.T, s.D}, bhsd_strides(s, s.HK), kDV);
  const Dims rd{s.B, s.H, s.T, 1}, rs{s.H * s.T, s.T, 1, 1};
  auto stats = g.tensor(f32, rd, rs, kStats);
  auto dsum = g.tensor(f32, rd, rs, kDsum);
  auto dq_acc = g.tensor(f32, {s.B, s.H, s.T, s.D}, {s.H * s.T * s.D, s.T * s.D, s.D, 1}, kDQAccum);
  auto scale = g.scalar(kScale), neg_inf = g.scalar(kNegInf), one = g.scalar(kOne);
  auto window = s.window > 0 ? g.scalar(kWindow) : nullptr;

  // Dsum = rowsum(dO * O)
  auto doo = g.tensor(f32, {s.B, s.H, s.T, s.D}, bhsd_strides(s, s.H));
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dout, o, nullptr, doo);
  auto dsum_v = g.tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, doo, dsum_v);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dsum_v, one, nullptr, dsum);

  // P = exp(mask(scale * Q K^T - stats))
  const Dims sd{s.B, s.H, s.T, s.T}, ss{s.H * s.T * s.T, s.T * s.T, s.T, 1};
  const Dims st_strides{s.H * s.T * s.T, s.T * s.T, 1, s.T};  // [B, H, T_kv, T_q] view of a [.., T_q, T_kv] tile
  auto s1 = g.tensor(f32, sd, ss);
  g.matmul(q, kt, s1);
  auto s2 = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, s1, scale, nullptr, s2);
  auto s3 = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, s2, stats, nullptr, s3);
  auto sm = apply_mask(g, s, s3, neg_inf, window);
  auto p = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, f32, sm, nullptr, nullptr, p);

  // dV = P^T dO (summed over each GQA group)
  auto pt = g.tensor(bf16, sd, st_strides);
  g.reshape(p, pt);
  const Dims full{s.B, s.H, s.T, s.D}, full_s{s.H * s.T * s.D, s.T * s.D, s.D, 1};
  if (!gqa) {
    g.matmul(pt, dout, dv);
  } else {
    auto dv_full = g.tensor(bf16, full, full_s);
    g.matmul(pt, dout, dv_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dv_full, dv);
  }

  // dS = P * (dO V^T - Dsum) * scale
  auto dp = g.tensor(f32, sd, ss);
  g.matmul(dout, vt, dp);
  auto dp2 = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, dp, dsum, nullptr, dp2);
  auto dp3 = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dp2, p, nullptr, dp3);
  auto ds = g.tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dp3, scale, nullptr, ds);

  // dK = dS^T Q (summed over each GQA group)
  auto dst = g.tensor(bf16, sd, st_strides);
  g.reshape(ds, dst);
  if (!gqa) {
    g.matmul(dst, q, dk);
  } else {
    auto dk_full = g.tensor(bf16, full, full_s);
    g.matmul(dst, q, dk_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dk_full, dk);
  }

  // dQ = dS K, through the fp32 accumulator
  auto k = g.tensor(bf16, {s.B, s.HK, s.T, s.D}, bhsd_strides(s, s.HK));
  g.reshape(kt, k);
  g.matmul(ds, k, dq_acc);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, f32, dq_acc, nullptr, nullptr, dq);
}

// ---------------- plans and handles ----------------

struct Key {
  int device;
  bool backward;
  int64_t B, T, H, HK, D, window;
  auto operator<=>(const Key&) const = default;
};

struct Plan {
  std::vector<std::unique_ptr<Desc>> keep;
  cudnnBackendDescriptor_t plan = nullptr;
  size_t engine_ws = 0;   // cuDNN's own workspace (rounded up to 256 bytes)
  size_t dq_acc_off = 0;  // backward: fp32 dQ accumulator, then the Dsum rows
  size_t dsum_off = 0;
  size_t total_ws = 0;
  std::string error;  // non-empty: the build failed
};

constexpr size_t align256(size_t x) { return (x + 255) / 256 * 256; }

struct State {
  std::mutex mu;
  std::map<Key, std::unique_ptr<Plan>> plans;
  int64_t built = 0;    // plans built (or attempted) in this process
  double build_s = 0;   // host seconds spent building them (NVRTC compiles included)
  std::map<std::pair<int, uintptr_t>, cudnnHandle_t> handles;  // (device, stream)
  std::string last_error;
  bool logged = false;
};
State& state() {
  static State* s = new State;  // never destroyed (see api())
  return *s;
}

// Caller holds state().mu.
cudnnHandle_t handle_locked(State& st, int device, cudaStream_t stream, std::string* err) {
  const std::pair<int, uintptr_t> key{device, reinterpret_cast<uintptr_t>(stream)};
  auto it = st.handles.find(key);
  if (it != st.handles.end()) return it->second;
  const Api& a = api();
  cudnnHandle_t h = nullptr;
  cudnnStatus_t s = a.Create(&h);
  if (s == CUDNN_STATUS_SUCCESS) s = a.SetStream(h, stream);
  if (s != CUDNN_STATUS_SUCCESS) {
    *err = "cudnnCreate / cudnnSetStream failed: " + status_str(s);
    return nullptr;
  }
  st.handles[key] = h;
  return h;
}

// A handle to build plans with: any handle already made for the device (plans are not tied to a stream),
// else a new one for (device, stream).
cudnnHandle_t build_handle_locked(State& st, int device, cudaStream_t stream, std::string* err) {
  for (const auto& [k, h] : st.handles)
    if (k.first == device) return h;
  return handle_locked(st, device, stream, err);
}

void record_failure_locked(State& st, const std::string& msg) {
  st.last_error = msg;
  if (!st.logged) {
    st.logged = true;
    log::warn("cuDNN attention unavailable for a shape, using the built-in kernels: " + msg);
  }
}

Key make_key(const AttnParams& p, bool backward) {
  int device = 0;
  cudaGetDevice(&device);
  return Key{device, backward, p.batch, p.seq, p.n_heads, p.n_kv_heads, p.head_dim,
             p.sliding_window > 0 ? p.sliding_window : 0};
}

// Finds or builds the plan; nullptr (failure recorded) when it cannot be built. Caller holds state().mu.
const Plan* plan_locked(State& st, const Key& key, cudaStream_t stream) {
  auto it = st.plans.find(key);
  if (it != st.plans.end()) return it->second->error.empty() ? it->second.get() : nullptr;
  const auto t0 = std::chrono::steady_clock::now();
  struct Timed {  // counts the build, whichever way it ends
    State& st;
    std::chrono::steady_clock::time_point t0;
    ~Timed() {
      ++st.built;
      st.build_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  } timed{st, t0};
  auto plan = std::make_unique<Plan>();
  const Api& a = api();
  std::string herr;
  cudnnHandle_t h = build_handle_locked(st, key.device, stream, &herr);
  const std::string tag = std::string(key.backward ? "backward" : "forward") + " B" + std::to_string(key.B) + " T" +
                          std::to_string(key.T) + " nh" + std::to_string(key.H) + " nkv" + std::to_string(key.HK) +
                          " D" + std::to_string(key.D) + (key.window ? " window " + std::to_string(key.window) : "");
  if (!h) {
    plan->error = herr;
  } else {
    Builder g(a);
    const Shape4 s{key.B, key.T, key.H, key.HK, key.D, key.window};
    if (key.backward) build_backward(g, s);
    else build_forward(g, s);
    int64_t ws = 0;
    plan->plan = g.build_plan(h, &ws);
    if (!plan->plan) {
      plan->error = g.error();
    } else {
      plan->keep = std::move(g.owned());
      plan->engine_ws = align256(static_cast<size_t>(ws));
      plan->total_ws = plan->engine_ws;
      if (key.backward) {
        plan->dq_acc_off = plan->total_ws;
        plan->total_ws += align256(static_cast<size_t>(key.B * key.H * key.T * key.D) * sizeof(float));
        plan->dsum_off = plan->total_ws;
        plan->total_ws += align256(static_cast<size_t>(key.B * key.H * key.T) * sizeof(float));
      }
    }
  }
  if (!plan->error.empty()) {
    plan->error = tag + ": " + plan->error;
    record_failure_locked(st, plan->error);
  }
  Plan* r = plan->error.empty() ? plan.get() : nullptr;
  st.plans[key] = std::move(plan);
  return r;
}

bool workspace_for(const AttnParams& p, bool backward, size_t* bytes, cudaStream_t stream) {
  if (!cudnn_attention_supports(p, DType::BF16)) return false;
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  const Plan* plan = plan_locked(st, make_key(p, backward), stream);
  if (!plan) return false;
  if (bytes) *bytes = plan->total_ws;
  return true;
}

// ---------------- argument checks ----------------

void need(bool ok, const char* op, const std::string& what) {
  if (!ok) throw DeviceError(std::string(op) + ": " + what);
}

void check_t(const char* op, const char* name, const Tensor& t, DType dt, int64_t numel) {
  need(t.defined(), op, std::string(name) + " is not defined");
  need(t.device() == DeviceType::CUDA, op, std::string(name) + " must be on the CUDA device");
  need(t.dtype() == dt, op, std::string(name) + (dt == DType::BF16 ? " must be bf16" : " must be fp32"));
  need(t.numel() == numel, op,
       std::string(name) + " has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(numel));
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Runs `plan` with the variant pack (uids[i] -> ptrs[i]); takes the workspace from cudaMallocAsync when none is
// given. false (failure recorded) when cuDNN refuses.
bool execute(const Plan& plan, cudaStream_t stream, const std::vector<int64_t>& uids, std::vector<void*> ptrs,
             void* workspace, size_t workspace_bytes, bool zero_dq_acc, const char* op) {
  const Api& a = api();
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  int device = 0;
  cudaGetDevice(&device);
  std::string herr;
  cudnnHandle_t h = handle_locked(st, device, stream, &herr);
  if (!h) {
    record_failure_locked(st, std::string(op) + ": " + herr);
    return false;
  }
  void* ws = workspace;
  bool owned = false;
  if (plan.total_ws > 0) {
    if (!ws) {
      const cudaError_t e = cudaMallocAsync(&ws, plan.total_ws, stream);
      if (e != cudaSuccess) {
        cudaGetLastError();
        throw DeviceError(std::string(op) + ": cudaMallocAsync of " + std::to_string(plan.total_ws) +
                          " bytes failed: " + cudaGetErrorString(e));
      }
      owned = true;
    } else {
      need(workspace_bytes >= plan.total_ws, op,
           "workspace of " + std::to_string(workspace_bytes) + " bytes, the plan needs " +
               std::to_string(plan.total_ws));
      need(aligned16(ws), op, "workspace must be 16-byte aligned");
    }
  }
  char* base = static_cast<char*>(ws);
  // The backward's accumulator and Dsum live after the engine's own workspace.
  for (size_t i = 0; i < uids.size(); ++i) {
    if (uids[i] == kDQAccum) ptrs[i] = base + plan.dq_acc_off;
    if (uids[i] == kDsum) ptrs[i] = base + plan.dsum_off;
  }
  bool ok = true;
  // cuDNN before 9.6 expects the dQ accumulator zeroed by the caller (later releases clear it themselves).
  if (zero_dq_acc && a.version < 90600) {
    const size_t n = plan.dsum_off - plan.dq_acc_off;
    if (cudaMemsetAsync(base + plan.dq_acc_off, 0, n, stream) != cudaSuccess) {
      cudaGetLastError();
      ok = false;
      record_failure_locked(st, std::string(op) + ": cudaMemsetAsync of the dQ accumulator failed");
    }
  }
  if (ok) {
    Desc pack;
    cudnnStatus_t s = a.CreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack.d);
    const int64_t n = static_cast<int64_t>(uids.size());
    void* engine_ws = plan.engine_ws ? ws : nullptr;
    if (s == CUDNN_STATUS_SUCCESS)
      s = a.SetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, n, uids.data());
    if (s == CUDNN_STATUS_SUCCESS)
      s = a.SetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, n, ptrs.data());
    if (s == CUDNN_STATUS_SUCCESS)
      s = a.SetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &engine_ws);
    if (s == CUDNN_STATUS_SUCCESS) s = a.Finalize(pack.d);
    if (s == CUDNN_STATUS_SUCCESS) s = a.Execute(h, plan.plan, pack.d);
    if (s != CUDNN_STATUS_SUCCESS) {
      ok = false;
      record_failure_locked(st, std::string(op) + ": cudnnBackendExecute failed: " + status_str(s));
    }
  }
  if (owned) cudaFreeAsync(ws, stream);
  return ok;
}

float neg_inf_value() {
  // cuDNN before 9.10 wants the lowest finite float as the mask value (as the cuDNN frontend does).
  return api().version >= 91000 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::lowest();
}

}  // namespace

// ---------------- public entry points ----------------

bool cudnn_attention_available(std::string* why) {
  const Api& a = api();
  if (!a.why.empty()) {
    if (why) *why = a.why;
    return false;
  }
  return true;
}

size_t cudnn_attention_runtime_version() { return api().why.empty() ? api().version : 0; }

CudnnPlanStats cudnn_attention_plan_stats() {
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  return {st.built, st.build_s};
}

std::string cudnn_attention_last_error() {
  State& st = state();
  std::lock_guard<std::mutex> lk(st.mu);
  return st.last_error;
}

bool cudnn_attention_supports(const AttnParams& p, DType dtype, std::string* why) {
  auto no = [&](const char* w) {
    if (why) *why = w;
    return false;
  };
  if (dtype != DType::BF16) return no("cuDNN attention takes bf16 only");
  if (p.head_dim != 64 && p.head_dim != 128) return no("cuDNN attention takes head dims 64 and 128 only");
  if (p.dv() != p.head_dim) return no("cuDNN attention needs the v head dim equal to head_dim");
  if (p.softcap > 0.f) return no("cuDNN attention does not take soft-capping");
  if (p.sinks) return no("cuDNN attention does not take sinks");
  if (p.segment_ids) return no("cuDNN attention does not take segment ids");
  if (p.sliding_window < 0) return no("negative sliding window");
  if (p.batch <= 0 || p.seq <= 0 || p.n_heads <= 0 || p.n_kv_heads <= 0 || p.n_heads % p.n_kv_heads != 0)
    return no("cuDNN attention needs B, T, nh, nkv > 0 and nkv dividing nh");
  // int32 indices inside the fused kernels: keep every tensor well inside 2^31 elements
  if (p.batch * p.seq * p.n_heads * p.head_dim >= (int64_t{1} << 31)) return no("tensor too large for cuDNN");
  return cudnn_attention_available(why);
}

bool cudnn_attention_fwd_workspace(const AttnParams& p, size_t* bytes, CUstream_st* stream) {
  return workspace_for(p, false, bytes, stream);
}
bool cudnn_attention_bwd_workspace(const AttnParams& p, size_t* bytes, CUstream_st* stream) {
  return workspace_for(p, true, bytes, stream);
}

bool cudnn_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnParams& p, Tensor& out,
                         Tensor& lse, CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  const char* op = "cudnn_attention_fwd";
  if (!cudnn_attention_supports(p, q.dtype())) return false;
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim;
  check_t(op, "q", q, DType::BF16, B * T * nh * D);
  check_t(op, "k", k, DType::BF16, B * T * nkv * D);
  check_t(op, "v", v, DType::BF16, B * T * nkv * D);
  check_t(op, "out", out, DType::BF16, B * T * nh * D);
  check_t(op, "lse", lse, DType::F32, B * nh * T);
  for (const void* ptr : {q.raw(), k.raw(), v.raw(), out.raw(), lse.raw()})
    if (!aligned16(ptr)) return false;
  const Plan* plan = nullptr;
  {
    State& st = state();
    std::lock_guard<std::mutex> lk(st.mu);
    plan = plan_locked(st, make_key(p, false), stream);
  }
  if (!plan) return false;
  float scale = p.scale, neg_inf = neg_inf_value(), window = static_cast<float>(p.sliding_window);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kStats, kScale, kNegInf};
  std::vector<void*> ptrs{q.raw(), k.raw(), v.raw(), out.raw(), lse.raw(), &scale, &neg_inf};
  if (p.sliding_window > 0) {
    uids.push_back(kWindow);
    ptrs.push_back(&window);
  }
  return execute(*plan, stream, uids, ptrs, workspace, workspace_bytes, false, op);
}

bool cudnn_attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                         const Tensor& dout, const AttnParams& p, Tensor& dq, Tensor& dk, Tensor& dv,
                         CUstream_st* stream, void* workspace, size_t workspace_bytes) {
  const char* op = "cudnn_attention_bwd";
  if (!cudnn_attention_supports(p, q.dtype())) return false;
  const int64_t B = p.batch, T = p.seq, nh = p.n_heads, nkv = p.n_kv_heads, D = p.head_dim;
  check_t(op, "q", q, DType::BF16, B * T * nh * D);
  check_t(op, "k", k, DType::BF16, B * T * nkv * D);
  check_t(op, "v", v, DType::BF16, B * T * nkv * D);
  check_t(op, "out", out, DType::BF16, B * T * nh * D);
  check_t(op, "lse", lse, DType::F32, B * nh * T);
  check_t(op, "dout", dout, DType::BF16, B * T * nh * D);
  check_t(op, "dq", dq, DType::BF16, B * T * nh * D);
  check_t(op, "dk", dk, DType::BF16, B * T * nkv * D);
  check_t(op, "dv", dv, DType::BF16, B * T * nkv * D);
  for (const void* ptr : {q.raw(), k.raw(), v.raw(), out.raw(), lse.raw(), dout.raw(), dq.raw(), dk.raw(), dv.raw()})
    if (!aligned16(ptr)) return false;
  const Plan* plan = nullptr;
  {
    State& st = state();
    std::lock_guard<std::mutex> lk(st.mu);
    plan = plan_locked(st, make_key(p, true), stream);
  }
  if (!plan) return false;
  float scale = p.scale, neg_inf = neg_inf_value(), one = 1.f, window = static_cast<float>(p.sliding_window);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV, kDsum, kDQAccum, kScale, kNegInf, kOne};
  std::vector<void*> ptrs{q.raw(),  k.raw(),  v.raw(),  out.raw(), lse.raw(), dout.raw(), dq.raw(),
                          dk.raw(), dv.raw(), nullptr,  nullptr,   &scale,    &neg_inf,   &one};
  if (p.sliding_window > 0) {
    uids.push_back(kWindow);
    ptrs.push_back(&window);
  }
  return execute(*plan, stream, uids, ptrs, workspace, workspace_bytes, true, op);
}

}  // namespace am::cuda
