// 3-D convolutions (float32, forward, bias fused) on oneDNN, as XLA FFI handlers for jax.jit on CPU:
//   BrainLdmOnednnConv3d   oneDNN's direct convolution (below);
//   BrainLdmWinogradConv3d a 3x3x3 convolution by Winograd F(2x2x2, 3x3x3),
//   BrainLdmWinograd4Conv3d the same by Winograd F(4x4x4, 3x3x3), and
//   BrainLdmUpsampleConv3d nearest x2 upsampling then a 3x3x3 convolution in 27 products per 8
//                          outputs: transforms here, channel sums as oneDNN matmuls ("Transformed
//                          convolutions" below).
//
// Registered from Python (brain_ldm_nodes/models/onednn.py) with jax.ffi.register_ffi_target, platform
// "cpu". The direct convolution ("brain_ldm_onednn_conv3d"); arguments, all float32 and row-major:
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
#include <utility>
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


// ---- Transformed convolutions: Winograd F(2x2x2, 3x3x3), F(4x4x4, 3x3x3), upsample-then-3x3x3 ----
// All compute y = A^T [ (G g G^T) (.) (B^T d B) ] A along each axis on tiles of 2^3 (4^3) outputs, on
// channels-last volumes: an input patch is transformed into P points per channel, the P element-wise
// products summed over input channels are P matrix products (tiles x I) @ (I x O), and each output
// tile is a back-transform of its P products. Transforms are additions only (and halves, in G).
//
// * Winograd F(2,3) (Lavin & Gray 2016): a 3x3x3 convolution, stride 1, zero padding 0 or 1 per
//   side. 4x4x4 input patches at stride 2, P = 64: 64 multiplies per 8 outputs instead of 216.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// * Winograd F(4,3): 6x6x6 patches at stride 4, P = 216: 216 multiplies per 64 outputs instead of
//   1728 (struct Winograd4 has its matrices). Its transforms (entries up to 5 and down to 1/24)
//   amplify float32 rounding: up to ~4e-5 relative per convolution against ~6e-7 for F(2,3), so
//   Python uses it only where it pays most, on <= 64 output channels (the autoencoder's
//   full-resolution level: time / oneDNN direct 0.42 instead of 0.71 for F(2,3), AVX2).
// * Upsampling: conv3x3x3(nearest_x2(x)), zero padding 1 (of the upsampled volume), without
//   forming the upsampled volume. Along one axis, outputs 2i and 2i+1 read x[i-1], x[i], x[i+1]:
//   y(2i) = w0 x[i-1] + (w1+w2) x[i] = w0 (x[i-1]-x[i]) + (w0+w1+w2) x[i] and
//   y(2i+1) = (w0+w1) x[i] + w2 x[i+1] = (w0+w1+w2) x[i] + w2 (x[i+1]-x[i]): 3 products for 2
//   outputs. 3x3x3 patches at stride 1, P = 27: 27 multiplies per 8 outputs (the sub-pixel form,
//   a 2x2x2 convolution with 8x the outputs, needs 64). B^T = [1 -1 0; 0 1 0; 0 -1 1],
//   G = [1 0 0; 1 1 1; 0 0 1], A^T = [1 1 0; 0 1 1]. Padding here is of x (0 or 1 per side: a
//   slab whose neighbouring rows are given has 0); the output has 2 (n + lo + hi - 2) rows.
//
// Per call the kernel is transformed into a scratch buffer (cheap next to the products). Tiles go
// in chunks: with more than 128 channels the products take the time and run faster on many rows,
// so chunks are large (kChunkBytes) and each step uses all threads; up to 128 channels the
// transforms weigh more (P/8 times the input written and read back), so each thread takes whole
// small chunks (kFusedBytes) through transform, a single-threaded matmul (oneDNN runs a call made
// inside a parallel region on the calling thread) and back-transform while they are in its cache.
// The transforms work on 16 channels at a time as GCC vector-extension values, compiled once
// per instruction set (below: a scalar loop over the channels was not vectorised, and took 2-3x
// the time of the products on 64 channels). Measured on AVX-512 (2 cores), Winograd, time / oneDNN direct:
// 512->512 at 20x28x20 with 2, 8, 64, 256 MB chunks 0.94, 0.60, 0.53, 0.48; 128->128 at
// 20x112x80 fused with 512 kB, 2 MB, 8 MB chunks 0.76, 0.69, 0.82 (unfused at best 0.85).
constexpr int64_t kChunkBytes = 256 << 20;
constexpr int64_t kFusedBytes = 2 << 20;
constexpr int64_t kFusedMaxChannels = 128;
constexpr int64_t kLanes = 16;  // channels transformed together (one AVX-512 register)

struct TransformProblem {
  int64_t i, o, d, h, w, pads[6];
  auto tie() const { return std::tie(i, o, d, h, w, pads[0], pads[1], pads[2], pads[3], pads[4], pads[5]); }
  int64_t padded(int axis) const { return (axis == 0 ? d : axis == 1 ? h : w) + pads[2 * axis] + pads[2 * axis + 1]; }
};

// Sixteen channels, transformed together: one AVX-512 register, two AVX2 ones, four SSE ones
// (GCC vector extension, lowered for the instruction set of the function it is inlined into).
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

// n <= kLanes consecutive floats (kFull: exactly kLanes) <-> Lanes; the rest zero on load.
template <bool kFull>
__attribute__((always_inline)) inline Lanes load_lanes(const float* from, int64_t n) {
  Lanes v = {};
  std::memcpy(&v, from, (kFull ? kLanes : n) * sizeof(float));
  return v;
}
template <bool kFull>
__attribute__((always_inline)) inline void store_lanes(float* to, const Lanes& v, int64_t n) {
  std::memcpy(to, &v, (kFull ? kLanes : n) * sizeof(float));
}

struct Winograd {
  static constexpr int kPoints = 64, kPatch = 4, kStep = 2, kOut = 2;
  static constexpr const char* kName = "winograd conv3d";
  static int64_t tiles(const TransformProblem& p, int axis) { return (p.padded(axis) - 2 + 1) / 2; }
  static int64_t out(const TransformProblem& p, int axis) { return p.padded(axis) - 2; }
  // G g along one axis: 3 values -> 4 (in place in `v`, stride between values `s`).
  static void kernel_line(float* v, int s) {
    const float g0 = v[0], g1 = v[s], g2 = v[2 * s];
    v[0] = g0, v[s] = 0.5f * (g0 + g1 + g2), v[2 * s] = 0.5f * (g0 - g1 + g2), v[3 * s] = g2;
  }
  // B^T d along one axis (4 values, stride s, from v[base]).
  __attribute__((always_inline)) static void input_line(Lanes* v, int base, int s) {
    const Lanes d0 = v[base], d1 = v[base + s], d2 = v[base + 2 * s], d3 = v[base + 3 * s];
    v[base] = d0 - d2, v[base + s] = d1 + d2, v[base + 2 * s] = d2 - d1, v[base + 3 * s] = d1 - d3;
  }
  // A^T m along one axis: 4 values -> 2, kept in the first two slots.
  __attribute__((always_inline)) static void output_line(Lanes* m, int base, int s) {
    const Lanes a0 = m[base], a1 = m[base + s], a2 = m[base + 2 * s], a3 = m[base + 3 * s];
    m[base] = a0 + a1 + a2, m[base + s] = a1 - a2 - a3;
  }
};

// Winograd F(4x4x4, 3x3x3): 6x6x6 patches at stride 4, P = 216 per 64 outputs (3.4 multiplies per
// output instead of 8); interpolation points 0, 1, -1, 2, -2 and infinity (Lavin & Gray 2016):
//   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1],
//   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1],
//   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
struct Winograd4 {
  static constexpr int kPoints = 216, kPatch = 6, kStep = 4, kOut = 4;
  static constexpr const char* kName = "winograd4 conv3d";
  static int64_t tiles(const TransformProblem& p, int axis) { return (p.padded(axis) - 2 + 3) / 4; }
  static int64_t out(const TransformProblem& p, int axis) { return p.padded(axis) - 2; }
  static void kernel_line(float* v, int s) {
    const float g0 = v[0], g1 = v[s], g2 = v[2 * s];
    v[0] = g0 / 4, v[s] = -(g0 + g1 + g2) / 6, v[2 * s] = -(g0 - g1 + g2) / 6;
    v[3 * s] = g0 / 24 + g1 / 12 + g2 / 6, v[4 * s] = g0 / 24 - g1 / 12 + g2 / 6, v[5 * s] = g2;
  }
  __attribute__((always_inline)) static void input_line(Lanes* v, int base, int s) {
    const Lanes d0 = v[base], d1 = v[base + s], d2 = v[base + 2 * s], d3 = v[base + 3 * s],
                d4 = v[base + 4 * s], d5 = v[base + 5 * s];
    const Lanes d4_minus_4d2 = d4 - 4 * d2, d3_minus_4d1 = d3 - 4 * d1, d4_minus_d2 = d4 - d2,
                twice_d3_minus_d1 = 2 * (d3 - d1);
    v[base] = 4 * d0 - 5 * d2 + d4;
    v[base + s] = d4_minus_4d2 + d3_minus_4d1;
    v[base + 2 * s] = d4_minus_4d2 - d3_minus_4d1;
    v[base + 3 * s] = d4_minus_d2 + twice_d3_minus_d1;
    v[base + 4 * s] = d4_minus_d2 - twice_d3_minus_d1;
    v[base + 5 * s] = 4 * d1 - 5 * d3 + d5;
  }
  __attribute__((always_inline)) static void output_line(Lanes* m, int base, int s) {
    const Lanes m0 = m[base], m1 = m[base + s], m2 = m[base + 2 * s], m3 = m[base + 3 * s],
                m4 = m[base + 4 * s], m5 = m[base + 5 * s];
    const Lanes sum12 = m1 + m2, diff12 = m1 - m2, sum34 = m3 + m4, diff34 = m3 - m4;
    m[base] = m0 + sum12 + sum34;
    m[base + s] = diff12 + 2 * diff34;
    m[base + 2 * s] = sum12 + 4 * sum34;
    m[base + 3 * s] = diff12 + 8 * diff34 + m5;
  }
};

struct Upsample {
  static constexpr int kPoints = 27, kPatch = 3, kStep = 1, kOut = 2;
  static constexpr const char* kName = "upsample conv3d";
  static int64_t tiles(const TransformProblem& p, int axis) { return p.padded(axis) - 2; }
  static int64_t out(const TransformProblem& p, int axis) { return 2 * (p.padded(axis) - 2); }
  static void kernel_line(float* v, int s) {
    const float g0 = v[0], g1 = v[s], g2 = v[2 * s];
    v[0] = g0, v[s] = g0 + g1 + g2, v[2 * s] = g2;
  }
  __attribute__((always_inline)) static void input_line(Lanes* v, int base, int s) {
    const Lanes centre = v[base + s];
    v[base] -= centre, v[base + 2 * s] -= centre;
  }
  __attribute__((always_inline)) static void output_line(Lanes* m, int base, int s) {
    const Lanes a1 = m[base + s];
    m[base] += a1, m[base + s] = a1 + m[base + 2 * s];
  }
};

// The index of element k of line `line` (0 .. kPatch^2 - 1) along the axis whose stride is s in
// a kPatch^3 cube laid out (d, h, w): s = 1 (w), kPatch (h), kPatch^2 (d).
template <int kPatch>
constexpr int line_base(int line, int s) {
  return (line / s) * s * kPatch + line % s;
}

// Kernel (O, I, 3, 3, 3) -> transformed (P, I, O); output channels in blocks of kLanes so that each
// transformed value is written as one cache line.
template <class F>
void transform_kernel(const float* kernel, int64_t channels_in, int64_t channels_out, float* transformed) {
  constexpr int kP = F::kPatch;
  const int64_t blocks = (channels_out + kLanes - 1) / kLanes;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i = 0; i < channels_in; ++i) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t o0 = block * kLanes, n = std::min(kLanes, channels_out - o0);
      float values[F::kPoints][kLanes];
      for (int64_t j = 0; j < n; ++j) {
        // the 3x3x3 taps placed in a kP^3 cube, then transformed along w, h, d in place
        float cube[kP * kP * kP] = {};
        const float* g = kernel + ((o0 + j) * channels_in + i) * 27;
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b)
            for (int c = 0; c < 3; ++c) cube[(a * kP + b) * kP + c] = g[(a * 3 + b) * 3 + c];
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) F::kernel_line(cube + (a * kP + b) * kP, 1);
        for (int a = 0; a < 3; ++a)
          for (int c = 0; c < kP; ++c) F::kernel_line(cube + a * kP * kP + c, kP);
        for (int b = 0; b < kP; ++b)
          for (int c = 0; c < kP; ++c) F::kernel_line(cube + b * kP + c, kP * kP);
        for (int point = 0; point < F::kPoints; ++point) values[point][j] = cube[point];
      }
      for (int point = 0; point < F::kPoints; ++point) {
        float* dst = transformed + (point * channels_in + i) * channels_out + o0;
        for (int64_t j = 0; j < n; ++j) dst[j] = values[point][j];
      }
    }
  }
}

// Input patch of tile (td, th, tw), channels [c0, c0 + n), transformed into row `row` of each of
// the P (rows, I) matrices at `out`, `point_stride` floats apart (zero outside the volume: the
// padding). kFull: n == kLanes.
template <class F, bool kFull>
__attribute__((always_inline)) inline void input_tile(const float* x, const TransformProblem& p, int64_t td,
                                                      int64_t th, int64_t tw, int64_t c0, int64_t n, float* out,
                                                      int64_t point_stride, int64_t row) {
  constexpr int kP = F::kPatch;
  Lanes v[F::kPoints];
  for (int a = 0; a < kP; ++a) {
    const int64_t zd = F::kStep * td - p.pads[0] + a;
    const bool inside_d = zd >= 0 && zd < p.d;
    for (int b = 0; b < kP; ++b) {
      const int64_t zh = F::kStep * th - p.pads[2] + b;
      const bool inside_dh = inside_d && zh >= 0 && zh < p.h;
      for (int c = 0; c < kP; ++c) {
        const int64_t zw = F::kStep * tw - p.pads[4] + c;
        v[(a * kP + b) * kP + c] = inside_dh && zw >= 0 && zw < p.w
                                       ? load_lanes<kFull>(x + ((zd * p.h + zh) * p.w + zw) * p.i + c0, n)
                                       : Lanes{};
      }
    }
  }
  // along w, h, d in turn: each of the kP^2 lines of the cube along that axis
  for (int b = 0; b < kP * kP; ++b) F::input_line(v, b * kP, 1);
  for (int a = 0; a < kP; ++a)
    for (int c = 0; c < kP; ++c) F::input_line(v, a * kP * kP + c, kP);
  for (int b = 0; b < kP * kP; ++b) F::input_line(v, b, kP * kP);
  for (int point = 0; point < F::kPoints; ++point)
    store_lanes<kFull>(out + point * point_stride + row * p.i + c0, v[point], n);
}

// Row `row` of the P (rows, O) products (`point_stride` floats apart), channels [c0, c0 + n),
// back-transformed, plus bias, into the (up to) kOut^3 outputs of tile (td, th, tw) of the
// channels-last result y.
template <class F, bool kFull>
__attribute__((always_inline)) inline void output_tile(const float* products, const float* bias,
                                                       const TransformProblem& p, int64_t td, int64_t th, int64_t tw,
                                                       int64_t c0, int64_t n, float* y, int64_t point_stride,
                                                       int64_t row) {
  constexpr int kP = F::kPatch;
  Lanes m[F::kPoints];
  for (int point = 0; point < F::kPoints; ++point)
    m[point] = load_lanes<kFull>(products + point * point_stride + row * p.o + c0, n);
  // kP values -> kOut along w, then h, then d (kept in the first kOut slots of each line)
  for (int b = 0; b < kP * kP; ++b) F::output_line(m, b * kP, 1);
  for (int a = 0; a < kP; ++a)
    for (int c = 0; c < F::kOut; ++c) F::output_line(m, a * kP * kP + c, kP);
  for (int b = 0; b < F::kOut; ++b)
    for (int c = 0; c < F::kOut; ++c) F::output_line(m, b * kP + c, kP * kP);
  const Lanes bias_lanes = load_lanes<kFull>(bias + c0, n);
  const int64_t out_d = F::out(p, 0), out_h = F::out(p, 1), out_w = F::out(p, 2);
  for (int a = 0; a < F::kOut; ++a) {
    const int64_t od = F::kOut * td + a;
    if (od >= out_d) continue;
    for (int b = 0; b < F::kOut; ++b) {
      const int64_t oh = F::kOut * th + b;
      if (oh >= out_h) continue;
      for (int c = 0; c < F::kOut; ++c) {
        const int64_t ow = F::kOut * tw + c;
        if (ow >= out_w) continue;
        store_lanes<kFull>(y + ((od * out_h + oh) * out_w + ow) * p.o + c0, m[(a * kP + b) * kP + c] + bias_lanes, n);
      }
    }
  }
}

// The transforms of rows [0, rows) of a chunk whose first tile is `first` (tile index t in d, h, w
// order), over all channel blocks.
template <class F>
__attribute__((always_inline)) inline void input_rows(const TransformProblem& p, int64_t tiles_h, int64_t tiles_w,
                                                      const float* x, int64_t first, int64_t rows, float* transformed,
                                                      int64_t point_stride) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t t = first + row, td = t / (tiles_h * tiles_w), th = (t / tiles_w) % tiles_h, tw = t % tiles_w;
    for (int64_t c0 = 0; c0 < p.i; c0 += kLanes) {
      if (p.i - c0 >= kLanes)
        input_tile<F, true>(x, p, td, th, tw, c0, kLanes, transformed, point_stride, row);
      else
        input_tile<F, false>(x, p, td, th, tw, c0, p.i - c0, transformed, point_stride, row);
    }
  }
}

template <class F>
__attribute__((always_inline)) inline void output_rows(const TransformProblem& p, int64_t tiles_h, int64_t tiles_w,
                                                       const float* products, const float* bias, int64_t first,
                                                       int64_t rows, float* y, int64_t point_stride) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t t = first + row, td = t / (tiles_h * tiles_w), th = (t / tiles_w) % tiles_h, tw = t % tiles_w;
    for (int64_t c0 = 0; c0 < p.o; c0 += kLanes) {
      if (p.o - c0 >= kLanes)
        output_tile<F, true>(products, bias, p, td, th, tw, c0, kLanes, y, point_stride, row);
      else
        output_tile<F, false>(products, bias, p, td, th, tw, c0, p.o - c0, y, point_stride, row);
    }
  }
}

// One copy of the transforms per instruction set (the package is built once, for any x86-64);
// `TileRows` calls the one for the CPU oneDNN runs on (dnnl::get_effective_cpu_isa(), so
// ONEDNN_MAX_CPU_ISA limits both).
#define BRAIN_LDM_TRANSFORM_CLONE(suffix, target_attribute)                                                          \
  template <class F>                                                                                                 \
  target_attribute void input_rows_##suffix(const TransformProblem& p, int64_t tiles_h, int64_t tiles_w,             \
                                            const float* x, int64_t first, int64_t rows, float* transformed,         \
                                            int64_t point_stride) {                                                  \
    input_rows<F>(p, tiles_h, tiles_w, x, first, rows, transformed, point_stride);                                   \
  }                                                                                                                  \
  template <class F>                                                                                                 \
  target_attribute void output_rows_##suffix(const TransformProblem& p, int64_t tiles_h, int64_t tiles_w,            \
                                             const float* products, const float* bias, int64_t first, int64_t rows,  \
                                             float* y, int64_t point_stride) {                                       \
    output_rows<F>(p, tiles_h, tiles_w, products, bias, first, rows, y, point_stride);                               \
  }
BRAIN_LDM_TRANSFORM_CLONE(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
BRAIN_LDM_TRANSFORM_CLONE(avx2, __attribute__((target("avx2,fma"))))
BRAIN_LDM_TRANSFORM_CLONE(baseline, )
#undef BRAIN_LDM_TRANSFORM_CLONE

enum class TransformIsa { kBaseline, kAvx2, kAvx512 };

TransformIsa transform_isa() {
  static const TransformIsa isa = [] {
    const dnnl::cpu_isa effective = dnnl::get_effective_cpu_isa();
    if (effective == dnnl::cpu_isa::avx512_core || effective == dnnl::cpu_isa::avx512_core_vnni ||
        effective == dnnl::cpu_isa::avx512_core_bf16 || effective == dnnl::cpu_isa::avx512_core_fp16 ||
        effective == dnnl::cpu_isa::avx512_core_amx || effective == dnnl::cpu_isa::avx512_core_amx_fp16)
      return TransformIsa::kAvx512;
    if (effective == dnnl::cpu_isa::avx2 || effective == dnnl::cpu_isa::avx2_vnni ||
        effective == dnnl::cpu_isa::avx2_vnni_2)
      return TransformIsa::kAvx2;
    return TransformIsa::kBaseline;
  }();
  return isa;
}

// This thread's contiguous share [lo, hi) of n rows (inside a parallel region).
std::pair<int64_t, int64_t> thread_share(int64_t n) {
  const int64_t me = omp_get_thread_num(), team = omp_get_num_threads();
  return {n * me / team, n * (me + 1) / team};
}

// The transforms of a problem's tiles, on this CPU's instruction set.
template <class F>
struct TileRows {
  const TransformProblem& p;
  int64_t tiles_h, tiles_w;
  TransformIsa isa = transform_isa();
  void input(const float* x, int64_t first, int64_t rows, float* transformed, int64_t point_stride) const {
    switch (isa) {
      case TransformIsa::kAvx512: return input_rows_avx512<F>(p, tiles_h, tiles_w, x, first, rows, transformed, point_stride);
      case TransformIsa::kAvx2: return input_rows_avx2<F>(p, tiles_h, tiles_w, x, first, rows, transformed, point_stride);
      default: return input_rows_baseline<F>(p, tiles_h, tiles_w, x, first, rows, transformed, point_stride);
    }
  }
  void output(const float* products, const float* bias, int64_t first, int64_t rows, float* y,
              int64_t point_stride) const {
    switch (isa) {
      case TransformIsa::kAvx512:
        return output_rows_avx512<F>(p, tiles_h, tiles_w, products, bias, first, rows, y, point_stride);
      case TransformIsa::kAvx2:
        return output_rows_avx2<F>(p, tiles_h, tiles_w, products, bias, first, rows, y, point_stride);
      default: return output_rows_baseline<F>(p, tiles_h, tiles_w, products, bias, first, rows, y, point_stride);
    }
  }
};

// Batched matmul (P, rows, I) @ (P, I, O) -> (P, rows, O), one per distinct shape and point
// strides. Its scratchpad is the caller's (scratchpad_mode::user): threads run the same primitive
// at once.
struct PointMatmul {
  dnnl::matmul primitive;
  dnnl::memory::desc src, weights, dst;
  size_t scratchpad_bytes = 0;
};

// The transformed tiles and the products are P matrices of `rows` rows each, `in_stride` and
// `out_stride` floats apart. Caller holds call_mutex() (the map may grow).
PointMatmul& point_matmul(int64_t points, int64_t rows, int64_t i, int64_t o, int64_t in_stride, int64_t out_stride) {
  static std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>, PointMatmul> cache;
  auto& slot = cache[{points, rows, i, o, in_stride, out_stride}];
  if (!slot.primitive) {
    slot.src = dnnl::memory::desc({points, rows, i}, dt::f32, {in_stride, i, 1});
    slot.weights = dnnl::memory::desc({points, i, o}, dt::f32, tag::abc);
    slot.dst = dnnl::memory::desc({points, rows, o}, dt::f32, {out_stride, o, 1});
    dnnl::primitive_attr attributes;
    attributes.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::matmul::primitive_desc pd(engine(), slot.src, slot.weights, slot.dst, attributes);
    slot.primitive = dnnl::matmul(pd);
    slot.scratchpad_bytes = pd.scratchpad_desc().get_size();
  }
  return slot;
}

// `scratchpad`: at least the matmul's scratchpad_bytes, used by this call only.
void run_point_matmul(dnnl::stream& stream, const PointMatmul& matmul, float* transformed, float* kernel,
                      float* products, void* scratchpad) {
  std::unordered_map<int, dnnl::memory> arguments{{DNNL_ARG_SRC, dnnl::memory(matmul.src, engine(), transformed)},
                                                  {DNNL_ARG_WEIGHTS, dnnl::memory(matmul.weights, engine(), kernel)},
                                                  {DNNL_ARG_DST, dnnl::memory(matmul.dst, engine(), products)}};
  if (matmul.scratchpad_bytes > 0)
    arguments[DNNL_ARG_SCRATCHPAD] =
        dnnl::memory({{static_cast<int64_t>(matmul.scratchpad_bytes)}, dt::u8, tag::a}, engine(), scratchpad);
  matmul.primitive.execute(stream, arguments);
  stream.wait();
}

Scratch scratch_transform_kernel, scratch_transform_in, scratch_transform_products, scratch_transform_pad;

template <class F>
ffi::Error TransformedConv3d(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> bias,
                             ffi::ResultBuffer<ffi::F32> y, const int64_t (&pads)[6]) {
  const std::string where = std::string(F::kName) + ": ";
  const auto xd = x.dimensions(), wd = weight.dimensions(), bd = bias.dimensions();
  if (xd.size() < 4 || wd.size() < 5 || bd.size() < 1)
    return ffi::Error::InvalidArgument(where + "x needs rank >= 4, weight >= 5, bias >= 1");
  if (leading(wd, 5) != 1) return ffi::Error::InvalidArgument(where + "one kernel per call (weights must not be batched)");
  const size_t r = xd.size(), rw = wd.size();
  TransformProblem p{};
  p.d = xd[r - 4], p.h = xd[r - 3], p.w = xd[r - 2], p.i = xd[r - 1];
  p.o = wd[rw - 5];
  if (wd[rw - 4] != p.i || wd[rw - 3] != 3 || wd[rw - 2] != 3 || wd[rw - 1] != 3 || bd[bd.size() - 1] != p.o)
    return ffi::Error::InvalidArgument(where + "needs a (O, I, 3, 3, 3) kernel matching x and bias");
  for (const int64_t pad : pads)
    if (pad < 0 || pad > 1) return ffi::Error::InvalidArgument(where + "padding must be 0 or 1");
  std::memcpy(p.pads, pads, sizeof pads);
  const int64_t batch = leading(y->dimensions(), 4), inputs = leading(xd, 4), biases = leading(bd, 1);
  if ((inputs != 1 && inputs != batch) || (biases != 1 && biases != batch))
    return ffi::Error::InvalidArgument(where + "x or bias batch differs from the result's");
  const int64_t tiles_d = F::tiles(p, 0), tiles_h = F::tiles(p, 1), tiles_w = F::tiles(p, 2);
  if (batch == 0 || tiles_d <= 0 || tiles_h <= 0 || tiles_w <= 0) return ffi::Error::Success();
  constexpr int64_t points = F::kPoints;
  const int64_t tiles = tiles_d * tiles_h * tiles_w;
  const bool fused = std::max(p.i, p.o) <= kFusedMaxChannels;
  const int64_t per_tile = points * (fused ? p.i + p.o : std::max(p.i, p.o)) * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = std::max<int64_t>(8, std::min<int64_t>(tiles, (fused ? kFusedBytes : kChunkBytes) / per_tile));
  const int64_t x_step = p.d * p.h * p.w * p.i, y_step = F::out(p, 0) * F::out(p, 1) * F::out(p, 2) * p.o;
  const TileRows<F> tile_rows{p, tiles_h, tiles_w};

  std::lock_guard<std::mutex> lock(call_mutex());
  try {
    dnnl::stream stream(engine());
    PhaseClock clock;
    float* kernel = static_cast<float*>(scratch_transform_kernel.get(points * p.i * p.o * sizeof(float)));
    transform_kernel<F>(weight.typed_data(), p.i, p.o, kernel);
    clock.lap(kWeights);
    // the two matmul shapes every chunk uses (all chunks but the last have `chunk` rows), and the
    // buffers: per thread when fused, else one set shared by the threads of each step. (Padding
    // the P matrices apart, against cache-set conflicts, was measured: oneDNN 3.2 then leaves
    // its brgemm matmul for a slower one.)
    const int64_t in_stride = chunk * p.i, out_stride = chunk * p.o;
    const PointMatmul& full = point_matmul(points, chunk, p.i, p.o, in_stride, out_stride);
    const PointMatmul& tail =
        point_matmul(points, tiles % chunk ? tiles % chunk : chunk, p.i, p.o, in_stride, out_stride);
    const size_t pad_bytes = std::max<size_t>({full.scratchpad_bytes, tail.scratchpad_bytes, 64});
    const int threads = omp_get_max_threads();
    const int64_t chunks = (tiles + chunk - 1) / chunk;
    const int64_t per_thread = points * (in_stride + out_stride) + static_cast<int64_t>((pad_bytes + 63) / 64 * 16);
    float* buffers = nullptr;
    float *transformed = nullptr, *products = nullptr;
    void* scratchpad = nullptr;
    if (fused) {
      buffers = static_cast<float*>(scratch_transform_in.get(threads * per_thread * sizeof(float)));
    } else {
      transformed = static_cast<float*>(scratch_transform_in.get(points * in_stride * sizeof(float)));
      products = static_cast<float*>(scratch_transform_products.get(points * out_stride * sizeof(float)));
      scratchpad = scratch_transform_pad.get(pad_bytes);
    }
    for (int64_t e = 0; e < batch; ++e) {
      const float* x_e = x.typed_data() + (inputs == 1 ? 0 : e) * x_step;
      const float* bias_e = bias.typed_data() + (biases == 1 ? 0 : e) * p.o;
      float* y_e = y->typed_data() + e * y_step;
      if (fused) {
        bool failed = false;
#pragma omp parallel num_threads(threads)
        {
          const int me = omp_get_thread_num(), team = omp_get_num_threads();
          float* thread_in = buffers + me * per_thread;
          float* thread_products = thread_in + points * in_stride;
          float* thread_pad = thread_products + points * out_stride;
          try {
            dnnl::stream local(engine());
            for (int64_t c = me; c < chunks; c += team) {
              const int64_t first = c * chunk, rows = std::min(chunk, tiles - first);
              tile_rows.input(x_e, first, rows, thread_in, in_stride);
              run_point_matmul(local, rows == chunk ? full : tail, thread_in, kernel, thread_products, thread_pad);
              tile_rows.output(thread_products, bias_e, first, rows, y_e, out_stride);
            }
          } catch (const dnnl::error&) {
#pragma omp atomic write
            failed = true;
          }
        }
        if (failed) return ffi::Error::Internal(where + "oneDNN matmul failed");
        clock.lap(kConv);
      } else {
        for (int64_t first = 0; first < tiles; first += chunk) {
          const int64_t rows = std::min(chunk, tiles - first);
#pragma omp parallel
          {
            const auto [lo, hi] = thread_share(rows);
            tile_rows.input(x_e, first + lo, hi - lo, transformed + lo * p.i, in_stride);
          }
          clock.lap(kSrc);
          run_point_matmul(stream, rows == chunk ? full : tail, transformed, kernel, products, scratchpad);
          clock.lap(kConv);
#pragma omp parallel
          {
            const auto [lo, hi] = thread_share(rows);
            tile_rows.output(products + lo * p.o, bias_e, first + lo, hi - lo, y_e, out_stride);
          }
          clock.lap(kDst);
        }
      }
    }
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(where + e.what());
  }
  return ffi::Error::Success();
}

// The FFI handler of transform F: attributes are the six paddings.
template <class F>
ffi::Error TransformedHandler(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> bias,
                              ffi::ResultBuffer<ffi::F32> y, int64_t pad_d_lo, int64_t pad_d_hi, int64_t pad_h_lo,
                              int64_t pad_h_hi, int64_t pad_w_lo, int64_t pad_w_hi) {
  const int64_t pads[6] = {pad_d_lo, pad_d_hi, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi};
  return TransformedConv3d<F>(x, weight, bias, y, pads);
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

// Shared binding of the two transformed convolutions: x (..., D, H, W, I) channels-last, weight
// (O, I, 3, 3, 3), bias (..., O); result channels-last; zero padding 0 or 1 per side.
#define BRAIN_LDM_TRANSFORMED_BINDING                  \
  ffi::Ffi::Bind()                                     \
      .Arg<ffi::Buffer<ffi::F32>>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()                    \
      .Ret<ffi::Buffer<ffi::F32>>()                    \
      .Attr<int64_t>("pad_d_lo")                       \
      .Attr<int64_t>("pad_d_hi")                       \
      .Attr<int64_t>("pad_h_lo")                       \
      .Attr<int64_t>("pad_h_hi")                       \
      .Attr<int64_t>("pad_w_lo")                       \
      .Attr<int64_t>("pad_w_hi")
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrainLdmWinogradConv3d, TransformedHandler<Winograd>, BRAIN_LDM_TRANSFORMED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrainLdmWinograd4Conv3d, TransformedHandler<Winograd4>, BRAIN_LDM_TRANSFORMED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BrainLdmUpsampleConv3d, TransformedHandler<Upsample>, BRAIN_LDM_TRANSFORMED_BINDING);

// The version of this file's interface (handler attributes, exported functions). The Python side
// (models/onednn.py, INTERFACE_VERSION) refuses an extension built from another version, e.g. a
// stale build left in a source checkout, and runs on XLA instead. Bump both on any change.
extern "C" int brain_ldm_onednn_interface_version() { return 6; }

// Threads oneDNN's OpenMP runtime uses (for the Python side's one-line report and tests).
extern "C" int brain_ldm_onednn_max_threads() { return omp_get_max_threads(); }

// The instruction set of the Winograd / upsampling transforms: "avx512", "avx2" or "baseline".
extern "C" const char* brain_ldm_onednn_transform_isa() {
  switch (transform_isa()) {
    case TransformIsa::kAvx512: return "avx512";
    case TransformIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

// Frees the scratch buffers (they grow back on the next call), e.g. between sampling and decoding.
extern "C" void brain_ldm_onednn_release_scratch() {
  std::lock_guard<std::mutex> lock(call_mutex());
  scratch_src.release();
  scratch_dst.release();
  scratch_weights.release();
  scratch_transform_kernel.release();
  scratch_transform_in.release();
  scratch_transform_products.release();
  scratch_transform_pad.release();
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
