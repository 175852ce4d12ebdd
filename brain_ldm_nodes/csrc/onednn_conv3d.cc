// 3-D convolution (float32, forward, bias fused) by oneDNN, as an XLA FFI handler for jax.jit on CPU.
//
// Registered from Python (brain_ldm_nodes/models/onednn.py) with jax.ffi.register_ffi_target under
// the name "brain_ldm_onednn_conv3d", platform "cpu". Arguments, all float32 and row-major:
//   x      (..., I, D, H, W)   or, with channels_last, (..., D, H, W, I); leading axes = the batch
//   weight (..., O, I, kD, kH, kW), leading axes all of size 1 (one kernel for the whole batch),
//          or, with packed_for, the kernel already in oneDNN's layout (brain_ldm_onednn_pack), flat
//   bias   (..., O),             leading axes all of size 1, or one bias per example
// Result: (..., O, D', H', W') (or channels-last), the same leading axes as x.
// Attributes: stride (one for every axis), pad_{d,h,w}_{lo,hi} (zero padding before / after),
// blocked (use the layout oneDNN prefers for the activations, nCdhw8c/16c, reordering the
// plain input and output; otherwise channels-last, ndhwc), packed_for (empty, or the 16 values
// of the problem the packed kernel was made for: see problem_from).
//
// oneDNN primitives (convolution and the reorders around it) are built once per problem
// (shapes, stride, padding, layout) and cached. On each call a plain kernel is reordered into
// oneDNN's packed layout (a packed one is read as is) and the activations into its blocked
// layout, in three scratch buffers
// shared by all problems (grown to the largest one, never one per problem: a U-Net's packed
// kernels would otherwise double its 2.2 GB of weights). Calls are serialised: each uses all of
// oneDNN's OpenMP threads (OMP_NUM_THREADS).

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Problem {
  int64_t n, i, d, h, w, o, kd, kh, kw, stride, pads[6];
  bool blocked, channels_last;
  auto tie() const {
    return std::tie(n, i, d, h, w, o, kd, kh, kw, stride, pads[0], pads[1], pads[2], pads[3], pads[4],
                    pads[5], blocked, channels_last);
  }
  bool operator<(const Problem& other) const { return tie() < other.tie(); }
  int64_t out(int64_t size, int64_t k, int64_t lo, int64_t hi) const {
    return (size + lo + hi - k) / stride + 1;
  }
};

struct Plan {
  dnnl::convolution_forward conv;
  dnnl::memory::desc src_user, dst_user, weights_user, src_md, dst_md, weights_md, bias_md;
  bool reorder_src = false, reorder_dst = false;
  dnnl::reorder src_reorder, dst_reorder, weights_reorder;
  std::string implementation;  // oneDNN's name of the convolution's implementation
};

// A grow-only 64-byte-aligned scratch buffer.
class Scratch {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      data_ = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      size_ = data_ ? bytes : 0;
      if (!data_) throw std::bad_alloc();
    }
    return data_;
  }
  void release() {
    std::free(data_);
    data_ = nullptr;
    size_ = 0;
  }
  ~Scratch() { std::free(data_); }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

Scratch scratch_src, scratch_dst, scratch_weights;

// Seconds spent in each phase of the calls so far (profiling: bench/profile_unet.py).
enum Phase { kWeights, kSrc, kConv, kDst, kPhases };
double phase_seconds[kPhases] = {};

class PhaseClock {
 public:
  void lap(Phase phase) {
    const auto now = std::chrono::steady_clock::now();
    phase_seconds[phase] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

dnnl::engine& engine() {
  static dnnl::engine instance(dnnl::engine::kind::cpu, 0);
  return instance;
}

std::mutex& call_mutex() {
  static std::mutex instance;
  return instance;
}

std::map<Problem, std::unique_ptr<Plan>>& plans() {
  static std::map<Problem, std::unique_ptr<Plan>> instance;
  return instance;
}

std::unique_ptr<Plan> make_plan(const Problem& p) {
  auto plan = std::make_unique<Plan>();
  const dnnl::memory::dims src_dims{p.n, p.i, p.d, p.h, p.w};
  const dnnl::memory::dims dst_dims{p.n, p.o, p.out(p.d, p.kd, p.pads[0], p.pads[1]),
                                    p.out(p.h, p.kh, p.pads[2], p.pads[3]),
                                    p.out(p.w, p.kw, p.pads[4], p.pads[5])};
  const dnnl::memory::dims weights_dims{p.o, p.i, p.kd, p.kh, p.kw};
  const tag user = p.channels_last ? tag::ndhwc : tag::ncdhw;
  plan->src_user = dnnl::memory::desc(src_dims, dt::f32, user);
  plan->dst_user = dnnl::memory::desc(dst_dims, dt::f32, user);
  plan->weights_user = dnnl::memory::desc(weights_dims, dt::f32, tag::oidhw);
  plan->bias_md = dnnl::memory::desc({p.o}, dt::f32, tag::x);
  const auto weights_any = dnnl::memory::desc(weights_dims, dt::f32, tag::any);
  const dnnl::memory::dims strides{p.stride, p.stride, p.stride};
  const dnnl::memory::dims pad_lo{p.pads[0], p.pads[2], p.pads[4]};
  const dnnl::memory::dims pad_hi{p.pads[1], p.pads[3], p.pads[5]};
  auto describe = [&](tag src_tag, tag dst_tag) {
    return dnnl::convolution_forward::primitive_desc(
        engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        dnnl::memory::desc(src_dims, dt::f32, src_tag), weights_any, plan->bias_md,
        dnnl::memory::desc(dst_dims, dt::f32, dst_tag), strides, pad_lo, pad_hi);
  };
  // Blocked: the CPU's native channel blocks (nCdhw16c on AVX-512, nCdhw8c on AVX2), the first
  // one oneDNN has a direct JIT implementation for (not "ref", not "gemm"); an input with fewer channels
  // than a block (the networks' 1-, 3- and 7-channel inputs) is left to oneDNN, and so is a
  // convolution with fewer outputs (64 -> 1: blocked, it computes 15 padding channels). Not tag::any for
  // both: measured on AVX-512 (oneDNN 3.2), that picks its channels-last brgconv, 2x slower on
  // the sub-pixel (2x2x2, 1024-output) convolutions and 1.3x on 768->256 ones.
  dnnl::convolution_forward::primitive_desc pd;
  bool found = false;
  if (p.blocked && p.o >= 16) {
    for (const tag block : {tag::nCdhw16c, tag::nCdhw8c}) {
      try {
        pd = describe(p.i >= 16 ? block : tag::any, block);
      } catch (const dnnl::error&) {
        continue;
      }
      const std::string implementation = pd.impl_info_str();
      if (implementation.rfind("jit:", 0) == 0 || implementation.rfind("brg", 0) == 0) {
        found = true;
        break;
      }
    }
  }
  if (!found) pd = p.blocked ? describe(tag::any, tag::any) : describe(tag::ndhwc, tag::ndhwc);
  plan->conv = dnnl::convolution_forward(pd);
  plan->implementation = pd.impl_info_str();
  plan->src_md = pd.src_desc();
  plan->dst_md = pd.dst_desc();
  plan->weights_md = pd.weights_desc();
  if (plan->src_md != plan->src_user) {
    plan->reorder_src = true;
    plan->src_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), plan->src_user, engine(),
                                                                    plan->src_md));
  }
  if (plan->dst_md != plan->dst_user) {
    plan->reorder_dst = true;
    plan->dst_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), plan->dst_md, engine(),
                                                                    plan->dst_user));
  }
  plan->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), plan->weights_user,
                                                                      engine(), plan->weights_md));
  return plan;
}

// Caller holds call_mutex().
Plan& plan_for(const Problem& p) {
  auto& slot = plans()[p];
  if (!slot) slot = make_plan(p);
  return *slot;
}

// A problem written as 16 integers (packing; the packed_for attribute): one example (n = 1),
// plain channels-first user layout:
// i, d, h, w, o, kd, kh, kw, stride, pad d lo, d hi, h lo, h hi, w lo, w hi, blocked.
constexpr size_t kPackedProblem = 16;

Problem problem_from(const int64_t* v) {
  Problem p{};
  p.n = 1, p.i = v[0], p.d = v[1], p.h = v[2], p.w = v[3], p.o = v[4], p.kd = v[5], p.kh = v[6], p.kw = v[7];
  p.stride = v[8];
  for (int k = 0; k < 6; ++k) p.pads[k] = v[9 + k];
  p.blocked = v[15] != 0;
  p.channels_last = false;
  return p;
}

int64_t leading(const ffi::Span<const int64_t> dims, size_t trailing) {
  int64_t product = 1;
  for (size_t k = 0; k + trailing < dims.size(); ++k) product *= dims[k];
  return product;
}

ffi::Error Conv3d(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> bias,
                  ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad_d_lo, int64_t pad_d_hi,
                  int64_t pad_h_lo, int64_t pad_h_hi, int64_t pad_w_lo, int64_t pad_w_hi, bool blocked,
                  bool channels_last, ffi::Span<const int64_t> packed_for) {
  const auto xd = x.dimensions(), wd = weight.dimensions(), bd = bias.dimensions();
  if (xd.size() < 4 || bd.size() < 1)
    return ffi::Error::InvalidArgument("onednn conv3d: x needs rank >= 4, bias >= 1");
  if (packed_for.size() == 0 && wd.size() >= 5 && leading(wd, 5) != 1)
    return ffi::Error::InvalidArgument("onednn conv3d: one kernel per call (weights must not be batched)");
  const size_t r = xd.size();
  Problem p{};
  // The batch is the result's leading axes; x and bias have either the same or size-1 ones
  // (jax.vmap's "expand_dims" over only some arguments). A batched bias (one per example, e.g. a
  // U-Net's conv bias plus its time embedding) or a shared x: one convolution per example.
  const int64_t batch = leading(y->dimensions(), 4), inputs = leading(xd, 4), biases = leading(bd, 1);
  if ((inputs != 1 && inputs != batch) || (biases != 1 && biases != batch))
    return ffi::Error::InvalidArgument("onednn conv3d: x or bias batch differs from the result's");
  const bool per_example = batch > 1 && (inputs != batch || biases != 1);
  const int64_t examples = per_example ? batch : 1;
  p.n = per_example ? 1 : batch;
  if (channels_last) {
    p.d = xd[r - 4], p.h = xd[r - 3], p.w = xd[r - 2], p.i = xd[r - 1];
  } else {
    p.i = xd[r - 4], p.d = xd[r - 3], p.h = xd[r - 2], p.w = xd[r - 1];
  }
  // packed_for: empty (weight is the plain (O, I, kD, kH, kW) kernel, reordered on every call) or
  // the problem the weight was packed for by brain_ldm_onednn_pack (kPackedProblem values; the
  // weight is then that plan's packed kernel, a flat array).
  const bool packed = packed_for.size() != 0;
  if (packed) {
    if (packed_for.size() != kPackedProblem)
      return ffi::Error::InvalidArgument("onednn conv3d: packed_for needs 16 values");
    p.o = packed_for[4], p.kd = packed_for[5], p.kh = packed_for[6], p.kw = packed_for[7];
    if (packed_for[0] != p.i || bd[bd.size() - 1] != p.o)
      return ffi::Error::InvalidArgument("onednn conv3d: x, packed weight and bias channels disagree");
  } else {
    if (wd.size() < 5) return ffi::Error::InvalidArgument("onednn conv3d: weight needs rank >= 5");
    const size_t rw = wd.size();
    p.o = wd[rw - 5], p.kd = wd[rw - 3], p.kh = wd[rw - 2], p.kw = wd[rw - 1];
    if (wd[rw - 4] != p.i || bd[bd.size() - 1] != p.o)
      return ffi::Error::InvalidArgument("onednn conv3d: x, weight and bias channels disagree");
  }
  p.stride = stride;
  const int64_t pads[6] = {pad_d_lo, pad_d_hi, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi};
  std::memcpy(p.pads, pads, sizeof pads);
  p.blocked = blocked;
  p.channels_last = channels_last;
  if (p.n == 0) return ffi::Error::Success();

  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    Plan& plan = plan_for(p);
    dnnl::stream stream(engine());
    PhaseClock clock;
    dnnl::memory weights_packed;
    if (packed) {
      // Packed at load for packed_for; used as is when this problem wants the same layout
      // (the usual case), else reordered between the two packed layouts.
      const Plan& origin = plan_for(problem_from(packed_for.begin()));
      if (static_cast<int64_t>(origin.weights_md.get_size() / sizeof(float)) != leading(wd, 0))
        return ffi::Error::InvalidArgument("onednn conv3d: packed weight size differs from its problem's");
      dnnl::memory weights_given(origin.weights_md, engine(), const_cast<float*>(weight.typed_data()));
      if (origin.weights_md == plan.weights_md) {
        weights_packed = weights_given;
      } else {
        weights_packed = dnnl::memory(plan.weights_md, engine(), scratch_weights.get(plan.weights_md.get_size()));
        dnnl::reorder(weights_given, weights_packed).execute(stream, weights_given, weights_packed);
      }
    } else {
      dnnl::memory weights_user(plan.weights_user, engine(), const_cast<float*>(weight.typed_data()));
      weights_packed = dnnl::memory(plan.weights_md, engine(), scratch_weights.get(plan.weights_md.get_size()));
      plan.weights_reorder.execute(stream, weights_user, weights_packed);
    }
    stream.wait();
    clock.lap(kWeights);
    const size_t src_step = plan.src_user.get_size() / sizeof(float);
    const size_t dst_step = plan.dst_user.get_size() / sizeof(float);
    for (int64_t e = 0; e < examples; ++e) {
      const int64_t x_index = inputs == 1 ? 0 : e, bias_index = biases == 1 ? 0 : e;
      dnnl::memory src_user(plan.src_user, engine(), const_cast<float*>(x.typed_data()) + x_index * src_step);
      dnnl::memory dst_user(plan.dst_user, engine(), y->typed_data() + e * dst_step);
      dnnl::memory bias_mem(plan.bias_md, engine(), const_cast<float*>(bias.typed_data()) + bias_index * p.o);
      dnnl::memory src = src_user, dst = dst_user;
      if (plan.reorder_src) {
        src = dnnl::memory(plan.src_md, engine(), scratch_src.get(plan.src_md.get_size()));
        plan.src_reorder.execute(stream, src_user, src);
        stream.wait();
      }
      clock.lap(kSrc);
      if (plan.reorder_dst) dst = dnnl::memory(plan.dst_md, engine(), scratch_dst.get(plan.dst_md.get_size()));
      plan.conv.execute(stream, {{DNNL_ARG_SRC, src},
                                 {DNNL_ARG_WEIGHTS, weights_packed},
                                 {DNNL_ARG_BIAS, bias_mem},
                                 {DNNL_ARG_DST, dst}});
      stream.wait();
      clock.lap(kConv);
      if (plan.reorder_dst) plan.dst_reorder.execute(stream, dst, dst_user);
      stream.wait();
      clock.lap(kDst);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn conv3d: ") + e.what());
  }
  return ffi::Error::Success();
}


// ---- Winograd F(2x2x2, 3x3x3) -------------------------------------------------------------------
// A 3x3x3 convolution, stride 1, zero padding 0 or 1 per side, on channels-last volumes:
// y = A^T [ (G g G^T) (.) (B^T d B) ] A along each axis (Lavin & Gray 2016), on tiles of 2x2x2
// outputs (4x4x4 inputs). The 64 element-wise products summed over input channels are 64 matrix
// products (tiles x I) @ (I x O): one batched oneDNN matmul per chunk of tiles. 64 multiplies per
// 8 outputs instead of 216 (3.4x fewer); transforms are additions only (and halves, in G).
// Per call: the kernel is transformed into a scratch buffer (cheap next to the products), then
// tiles are processed in chunks so that the transformed inputs and products stay a few tens of MB.
constexpr int kWinogradPoints = 64;  // 4x4x4

struct WinogradProblem {
  int64_t i, o, d, h, w, pads[6];
  auto tie() const { return std::tie(i, o, d, h, w, pads[0], pads[1], pads[2], pads[3], pads[4], pads[5]); }
  bool operator<(const WinogradProblem& other) const { return tie() < other.tie(); }
  int64_t out_d() const { return d + pads[0] + pads[1] - 2; }
  int64_t out_h() const { return h + pads[2] + pads[3] - 2; }
  int64_t out_w() const { return w + pads[4] + pads[5] - 2; }
  int64_t tiles() const { return ((out_d() + 1) / 2) * ((out_h() + 1) / 2) * ((out_w() + 1) / 2); }
};

// Tiles per matrix product: the transformed inputs of a chunk take at most about kWinogradChunkBytes.
// Measured (512->512 at 20x28x20, AVX-512): 2 MB chunks 0.94x the direct convolution's time,
// 8 MB 0.60x, 64 MB 0.53x, 256 MB 0.48x: with many channels the products take the time, and
// they run faster on more rows.
constexpr int64_t kWinogradChunkBytes = 256 << 20;

// Up to 128 channels the transforms, not the products, take the time (memory-bound: 8x the input
// is written and read back): each thread then takes whole chunks of about kWinogradFusedBytes
// (transformed inputs + products) through transform, matmul and back-transform while they are
// in its cache. Measured (128->128 at 20x112x80): 0.76x oneDNN direct with 512 kB, 0.69x with
// 2 MB, 0.82x with 8 MB; the unfused form 0.85x at its best.
constexpr int64_t kWinogradFusedBytes = 2 << 20;
constexpr int64_t kWinogradFusedMaxChannels = 128;

bool winograd_fused(const WinogradProblem& p) { return std::max(p.i, p.o) <= kWinogradFusedMaxChannels; }

int64_t winograd_chunk(const WinogradProblem& p, bool fused) {
  if (fused) {
    const int64_t per_tile = kWinogradPoints * (p.i + p.o) * static_cast<int64_t>(sizeof(float));
    return std::max<int64_t>(8, std::min<int64_t>(p.tiles(), kWinogradFusedBytes / per_tile));
  }
  const int64_t per_tile = kWinogradPoints * std::max(p.i, p.o) * static_cast<int64_t>(sizeof(float));
  return std::max<int64_t>(8, std::min<int64_t>(p.tiles(), kWinogradChunkBytes / per_tile));
}

// Batched matmul (64, rows, I) @ (64, I, O) -> (64, rows, O), one per distinct (rows, I, O). Its
// scratchpad is the caller's (scratchpad_mode::user): threads run the same primitive at once.
struct WinogradMatmul {
  dnnl::matmul primitive;
  size_t scratchpad_bytes = 0;
};

std::map<std::tuple<int64_t, int64_t, int64_t>, WinogradMatmul>& winograd_matmuls() {
  static std::map<std::tuple<int64_t, int64_t, int64_t>, WinogradMatmul> instance;
  return instance;
}

// Caller holds call_mutex() (the map may grow).
WinogradMatmul& winograd_matmul(int64_t rows, int64_t i, int64_t o) {
  auto& slot = winograd_matmuls()[{rows, i, o}];
  if (!slot.primitive) {
    const dnnl::memory::desc src({kWinogradPoints, rows, i}, dt::f32, tag::abc);
    const dnnl::memory::desc weights({kWinogradPoints, i, o}, dt::f32, tag::abc);
    const dnnl::memory::desc dst({kWinogradPoints, rows, o}, dt::f32, tag::abc);
    dnnl::primitive_attr attributes;
    attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::matmul::primitive_desc pd(engine(), src, weights, dst, attributes);
    slot.primitive = dnnl::matmul(pd);
    slot.scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  return slot;
}

Scratch scratch_winograd_kernel, scratch_winograd_in, scratch_winograd_products, scratch_winograd_pad;

constexpr int64_t kLanes = 16;  // channels transformed together (one AVX-512 register)

// G g G^T along each axis: kernel (O, I, 3, 3, 3) -> transformed (64, I, O). Output channels go
// in blocks of kLanes, so that each of the 64 transformed values is written as one cache line.
void winograd_kernel(const float* kernel, int64_t channels_in, int64_t channels_out, float* transformed) {
  const int64_t blocks = (channels_out + kLanes - 1) / kLanes;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < channels_in; ++i) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t o0 = block * kLanes, n = std::min(kLanes, channels_out - o0);
      float values[kWinogradPoints][kLanes];
      for (int64_t j = 0; j < n; ++j) {
        const float* g = kernel + ((o0 + j) * channels_in + i) * 27;
        float along_w[3][3][4], along_h[3][4][4];
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) {
            const float* t = g + (a * 3 + b) * 3;
            along_w[a][b][0] = t[0];
            along_w[a][b][1] = 0.5f * (t[0] + t[1] + t[2]);
            along_w[a][b][2] = 0.5f * (t[0] - t[1] + t[2]);
            along_w[a][b][3] = t[2];
          }
        for (int a = 0; a < 3; ++a)
          for (int c = 0; c < 4; ++c) {
            const float t0 = along_w[a][0][c], t1 = along_w[a][1][c], t2 = along_w[a][2][c];
            along_h[a][0][c] = t0;
            along_h[a][1][c] = 0.5f * (t0 + t1 + t2);
            along_h[a][2][c] = 0.5f * (t0 - t1 + t2);
            along_h[a][3][c] = t2;
          }
        for (int b = 0; b < 4; ++b)
          for (int c = 0; c < 4; ++c) {
            const float t0 = along_h[0][b][c], t1 = along_h[1][b][c], t2 = along_h[2][b][c];
            values[(0 * 4 + b) * 4 + c][j] = t0;
            values[(1 * 4 + b) * 4 + c][j] = 0.5f * (t0 + t1 + t2);
            values[(2 * 4 + b) * 4 + c][j] = 0.5f * (t0 - t1 + t2);
            values[(3 * 4 + b) * 4 + c][j] = t2;
          }
      }
      for (int point = 0; point < kWinogradPoints; ++point) {
        float* dst = transformed + (point * channels_in + i) * channels_out + o0;
        for (int64_t j = 0; j < n; ++j) dst[j] = values[point][j];
      }
    }
  }
}

// B^T d B of the 4x4x4 input patch of tile (td, th, tw), channels [c0, c0 + n), into row `row` of
// each of the 64 (rows, I) matrices at `out` (zero outside the volume: the padding).
template <int64_t kFixed>  // kFixed > 0: n == kFixed, a compile-time trip count (vectorised)
inline void winograd_input_tile(const float* x, const WinogradProblem& p, int64_t td, int64_t th, int64_t tw,
                                int64_t c0, int64_t lanes, float* out, int64_t rows, int64_t row) {
  const int64_t n = kFixed > 0 ? kFixed : lanes;
  float v[kWinogradPoints][kLanes];
  for (int a = 0; a < 4; ++a) {
    const int64_t zd = 2 * td - p.pads[0] + a;
    for (int b = 0; b < 4; ++b) {
      const int64_t zh = 2 * th - p.pads[2] + b;
      for (int c = 0; c < 4; ++c) {
        const int64_t zw = 2 * tw - p.pads[4] + c;
        float* dst = v[(a * 4 + b) * 4 + c];
        if (zd >= 0 && zd < p.d && zh >= 0 && zh < p.h && zw >= 0 && zw < p.w) {
          const float* src = x + ((zd * p.h + zh) * p.w + zw) * p.i + c0;
          for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
        } else {
          for (int64_t j = 0; j < n; ++j) dst[j] = 0.0f;
        }
      }
    }
  }
  // along each axis (stride 1, 4, 16 between the four values of a line)
  for (const int stride : {1, 4, 16}) {
    for (int line = 0; line < 16; ++line) {
      // the 16 lines along the axis: base index with the axis' own digit zero
      const int low = line % stride, high = line / stride;
      const int base = high * stride * 4 + low;
      float* v0 = v[base];
      float* v1 = v[base + stride];
      float* v2 = v[base + 2 * stride];
      float* v3 = v[base + 3 * stride];
      for (int64_t j = 0; j < n; ++j) {
        const float d0 = v0[j], d1 = v1[j], d2 = v2[j], d3 = v3[j];
        v0[j] = d0 - d2;
        v1[j] = d1 + d2;
        v2[j] = d2 - d1;
        v3[j] = d1 - d3;
      }
    }
  }
  for (int point = 0; point < kWinogradPoints; ++point) {
    float* dst = out + (point * rows + row) * p.i + c0;
    for (int64_t j = 0; j < n; ++j) dst[j] = v[point][j];
  }
}

// A^T m A of row `row` of the 64 (rows, O) products, channels [c0, c0 + n), plus bias, written to
// the (up to) 2x2x2 outputs of tile (td, th, tw) in the channels-last result y.
template <int64_t kFixed>
inline void winograd_output_tile(const float* products, const float* bias, const WinogradProblem& p,
                                 int64_t td, int64_t th, int64_t tw, int64_t c0, int64_t lanes, float* y,
                                 int64_t rows, int64_t row) {
  const int64_t n = kFixed > 0 ? kFixed : lanes;
  float m[kWinogradPoints][kLanes];
  for (int point = 0; point < kWinogradPoints; ++point) {
    const float* src = products + (point * rows + row) * p.o + c0;
    for (int64_t j = 0; j < n; ++j) m[point][j] = src[j];
  }
  // along w, then h, then d: 4 values -> 2 (kept in the first two slots of each line)
  for (const int stride : {1, 4, 16}) {
    for (int line = 0; line < 16; ++line) {
      const int low = line % stride, high = line / stride;
      const int base = high * stride * 4 + low;
      float* m0 = m[base];
      float* m1 = m[base + stride];
      const float* m2 = m[base + 2 * stride];
      const float* m3 = m[base + 3 * stride];
      for (int64_t j = 0; j < n; ++j) {
        const float a0 = m0[j], a1 = m1[j], a2 = m2[j], a3 = m3[j];
        m0[j] = a0 + a1 + a2;
        m1[j] = a1 - a2 - a3;
      }
    }
  }
  const int64_t out_d = p.out_d(), out_h = p.out_h(), out_w = p.out_w();
  for (int a = 0; a < 2; ++a) {
    const int64_t od = 2 * td + a;
    if (od >= out_d) continue;
    for (int b = 0; b < 2; ++b) {
      const int64_t oh = 2 * th + b;
      if (oh >= out_h) continue;
      for (int c = 0; c < 2; ++c) {
        const int64_t ow = 2 * tw + c;
        if (ow >= out_w) continue;
        const float* src = m[(a * 4 + b) * 4 + c];
        float* dst = y + ((od * out_h + oh) * out_w + ow) * p.o + c0;
        for (int64_t j = 0; j < n; ++j) dst[j] = src[j] + bias[c0 + j];
      }
    }
  }
}

// The transforms of one tile (index t in d, h, w order), over all channel blocks.
struct TileRows {
  const WinogradProblem& p;
  int64_t tiles_h, tiles_w;
  void input(const float* x, int64_t t, float* transformed, int64_t rows, int64_t row) const {
    const int64_t td = t / (tiles_h * tiles_w), th = (t / tiles_w) % tiles_h, tw = t % tiles_w;
    for (int64_t c0 = 0; c0 < p.i; c0 += kLanes) {
      const int64_t lanes = std::min(kLanes, p.i - c0);
      if (lanes == kLanes)
        winograd_input_tile<kLanes>(x, p, td, th, tw, c0, lanes, transformed, rows, row);
      else
        winograd_input_tile<0>(x, p, td, th, tw, c0, lanes, transformed, rows, row);
    }
  }
  void output(const float* products, const float* bias, int64_t t, float* y, int64_t rows, int64_t row) const {
    const int64_t td = t / (tiles_h * tiles_w), th = (t / tiles_w) % tiles_h, tw = t % tiles_w;
    for (int64_t c0 = 0; c0 < p.o; c0 += kLanes) {
      const int64_t lanes = std::min(kLanes, p.o - c0);
      if (lanes == kLanes)
        winograd_output_tile<kLanes>(products, bias, p, td, th, tw, c0, lanes, y, rows, row);
      else
        winograd_output_tile<0>(products, bias, p, td, th, tw, c0, lanes, y, rows, row);
    }
  }
};

// `scratchpad`: at least the matmul's scratchpad_bytes, used by this call only.
void run_winograd_matmul(dnnl::stream& stream, const WinogradMatmul& matmul, int64_t rows, const WinogradProblem& p,
                         float* transformed, float* kernel, float* products, void* scratchpad) {
  dnnl::memory src({{kWinogradPoints, rows, p.i}, dt::f32, tag::abc}, engine(), transformed);
  dnnl::memory weights({{kWinogradPoints, p.i, p.o}, dt::f32, tag::abc}, engine(), kernel);
  dnnl::memory dst({{kWinogradPoints, rows, p.o}, dt::f32, tag::abc}, engine(), products);
  std::unordered_map<int, dnnl::memory> arguments{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst}};
  if (matmul.scratchpad_bytes > 0)
    arguments[DNNL_ARG_SCRATCHPAD] =
        dnnl::memory({{static_cast<int64_t>(matmul.scratchpad_bytes)}, dt::u8, tag::a}, engine(), scratchpad);
  matmul.primitive.execute(stream, arguments);
  stream.wait();
}

ffi::Error WinogradConv3d(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> bias,
                          ffi::ResultBuffer<ffi::F32> y, int64_t pad_d_lo, int64_t pad_d_hi, int64_t pad_h_lo,
                          int64_t pad_h_hi, int64_t pad_w_lo, int64_t pad_w_hi) {
  const auto xd = x.dimensions(), wd = weight.dimensions(), bd = bias.dimensions();
  if (xd.size() < 4 || wd.size() < 5 || bd.size() < 1)
    return ffi::Error::InvalidArgument("winograd conv3d: x needs rank >= 4, weight >= 5, bias >= 1");
  if (leading(wd, 5) != 1)
    return ffi::Error::InvalidArgument("winograd conv3d: one kernel per call (weights must not be batched)");
  const size_t r = xd.size(), rw = wd.size();
  WinogradProblem p{};
  p.d = xd[r - 4], p.h = xd[r - 3], p.w = xd[r - 2], p.i = xd[r - 1];
  p.o = wd[rw - 5];
  if (wd[rw - 4] != p.i || wd[rw - 3] != 3 || wd[rw - 2] != 3 || wd[rw - 1] != 3 || bd[bd.size() - 1] != p.o)
    return ffi::Error::InvalidArgument("winograd conv3d: needs a (O, I, 3, 3, 3) kernel matching x and bias");
  const int64_t pads[6] = {pad_d_lo, pad_d_hi, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi};
  for (const int64_t pad : pads)
    if (pad < 0 || pad > 1) return ffi::Error::InvalidArgument("winograd conv3d: padding must be 0 or 1");
  std::memcpy(p.pads, pads, sizeof pads);
  const int64_t batch = leading(y->dimensions(), 4), inputs = leading(xd, 4), biases = leading(bd, 1);
  if ((inputs != 1 && inputs != batch) || (biases != 1 && biases != batch))
    return ffi::Error::InvalidArgument("winograd conv3d: x or bias batch differs from the result's");
  if (batch == 0 || p.out_d() <= 0 || p.out_h() <= 0 || p.out_w() <= 0) return ffi::Error::Success();

  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    dnnl::stream stream(engine());
    PhaseClock clock;
    float* kernel = static_cast<float*>(
        scratch_winograd_kernel.get(kWinogradPoints * p.i * p.o * sizeof(float)));
    winograd_kernel(weight.typed_data(), p.i, p.o, kernel);
    clock.lap(kWeights);
    const int64_t tiles_d = (p.out_d() + 1) / 2, tiles_h = (p.out_h() + 1) / 2, tiles_w = (p.out_w() + 1) / 2;
    const bool fused = winograd_fused(p);
    const int64_t tiles = tiles_d * tiles_h * tiles_w, chunk = winograd_chunk(p, fused);
    const int64_t x_step = p.d * p.h * p.w * p.i, y_step = p.out_d() * p.out_h() * p.out_w() * p.o;
    const TileRows tile_rows{p, tiles_h, tiles_w};
    if (fused) {
      // Each thread takes whole chunks: transform, a single-threaded matmul (oneDNN runs nested
      // calls on the calling thread), back-transform, while the chunk is still in its cache.
      const int threads = omp_get_max_threads();
      const int64_t chunks = (tiles + chunk - 1) / chunk;
      const WinogradMatmul& full = winograd_matmul(chunk, p.i, p.o);
      const WinogradMatmul& tail = winograd_matmul(tiles % chunk ? tiles % chunk : chunk, p.i, p.o);
      const int64_t pad_floats = (std::max(full.scratchpad_bytes, tail.scratchpad_bytes) + 63) / 64 * 16;
      const int64_t per_thread = kWinogradPoints * chunk * (p.i + p.o) + pad_floats;
      float* buffers = static_cast<float*>(scratch_winograd_in.get(threads * per_thread * sizeof(float)));
      for (int64_t e = 0; e < batch; ++e) {
        const float* x_e = x.typed_data() + (inputs == 1 ? 0 : e) * x_step;
        const float* bias_e = bias.typed_data() + (biases == 1 ? 0 : e) * p.o;
        float* y_e = y->typed_data() + e * y_step;
        bool failed = false;
#pragma omp parallel num_threads(threads)
        {
          const int me = omp_get_thread_num(), team = omp_get_num_threads();
          float* transformed = buffers + me * per_thread;
          float* products = transformed + kWinogradPoints * chunk * p.i;
          float* scratchpad = products + kWinogradPoints * chunk * p.o;
          try {
            dnnl::stream local(engine());
            for (int64_t c = me; c < chunks; c += team) {
              const int64_t first = c * chunk, rows = std::min(chunk, tiles - first);
              for (int64_t row = 0; row < rows; ++row) tile_rows.input(x_e, first + row, transformed, rows, row);
              run_winograd_matmul(local, rows == chunk ? full : tail, rows, p, transformed, kernel, products,
                                  scratchpad);
              for (int64_t row = 0; row < rows; ++row)
                tile_rows.output(products, bias_e, first + row, y_e, rows, row);
            }
          } catch (const dnnl::error&) {
#pragma omp atomic write
            failed = true;
          }
        }
        if (failed) return ffi::Error::Internal("winograd conv3d: oneDNN matmul failed");
      }
      clock.lap(kConv);
    } else {
      float* transformed = static_cast<float*>(
          scratch_winograd_in.get(kWinogradPoints * chunk * p.i * sizeof(float)));
      float* products = static_cast<float*>(
          scratch_winograd_products.get(kWinogradPoints * chunk * p.o * sizeof(float)));
      for (int64_t e = 0; e < batch; ++e) {
        const float* x_e = x.typed_data() + (inputs == 1 ? 0 : e) * x_step;
        const float* bias_e = bias.typed_data() + (biases == 1 ? 0 : e) * p.o;
        float* y_e = y->typed_data() + e * y_step;
        for (int64_t first = 0; first < tiles; first += chunk) {
          const int64_t rows = std::min(chunk, tiles - first);
#pragma omp parallel for schedule(static)
          for (int64_t row = 0; row < rows; ++row) tile_rows.input(x_e, first + row, transformed, rows, row);
          clock.lap(kSrc);
          const WinogradMatmul& matmul = winograd_matmul(rows, p.i, p.o);
          run_winograd_matmul(stream, matmul, rows, p, transformed, kernel, products,
                              scratch_winograd_pad.get(std::max<size_t>(matmul.scratchpad_bytes, 64)));
          clock.lap(kConv);
#pragma omp parallel for schedule(static)
          for (int64_t row = 0; row < rows; ++row)
            tile_rows.output(products, bias_e, first + row, y_e, rows, row);
          clock.lap(kDst);
        }
      }
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("winograd conv3d: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// The exported symbols (everything else is hidden: -fvisibility=hidden).
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrainLdmOnednnConv3d, Conv3d,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_d_lo")
                                  .Attr<int64_t>("pad_d_hi")
                                  .Attr<int64_t>("pad_h_lo")
                                  .Attr<int64_t>("pad_h_hi")
                                  .Attr<int64_t>("pad_w_lo")
                                  .Attr<int64_t>("pad_w_hi")
                                  .Attr<bool>("blocked")
                                  .Attr<bool>("channels_last")
                                  .Attr<ffi::Span<const int64_t>>("packed_for"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BrainLdmWinogradConv3d, WinogradConv3d,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_d_lo")
                                  .Attr<int64_t>("pad_d_hi")
                                  .Attr<int64_t>("pad_h_lo")
                                  .Attr<int64_t>("pad_h_hi")
                                  .Attr<int64_t>("pad_w_lo")
                                  .Attr<int64_t>("pad_w_hi"));

// The version of this file's interface (handler attributes, exported functions). The Python side
// (models/onednn.py, INTERFACE_VERSION) refuses an extension built from another version, e.g. a
// stale build left in a source checkout, and runs on XLA instead. Bump both on any change.
extern "C" int brain_ldm_onednn_interface_version() { return 3; }

// Threads oneDNN's OpenMP runtime uses (for the Python side's one-line report and tests).
extern "C" int brain_ldm_onednn_max_threads() { return omp_get_max_threads(); }

// Frees the scratch buffers (they grow back on the next call), e.g. between sampling and decoding.
extern "C" void brain_ldm_onednn_release_scratch() {
  std::lock_guard<std::mutex> lock(call_mutex());
  scratch_src.release();
  scratch_dst.release();
  scratch_weights.release();
  scratch_winograd_kernel.release();
  scratch_winograd_in.release();
  scratch_winograd_products.release();
  scratch_winograd_pad.release();
}

// Seconds spent so far reordering kernels, reordering inputs, convolving, reordering outputs
// (written to seconds[0..3]); reset with reset != 0.
extern "C" void brain_ldm_onednn_phase_seconds(double* seconds, int reset) {
  std::lock_guard<std::mutex> lock(call_mutex());
  for (int k = 0; k < kPhases; ++k) {
    seconds[k] = phase_seconds[k];
    if (reset) phase_seconds[k] = 0.0;
  }
}

// Floats of the kernel packed for `problem` (16 values, see problem_from), or -1 on error.
extern "C" int64_t brain_ldm_onednn_packed_floats(const int64_t* problem) {
  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    return static_cast<int64_t>(plan_for(problem_from(problem)).weights_md.get_size() / sizeof(float));
  } catch (const dnnl::error&) {
    return -1;
  }
}

// Kernel (O, I, kD, kH, kW) reordered into, or (unpack != 0) back from, the layout the convolution
// of `problem` reads (brain_ldm_onednn_packed_floats floats). 0 on success, -1 on error.
extern "C" int brain_ldm_onednn_pack(const int64_t* problem, const float* from, float* to, int unpack) {
  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    const Plan& plan = plan_for(problem_from(problem));
    const auto& source = unpack ? plan.weights_md : plan.weights_user;
    const auto& target = unpack ? plan.weights_user : plan.weights_md;
    dnnl::memory in(source, engine(), const_cast<float*>(from)), out(target, engine(), to);
    dnnl::stream stream(engine());
    dnnl::reorder(in, out).execute(stream, in, out);
    stream.wait();
    return 0;
  } catch (const dnnl::error&) {
    return -1;
  }
}

// The activation layout a problem's convolution reads and writes, as oneDNN names it.
std::string layout_name(const dnnl::memory::desc& md) {
  const auto dims = md.get_dims();
  for (const auto& [format, name] : {std::pair{tag::nCdhw16c, "nCdhw16c"}, std::pair{tag::nCdhw8c, "nCdhw8c"},
                                     std::pair{tag::ndhwc, "ndhwc"}, std::pair{tag::ncdhw, "ncdhw"}}) {
    if (md == dnnl::memory::desc(dims, dt::f32, format)) return name;
  }
  return "other";
}

// "<implementation> <src layout> <dst layout>" of the convolution of `problem` (16 values, see
// problem_from), written NUL-terminated into `text` (at most `size` bytes). 0 on success.
extern "C" int brain_ldm_onednn_describe(const int64_t* problem, char* text, int64_t size) {
  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    const Plan& plan = plan_for(problem_from(problem));
    const std::string description =
        plan.implementation + " " + layout_name(plan.src_md) + " " + layout_name(plan.dst_md);
    if (size <= 0) return -1;
    std::strncpy(text, description.c_str(), static_cast<size_t>(size) - 1);
    text[size - 1] = '\0';
    return 0;
  } catch (const dnnl::error&) {
    return -1;
  }
}

// Number of cached primitive plans (tests: the cache is keyed by problem, not by call).
extern "C" int64_t brain_ldm_onednn_cached_plans() {
  std::lock_guard<std::mutex> lock(call_mutex());
  return static_cast<int64_t>(plans().size());
}
#pragma GCC visibility pop
