// ONNX Runtime glue for the bitnet custom ops: validates inputs, quantizes activations and
// splits the work over ONNX Runtime's intra-op thread pool. The math lives in the kernels
// (kernels.h), the weights' memory in weight_memory.cc.
//
//   BitLinear(X float32 [..., K], W uint8 packed, S float32 [1] or [N]; attrs K, N)
//     -> Y float32 [..., N] = (xq . w) / s * S, xq/s the per-row int8 quantization of X.
//   MatMulF16(X float32 [..., K], W float16 [N, K]) -> Y float32 [..., N] = X @ W^T.
//   MatMulI8(X float32 [..., K], W int8 [N, K], S float32 [1] or [N])
//     -> Y float32 [..., N] = ((xq . w) / s + (rq . w) / r) * S, the 8-bit lm_head: xq/s as for
//     BitLinear, rq/r the same quantization of the residual x - xq / s.
//   GroupQueryAttention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
//     cos_cache, sin_cache) -> output, present_key, present_value: com.microsoft's contract,
//     computed by attention.cc (see the op's section below).
//   GatedReluSquared(X float32 [..., 2 I]) -> Y float32 [..., I] = relu(X[..., :I])^2 * X[..., I:].
//
// Every error becomes an OrtStatus naming the node and the problem; nothing throws across
// the C boundary.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "attention.h"
#include "kernels.h"
#include "weight_memory.h"

namespace {

using bitnet::HugePageOnce;
using bitnet::KernelSet;

OrtStatus* error_status(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

std::string node_label(const char* op, const std::string& node) {
  return std::string(op) + " node '" + node + "'";
}

// Runs fn(data, i) for i in [0, items) on the session's intra-op pool (inline without one).
void parallel_for(Ort::KernelContext& ctx, size_t items, void (*fn)(void*, size_t), void* data) {
  if (items == 1) {
    fn(data, 0);
    return;
  }
  ctx.ParallelFor(fn, items, 0, data);
}

// Rows of a [..., K] tensor: the product of its leading dimensions (also when K == 0).
int64_t leading_rows(const std::vector<int64_t>& shape) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return rows;
}

// Reads the node's name and a required positive int attribute.
OrtStatus* read_node_name(const OrtApi& api, const OrtKernelInfo* info, std::string* name) {
  size_t size = 0;
  if (OrtStatus* st = api.KernelInfo_GetNodeName(info, nullptr, &size)) return st;
  std::string buf(size, '\0');
  if (OrtStatus* st = api.KernelInfo_GetNodeName(info, buf.data(), &size)) return st;
  *name = std::string(buf.c_str());
  return nullptr;
}

OrtStatus* read_positive_attr(const OrtApi& api, const OrtKernelInfo* info, const std::string& label,
                              const char* attr, int64_t* value) {
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, attr, value)) {
    api.ReleaseStatus(st);
    return error_status(ORT_INVALID_ARGUMENT, label + ": missing required int attribute '" + attr + "'");
  }
  if (*value <= 0)
    return error_status(ORT_INVALID_ARGUMENT,
                        label + ": attribute '" + attr + "' must be positive, got " + std::to_string(*value));
  return nullptr;
}

// Catches everything a compute body may throw and turns it into a status.
template <typename Body>
OrtStatus* guarded(const std::string& label, Body body) noexcept {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return error_status(e.GetOrtErrorCode(), label + ": " + e.what());
  } catch (const std::bad_alloc&) {
    return error_status(ORT_RUNTIME_EXCEPTION, label + ": out of memory");
  } catch (const std::exception& e) {
    return error_status(ORT_RUNTIME_EXCEPTION, label + ": " + e.what());
  } catch (...) {
    return error_status(ORT_RUNTIME_EXCEPTION, label + ": unknown error");
  }
}

// ---- BitLinear -----------------------------------------------------------------------------

// ---- Work items (every op) -----------------------------------------------------------------

// The column units a kernel's range counts: BitLinear's groups of 32 columns, the heads' columns.
int64_t column_units(const bitnet::BitLinearProblem& p) { return bitnet::round_up(p.N, bitnet::kGroupCols) / bitnet::kGroupCols; }
int64_t column_units(const bitnet::MatMulF16Problem& p) { return p.N; }
int64_t column_units(const bitnet::MatMulI8Problem& p) { return p.N; }

// One op's multiply, cut into items of rows_per_item rows x cols_per_item column units. Row
// blocks vary fastest, so consecutive items share a slice of weights: it is read from memory
// once, then hits the cache.
template <typename Problem>
struct TileWork {
  const Problem* problem;
  void (*kernel)(const Problem&, int64_t, int64_t, int64_t, int64_t);
  int64_t rows_per_item, cols_per_item;

  int64_t row_items() const { return (problem->M + rows_per_item - 1) / rows_per_item; }
  size_t items() const {
    return static_cast<size_t>(row_items() * ((column_units(*problem) + cols_per_item - 1) / cols_per_item));
  }
  static void run(void* data, size_t i) {
    const auto* w = static_cast<const TileWork*>(data);
    const Problem& p = *w->problem;
    const int64_t row_items = w->row_items();
    const int64_t m0 = static_cast<int64_t>(i) % row_items * w->rows_per_item;
    const int64_t c0 = static_cast<int64_t>(i) / row_items * w->cols_per_item;
    w->kernel(p, m0, std::min(m0 + w->rows_per_item, p.M), c0, std::min(c0 + w->cols_per_item, column_units(p)));
  }
  void run_all(Ort::KernelContext& ctx) { parallel_for(ctx, items(), run, this); }
};

// Quantization items: rows [16 i, 16 i + 16) (one item for decode).
constexpr int64_t kQuantizeRows = 16;
size_t quantize_items(int64_t M) { return static_cast<size_t>((M + kQuantizeRows - 1) / kQuantizeRows); }

// ---- Weights the kernels stream -------------------------------------------------------------

// A huge-page copy of W (input 1) when it is a constant of `type` (element size `element_bytes`;
// of `expected_bytes` when that is not 0) and owned weights are requested (weight_memory.h);
// nullptr otherwise, and the kernel reads ORT's buffer (Compute reports a wrong size).
// `keep_cached`: ORT may still read the table (a head's table can be the embedding's Gather
// table too), so its file pages are unmapped but stay in the page cache (own_copy).
std::unique_ptr<bitnet::OwnedBuffer> hold_constant_weights(const OrtApi& api, const OrtKernelInfo* info,
                                                           ONNXTensorElementDataType type, size_t element_bytes,
                                                           size_t expected_bytes, bool keep_cached) {
  if (!bitnet::owned_weights_requested()) return nullptr;
  int is_constant = 0;
  const OrtValue* value = nullptr;
  if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value)) {
    api.ReleaseStatus(st);
    return nullptr;
  }
  if (!is_constant || value == nullptr) return nullptr;
  const Ort::ConstValue w(value);
  const auto w_info = w.GetTensorTypeAndShapeInfo();
  const size_t bytes = w_info.GetElementCount() * element_bytes;
  if (w_info.GetElementType() != type || bytes == 0 || (expected_bytes && bytes != expected_bytes)) return nullptr;
  return bitnet::own_copy(static_cast<const uint8_t*>(w.GetTensorRawData()), bytes, keep_cached);
}

// The table a head kernel reads: its owned copy when it holds one of this size, else ORT's
// buffer advised into huge pages in place.
template <typename T>
const T* head_table(const std::unique_ptr<bitnet::OwnedBuffer>& owned, HugePageOnce& huge_pages, const Ort::ConstValue& W,
                    int64_t N, int64_t K) {
  const size_t bytes = static_cast<size_t>(N * K) * sizeof(T);
  if (owned && owned->bytes == bytes) return reinterpret_cast<const T*>(owned->data);
  huge_pages(W.GetTensorData<T>(), bytes);
  return W.GetTensorData<T>();
}

// ---- BitLinear -----------------------------------------------------------------------------

struct BitLinearQuantizeWork {
  const float* x;
  int64_t M, K, Kp;
  int8_t* xq;
  int32_t* xsum;
  float* xscale;
};

void bitlinear_quantize_item(void* data, size_t i) {
  auto* w = static_cast<BitLinearQuantizeWork*>(data);
  const int64_t m0 = static_cast<int64_t>(i) * kQuantizeRows, m1 = std::min(m0 + kQuantizeRows, w->M);
  bitnet::quantize_rows(w->x, w->K, w->Kp, m0, m1, w->xq, w->xsum, w->xscale);
}

struct BitLinearKernelState {
  int64_t K, N;
  KernelSet kernels;
  std::string label;
  std::unique_ptr<bitnet::OwnedBuffer> owned_w;  // W copied at creation (unless BITNET_WEIGHTS=ort)

  OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
    if (OrtStatus* st = read_positive_attr(api, info, label, "K", &K)) return st;
    if (OrtStatus* st = read_positive_attr(api, info, label, "N", &N)) return st;
    owned_w = hold_constant_weights(api, info, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 1,
                                    static_cast<size_t>(bitnet::packed_bytes(N, K)), false);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&]() -> OrtStatus* { return Compute(context); });
  }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue X = ctx.GetInput(0), W = ctx.GetInput(1), S = ctx.GetInput(2);
    const auto x_info = X.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> x_shape = x_info.GetShape();
    if (x_shape.empty())
      return error_status(ORT_INVALID_ARGUMENT, label + ": X must have rank >= 1 ([..., K]), got a scalar");
    if (x_shape.back() != K)
      return error_status(ORT_INVALID_ARGUMENT, label + ": X has shape " + shape_string(x_shape) +
                                                    " but its last dimension must equal attribute K=" + std::to_string(K));
    const int64_t expected_w = bitnet::packed_bytes(N, K);
    const int64_t w_count = W.GetTensorTypeAndShapeInfo().GetElementCount();
    if (w_count != expected_w)
      return error_status(ORT_INVALID_ARGUMENT,
                          label + ": W holds " + std::to_string(w_count) + " bytes but K=" + std::to_string(K) +
                              ", N=" + std::to_string(N) + " need " + std::to_string(expected_w) +
                              " (pack the ternary weights with custom_ops.pack_ternary)");
    const int64_t s_count = S.GetTensorTypeAndShapeInfo().GetElementCount();
    if (s_count != 1 && s_count != N)
      return error_status(ORT_INVALID_ARGUMENT, label + ": S must hold 1 or N=" + std::to_string(N) +
                                                    " values, got " + std::to_string(s_count));

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = N;
    Ort::UnownedValue Y = ctx.GetOutput(0, y_shape);
    const int64_t M = x_info.GetElementCount() / K;
    if (M == 0) return nullptr;

    const int64_t Kp = bitnet::round_up(K, bitnet::kBlockK);
    std::vector<int8_t> xq(static_cast<size_t>(M * Kp));
    std::vector<int32_t> xsum(static_cast<size_t>(M));
    std::vector<float> xscale(static_cast<size_t>(M));

    bitnet::BitLinearProblem p{};
    p.xq = xq.data();
    p.xsum = xsum.data();
    p.xscale = xscale.data();
    p.w = owned_w ? owned_w->data : W.GetTensorData<uint8_t>();
    p.S = S.GetTensorData<float>();
    p.per_channel_scale = s_count == N && N != 1;
    p.y = Y.GetTensorMutableData<float>();
    p.M = M;
    p.N = N;
    p.Kp = Kp;

    BitLinearQuantizeWork quantize{X.GetTensorData<float>(), M, K, Kp, xq.data(), xsum.data(), xscale.data()};
    parallel_for(ctx, quantize_items(M), bitlinear_quantize_item, &quantize);

    // Multiply: decode-sized M splits columns only; prefill splits rows x columns so a block
    // of activations stays in L1/L2 while a slice of weights streams through. An item's rows
    // are whole row tiles of the kernel (AMX: pairs of 16-row tiles; VNNI: 6-row tiles), so no
    // item ends on a short tile that unpacks its weights again for a few rows (AMX, 128-token
    // prefill of 2B4T on 2 threads: 48 rows 289-296 ms, 64 rows 267-278; bench/README.md).
    const int64_t groups = column_units(p);
    const int64_t prefill_rows = (kernels.features & bitnet::kFeatAmxInt8) ? 64 : 48;
    TileWork<bitnet::BitLinearProblem> work{&p, kernels.bitlinear, prefill_rows, 2};
    if (M <= 6) {
      work.rows_per_item = M;
      work.cols_per_item = std::max<int64_t>(1, (groups + 23) / 24);
    }
    work.run_all(ctx);
    return nullptr;
  }
};

// Every op's kernel state: labelled with the node's name (for error messages), holding the
// kernel set chosen at registration and its attributes.
template <typename State>
OrtStatusPtr create_kernel_state(const char* op, const KernelSet& kernels, const OrtApi& api,
                                 const OrtKernelInfo* info, void** kernel) {
  std::string name;
  if (OrtStatus* st = read_node_name(api, info, &name)) return st;
  auto state = std::make_unique<State>();
  state->label = node_label(op, name);
  state->kernels = kernels;
  if (OrtStatus* st = state->read_attributes(api, info)) return st;
  *kernel = state.release();
  return nullptr;
}

// What the matmul ops and GatedReluSquared share: float32 inputs except input 1 (W, of type
// WType, when there is one), one float32 output, and the kernel set chosen when the library
// was registered.
template <typename Op, typename State, ONNXTensorElementDataType WType, size_t Inputs>
struct FloatOp : Ort::CustomOpBase<Op, State, true> {
  explicit FloatOp(const KernelSet& k) : kernels(k) {}
  size_t GetInputTypeCount() const { return Inputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? WType : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel_state<State>(static_cast<const Op*>(this)->GetName(), kernels, api, info, kernel);
  }

  KernelSet kernels;
};

struct BitLinearOp : FloatOp<BitLinearOp, BitLinearKernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 3> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "BitLinear"; }
};

// ---- MatMulF16 -----------------------------------------------------------------------------

struct MatMulF16KernelState {
  KernelSet kernels;
  std::string label;
  std::unique_ptr<bitnet::OwnedBuffer> owned_w;  // W copied at creation (unless BITNET_WEIGHTS=ort)
  HugePageOnce huge_pages;                       // else ORT's W, advised in place
  OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
    owned_w = hold_constant_weights(api, info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2, 0, true);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&]() -> OrtStatus* { return Compute(context); });
  }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue X = ctx.GetInput(0), W = ctx.GetInput(1);
    const auto x_info = X.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> x_shape = x_info.GetShape();
    const std::vector<int64_t> w_shape = W.GetTensorTypeAndShapeInfo().GetShape();
    if (w_shape.size() != 2)
      return error_status(ORT_INVALID_ARGUMENT, label + ": W must be 2-D [N, K], got " + shape_string(w_shape));
    const int64_t N = w_shape[0], K = w_shape[1];
    if (x_shape.empty() || x_shape.back() != K)
      return error_status(ORT_INVALID_ARGUMENT, label + ": X has shape " + shape_string(x_shape) +
                                                    " but its last dimension must equal W's K=" + std::to_string(K));
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = N;
    Ort::UnownedValue Y = ctx.GetOutput(0, y_shape);
    const int64_t M = leading_rows(x_shape);
    float* y = Y.GetTensorMutableData<float>();
    if (M == 0 || N == 0) return nullptr;
    if (K == 0) {
      std::fill(y, y + M * N, 0.0f);
      return nullptr;
    }
    const auto* table = head_table<uint16_t>(owned_w, huge_pages, W, N, K);
    bitnet::MatMulF16Problem p{X.GetTensorData<float>(), table, y, M, N, K};
    TileWork<bitnet::MatMulF16Problem> work{&p, kernels.matmul_f16, 16, M == 1 ? 4096 : 64};
    work.run_all(ctx);
    return nullptr;
  }
};

struct MatMulF16Op : FloatOp<MatMulF16Op, MatMulF16KernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "MatMulF16"; }
};

// ---- MatMulI8: the 8-bit lm_head -----------------------------------------------------------

// |xq| <= 127 and |w| <= 128: the int32 dot product is exact up to this K.
constexpr int64_t kMaxI8K = (int64_t{1} << 31) / (127 * 128);

struct MatMulI8QuantizeWork {
  const bitnet::MatMulI8Problem* problem;
  const float* x;
  float* residual;  // [M, K]
  int8_t *xq, *rq;
  int32_t *xsum, *rsum;
  float *xscale, *rscale;
};

// Both int8 terms of rows [16 i, 16 i + 16): xq/s of x, then rq/r of x - xq / s (two IEEE
// operations per element, as custom_ops/reference.py does them).
void matmul_i8_quantize_item(void* data, size_t i) {
  auto* w = static_cast<MatMulI8QuantizeWork*>(data);
  const auto& p = *w->problem;
  const int64_t m0 = static_cast<int64_t>(i) * kQuantizeRows, m1 = std::min(m0 + kQuantizeRows, p.M);
  bitnet::quantize_rows(w->x, p.K, p.Kp, m0, m1, w->xq, w->xsum, w->xscale);
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = w->x + m * p.K;
    const int8_t* q = w->xq + m * p.Kp;
    float* r = w->residual + m * p.K;
    const float s = w->xscale[m];
    for (int64_t k = 0; k < p.K; ++k) r[k] = x[k] - static_cast<float>(q[k]) / s;
  }
  bitnet::quantize_rows(w->residual, p.K, p.Kp, m0, m1, w->rq, w->rsum, w->rscale);
}

struct MatMulI8KernelState {
  KernelSet kernels;
  std::string label;
  std::unique_ptr<bitnet::OwnedBuffer> owned_w;  // W copied at creation (unless BITNET_WEIGHTS=ort)
  HugePageOnce huge_pages;                       // else ORT's W, advised in place
  OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
    owned_w = hold_constant_weights(api, info, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 1, 0, true);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&]() -> OrtStatus* { return Compute(context); });
  }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue X = ctx.GetInput(0), W = ctx.GetInput(1), S = ctx.GetInput(2);
    const std::vector<int64_t> x_shape = X.GetTensorTypeAndShapeInfo().GetShape();
    const std::vector<int64_t> w_shape = W.GetTensorTypeAndShapeInfo().GetShape();
    if (w_shape.size() != 2)
      return error_status(ORT_INVALID_ARGUMENT, label + ": W must be 2-D [N, K], got " + shape_string(w_shape));
    const int64_t N = w_shape[0], K = w_shape[1];
    if (x_shape.empty() || x_shape.back() != K)
      return error_status(ORT_INVALID_ARGUMENT, label + ": X has shape " + shape_string(x_shape) +
                                                    " but its last dimension must equal W's K=" + std::to_string(K));
    if (K > kMaxI8K)
      return error_status(ORT_INVALID_ARGUMENT, label + ": K=" + std::to_string(K) + " exceeds " +
                                                    std::to_string(kMaxI8K) + " (the int32 sums could overflow)");
    const int64_t s_count = S.GetTensorTypeAndShapeInfo().GetElementCount();
    if (s_count != 1 && s_count != N)
      return error_status(ORT_INVALID_ARGUMENT, label + ": S must hold 1 or N=" + std::to_string(N) +
                                                    " values, got " + std::to_string(s_count));
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = N;
    Ort::UnownedValue Y = ctx.GetOutput(0, y_shape);
    const int64_t M = leading_rows(x_shape);
    float* y = Y.GetTensorMutableData<float>();
    if (M == 0 || N == 0) return nullptr;
    if (K == 0) {
      std::fill(y, y + M * N, 0.0f);
      return nullptr;
    }
    const int8_t* table = head_table<int8_t>(owned_w, huge_pages, W, N, K);
    const int64_t Kp = bitnet::round_up(K, bitnet::kI8PadK);
    std::vector<int8_t> xq(static_cast<size_t>(2 * M * Kp));
    std::vector<int32_t> xsum(static_cast<size_t>(2 * M));
    std::vector<float> xscale(static_cast<size_t>(2 * M)), residual(static_cast<size_t>(M * K));
    bitnet::MatMulI8Problem p{xq.data(), xsum.data(), xscale.data(), xq.data() + M * Kp, xsum.data() + M,
                              xscale.data() + M, table, S.GetTensorData<float>(),
                              s_count == N && N != 1, y, M, N, K, Kp};
    MatMulI8QuantizeWork quantize{&p, X.GetTensorData<float>(), residual.data(), xq.data(), xq.data() + M * Kp,
                                  xsum.data(), xsum.data() + M, xscale.data(), xscale.data() + M};
    parallel_for(ctx, quantize_items(M), matmul_i8_quantize_item, &quantize);
    // Up to 16 rows (decode, batches): slices of 4096 weight rows (few pool tasks, each one long
    // sequential stream, and the AMX kernel lays x out once per slice); more rows: blocks of 16
    // rows x 256 weight rows, so both stay in cache while paired.
    TileWork<bitnet::MatMulI8Problem> work{&p, kernels.matmul_i8, 16, M <= 16 ? 4096 : 256};
    work.run_all(ctx);
    return nullptr;
  }
};

struct MatMulI8Op : FloatOp<MatMulI8Op, MatMulI8KernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 3> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "MatMulI8"; }
};

// ---- GroupQueryAttention: attention over the KV cache ------------------------------------
//
// The subset of com.microsoft.GroupQueryAttention the export uses, with the same inputs,
// outputs and attributes: query [B, S, (H + 2 KV) D] packed (key, value omitted) or query
// [B, S, H D] with key/value [B, S, KV D]; past_key/past_value [B, KV, P, D]; seqlens_k [B]
// (tokens after this run - 1 per row); total_sequence_length (scalar); cos_cache/sin_cache
// [positions, D / 2]. Outputs [B, S, H D] and present_key/present_value
// [B, KV, max(P, total_sequence_length), D]: when the caller binds one buffer as both past and
// present, the new keys and values are written into it in place (nothing is copied).
// Attributes num_heads, kv_num_heads, scale (default 1/sqrt(D)), do_rotary (non-interleaved).

struct AttentionKernelState {
  KernelSet kernels;
  std::string label;
  int64_t heads = 0, kv_heads = 0, rotary = 0;
  float scale = 0.0f;  // 0: 1 / sqrt(D)

  OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
    if (OrtStatus* st = read_positive_attr(api, info, label, "num_heads", &heads)) return st;
    if (OrtStatus* st = read_positive_attr(api, info, label, "kv_num_heads", &kv_heads)) return st;
    if (heads % kv_heads != 0)
      return error_status(ORT_INVALID_ARGUMENT, label + ": num_heads=" + std::to_string(heads) +
                                                    " is not a multiple of kv_num_heads=" + std::to_string(kv_heads));
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "do_rotary", &rotary)) api.ReleaseStatus(st);
    int64_t interleaved = 0;
    if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "rotary_interleaved", &interleaved)) api.ReleaseStatus(st);
    if (interleaved != 0)
      return error_status(ORT_INVALID_ARGUMENT, label + ": rotary_interleaved=1 is not supported (only rotate_half)");
    if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, "scale", &scale)) api.ReleaseStatus(st);
    return nullptr;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&]() -> OrtStatus* { return Compute(context); });
  }

  OrtStatus* fail(const std::string& message) const { return error_status(ORT_INVALID_ARGUMENT, label + ": " + message); }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue query = ctx.GetInput(0), key = ctx.GetInput(1), value = ctx.GetInput(2);
    const Ort::ConstValue past_key = ctx.GetInput(3), past_value = ctx.GetInput(4);
    const Ort::ConstValue seqlens = ctx.GetInput(5), total = ctx.GetInput(6);
    const bool packed = static_cast<const OrtValue*>(key) == nullptr;
    if (packed != (static_cast<const OrtValue*>(value) == nullptr))
      return fail("give both key and value, or neither (packed QKV in query)");
    const std::vector<int64_t> q_shape = query.GetTensorTypeAndShapeInfo().GetShape();
    if (q_shape.size() != 3) return fail("query must be [batch, sequence, hidden], got " + shape_string(q_shape));
    const int64_t B = q_shape[0], S = q_shape[1], H = heads, KV = kv_heads;
    const int64_t D = packed ? q_shape[2] / (H + 2 * KV) : q_shape[2] / H;
    if (D == 0 || D % 2 != 0 || q_shape[2] != (packed ? (H + 2 * KV) * D : H * D))
      return fail("query's last dimension " + std::to_string(q_shape[2]) + " is not " +
                  (packed ? "(num_heads + 2 kv_num_heads)" : "num_heads") + " times an even head size");
    if (!packed) {
      const std::vector<int64_t> expected{B, S, KV * D};
      if (key.GetTensorTypeAndShapeInfo().GetShape() != expected || value.GetTensorTypeAndShapeInfo().GetShape() != expected)
        return fail("key and value must be " + shape_string(expected));
    }
    const std::vector<int64_t> past_shape = past_key.GetTensorTypeAndShapeInfo().GetShape();
    if (past_shape.size() != 4 || past_shape[0] != B || past_shape[1] != KV || past_shape[3] != D ||
        past_value.GetTensorTypeAndShapeInfo().GetShape() != past_shape)
      return fail("past_key and past_value must both be [" + std::to_string(B) + ", " + std::to_string(KV) +
                  ", past, " + std::to_string(D) + "], got " + shape_string(past_shape));
    if (seqlens.GetTensorTypeAndShapeInfo().GetElementCount() != static_cast<size_t>(B))
      return fail("seqlens_k must hold one value per batch row (" + std::to_string(B) + ")");
    if (total.GetTensorTypeAndShapeInfo().GetElementCount() != 1)
      return fail("total_sequence_length must be a scalar");
    const int64_t P = past_shape[2], total_len = total.GetTensorData<int32_t>()[0];
    const int64_t capacity = std::max(P, total_len);
    const float* cos = nullptr;
    const float* sin = nullptr;
    int64_t positions = std::numeric_limits<int64_t>::max();
    if (rotary) {
      const Ort::ConstValue cos_cache = ctx.GetInput(7), sin_cache = ctx.GetInput(8);
      if (static_cast<const OrtValue*>(cos_cache) == nullptr || static_cast<const OrtValue*>(sin_cache) == nullptr)
        return fail("do_rotary=1 needs cos_cache and sin_cache");
      const std::vector<int64_t> cs = cos_cache.GetTensorTypeAndShapeInfo().GetShape();
      if (cs.size() != 2 || cs[1] != D / 2 || sin_cache.GetTensorTypeAndShapeInfo().GetShape() != cs)
        return fail("cos_cache and sin_cache must be [positions, " + std::to_string(D / 2) + "], got " + shape_string(cs));
      positions = cs[0];
      cos = cos_cache.GetTensorData<float>();
      sin = sin_cache.GetTensorData<float>();
    }
    // Rows: tokens cached before this run, and new tokens that are real. A first prompt
    // (S > 1, nothing cached) may be right-padded; later runs append S tokens to each row.
    const bool first_prompt = S > 1 && S == total_len;
    const int32_t* seqlens_k = seqlens.GetTensorData<int32_t>();
    std::vector<int32_t> past(static_cast<size_t>(B)), valid(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t tokens = int64_t{seqlens_k[b]} + 1;
      past[b] = static_cast<int32_t>(first_prompt ? 0 : tokens - S);
      valid[b] = static_cast<int32_t>(first_prompt ? std::min(S, tokens) : S);
      if (tokens < 1 || past[b] < 0 || tokens > capacity || tokens > positions)
        return fail("row " + std::to_string(b) + ": seqlens_k + 1 = " + std::to_string(tokens) + " does not fit " +
                    std::to_string(S) + " new tokens, a cache of " + std::to_string(capacity) + " and " +
                    (rotary ? std::to_string(positions) + " rotary positions" : std::string("no rotary limit")));
      if (past[b] > P) return fail("row " + std::to_string(b) + " continues past the " + std::to_string(P) + " cached tokens given");
    }

    Ort::UnownedValue out = ctx.GetOutput(0, {B, S, H * D});
    const std::vector<int64_t> present_shape{B, KV, capacity, D};
    Ort::UnownedValue present_key = ctx.GetOutput(1, present_shape), present_value = ctx.GetOutput(2, present_shape);
    // float32 or float16 cache (the op is registered for both): bytes per element.
    const bool half_cache = past_key.GetTensorTypeAndShapeInfo().GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const size_t element = half_cache ? 2 : 4;
    char* k_cache = static_cast<char*>(present_key.GetTensorMutableRawData());
    char* v_cache = static_cast<char*>(present_value.GetTensorMutableRawData());
    if (B == 0 || S == 0) return nullptr;
    // Unless the caller shares one buffer for past and present, carry the past over.
    for (auto [from, to] : {std::make_pair(static_cast<const char*>(past_key.GetTensorRawData()), k_cache),
                            std::make_pair(static_cast<const char*>(past_value.GetTensorRawData()), v_cache)}) {
      if (from == to) continue;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t g = 0; g < KV; ++g)
          std::memcpy(to + (b * KV + g) * capacity * D * element, from + (b * KV + g) * P * D * element,
                      static_cast<size_t>(past[b] * D) * element);
    }

    const float* q = query.GetTensorData<float>();
    bitnet::AttentionProblem p{};
    p.q = q;
    p.k = packed ? q + H * D : key.GetTensorData<float>();
    p.v = packed ? q + (H + KV) * D : value.GetTensorData<float>();
    p.q_stride = q_shape[2];
    p.kv_stride = packed ? q_shape[2] : KV * D;
    p.k_cache = k_cache;
    p.v_cache = v_cache;
    p.past = past.data();
    p.valid = valid.data();
    p.cos = cos;
    p.sin = sin;
    p.out = out.GetTensorMutableData<float>();
    p.B = B;
    p.S = S;
    p.H = H;
    p.KV = KV;
    p.D = D;
    p.capacity = capacity;
    p.scale = scale != 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(D));
    p.half_cache = half_cache;
    p.features = kernels.features;
    bitnet::AttentionRun run(p);
    parallel_for(ctx, run.append_items(), [](void* r, size_t i) { static_cast<bitnet::AttentionRun*>(r)->append(i); }, &run);
    parallel_for(ctx, run.attend_items(), [](void* r, size_t i) { static_cast<bitnet::AttentionRun*>(r)->attend(i); }, &run);
    parallel_for(ctx, run.merge_items(), [](void* r, size_t i) { static_cast<bitnet::AttentionRun*>(r)->merge(i); }, &run);
    return nullptr;
  }
};

// Registered once per cache type (float32, float16) under one name: ONNX Runtime picks the one
// whose types match the graph.
template <ONNXTensorElementDataType CacheType>
struct GroupQueryAttentionOp : Ort::CustomOpBase<GroupQueryAttentionOp<CacheType>, AttentionKernelState, true> {
  explicit GroupQueryAttentionOp(const KernelSet& k) : kernels(k) {}
  const char* GetName() const { return "GroupQueryAttention"; }
  size_t GetInputTypeCount() const { return 9; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    if (index == 3 || index == 4) return CacheType;
    return index == 5 || index == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 1 || index == 2 || index >= 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : CacheType;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return create_kernel_state<AttentionKernelState>(GetName(), kernels, api, info, kernel);
  }

  KernelSet kernels;
};

// ---- GatedReluSquared: 2B4T's MLP activation in one pass -------------------------------------
//
//   GatedReluSquared(X float32 [..., 2 I]) -> Y float32 [..., I] = relu(gate)^2 * up, with gate =
//   X[..., :I] and up = X[..., I:] (the fused gate+up projection's two halves). The same three
//   IEEE operations as Split, Relu, Mul(relu, relu), Mul(., up), in one node and one pass.

struct GatedReluSquaredWork {
  const float* x;
  float* y;
  int64_t rows, I;
};

constexpr int64_t kActivationRows = 16;  // rows per work item

void gated_relu_squared_item(void* data, size_t i) {
  const auto* w = static_cast<const GatedReluSquaredWork*>(data);
  const int64_t m0 = static_cast<int64_t>(i) * kActivationRows, m1 = std::min(m0 + kActivationRows, w->rows);
  bitnet::gated_relu_squared_rows(w->x, w->y, m0, m1, w->I);
}

struct GatedReluSquaredKernelState {
  KernelSet kernels;  // unused: one portable loop
  std::string label;
  OrtStatus* read_attributes(const OrtApi&, const OrtKernelInfo*) { return nullptr; }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&]() -> OrtStatus* { return Compute(context); });
  }

  OrtStatus* Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const Ort::ConstValue X = ctx.GetInput(0);
    const std::vector<int64_t> x_shape = X.GetTensorTypeAndShapeInfo().GetShape();
    if (x_shape.empty() || x_shape.back() % 2 != 0)
      return error_status(ORT_INVALID_ARGUMENT, label + ": X must be [..., 2 I] (gate and up halves), got " +
                                                    shape_string(x_shape));
    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() /= 2;
    Ort::UnownedValue Y = ctx.GetOutput(0, y_shape);
    GatedReluSquaredWork work{X.GetTensorData<float>(), Y.GetTensorMutableData<float>(), leading_rows(x_shape),
                              y_shape.back()};
    if (work.rows == 0 || work.I == 0) return nullptr;
    parallel_for(ctx, static_cast<size_t>((work.rows + kActivationRows - 1) / kActivationRows), gated_relu_squared_item,
                 &work);
    return nullptr;
  }
};

struct GatedReluSquaredOp
    : FloatOp<GatedReluSquaredOp, GatedReluSquaredKernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, 1> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "GatedReluSquared"; }
};

// One registration: a domain holding the ops, bound to the kernel set chosen at that time.
// Sessions keep raw pointers to these, so they live until the process ends.
struct Registration {
  BitLinearOp bitlinear;
  MatMulF16Op matmul_f16;
  MatMulI8Op matmul_i8;
  GroupQueryAttentionOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT> attention;
  GroupQueryAttentionOp<ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16> attention_f16_cache;
  GatedReluSquaredOp gated_relu_squared;
  Ort::CustomOpDomain domain{"bitnet"};
  explicit Registration(const KernelSet& k) : bitlinear(k), matmul_f16(k), matmul_i8(k), attention(k), attention_f16_cache(k), gated_relu_squared(k) {
    domain.Add(&bitlinear);
    domain.Add(&matmul_f16);
    domain.Add(&matmul_i8);
    domain.Add(&attention);
    domain.Add(&attention_f16_cache);
    domain.Add(&gated_relu_squared);
  }
};

std::mutex registrations_mutex;
std::vector<Registration*> registrations;  // intentionally never freed (see above)

}  // namespace

extern "C" {

// Called by SessionOptions.register_custom_ops_library. The kernel set is chosen here, once
// per registration, from BITNET_KERNEL and the CPU's features.
BITNET_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    std::fprintf(stderr, "bitnet custom ops: this onnxruntime is older than the API version %d they were built for\n",
                 ORT_API_VERSION);
    return nullptr;  // no API to build a status with; registering nothing makes the model fail to load
  }
  Ort::InitApi(api);
  KernelSet kernels{};
  std::string error;
  if (!bitnet::select_kernels(std::getenv("BITNET_KERNEL"), &kernels, &error))
    return error_status(ORT_INVALID_ARGUMENT, "bitnet custom ops: " + error);
  try {
    auto reg = std::make_unique<Registration>(kernels);
    Ort::UnownedSessionOptions session_options(options);
    session_options.Add(reg->domain);
    std::lock_guard<std::mutex> lock(registrations_mutex);
    registrations.push_back(reg.release());
  } catch (const std::exception& e) {
    return error_status(ORT_RUNTIME_EXCEPTION, std::string("bitnet custom ops: registration failed: ") + e.what());
  }
  return nullptr;
}

// For tools and tests (via ctypes): the kernel that BITNET_KERNEL=requested resolves to on
// this CPU, or an empty string when it cannot be used.
BITNET_EXPORT const char* bitnet_resolve_kernel(const char* requested) {
  KernelSet kernels{};
  std::string error;
  return bitnet::select_kernels(requested, &kernels, &error) ? kernels.name : "";
}

// For tests and tools (via ctypes): bytes of BitLinear weights held in owned copies now, 0
// when every kernel reads ONNX Runtime's buffers (BITNET_WEIGHTS=ort).
BITNET_EXPORT size_t bitnet_owned_weight_bytes() { return bitnet::owned_weight_bytes(); }

// For tests (via ctypes): this CPU's feature bits, and which kernel each op gets for a
// feature bitmask ("level bitlinear matmul_f16 matmul_i8", written into out).
BITNET_EXPORT uint32_t bitnet_cpu_features() { return bitnet::cpu_features(); }

BITNET_EXPORT void bitnet_kernel_table(uint32_t features, char* out, size_t size) {
  const KernelSet k = bitnet::kernels_for_features(features);
  std::snprintf(out, size, "%s %s %s %s", k.name, k.bitlinear_name, k.matmul_f16_name, k.matmul_i8_name);
}

}  // extern "C"
