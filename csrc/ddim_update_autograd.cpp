// The autograd kernel of the fused DDIM update, in C++ so that no Python runs per call.
//
//   z_s = c0 * clip(x0) + c1 * z_t,   c1 = sigma_s / sigma_t,   c0 = alpha_s - c1 * alpha_t
//   dz_s/dz_t = c1,   dz_s/dx0 = c0 * [|x0| <= 1] (clip) or c0 (no clip)
//
// Differentiable in z_t and x0; the coefficients get no gradient. When no graph is needed
// (grad mode off, as in the samplers, or neither image requires grad) the call goes straight
// to the device kernel below autograd.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace rcfd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TensorOpSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
using ScalarOpSig = at::Tensor(const at::Tensor&, const at::Tensor&, double, double, double,
                               double, bool);

const c10::TypedOperatorHandle<TensorOpSig>& tensor_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rcfd::ddim_update", "")
                             .typed<TensorOpSig>();
  return op;
}

const c10::TypedOperatorHandle<ScalarOpSig>& scalar_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rcfd::ddim_update_scalar", "")
                             .typed<ScalarOpSig>();
  return op;
}

bool needs_graph(const at::Tensor& z_t, const at::Tensor& x0) {
  return at::GradMode::is_enabled() && (z_t.requires_grad() || x0.requires_grad());
}

// A [B] coefficient as [B, 1, ...] so that it broadcasts over the images; [] stays [].
// (Symbolic sizes: under torch.compile the batch may be a symbol.)
at::Tensor per_sample(const at::Tensor& c, int64_t dim) {
  if (c.dim() != 1 || dim <= 1) return c;
  std::vector<c10::SymInt> shape(static_cast<size_t>(dim), c10::SymInt(1));
  shape[0] = c.sym_size(0);
  return c.view_symint(shape);
}

// The gradients of z_t and x0 (c0, c1: Python numbers or broadcastable tensors), in the
// gradient's dtype; nothing for the coefficients and clip.
template <typename Coef>
variable_list image_grads(AutogradContext* ctx, const at::Tensor& grad, const Coef& c0,
                          const Coef& c1, const at::Tensor& x0, bool clip) {
  variable_list out(7);
  if (ctx->needs_input_grad(0)) out[0] = (grad * c1).to(grad.scalar_type());
  if (ctx->needs_input_grad(1)) {
    at::Tensor g = grad * c0;
    if (clip) g = g * x0.abs().le(1);  // clamp's gradient: 1 inside [-1, 1], 0 outside (and NaN)
    out[1] = g.to(grad.scalar_type());
  }
  return out;
}

struct DdimUpdateFn : public torch::autograd::Function<DdimUpdateFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z_t, const at::Tensor& x0,
                            const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                            const at::Tensor& alpha_t, const at::Tensor& sigma_t, bool clip) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = tensor_op().call(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
    ctx->save_for_backward({clip ? x0 : at::Tensor(), alpha_s, sigma_s, alpha_t, sigma_t});
    ctx->saved_data["clip"] = clip;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    const int64_t dim = grad.dim();
    const at::Tensor c1 = per_sample(saved[2], dim) / per_sample(saved[4], dim);
    const at::Tensor c0 = per_sample(saved[1], dim) - c1 * per_sample(saved[3], dim);
    return image_grads(ctx, grad, c0, c1, saved[0], ctx->saved_data["clip"].toBool());
  }
};

struct DdimUpdateScalarFn : public torch::autograd::Function<DdimUpdateScalarFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z_t, const at::Tensor& x0,
                            double alpha_s, double sigma_s, double alpha_t, double sigma_t,
                            bool clip) {
    at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor out = scalar_op().call(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
    const double c1 = sigma_s / sigma_t;
    ctx->save_for_backward({clip ? x0 : at::Tensor()});
    ctx->saved_data["c0"] = alpha_s - c1 * alpha_t;
    ctx->saved_data["c1"] = c1;
    ctx->saved_data["clip"] = clip;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const double c0 = ctx->saved_data["c0"].toDouble();
    const double c1 = ctx->saved_data["c1"].toDouble();
    return image_grads(ctx, grads[0], c0, c1, saved[0], ctx->saved_data["clip"].toBool());
  }
};

at::Tensor ddim_update_autograd(const at::Tensor& z_t, const at::Tensor& x0,
                                const at::Tensor& alpha_s, const at::Tensor& sigma_s,
                                const at::Tensor& alpha_t, const at::Tensor& sigma_t, bool clip) {
  if (!needs_graph(z_t, x0)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return tensor_op().call(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
  }
  return DdimUpdateFn::apply(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
}

at::Tensor ddim_update_scalar_autograd(const at::Tensor& z_t, const at::Tensor& x0,
                                       double alpha_s, double sigma_s, double alpha_t,
                                       double sigma_t, bool clip) {
  if (!needs_graph(z_t, x0)) {
    at::AutoDispatchBelowADInplaceOrView below;
    return scalar_op().call(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
  }
  return DdimUpdateScalarFn::apply(z_t, x0, alpha_s, sigma_s, alpha_t, sigma_t, clip);
}

}  // namespace

TORCH_LIBRARY_IMPL(rcfd, Autograd, m) {
  m.impl("ddim_update", &ddim_update_autograd);
  m.impl("ddim_update_scalar", &ddim_update_scalar_autograd);
}

}  // namespace rcfd
