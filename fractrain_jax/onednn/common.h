// What the kernels' sources share: oneDNN's CPU engine, primitives that take their scratch
// space from the caller, and a call's run on a stream with oneDNN's errors as the FFI's.
#ifndef FRACTRAIN_JAX_ONEDNN_COMMON_H_
#define FRACTRAIN_JAX_ONEDNN_COMMON_H_

#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace fractrain_onednn {

inline dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Scratch space is passed with each call (Execute): XLA may run two oneDNN calls at once
// from two threads.
inline dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Runs `primitive` (made from `pd`) on `args` and the scratch space `pd` asks for.
inline void Execute(dnnl::stream& s, const dnnl::primitive& primitive,
                    const dnnl::primitive_desc_base& pd,
                    std::unordered_map<int, dnnl::memory> args) {
  args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(pd.scratchpad_desc(), Engine()));
  primitive.execute(s, args);
}

// Runs body(stream) and waits for it; a oneDNN error becomes the FFI's, named by `what`.
template <typename Body>
xla::ffi::Error Guarded(const char* what, Body&& body) {
  try {
    dnnl::stream s(Engine());
    body(s);
    s.wait();
  } catch (const dnnl::error& e) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kInternal,
                           std::string("fractrain oneDNN ") + what + ": " + e.what());
  }
  return xla::ffi::Error::Success();
}

}  // namespace fractrain_onednn

#endif  // FRACTRAIN_JAX_ONEDNN_COMMON_H_
