// 2-D float32 convolution through oneDNN, as three XLA FFI handlers: the forward conv,
// its input gradient and its weight gradient.
//
// Why: XLA:CPU's own convolution (Eigen) is 1.5-3x slower per call than oneDNN's JIT
// kernels on an AVX-512 CPU, and no XLA:CPU flag routes a conv to oneDNN
// (docs/RESULTS.md, issue 28's fifth step). Layouts are JAX's: activations NHWC,
// weights HWIO (grouped: H, W, I/G, G, O/G), so no transposes are needed around the
// calls; oneDNN reorders the (small) weights to its blocked layout itself.
//
// Every handler takes the same `window` attribute: stride_h, stride_w, pad_lo_h,
// pad_lo_w, pad_hi_h, pad_hi_w, dilation_h, dilation_w, groups.
#include <cstdint>
#include <string>

#include "common.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using fractrain_onednn::Attr;
using fractrain_onednn::Engine;
using fractrain_onednn::Execute;
using Tag = dnnl::memory::format_tag;
using Type = dnnl::memory::data_type;

namespace {

// One conv's shapes in oneDNN's terms (logical dims are N, C, H, W; O, I, H, W).
struct Geometry {
  memory::desc src, dst, user_weights, any_weights;
  memory::dims strides, dilates, pad_l, pad_r;
};

// x: [N, H, W, C], w: [KH, KW, C / G, O], y: [N, OH, OW, O].
ffi::Error MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                        ffi::Span<const int64_t> y, ffi::Span<const int64_t> window, Geometry& g) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || window.size() != 9) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fractrain oneDNN conv: expected rank-4 NHWC/HWIO operands and a "
                      "9-entry window attribute");
  }
  const int64_t groups = window[8];
  if (groups < 1 || x[3] != w[2] * groups || y[3] % groups != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fractrain oneDNN conv: features do not match the group count");
  }
  g.src = memory::desc({x[0], x[3], x[1], x[2]}, Type::f32, Tag::nhwc);
  g.dst = memory::desc({y[0], y[3], y[1], y[2]}, Type::f32, Tag::nhwc);
  if (groups == 1) {
    memory::dims dims = {w[3], w[2], w[0], w[1]};
    g.user_weights = memory::desc(dims, Type::f32, Tag::hwio);
    g.any_weights = memory::desc(dims, Type::f32, Tag::any);
  } else {
    memory::dims dims = {groups, w[3] / groups, w[2], w[0], w[1]};
    g.user_weights = memory::desc(dims, Type::f32, Tag::hwigo);
    g.any_weights = memory::desc(dims, Type::f32, Tag::any);
  }
  g.strides = {window[0], window[1]};
  g.pad_l = {window[2], window[3]};
  g.pad_r = {window[4], window[5]};
  g.dilates = {window[6] - 1, window[7] - 1};  // oneDNN counts the added gaps.
  return ffi::Error::Success();
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, g.src,
      g.any_weights, g.dst, g.strides, g.dilates, g.pad_l, g.pad_r, Attr());
}

// The user's weights in the layout the primitive wants (a copy only if it differs).
memory WeightsFor(const memory::desc& wanted, const Geometry& g, void* data, dnnl::stream& s) {
  memory user(g.user_weights, Engine(), data);
  if (wanted == g.user_weights) return user;
  memory blocked(wanted, Engine());
  dnnl::reorder(user, blocked).execute(s, user, blocked);
  return blocked;
}

enum class Pass { kForward, kInputGrad, kWeightGrad };

// kForward: a = x, b = w, out = y. kInputGrad: a = dy, b = w, out = dx.
// kWeightGrad: a = x, b = dy, out = dw.
ffi::Error Run(Pass pass, ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
               ffi::Span<const int64_t> y, ffi::Span<const int64_t> window, void* a, void* b,
               void* out) {
  Geometry g;
  if (ffi::Error error = MakeGeometry(x, w, y, window, g); error.failure()) return error;
  return fractrain_onednn::Guarded("conv", [&](dnnl::stream& s) {
    dnnl::engine& engine = Engine();
    auto forward = ForwardPd(g);
    if (pass == Pass::kForward) {
      Execute(s, dnnl::convolution_forward(forward), forward,
              {{DNNL_ARG_SRC, memory(g.src, engine, a)},
               {DNNL_ARG_WEIGHTS, WeightsFor(forward.weights_desc(), g, b, s)},
               {DNNL_ARG_DST, memory(g.dst, engine, out)}});
      return;
    }
    if (pass == Pass::kInputGrad) {
      dnnl::convolution_backward_data::primitive_desc pd(
          engine, dnnl::algorithm::convolution_direct, g.src, g.any_weights, g.dst, g.strides,
          g.dilates, g.pad_l, g.pad_r, forward, Attr());
      Execute(s, dnnl::convolution_backward_data(pd), pd,
              {{DNNL_ARG_DIFF_DST, memory(g.dst, engine, a)},
               {DNNL_ARG_WEIGHTS, WeightsFor(pd.weights_desc(), g, b, s)},
               {DNNL_ARG_DIFF_SRC, memory(g.src, engine, out)}});
      return;
    }
    dnnl::convolution_backward_weights::primitive_desc pd(
        engine, dnnl::algorithm::convolution_direct, g.src, g.any_weights, g.dst, g.strides,
        g.dilates, g.pad_l, g.pad_r, forward, Attr());
    memory user(g.user_weights, engine, out);
    const bool blocked = pd.diff_weights_desc() != g.user_weights;
    memory dw = blocked ? memory(pd.diff_weights_desc(), engine) : user;
    Execute(s, dnnl::convolution_backward_weights(pd), pd,
            {{DNNL_ARG_SRC, memory(g.src, engine, a)},
             {DNNL_ARG_DIFF_DST, memory(g.dst, engine, b)},
             {DNNL_ARG_DIFF_WEIGHTS, dw}});
    if (blocked) dnnl::reorder(dw, user).execute(s, dw, user);
  });
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                   ffi::Span<const int64_t> window) {
  return Run(Pass::kForward, x.dimensions(), w.dimensions(), y->dimensions(), window,
             x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> dx, ffi::Span<const int64_t> window) {
  return Run(Pass::kInputGrad, dx->dimensions(), w.dimensions(), dy.dimensions(), window,
             dy.untyped_data(), w.untyped_data(), dx->untyped_data());
}

ffi::Error WeightGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, ffi::Span<const int64_t> window) {
  return Run(Pass::kWeightGrad, x.dimensions(), dw->dimensions(), dy.dimensions(), window,
             x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

}  // namespace

#define FRACTRAIN_CONV_HANDLER(name, impl)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                                         \
                                ffi::Ffi::Bind()                                    \
                                    .Arg<ffi::Buffer<ffi::F32>>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()                   \
                                    .Ret<ffi::Buffer<ffi::F32>>()                   \
                                    .Attr<ffi::Span<const int64_t>>("window"))

FRACTRAIN_CONV_HANDLER(FractrainOneDnnConvForward, Forward);
FRACTRAIN_CONV_HANDLER(FractrainOneDnnConvInputGrad, InputGrad);
FRACTRAIN_CONV_HANDLER(FractrainOneDnnConvWeightGrad, WeightGrad);
