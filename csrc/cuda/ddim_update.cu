// CUDA kernel of the fused DDIM update (see ../ddim_update.h for the math).
// Only c10/cuda headers and the CUDA runtime are used (not ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS/cuSPARSE headers that a minimal toolkit lacks).
// Memory-bound: 16-byte vector loads and stores, a grid-stride loop with several vectors in
// flight per thread, launched on the current stream (so it composes with CUDA graphs and
// torch.compile).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../checks.h"
#include "../ddim_update.h"

namespace rcfd {

int cuda_runtime_version() { return CUDART_VERSION; }

namespace {

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Pack {
  scalar_t v[kVec];
};

// Per-sample (c0, c1); scalars come in `c.scalar`.
__device__ __forceinline__ void sample_coefs(const DdimCoefs& c, int64_t b, float& c0,
                                             float& c1) {
  float a_s, s_s, a_t, s_t;
  if (c.per_sample()) {
    a_s = __ldg(c.alpha_s + b * c.stride[0]);
    s_s = __ldg(c.sigma_s + b * c.stride[1]);
    a_t = __ldg(c.alpha_t + b * c.stride[2]);
    s_t = __ldg(c.sigma_t + b * c.stride[3]);
  } else {
    a_s = c.scalar[0];
    s_s = c.scalar[1];
    a_t = c.scalar[2];
    s_t = c.scalar[3];
  }
  c1 = __fdividef(s_s, s_t);
  c0 = a_s - c1 * a_t;
}

// Each thread handles kUnroll packs of kVec elements per iteration: all loads are issued
// before the first use, which keeps enough bytes in flight to saturate HBM.
// `per_sample_packs` is the number of packs per sample (each pack lies in one sample).
template <typename scalar_t, int kVec, int kUnroll>
__global__ void __launch_bounds__(256)
    ddim_update_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ x,
                     scalar_t* __restrict__ out, int64_t num_packs, int64_t per_sample_packs,
                     DdimCoefs coefs, bool clip) {
  using P = Pack<scalar_t, kVec>;
  const P* zp = reinterpret_cast<const P*>(z);
  const P* xp = reinterpret_cast<const P*>(x);
  P* op = reinterpret_cast<P*>(out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kUnroll;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x;
       base < num_packs; base += stride) {
    P zv[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < num_packs) {
        zv[u] = zp[i];
        xv[u] = xp[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + static_cast<int64_t>(u) * blockDim.x;
      if (i < num_packs) {
        float c0, c1;
        sample_coefs(coefs, i / per_sample_packs, c0, c1);
        P r;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          float xf = static_cast<float>(xv[u].v[k]);
          if (clip) xf = xf < -1.0f ? -1.0f : (xf > 1.0f ? 1.0f : xf);  // NaN stays NaN, as torch.clamp
          r.v[k] = static_cast<scalar_t>(fmaf(c0, xf, c1 * static_cast<float>(zv[u].v[k])));
        }
        op[i] = r;
      }
    }
  }
}

template <typename scalar_t, int kVec>
void launch(const DdimProblem& p, const DdimCoefs& c, bool clip) {
  constexpr int kThreads = 256;
  constexpr int kUnroll = 4;
  const int64_t num_packs = p.out.numel() / kVec;
  const int64_t blocks_needed = (num_packs + kThreads * kUnroll - 1) / (kThreads * kUnroll);
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(blocks_needed, static_cast<int64_t>(sms) * 16)));
  ddim_update_kernel<scalar_t, kVec, kUnroll>
      <<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          p.z_t.const_data_ptr<scalar_t>(), p.x0.const_data_ptr<scalar_t>(),
          p.out.mutable_data_ptr<scalar_t>(), num_packs, p.per_sample / kVec, c, clip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename scalar_t>
void launch_best(const DdimProblem& p, const DdimCoefs& c, bool clip) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (p.per_sample % kVec == 0 && aligned16(p.z_t) && aligned16(p.x0) && aligned16(p.out)) {
    launch<scalar_t, kVec>(p, c, clip);
  } else {
    launch<scalar_t, 1>(p, c, clip);
  }
}

}  // namespace

void ddim_update_cuda_launch(const DdimProblem& p, const DdimCoefs& c, bool clip) {
  switch (p.out.scalar_type()) {
    case at::kFloat:
      return launch_best<float>(p, c, clip);
    case at::kHalf:
      return launch_best<c10::Half>(p, c, clip);
    case at::kBFloat16:
      return launch_best<c10::BFloat16>(p, c, clip);
    default:
      type_error(std::string("rcfd::ddim_update: unsupported dtype ") +
                 dtype_str(p.out.scalar_type()));
  }
}

namespace {

at::Tensor ddim_update_cuda(const at::Tensor& z_t, const at::Tensor& x0, const at::Tensor& alpha_s,
                          const at::Tensor& sigma_s, const at::Tensor& alpha_t,
                          const at::Tensor& sigma_t, bool clip) {
  const c10::cuda::CUDAGuard guard(z_t.device());
  DdimProblem p = make_ddim_problem(z_t, x0);
  std::vector<at::Tensor> keep;
  DdimCoefs c = make_ddim_coefs(alpha_s, sigma_s, alpha_t, sigma_t, z_t, keep);
  ddim_update_cuda_launch(p, c, clip);
  return p.out;
}

at::Tensor ddim_update_scalar_cuda(const at::Tensor& z_t, const at::Tensor& x0, double alpha_s,
                                 double sigma_s, double alpha_t, double sigma_t, bool clip) {
  const DdimCoefs c = make_scalar_coefs(alpha_s, sigma_s, alpha_t, sigma_t);
  const c10::cuda::CUDAGuard guard(z_t.device());
  DdimProblem p = make_ddim_problem(z_t, x0);
  ddim_update_cuda_launch(p, c, clip);
  return p.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfd, CUDA, m) {
  m.impl("ddim_update", &ddim_update_cuda);
  m.impl("ddim_update_scalar", &ddim_update_scalar_cuda);
}

}  // namespace rcfd
