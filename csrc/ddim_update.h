// Shared declarations of the fused DDIM update (METHOD.md, "DDIM step"):
//   z_s = alpha_s * x0 + sigma_s * (z_t - alpha_t * x0) / sigma_t
//       = c0 * x0 + c1 * z_t,   c1 = sigma_s / sigma_t,   c0 = alpha_s - c1 * alpha_t,
// with x0 optionally clipped to [-1, 1] first. One read of z_t and x0, one write of z_s.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#ifdef __CUDACC__
#define RCFD_HOST_DEVICE __host__ __device__
#else
#define RCFD_HOST_DEVICE
#endif

namespace rcfd {

// The images as flat arrays: every sample is a contiguous run of `per_sample` elements
// (true for contiguous and channels-last layouts, where the batch stays outermost).
struct DdimProblem {
  at::Tensor z_t, x0, out;  // same dtype, device and strides
  int64_t batch;
  int64_t per_sample;
};

// Coefficients: either per-sample arrays (float32, stride 0 or 1) or four scalars.
struct DdimCoefs {
  const float* alpha_s = nullptr;
  const float* sigma_s = nullptr;
  const float* alpha_t = nullptr;
  const float* sigma_t = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  float scalar[4] = {0.f, 0.f, 0.f, 0.f};  // used when the pointers are null
  RCFD_HOST_DEVICE bool per_sample() const { return alpha_s != nullptr; }
};

// Lays z_t and x0 out densely (same memory format) and allocates the output.
DdimProblem make_ddim_problem(const at::Tensor& z_t, const at::Tensor& x0);

// The coefficient tensors as arrays (each made contiguous; kept alive by `keep`).
DdimCoefs make_ddim_coefs(const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                          const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                          const at::Tensor& z_t, std::vector<at::Tensor>& keep);

// Four scalar coefficients (sigma_t checked > 0).
DdimCoefs make_scalar_coefs(double alpha_s, double sigma_s, double alpha_t, double sigma_t);

#ifdef RCFD_WITH_CUDA
void ddim_update_cuda_launch(const DdimProblem& p, const DdimCoefs& c, bool clip);
int cuda_runtime_version();
#endif

}  // namespace rcfd
