// Input checks for the rcfd ops: the one place where arguments are validated in C++.
// Errors name the argument and raise ValueError / TypeError in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace rcfd {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// z_t and x0: same shape, device and dtype; float32/float16/bfloat16; [B, ...] with B >= 1.
inline void check_ddim_images(const at::Tensor& z_t, const at::Tensor& x0) {
  TORCH_CHECK_TYPE(is_supported_float(z_t.scalar_type()),
                   "rcfd::ddim_step: z_t must be float32, float16 or bfloat16, got ",
                   z_t.scalar_type());
  TORCH_CHECK_TYPE(x0.scalar_type() == z_t.scalar_type(), "rcfd::ddim_step: x0 is ",
                   x0.scalar_type(), " but z_t is ", z_t.scalar_type(), "; cast one of them");
  TORCH_CHECK_VALUE(z_t.dim() >= 1 && z_t.numel() > 0,
                    "rcfd::ddim_step: z_t must be a non-empty [B, ...] tensor, got shape ",
                    z_t.sizes());
  TORCH_CHECK_VALUE(x0.sizes() == z_t.sizes(), "rcfd::ddim_step: x0 has shape ", x0.sizes(),
                    " but z_t has ", z_t.sizes(), "; they must match");
  TORCH_CHECK_VALUE(x0.device() == z_t.device(), "rcfd::ddim_step: x0 is on ", x0.device(),
                    " but z_t is on ", z_t.device());
}

// A coefficient tensor: float32, on z_t's device, shape [] or [B].
inline void check_ddim_coef(const at::Tensor& c, const char* name, const at::Tensor& z_t) {
  TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, "rcfd::ddim_step: ", name,
                   " must be a float32 tensor, got ", c.scalar_type());
  TORCH_CHECK_VALUE(c.device() == z_t.device(), "rcfd::ddim_step: ", name, " is on ",
                    c.device(), " but z_t is on ", z_t.device());
  const int64_t batch = z_t.size(0);
  TORCH_CHECK_VALUE(c.dim() == 0 || (c.dim() == 1 && c.size(0) == batch) ||
                        (c.dim() == 1 && c.size(0) == 1),
                    "rcfd::ddim_step: ", name, " must have shape [] or [B] with B=", batch,
                    ", got ", c.sizes());
}

inline void check_positive(double v, const char* name) {
  TORCH_CHECK_VALUE(v > 0, "rcfd::ddim_step: ", name, " must be > 0 (it divides), got ", v);
}

}  // namespace rcfd
