// rcfd._C: the fused DDIM update. Op schemas (TORCH_LIBRARY), the CPU kernel, and the
// Python module with build_info(). The CUDA kernel lives in cuda/ddim_update.cu, the
// autograd kernel in ddim_update_autograd.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "ddim_update.h"

#ifndef RCFD_TORCH_VERSION
#define RCFD_TORCH_VERSION "unknown"
#endif
#ifndef RCFD_CUDA_ARCHS
#define RCFD_CUDA_ARCHS ""
#endif
#ifndef RCFD_BUILD_SYSTEM
#define RCFD_BUILD_SYSTEM "setuptools"
#endif

namespace rcfd {

// The layout the kernels work in: channels-last inputs stay channels-last, everything else
// is made contiguous (rcfd/ops.py mirrors this rule for the fake kernel).
static at::MemoryFormat ddim_memory_format(const at::Tensor& z_t) {
  if (z_t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (z_t.dim() == 4 && z_t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (z_t.dim() == 5 && z_t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

DdimProblem make_ddim_problem(const at::Tensor& z_t, const at::Tensor& x0) {
  check_ddim_images(z_t, x0);
  // One memory format for all three tensors; a copy only when an input is not already
  // dense in it. Either way every sample is one contiguous run (batch outermost).
  const auto fmt = ddim_memory_format(z_t);
  DdimProblem p;
  p.z_t = z_t.contiguous(fmt);
  p.x0 = x0.contiguous(fmt);
  p.out = at::empty_like(p.z_t, p.z_t.options(), fmt);
  p.batch = z_t.size(0);
  p.per_sample = z_t.numel() / p.batch;
  return p;
}

DdimCoefs make_ddim_coefs(const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                          const at::Tensor& alpha_t, const at::Tensor& sigma_t,
                          const at::Tensor& z_t, std::vector<at::Tensor>& keep) {
  const at::Tensor* in[4] = {&alpha_s, &sigma_s, &alpha_t, &sigma_t};
  const char* names[4] = {"alpha_s", "sigma_s", "alpha_t", "sigma_t"};
  DdimCoefs c;
  const float** ptrs[4] = {&c.alpha_s, &c.sigma_s, &c.alpha_t, &c.sigma_t};
  for (int i = 0; i < 4; ++i) {
    check_ddim_coef(*in[i], names[i], z_t);
    keep.push_back(in[i]->contiguous());
    *ptrs[i] = keep.back().data_ptr<float>();
    c.stride[i] = keep.back().numel() == 1 ? 0 : 1;
  }
  // Values are read on the host only for CPU tensors: reading device tensors would sync.
  if (z_t.is_cpu()) {
    const float* st = c.sigma_t;
    for (int64_t b = 0; b < (c.stride[3] ? z_t.size(0) : 1); ++b) {
      check_positive(st[b], "sigma_t");
    }
  }
  return c;
}

DdimCoefs make_scalar_coefs(double alpha_s, double sigma_s, double alpha_t, double sigma_t) {
  check_positive(sigma_t, "sigma_t");
  DdimCoefs c;
  c.scalar[0] = static_cast<float>(alpha_s);
  c.scalar[1] = static_cast<float>(sigma_s);
  c.scalar[2] = static_cast<float>(alpha_t);
  c.scalar[3] = static_cast<float>(sigma_t);
  return c;
}

namespace {

// z_s = c0 * x0 + c1 * z_t over one contiguous run; arithmetic in fp32. Written as plain
// loops over restrict pointers so that -O3 vectorises them for every dtype.
template <typename scalar_t>
void ddim_run(const scalar_t* __restrict__ z, const scalar_t* __restrict__ x,
              scalar_t* __restrict__ out, int64_t n, float c0, float c1, bool clip) {
  if (clip) {
    for (int64_t i = 0; i < n; ++i) {
      const float xv = std::min(std::max(static_cast<float>(x[i]), -1.0f), 1.0f);
      out[i] = static_cast<scalar_t>(c0 * xv + c1 * static_cast<float>(z[i]));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<scalar_t>(c0 * static_cast<float>(x[i]) +
                                     c1 * static_cast<float>(z[i]));
    }
  }
}

inline void sample_coefs(const DdimCoefs& c, int64_t b, float& c0, float& c1) {
  float a_s, s_s, a_t, s_t;
  if (c.per_sample()) {
    a_s = c.alpha_s[b * c.stride[0]];
    s_s = c.sigma_s[b * c.stride[1]];
    a_t = c.alpha_t[b * c.stride[2]];
    s_t = c.sigma_t[b * c.stride[3]];
  } else {
    a_s = c.scalar[0];
    s_s = c.scalar[1];
    a_t = c.scalar[2];
    s_t = c.scalar[3];
  }
  c1 = s_s / s_t;
  c0 = a_s - c1 * a_t;
}

// Parallel over the flat element range (so a batch of one large image still uses every
// thread); each chunk is split at sample boundaries to pick that sample's coefficients.
template <typename scalar_t>
void ddim_cpu(const DdimProblem& p, const DdimCoefs& c, bool clip) {
  const scalar_t* z = p.z_t.const_data_ptr<scalar_t>();
  const scalar_t* x = p.x0.const_data_ptr<scalar_t>();
  scalar_t* out = p.out.mutable_data_ptr<scalar_t>();
  const int64_t n = p.out.numel();
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t b = i / p.per_sample;
      const int64_t stop = std::min(end, (b + 1) * p.per_sample);
      float c0, c1;
      sample_coefs(c, b, c0, c1);
      ddim_run<scalar_t>(z + i, x + i, out + i, stop - i, c0, c1, clip);
      i = stop;
    }
  });
}

void dispatch_cpu(const DdimProblem& p, const DdimCoefs& c, bool clip) {
  switch (p.out.scalar_type()) {
    case at::kFloat:
      return ddim_cpu<float>(p, c, clip);
    case at::kHalf:
      return ddim_cpu<c10::Half>(p, c, clip);
    case at::kBFloat16:
      return ddim_cpu<c10::BFloat16>(p, c, clip);
    default:
      type_error(std::string("rcfd::ddim_update: unsupported dtype ") +
                 dtype_str(p.out.scalar_type()));
  }
}

at::Tensor ddim_update_cpu(const at::Tensor& z_t, const at::Tensor& x0, const at::Tensor& alpha_s,
                         const at::Tensor& sigma_s, const at::Tensor& alpha_t,
                         const at::Tensor& sigma_t, bool clip) {
  DdimProblem p = make_ddim_problem(z_t, x0);
  std::vector<at::Tensor> keep;
  DdimCoefs c = make_ddim_coefs(alpha_s, sigma_s, alpha_t, sigma_t, z_t, keep);
  dispatch_cpu(p, c, clip);
  return p.out;
}

at::Tensor ddim_update_scalar_cpu(const at::Tensor& z_t, const at::Tensor& x0, double alpha_s,
                                double sigma_s, double alpha_t, double sigma_t, bool clip) {
  const DdimCoefs c = make_scalar_coefs(alpha_s, sigma_s, alpha_t, sigma_t);
  DdimProblem p = make_ddim_problem(z_t, x0);
  dispatch_cpu(p, c, clip);
  return p.out;
}

}  // namespace

// The DDIM update alone: z_s from z_t and the model's x0 (a sampler's DDIM step is the model
// call plus this update). Coefficients are [] / [1] / [B] float32 tensors, or four floats.
TORCH_LIBRARY(rcfd, m) {
  m.def(
      "ddim_update(Tensor z_t, Tensor x0, Tensor alpha_s, Tensor sigma_s, Tensor alpha_t, "
      "Tensor sigma_t, bool clip=False) -> Tensor");
  m.def(
      "ddim_update_scalar(Tensor z_t, Tensor x0, float alpha_s, float sigma_s, float alpha_t, "
      "float sigma_t, bool clip=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(rcfd, CPU, m) {
  m.impl("ddim_update", &ddim_update_cpu);
  m.impl("ddim_update_scalar", &ddim_update_scalar_cpu);
}

}  // namespace rcfd

// What this binary was built with, so a user (and the test suite) can tell whether the
// CUDA kernels are in it.
static pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = RCFD_TORCH_VERSION;
  info["build_system"] = RCFD_BUILD_SYSTEM;
#ifdef RCFD_WITH_CUDA
  info["cuda"] = true;
  const int v = rcfd::cuda_runtime_version();
  info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  info["cuda_archs"] = RCFD_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = "";
#endif
#ifdef RCFD_DEBUG
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rcfd compiled ops (registered as torch.ops.rcfd.*)";
  m.def("build_info", &build_info,
        "Versions and targets this extension was built with, and whether it has CUDA kernels");
}
