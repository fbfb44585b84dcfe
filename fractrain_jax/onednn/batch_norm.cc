// BatchNorm over N, H, W of an NHWC float32 tensor through oneDNN (training: the batch's
// statistics), as XLA FFI handlers: forward (y, mean, variance) and backward (the
// gradients of x, scale and shift), and the same two with a ReLU fused after the
// normalization (oneDNN's fuse_norm_relu: the forward also writes the ReLU's mask, the
// backward reads it), so conv-BN-ReLU's ReLU is no pass of its own either way.
//
// Why: beside oneDNN's convs, XLA:CPU's BN fusions took 45% of a ResNet-38 FP32 step,
// several materializing the normalization's broadcast factors at the activation's size
// (docs/RESULTS.md, issue 28's fifth step). oneDNN reads x twice and writes y once
// forward, and reads x and dy twice backward.
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>

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

dnnl::normalization_flags Flags(bool relu) {
  dnnl::normalization_flags flags =
      dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  return relu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
}

ffi::Error Shape(ffi::Span<const int64_t> x, memory::desc& data, memory::desc& channel) {
  if (x.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fractrain oneDNN batch norm: expected a rank-4 NHWC operand");
  }
  data = memory::desc({x[0], x[3], x[1], x[2]}, Type::f32, Tag::nhwc);
  channel = memory::desc({x[3]}, Type::f32, Tag::a);
  return ffi::Error::Success();
}

dnnl::batch_normalization_forward::primitive_desc ForwardPd(const memory::desc& data,
                                                            float epsilon, bool relu) {
  return dnnl::batch_normalization_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, data, data, epsilon, Flags(relu), Attr());
}

// The fused ReLU's mask: oneDNN's workspace, held in the caller's buffer of one byte per
// element (ops.py), checked to fit.
memory Workspace(const memory::desc& workspace, void* mask, size_t bytes) {
  if (workspace.get_size() > bytes) {
    throw dnnl::error(dnnl_invalid_arguments, "the ReLU's mask needs more than a byte an element");
  }
  return memory(workspace, Engine(), mask);
}

// y = BN(x), or ReLU(BN(x)) with `mask` (relu) the ReLU's mask for the backward pass.
ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> variance,
                       float epsilon, bool relu, void* mask, size_t mask_bytes) {
  memory::desc data, channel;
  if (ffi::Error error = Shape(x.dimensions(), data, channel); error.failure()) return error;
  return fractrain_onednn::Guarded("batch norm", [&](dnnl::stream& s) {
    dnnl::engine& engine = Engine();
    auto pd = ForwardPd(data, epsilon, relu);
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(data, engine, x.untyped_data())},
        {DNNL_ARG_SCALE, memory(channel, engine, scale.untyped_data())},
        {DNNL_ARG_SHIFT, memory(channel, engine, shift.untyped_data())},
        {DNNL_ARG_DST, memory(data, engine, y->untyped_data())},
        {DNNL_ARG_MEAN, memory(channel, engine, mean->untyped_data())},
        {DNNL_ARG_VARIANCE, memory(channel, engine, variance->untyped_data())}};
    if (relu) args.emplace(DNNL_ARG_WORKSPACE, Workspace(pd.workspace_desc(), mask, mask_bytes));
    Execute(s, dnnl::batch_normalization_forward(pd), pd, std::move(args));
  });
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> variance,
                   float epsilon) {
  return ForwardImpl(x, scale, shift, y, mean, variance, epsilon, false, nullptr, 0);
}

ffi::Error ReluForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> variance,
                       ffi::ResultBuffer<ffi::U8> mask, float epsilon) {
  return ForwardImpl(x, scale, shift, y, mean, variance, epsilon, true, mask->untyped_data(),
                     mask->size_bytes());
}

// The gradients of x, scale and shift; with `mask` (relu) through the fused ReLU first.
ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> variance, ffi::ResultBuffer<ffi::F32> dx,
                        ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                        float epsilon, bool relu, void* mask, size_t mask_bytes) {
  memory::desc data, channel;
  if (ffi::Error error = Shape(x.dimensions(), data, channel); error.failure()) return error;
  return fractrain_onednn::Guarded("batch norm", [&](dnnl::stream& s) {
    dnnl::engine& engine = Engine();
    dnnl::batch_normalization_backward::primitive_desc pd(
        engine, dnnl::prop_kind::backward, data, data, data, epsilon, Flags(relu),
        ForwardPd(data, epsilon, relu), Attr());
    std::unordered_map<int, memory> args = {
        {DNNL_ARG_SRC, memory(data, engine, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, memory(data, engine, dy.untyped_data())},
        {DNNL_ARG_SCALE, memory(channel, engine, scale.untyped_data())},
        {DNNL_ARG_MEAN, memory(channel, engine, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, memory(channel, engine, variance.untyped_data())},
        {DNNL_ARG_DIFF_SRC, memory(data, engine, dx->untyped_data())},
        {DNNL_ARG_DIFF_SCALE, memory(channel, engine, dscale->untyped_data())},
        {DNNL_ARG_DIFF_SHIFT, memory(channel, engine, dshift->untyped_data())}};
    if (relu) args.emplace(DNNL_ARG_WORKSPACE, Workspace(pd.workspace_desc(), mask, mask_bytes));
    Execute(s, dnnl::batch_normalization_backward(pd), pd, std::move(args));
  });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> variance, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                    float epsilon) {
  return BackwardImpl(dy, x, scale, mean, variance, dx, dscale, dshift, epsilon, false,
                      nullptr, 0);
}

ffi::Error ReluBackward(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> variance, ffi::Buffer<ffi::U8> mask,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dshift, float epsilon) {
  return BackwardImpl(dy, x, scale, mean, variance, dx, dscale, dshift, epsilon, true,
                      mask.untyped_data(), mask.size_bytes());
}

// What the plain and the fused-ReLU bindings share: the forward's operands and results
// (the ReLU's adds its mask), the backward's operands (the ReLU's add its mask).
auto ForwardBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::Buffer<ffi::F32>>()   // scale
      .Arg<ffi::Buffer<ffi::F32>>()   // shift
      .Ret<ffi::Buffer<ffi::F32>>()   // y (ReLU(y) fused)
      .Ret<ffi::Buffer<ffi::F32>>()   // mean
      .Ret<ffi::Buffer<ffi::F32>>();  // variance (biased)
}

auto BackwardOperands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()   // dy
      .Arg<ffi::Buffer<ffi::F32>>()   // x
      .Arg<ffi::Buffer<ffi::F32>>()   // scale
      .Arg<ffi::Buffer<ffi::F32>>()   // mean
      .Arg<ffi::Buffer<ffi::F32>>();  // variance
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainOneDnnBatchNormForward, Forward,
                              ForwardBinding().Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainOneDnnBatchNormBackward, Backward,
                              BackwardOperands()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dshift
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainOneDnnBatchNormReluForward, ReluForward,
                              ForwardBinding()
                                  .Ret<ffi::Buffer<ffi::U8>>()  // the ReLU's mask
                                  .Attr<float>("epsilon"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainOneDnnBatchNormReluBackward, ReluBackward,
                              BackwardOperands()
                                  .Arg<ffi::Buffer<ffi::U8>>()   // the ReLU's mask
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dshift
                                  .Attr<float>("epsilon"));
