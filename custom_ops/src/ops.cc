// ONNX Runtime glue for the bitnet custom ops: validates inputs, quantizes activations and
// splits the work over ONNX Runtime's intra-op thread pool. The math lives in kernels.cc.
//
//   BitLinear(X float32 [..., K], W uint8 packed, S float32 [1] or [N]; attrs K, N)
//     -> Y float32 [..., N] = (xq . w) / s * S, xq/s the per-row int8 quantization of X.
//   MatMulF16(X float32 [..., K], W float16 [N, K]) -> Y float32 [..., N] = X @ W^T.
//   MatMulI8(X float32 [..., K], W int8 [N, K], S float32 [1] or [N])
//     -> Y float32 [..., N] = ((xq . w) / s + (rq . w) / r) * S, the 8-bit lm_head: xq/s as for
//     BitLinear, rq/r the same quantization of the residual x - xq / s.
//
// Every error becomes an OrtStatus naming the node and the problem; nothing throws across
// the C boundary.

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>  // madvise: owned weights and the lm_head tables in 2 MiB pages
#include <unistd.h>    // sysconf
#endif
#if defined(_WIN32)
#include <malloc.h>  // _aligned_malloc: Windows has no posix_memalign
#endif

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

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

struct BitLinearWork {
  const bitnet::BitLinearProblem* problem;
  bitnet::BitLinearKernel kernel;
  const float* x;
  int64_t K;
  int64_t rows_per_item, groups_per_item, row_items;
  bitnet::BitLinearProblem* mutable_problem;  // for quantization: writes xq, xsum, xscale
  int8_t* xq;
  int32_t* xsum;
  float* xscale;
};

void quantize_item(void* data, size_t i) {
  auto* w = static_cast<BitLinearWork*>(data);
  const int64_t m0 = static_cast<int64_t>(i) * w->rows_per_item;
  const int64_t m1 = std::min(m0 + w->rows_per_item, w->problem->M);
  bitnet::quantize_rows(w->x, w->K, w->problem->Kp, m0, m1, w->xq, w->xsum, w->xscale);
}

// The rows [m0, m1) x columns [c0, c1) of work item i. Row blocks vary fastest, so
// consecutive items share a slice of weights: it is read from memory once, then hits the cache.
struct ItemRange {
  int64_t m0, m1, c0, c1;
};
ItemRange item_range(size_t i, int64_t row_items, int64_t rows_per_item, int64_t rows,
                     int64_t cols_per_item, int64_t cols) {
  const int64_t row_block = static_cast<int64_t>(i) % row_items;
  const int64_t col_block = static_cast<int64_t>(i) / row_items;
  const int64_t m0 = row_block * rows_per_item, c0 = col_block * cols_per_item;
  return {m0, std::min(m0 + rows_per_item, rows), c0, std::min(c0 + cols_per_item, cols)};
}

void bitlinear_item(void* data, size_t i) {
  auto* w = static_cast<BitLinearWork*>(data);
  const auto& p = *w->problem;
  const int64_t groups = bitnet::round_up(p.N, bitnet::kGroupCols) / bitnet::kGroupCols;
  const ItemRange r = item_range(i, w->row_items, w->rows_per_item, p.M, w->groups_per_item, groups);
  w->kernel(p, r.m0, r.m1, r.c0, r.c1);
}

// ---- Weight holding ------------------------------------------------------------------------
//
// By default (BITNET_WEIGHTS unset or "owned") each BitLinear copies its constant W at kernel
// creation into a buffer of its own, 2 MiB aligned and advised for transparent huge pages (one
// TLB entry per 2 MiB of the weight stream instead of 512), then hints the kernel to reclaim the
// pages of ORT's copy (MADV_PAGEOUT: clean pages of the memory-mapped external data leave the
// process; anonymous memory without swap stays as it is; nothing is ever lost), so the weights
// are not held twice. Measured on the 2B4T-shaped model: 12-15 % less CPU time per decoded
// token than reading ORT's 4 KiB-page mapping, peak RSS +11 MB (bench/README.md).
// BITNET_WEIGHTS=ort: the kernels read W where ONNX Runtime holds it.

// Frees what own_copy allocated (posix_memalign, or _aligned_malloc on Windows).
inline void free_aligned(void* p) {
#if defined(_WIN32)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// Owned copies live in slabs of at least 64 MiB, 2 MiB aligned and huge-page advised, filled
// one after another (64-byte aligned): one small matrix per 2 MiB huge page would waste most
// of it. A slab is freed when the last kernel using it is destroyed.
struct Slab {
  uint8_t* base;
  size_t size, used;
  int users;
};

std::mutex slabs_mutex;
Slab* open_slab = nullptr;     // the slab new copies go to
size_t owned_weight_bytes = 0;  // bytes of W held in slabs now (for tests and tools)

struct OwnedBuffer {
  Slab* slab = nullptr;
  uint8_t* data = nullptr;
  size_t bytes = 0;
  ~OwnedBuffer() {
    std::lock_guard<std::mutex> lock(slabs_mutex);
    owned_weight_bytes -= bytes;
    if (--slab->users == 0) {
      if (open_slab == slab) open_slab = nullptr;
      free_aligned(slab->base);
      delete slab;
    }
  }
};

bool owned_weights_requested() {
  const char* v = std::getenv("BITNET_WEIGHTS");
  return !(v && std::string(v) == "ort");
}

// A copy of `bytes` at `src` in a slab; nullptr when memory is short (the kernel then reads
// ORT's copy).
std::unique_ptr<OwnedBuffer> own_copy(const uint8_t* src, size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20, kSlab = size_t{64} << 20;
  const size_t need = (bytes + 63) / 64 * 64;
  auto buffer = std::make_unique<OwnedBuffer>();
  {
    std::lock_guard<std::mutex> lock(slabs_mutex);
    if (open_slab == nullptr || open_slab->size - open_slab->used < need) {
      const size_t size = std::max(kSlab, (need + kHuge - 1) / kHuge * kHuge);
      void* mem = nullptr;
#if defined(_WIN32)
      mem = _aligned_malloc(size, kHuge);
      if (mem == nullptr) return nullptr;
#else
      if (posix_memalign(&mem, kHuge, size) != 0) return nullptr;
#endif
#ifdef MADV_HUGEPAGE
      madvise(mem, size, MADV_HUGEPAGE);
#endif
      if (open_slab != nullptr && open_slab->users == 0) {  // cannot happen (a full slab has users)
        free_aligned(open_slab->base);
        delete open_slab;
      }
      open_slab = new Slab{static_cast<uint8_t*>(mem), size, 0, 0};
    }
    buffer->slab = open_slab;
    buffer->data = open_slab->base + open_slab->used;
    buffer->bytes = bytes;
    owned_weight_bytes += bytes;
    open_slab->used += need;
    ++open_slab->users;
  }
  std::memcpy(buffer->data, src, bytes);
#ifdef MADV_PAGEOUT
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(src) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(src) + bytes) / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);  // a hint; errors ignored
#endif
  return buffer;
}

struct BitLinearKernelState {
  int64_t K, N;
  KernelSet kernels;
  std::string label;
  std::unique_ptr<OwnedBuffer> owned_w;  // W copied at creation (unless BITNET_WEIGHTS=ort)

  OrtStatus* read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
    if (OrtStatus* st = read_positive_attr(api, info, label, "K", &K)) return st;
    if (OrtStatus* st = read_positive_attr(api, info, label, "N", &N)) return st;
    if (owned_weights_requested()) hold_weights(api, info);
    return nullptr;
  }

  // Copies W when it is a constant of the expected size (anything else is left to Compute,
  // which reads the input and reports a wrong size).
  void hold_weights(const OrtApi& api, const OrtKernelInfo* info) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, 1, &is_constant, &value)) {
      api.ReleaseStatus(st);
      return;
    }
    if (!is_constant || value == nullptr) return;
    const Ort::ConstValue w(value);
    if (w.GetTensorTypeAndShapeInfo().GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) return;
    const int64_t count = w.GetTensorTypeAndShapeInfo().GetElementCount();
    if (count != bitnet::packed_bytes(N, K)) return;
    owned_w = own_copy(w.GetTensorData<uint8_t>(), static_cast<size_t>(count));
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

    BitLinearWork work{};
    work.problem = &p;
    work.kernel = kernels.bitlinear;
    work.x = X.GetTensorData<float>();
    work.K = K;
    work.xq = xq.data();
    work.xsum = xsum.data();
    work.xscale = xscale.data();

    // Quantize: rows in blocks of 16 (one item for decode).
    work.rows_per_item = 16;
    parallel_for(ctx, static_cast<size_t>((M + 15) / 16), quantize_item, &work);

    // Multiply: decode-sized M splits columns only; prefill splits rows x columns so a block
    // of activations stays in L1/L2 while a slice of weights streams through.
    const int64_t groups = bitnet::round_up(N, bitnet::kGroupCols) / bitnet::kGroupCols;
    if (M <= 6) {
      work.rows_per_item = M;
      work.groups_per_item = std::max<int64_t>(1, (groups + 23) / 24);
    } else {
      work.rows_per_item = 48;
      work.groups_per_item = 2;
    }
    work.row_items = (M + work.rows_per_item - 1) / work.rows_per_item;
    const int64_t group_items = (groups + work.groups_per_item - 1) / work.groups_per_item;
    parallel_for(ctx, static_cast<size_t>(work.row_items * group_items), bitlinear_item, &work);
    return nullptr;
  }
};

// What both ops share: float32 X, a weight input W of type WType (plus S for BitLinear),
// one float32 output, and the kernel set chosen when the library was registered.
template <typename Op, typename State, ONNXTensorElementDataType WType, size_t Inputs>
struct FloatOp : Ort::CustomOpBase<Op, State, true> {
  explicit FloatOp(const KernelSet& k) : kernels(k) {}
  size_t GetInputTypeCount() const { return Inputs; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 ? WType : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  // A kernel state labelled with the node's name (for error messages), with its attributes.
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    std::string name;
    if (OrtStatus* st = read_node_name(api, info, &name)) return st;
    auto state = std::make_unique<State>();
    state->label = node_label(static_cast<const Op*>(this)->GetName(), name);
    state->kernels = kernels;
    if (OrtStatus* st = state->read_attributes(api, info)) return st;
    *kernel = state.release();
    return nullptr;
  }

  KernelSet kernels;
};

struct BitLinearOp : FloatOp<BitLinearOp, BitLinearKernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, 3> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "BitLinear"; }
};

// ---- lm_head tables in 2 MiB pages ------------------------------------------------------------
//
// The head tables (656 MB fp16 / 328 MB int8 for 2B4T) are read front to back once per decode
// step. ORT hands them to us in 4 KiB pages (its heap, or its mmap of the external data file),
// and in 4 KiB pages the same kernel streamed ~1.8x slower than in 2 MiB pages inside ORT
// (bench/bench_heads.py). So the first call asks the kernel to back the table's 2 MiB-aligned
// interior with huge pages in place (MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+): no copy,
// no second table in memory, contents unchanged. Best effort: where the kernel refuses (older
// kernels, file systems without large folios) nothing changes. BITNET_HUGEPAGES=0 disables it.
void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__)
  static const bool enabled = [] {
    const char* env = std::getenv("BITNET_HUGEPAGES");
    return !(env && std::string(env) == "0");
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (!enabled || end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  madvise(start, end - begin, MADV_HUGEPAGE);  // errors ignored: an optimization only
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
  madvise(start, end - begin, MADV_COLLAPSE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Advises each distinct table once per kernel state (the pointer is stable across runs).
struct HugePageOnce {
  std::mutex mutex;
  const void* advised = nullptr;
  void operator()(const void* data, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    if (data == advised) return;
    advise_huge_pages(data, bytes);
    advised = data;
  }
};

// ---- MatMulF16 -----------------------------------------------------------------------------

struct MatMulF16Work {
  const bitnet::MatMulF16Problem* problem;
  bitnet::MatMulF16Kernel kernel;
  int64_t rows_per_item, cols_per_item, row_items;
};

void matmul_f16_item(void* data, size_t i) {
  auto* w = static_cast<MatMulF16Work*>(data);
  const auto& p = *w->problem;
  const ItemRange r = item_range(i, w->row_items, w->rows_per_item, p.M, w->cols_per_item, p.N);
  w->kernel(p, r.m0, r.m1, r.c0, r.c1);
}

struct MatMulF16KernelState {
  KernelSet kernels;
  std::string label;
  HugePageOnce huge_pages;
  OrtStatus* read_attributes(const OrtApi&, const OrtKernelInfo*) { return nullptr; }

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
    huge_pages(W.GetTensorData<Ort::Float16_t>(), static_cast<size_t>(N * K) * 2);
    bitnet::MatMulF16Problem p{X.GetTensorData<float>(),
                               reinterpret_cast<const uint16_t*>(W.GetTensorData<Ort::Float16_t>()), y, M, N, K};
    MatMulF16Work work{&p, kernels.matmul_f16, 16, M == 1 ? 4096 : 64, 0};
    work.row_items = (M + work.rows_per_item - 1) / work.rows_per_item;
    const int64_t col_items = (N + work.cols_per_item - 1) / work.cols_per_item;
    parallel_for(ctx, static_cast<size_t>(work.row_items * col_items), matmul_f16_item, &work);
    return nullptr;
  }
};

struct MatMulF16Op : FloatOp<MatMulF16Op, MatMulF16KernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, 2> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "MatMulF16"; }
};

// ---- MatMulI8: the 8-bit lm_head (kernels in head_kernels.cc) ------------------------------

// |xq| <= 127 and |w| <= 128: the int32 dot product is exact up to this K.
constexpr int64_t kMaxI8K = (int64_t{1} << 31) / (127 * 128);

struct MatMulI8Work {
  const bitnet::MatMulI8Problem* problem;
  bitnet::MatMulI8Kernel kernel;
  const float* x;
  float* residual;  // [M, K]
  int8_t *xq, *rq;
  int32_t *xsum, *rsum;
  float *xscale, *rscale;
  int64_t rows_per_item, cols_per_item, row_items;
};

// Both int8 terms of rows [16 i, 16 i + 16): xq/s of x, then rq/r of x - xq / s (two IEEE
// operations per element, as custom_ops/reference.py does them).
void matmul_i8_quantize_item(void* data, size_t i) {
  auto* w = static_cast<MatMulI8Work*>(data);
  const auto& p = *w->problem;
  const int64_t m0 = static_cast<int64_t>(i) * 16, m1 = std::min(m0 + 16, p.M);
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

void matmul_i8_item(void* data, size_t i) {
  auto* w = static_cast<MatMulI8Work*>(data);
  const auto& p = *w->problem;
  const ItemRange r = item_range(i, w->row_items, w->rows_per_item, p.M, w->cols_per_item, p.N);
  w->kernel(p, r.m0, r.m1, r.c0, r.c1);
}

struct MatMulI8KernelState {
  KernelSet kernels;
  std::string label;
  HugePageOnce huge_pages;
  OrtStatus* read_attributes(const OrtApi&, const OrtKernelInfo*) { return nullptr; }

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
    huge_pages(W.GetTensorData<int8_t>(), static_cast<size_t>(N * K));
    const int64_t Kp = bitnet::round_up(K, bitnet::kI8PadK);
    std::vector<int8_t> xq(static_cast<size_t>(2 * M * Kp));
    std::vector<int32_t> xsum(static_cast<size_t>(2 * M));
    std::vector<float> xscale(static_cast<size_t>(2 * M)), residual(static_cast<size_t>(M * K));
    bitnet::MatMulI8Problem p{xq.data(), xsum.data(), xscale.data(), xq.data() + M * Kp, xsum.data() + M,
                              xscale.data() + M, W.GetTensorData<int8_t>(), S.GetTensorData<float>(),
                              s_count == N && N != 1, y, M, N, K, Kp};
    MatMulI8Work work{&p, kernels.matmul_i8, X.GetTensorData<float>(), residual.data(),
                      xq.data(), xq.data() + M * Kp, xsum.data(), xsum.data() + M, xscale.data(), xscale.data() + M,
                      16, M == 1 ? 4096 : 256, 0};
    parallel_for(ctx, static_cast<size_t>((M + 15) / 16), matmul_i8_quantize_item, &work);
    // Decode: slices of 4096 weight rows (few pool tasks, each one long sequential stream);
    // more rows: blocks of 16 rows x 256 weight rows, so both stay in cache while paired.
    work.row_items = (M + work.rows_per_item - 1) / work.rows_per_item;
    const int64_t col_items = (N + work.cols_per_item - 1) / work.cols_per_item;
    parallel_for(ctx, static_cast<size_t>(work.row_items * col_items), matmul_i8_item, &work);
    return nullptr;
  }
};

struct MatMulI8Op : FloatOp<MatMulI8Op, MatMulI8KernelState, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, 3> {
  using FloatOp::FloatOp;
  const char* GetName() const { return "MatMulI8"; }
};

// One registration: a domain holding the ops, bound to the kernel set chosen at that time.
// Sessions keep raw pointers to these, so they live until the process ends.
struct Registration {
  BitLinearOp bitlinear;
  MatMulF16Op matmul_f16;
  MatMulI8Op matmul_i8;
  Ort::CustomOpDomain domain{"bitnet"};
  explicit Registration(const KernelSet& k) : bitlinear(k), matmul_f16(k), matmul_i8(k) {
    domain.Add(&bitlinear);
    domain.Add(&matmul_f16);
    domain.Add(&matmul_i8);
  }
};

std::mutex registrations_mutex;
std::vector<Registration*> registrations;  // intentionally never freed (see above)

}  // namespace

extern "C" {

// Called by SessionOptions.register_custom_ops_library. The kernel set is chosen here, once
// per registration, from BITNET_KERNEL and the CPU's features.
BITNET_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
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
__attribute__((visibility("default"))) size_t bitnet_owned_weight_bytes() {
  std::lock_guard<std::mutex> lock(slabs_mutex);
  return owned_weight_bytes;
}

// For tests (via ctypes): this CPU's feature bits, and which kernel each op gets for a
// feature bitmask ("level bitlinear matmul_f16 matmul_i8", written into out).
BITNET_EXPORT uint32_t bitnet_cpu_features() { return bitnet::cpu_features(); }

BITNET_EXPORT void bitnet_kernel_table(uint32_t features, char* out, size_t size) {
  const KernelSet k = bitnet::kernels_for_features(features);
  std::snprintf(out, size, "%s %s %s %s", k.name, k.bitlinear_name, k.matmul_f16_name, k.matmul_i8_name);
}

}  // extern "C"
