// FracTrain's fake quantizer as XLA FFI handlers, one pass over memory each: the
// quantization itself (round to nearest or stochastically), and the backward pass of
// DFQ's input blend (the straight-through gradient and every candidate's dot product).
//
// Why: XLA:CPU split each quantizer into three to five passes (the noise, the offset and
// broadcast range terms written out as whole tensors before the rounding read them back),
// and the blend's backward read the input and the gradient once per candidate width. The
// quantizers were 190 ms of a static 8/8 ResNet-38 step and 600 ms of a DFQ step
// (docs/RESULTS.md, issue 28's sixth step).
//
// The numbers are fractrain_jax/quant.py's `quantize` to the bit as JAX 0.10 compiles it:
// the same float32 operations in the same order (the build turns off FMA contraction), the
// same noise hash.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 1 << 14;  // Elements per parallel task.
constexpr int kLanes = 16;  // Independent partial sums per candidate (one AVX-512 vector).

// quant._mix32 (lowbias32).
inline uint32_t Mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  return h ^ (h >> 16);
}

// One width's grid: its terms are computed by the caller (quant.grid), so they are
// XLA's to the bit whatever XLA's simplifier makes of their scalar arithmetic.
struct Grid {
  float lo, step, inv_step, top;
  // The dequantized value of level v (v before rounding). NaN passes through, as
  // XLA's maximum and minimum let it.
  inline float Level(float v) const {
    float q = std::rint(v) * step + lo;
    q = q < lo ? lo : q;
    return q > top ? top : q;
  }
};

// `tensor` is `groups` equal runs of consecutive elements (a sample or a token each);
// calls task(group, begin, end) for pieces of at most kChunk elements, in parallel.
template <typename Task>
void ForPieces(int64_t size, int64_t groups, Task&& task) {
  const int64_t run = size / groups;
  const int64_t pieces = (run + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < groups * pieces; ++t) {
    const int64_t group = t / pieces;
    const int64_t begin = group * run + (t % pieces) * kChunk;
    const int64_t end = begin + kChunk < (group + 1) * run ? begin + kChunk : (group + 1) * run;
    task(group, begin, end);
  }
}

ffi::Error CheckGroups(int64_t size, int64_t groups, const char* what) {
  if (groups < 1 || size % groups != 0) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("fractrain quantize: ") + what +
                          " does not split the tensor into equal runs");
  }
  return ffi::Error::Success();
}

// q = Q_bits(x; lo, hi): bits holds one width per run of x (one for the whole tensor, or
// one per sample or token), and step, inv_step and top that width's grid. stochastic adds
// quant.uniform_noise's noise for `seed` (the key's mixed 32 bits); passthrough leaves a
// run at width 0 unquantized.
ffi::Error Quantize(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> lo,
                    ffi::Buffer<ffi::F32> step, ffi::Buffer<ffi::F32> inv_step,
                    ffi::Buffer<ffi::F32> top, ffi::Buffer<ffi::S32> bits,
                    ffi::Buffer<ffi::U32> seed_buffer, ffi::ResultBuffer<ffi::F32> q,
                    int32_t stochastic, int32_t passthrough) {
  const int64_t size = x.element_count();
  const int64_t groups = bits.element_count();
  if (ffi::Error e = CheckGroups(size, groups, "bits"); e.failure()) return e;
  if (step.element_count() != groups || inv_step.element_count() != groups ||
      top.element_count() != groups) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fractrain quantize: expected one grid per width");
  }
  const float* in = x.typed_data();
  float* out = q->typed_data();
  const uint32_t seed = seed_buffer.typed_data()[0];
  const int32_t* widths = bits.typed_data();
  ForPieces(size, groups, [&](int64_t group, int64_t begin, int64_t end) {
    if (passthrough && widths[group] == 0) {
      for (int64_t i = begin; i < end; ++i) out[i] = in[i];
      return;
    }
    const Grid grid{lo.typed_data()[0], step.typed_data()[group], inv_step.typed_data()[group],
                    top.typed_data()[group]};
    if (stochastic) {
      for (int64_t i = begin; i < end; ++i) {
        const uint32_t h = Mix32(static_cast<uint32_t>(i) ^ seed);
        // 24 bits fit an int32 exactly, which converts to float in one vector op.
        const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f - 0.5f;
        out[i] = grid.Level((in[i] - grid.lo) * grid.inv_step + u);
      }
    } else {
      for (int64_t i = begin; i < end; ++i) out[i] = grid.Level((in[i] - grid.lo) * grid.inv_step);
    }
  });
  return ffi::Error::Success();
}

// DFQ's blend backward (quant._blend_bwd) for K distinct candidate widths over one range,
// grid k given by step[k], inv_step[k] and top[k]: dx = g * scale[run] and
// dots[run, k] = sum over the run of g * Q_k(x).
ffi::Error BlendGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> lo,
                     ffi::Buffer<ffi::F32> step, ffi::Buffer<ffi::F32> inv_step,
                     ffi::Buffer<ffi::F32> top, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> dots) {
  const int64_t size = x.element_count();
  const int64_t groups = scale.element_count();
  const int64_t k_count = step.element_count();
  if (ffi::Error e = CheckGroups(size, groups, "scale"); e.failure()) return e;
  if (g.element_count() != size || dots->element_count() != groups * k_count ||
      inv_step.element_count() != k_count || top.element_count() != k_count) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "fractrain blend gradient: operand sizes do not match");
  }
  std::vector<Grid> grids;
  for (int64_t k = 0; k < k_count; ++k) {
    grids.push_back({lo.typed_data()[0], step.typed_data()[k], inv_step.typed_data()[k],
                     top.typed_data()[k]});
  }
  const int64_t run = size / groups;
  const int64_t pieces = (run + kChunk - 1) / kChunk;
  // Each piece's partial dots, summed per run afterwards in a fixed order: the result
  // does not depend on the number of threads.
  std::vector<double> partial(groups * pieces * k_count, 0.0);
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  float* dxs = dx->typed_data();
  ForPieces(size, groups, [&](int64_t group, int64_t begin, int64_t end) {
    const float s = scale.typed_data()[group];
    double* sums = &partial[(group * pieces + (begin - group * run) / kChunk) * k_count];
    for (int64_t k = 0; k < k_count; ++k) {
      const Grid grid = grids[k];
      float lanes[kLanes] = {};
      int64_t i = begin;
      for (; i + kLanes <= end; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          lanes[j] += gs[i + j] * grid.Level((xs[i + j] - grid.lo) * grid.inv_step);
        }
      }
      double sum = 0.0;
      for (; i < end; ++i) sum += gs[i] * grid.Level((xs[i] - grid.lo) * grid.inv_step);
      for (int j = 0; j < kLanes; ++j) sum += lanes[j];
      sums[k] = sum;
    }
    for (int64_t i = begin; i < end; ++i) dxs[i] = gs[i] * s;
  });
  float* out = dots->typed_data();
  for (int64_t group = 0; group < groups; ++group) {
    for (int64_t k = 0; k < k_count; ++k) {
      double sum = 0.0;
      for (int64_t p = 0; p < pieces; ++p) sum += partial[(group * pieces + p) * k_count + k];
      out[group * k_count + k] = static_cast<float>(sum);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainQuantize, Quantize,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lo
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step, one per run
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_step
                                  .Arg<ffi::Buffer<ffi::F32>>()  // top
                                  .Arg<ffi::Buffer<ffi::S32>>()  // bits
                                  .Arg<ffi::Buffer<ffi::U32>>()  // seed
                                  .Ret<ffi::Buffer<ffi::F32>>()  // q
                                  .Attr<int32_t>("stochastic")
                                  .Attr<int32_t>("passthrough"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FractrainBlendGrad, BlendGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale, one per run
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lo
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step, one per width
                                  .Arg<ffi::Buffer<ffi::F32>>()  // inv_step
                                  .Arg<ffi::Buffer<ffi::F32>>()  // top
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dots [runs, K]
