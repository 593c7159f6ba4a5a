// Input checks for the rcfd ops: the one place where arguments are validated in C++.
// Errors name the argument and raise ValueError / TypeError in Python.
//
// The error path is kept as plain as possible: every message is assembled here with
// std::string, std::to_string and snprintf, and handed to TORCH_CHECK_VALUE/TYPE as ONE
// std::string, which c10::str passes through untouched. So no std::ostringstream is built
// and no operator<< of libc10 (Device, IntArrayRef) or of libstdc++ (double) runs while an
// error is raised. Raw-op calls that streamed those values into the message crashed the
// process on one GPU machine (torch 2.11, Python 3.12, gcc 13.3) while the messages that
// streamed only a dtype did not; see tests/test_ddim_op.py, which calls the raw ops with
// every bad input in a child process.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace rcfd {

// --------------------------------------------------------------------------- messages

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline std::string device_str(const at::Device& d) {
  std::string s;
  switch (d.type()) {
    case at::kCPU: s = "cpu"; break;
    case at::kCUDA: s = "cuda"; break;
    case at::kMeta: s = "meta"; break;
    default: s = "device type " + std::to_string(static_cast<int>(d.type())); break;
  }
  return d.has_index() ? s + ":" + std::to_string(d.index()) : s;
}

inline std::string dtype_str(at::ScalarType t) { return c10::toString(t); }

inline std::string number_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

// Out of line and cold, so that the checks below cost a compare on the hot path.
[[noreturn]] C10_NOINLINE inline void value_error(const std::string& msg) {
  TORCH_CHECK_VALUE(false, msg);
  __builtin_unreachable();
}

[[noreturn]] C10_NOINLINE inline void type_error(const std::string& msg) {
  TORCH_CHECK_TYPE(false, msg);
  __builtin_unreachable();
}

// --------------------------------------------------------------------------- checks

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// z_t and x0: same shape, device and dtype; float32/float16/bfloat16; [B, ...] with B >= 1.
inline void check_ddim_images(const at::Tensor& z_t, const at::Tensor& x0) {
  constexpr const char* op = "rcfd::ddim_update: ";
  if (C10_UNLIKELY(!is_supported_float(z_t.scalar_type()))) {
    type_error(std::string(op) + "z_t must be float32, float16 or bfloat16, got " +
               dtype_str(z_t.scalar_type()));
  }
  if (C10_UNLIKELY(x0.scalar_type() != z_t.scalar_type())) {
    type_error(std::string(op) + "x0 is " + dtype_str(x0.scalar_type()) + " but z_t is " +
               dtype_str(z_t.scalar_type()) + "; cast one of them");
  }
  if (C10_UNLIKELY(z_t.dim() < 1 || z_t.numel() == 0)) {
    value_error(std::string(op) + "z_t must be a non-empty [B, ...] tensor, got shape " +
                shape_str(z_t.sizes()));
  }
  if (C10_UNLIKELY(x0.sizes() != z_t.sizes())) {
    value_error(std::string(op) + "x0 has shape " + shape_str(x0.sizes()) + " but z_t has " +
                shape_str(z_t.sizes()) + "; they must match");
  }
  if (C10_UNLIKELY(x0.device() != z_t.device())) {
    value_error(std::string(op) + "x0 is on " + device_str(x0.device()) + " but z_t is on " +
                device_str(z_t.device()) + "; move one of them");
  }
}

// A coefficient tensor: float32, on z_t's device, shape [], [1] or [B].
inline void check_ddim_coef(const at::Tensor& c, const char* name, const at::Tensor& z_t) {
  constexpr const char* op = "rcfd::ddim_update: ";
  if (C10_UNLIKELY(c.scalar_type() != at::kFloat)) {
    type_error(std::string(op) + name + " must be a float32 tensor, got " +
               dtype_str(c.scalar_type()));
  }
  if (C10_UNLIKELY(c.device() != z_t.device())) {
    value_error(std::string(op) + name + " is on " + device_str(c.device()) +
                " but z_t is on " + device_str(z_t.device()) + "; move it there");
  }
  const int64_t batch = z_t.size(0);
  if (C10_UNLIKELY(!(c.dim() == 0 || (c.dim() == 1 && (c.size(0) == batch || c.size(0) == 1))))) {
    value_error(std::string(op) + name + " must have shape [] or [B] with B=" +
                std::to_string(batch) + ", got " + shape_str(c.sizes()));
  }
}

inline void check_positive(double v, const char* name) {
  if (C10_UNLIKELY(!(v > 0))) {
    value_error(std::string("rcfd::ddim_update: ") + name + " must be > 0 (it divides), got " +
                number_str(v));
  }
}

}  // namespace rcfd
