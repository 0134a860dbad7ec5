// The only torch-facing file: op schemas (TORCH_LIBRARY), CUDA implementations
// (TORCH_LIBRARY_IMPL) that check their tensors, allocate outputs and call the torch-free
// launchers of kernels.h on the current stream. Fake (meta) kernels and autograd are added from
// Python (meditron_kernels/ops/cuda_*.py) once this library is loaded.
//
// The public API has validated shapes and dtypes before these ops run; the checks here guard
// direct torch.ops calls and the invariants the kernels rely on (contiguity, device, limits).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "kernels.h"

namespace {

using at::Tensor;

mk::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return mk::DType::kFloat32;
    case at::kHalf: return mk::DType::kFloat16;
    case at::kBFloat16: return mk::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the other inputs are on ", ref.device());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the Python launcher copies strided inputs)");
}

void check_same(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " has shape ", t.sizes(), " but ", ref_name, " has ", ref.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
                   " has ", ref.scalar_type());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorInvalidValue, op, ": arguments outside the kernel's limits");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

Tensor empty_as(const Tensor& t) { return at::empty(t.sizes(), t.options()); }

// ------------------------------------------------------------------------------------ RMSNorm
int rms_hidden(const Tensor& x, const Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must have shape (", x.size(-1),
              ",), got ", weight.sizes());
  TORCH_CHECK(x.size(-1) <= std::numeric_limits<int>::max(), "hidden size ", x.size(-1), " is too large");
  return static_cast<int>(x.size(-1));
}

// The kernels take their 16-byte path when hidden is a multiple of 16 bytes and every pointer is
// 16-byte aligned. An offset view is copied once into fresh (aligned) memory, so that the path,
// and with it the size limit, depend on the shape alone (see rms_norm_max_hidden).
Tensor aligned_for(const Tensor& t, const Tensor& x) {
  const bool vector_shape = x.size(-1) * x.element_size() % 16 == 0;
  return vector_shape && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 ? t.clone() : t;
}

void check_rms_limit(const Tensor& x, int hidden) {
  const bool vector_shape = static_cast<int64_t>(hidden) * x.element_size() % 16 == 0;
  const int limit = mk::rms_norm_max_hidden(dtype_of(x, "x"), vector_shape);
  TORCH_CHECK_VALUE(hidden <= limit, "rms_norm on the cuda backend supports hidden <= ", limit, " for ",
                    x.scalar_type(), vector_shape ? "" : " when hidden is not a multiple of 16 bytes", ", got ",
                    hidden);
}

void check_rms_inputs(const Tensor& x, const Tensor& weight) {
  check_cuda(x, "x", x);
  check_cuda(weight, "weight", x);
  check_contiguous(x, "x");
  check_contiguous(weight, "weight");
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() || weight.scalar_type() == at::kFloat,
                   "weight must have x's dtype or float32, got ", weight.scalar_type());
}

std::tuple<Tensor, Tensor> rms_norm_fwd_impl(const Tensor& x_in, const std::optional<Tensor>& residual_in,
                                             const Tensor& weight_in, double eps) {
  check_rms_inputs(x_in, weight_in);
  const int hidden = rms_hidden(x_in, weight_in);
  check_rms_limit(x_in, hidden);
  if (residual_in) {
    check_cuda(*residual_in, "residual", x_in);
    check_contiguous(*residual_in, "residual");
    check_same(*residual_in, "residual", x_in, "x");
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = aligned_for(x_in, x_in), weight = aligned_for(weight_in, x_in);
  const std::optional<Tensor> residual =
      residual_in ? std::optional<Tensor>(aligned_for(*residual_in, x_in)) : std::nullopt;
  Tensor y = empty_as(x);
  Tensor h = residual ? empty_as(x) : Tensor();
  mk::RmsNormFwdArgs a{};
  a.x = x.data_ptr();
  a.residual = residual ? residual->data_ptr() : nullptr;
  a.weight = weight.data_ptr();
  a.y = y.data_ptr();
  a.h = residual ? h.data_ptr() : nullptr;
  a.rows = hidden > 0 ? x.numel() / hidden : 0;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  a.dtype = dtype_of(x, "x");
  a.wdtype = dtype_of(weight, "weight");
  check_launch(mk::rms_norm_fwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_rms_norm_fwd");
  return {y, h};
}

Tensor rms_norm_fwd(const Tensor& x, const Tensor& weight, double eps) {
  return std::get<0>(rms_norm_fwd_impl(x, std::nullopt, weight, eps));
}

std::tuple<Tensor, Tensor> rms_norm_residual_fwd(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                                 double eps) {
  return rms_norm_fwd_impl(x, residual, weight, eps);
}

std::tuple<Tensor, Tensor> rms_norm_bwd(const Tensor& dy_in, const Tensor& h_in, const Tensor& weight_in,
                                        const std::optional<Tensor>& dh_in, double eps, bool need_dweight) {
  check_rms_inputs(h_in, weight_in);
  const int hidden = rms_hidden(h_in, weight_in);
  check_rms_limit(h_in, hidden);
  check_cuda(dy_in, "dy", h_in);
  check_contiguous(dy_in, "dy");
  check_same(dy_in, "dy", h_in, "h");
  if (dh_in) {
    check_cuda(*dh_in, "dh", h_in);
    check_contiguous(*dh_in, "dh");
    check_same(*dh_in, "dh", h_in, "h");
  }
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Tensor h = aligned_for(h_in, h_in), dy = aligned_for(dy_in, h_in), weight = aligned_for(weight_in, h_in);
  const std::optional<Tensor> dh = dh_in ? std::optional<Tensor>(aligned_for(*dh_in, h_in)) : std::nullopt;
  Tensor dx = empty_as(h);
  Tensor dweight = at::empty({need_dweight ? hidden : 0}, weight.options());
  mk::RmsNormBwdArgs a{};
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.weight = weight.data_ptr();
  a.dh = dh ? dh->data_ptr() : nullptr;
  a.dx = dx.data_ptr();
  a.dweight = need_dweight ? dweight.data_ptr() : nullptr;
  a.rows = hidden > 0 ? h.numel() / hidden : 0;
  a.hidden = hidden;
  a.eps = static_cast<float>(eps);
  a.dtype = dtype_of(h, "h");
  a.wdtype = dtype_of(weight, "weight");
  Tensor partials;
  const int64_t n_partials = mk::rms_norm_bwd_partials(a);
  if (n_partials > 0) {
    partials = at::empty({n_partials, hidden}, h.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
  }
  check_launch(mk::rms_norm_bwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_rms_norm_bwd");
  return {dx, dweight};
}

// ------------------------------------------------------------------------------------- rotary
std::tuple<Tensor, Tensor> apply_rotary(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                        const std::optional<Tensor>& position_ids, bool interleaved, bool conjugate) {
  check_cuda(q, "q", q);
  check_cuda(k, "k", q);
  check_cuda(cos, "cos", q);
  check_cuda(sin, "sin", q);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "q and k must be 4-D (batch, seq, heads, head_dim)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q and k must share batch, seq and head_dim, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "k has dtype ", k.scalar_type(), " but q has ", q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "q and k must have a contiguous last dimension");
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even, got ", head_dim);
  for (const Tensor* t : {&cos, &sin}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "cos and sin must be float32");
    check_contiguous(*t, "cos/sin");
    TORCH_CHECK(t->dim() == 2 && t->size(1) == head_dim / 2, "cos and sin must have shape (positions, ",
                head_dim / 2, "), got ", t->sizes());
  }
  TORCH_CHECK(cos.sizes() == sin.sizes(), "cos and sin must have the same shape");
  if (position_ids) {
    check_cuda(*position_ids, "position_ids", q);
    check_contiguous(*position_ids, "position_ids");
    TORCH_CHECK_TYPE(position_ids->scalar_type() == at::kInt || position_ids->scalar_type() == at::kLong,
                     "position_ids must be int32 or int64");
    TORCH_CHECK(position_ids->dim() == 2 && position_ids->size(0) == q.size(0) && position_ids->size(1) == q.size(1),
                "position_ids must have shape (batch, seq) = (", q.size(0), ", ", q.size(1), ")");
  } else {
    TORCH_CHECK(cos.size(0) >= q.size(1), "cos and sin cover ", cos.size(0), " positions but seq is ", q.size(1));
  }
  TORCH_CHECK(q.size(2) <= std::numeric_limits<int>::max() && k.size(2) <= std::numeric_limits<int>::max() &&
                  head_dim <= std::numeric_limits<int>::max(),
              "too many heads or too large a head_dim");
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor q_out = at::empty(q.sizes(), q.options());
  Tensor k_out = at::empty(k.sizes(), k.options());
  mk::RotaryArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.q_out = q_out.data_ptr();
  a.k_out = k_out.data_ptr();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.position_ids = position_ids ? position_ids->data_ptr() : nullptr;
  a.position_ids_int64 = position_ids && position_ids->scalar_type() == at::kLong;
  for (int i = 0; i < 3; ++i) {
    a.q_stride[i] = q.stride(i);
    a.k_stride[i] = k.stride(i);
  }
  a.batch = q.size(0);
  a.seq = q.size(1);
  a.n_positions = cos.size(0);
  a.n_heads = static_cast<int>(q.size(2));
  a.n_kv_heads = static_cast<int>(k.size(2));
  a.head_dim = static_cast<int>(head_dim);
  a.interleaved = interleaved;
  a.conjugate = conjugate;
  a.dtype = dtype_of(q, "q");
  if (q.numel() == 0 && k.numel() == 0) return {q_out, k_out};
  TORCH_CHECK(a.n_heads > 0 && a.n_kv_heads > 0, "q and k need at least one head each");
  check_launch(mk::rotary(a, c10::cuda::getCurrentCUDAStream()), "cuda_apply_rotary");
  return {q_out, k_out};
}

// ------------------------------------------------------------------------------------- SwiGLU
void check_swiglu_input(const Tensor& t, const char* name, const Tensor& ref) {
  check_cuda(t, name, ref);
  check_contiguous(t, name);
}

// The unpacked ops: gate, up and their gradients as one contiguous row of numel() elements.
mk::SwigluArgs flat_args(const Tensor& gate) {
  mk::SwigluArgs a{};
  a.rows = 1;
  a.cols = gate.numel();
  a.in_row_stride = a.out_row_stride = a.cols;
  a.dtype = dtype_of(gate, "gate");
  return a;
}

Tensor swiglu_fwd(const Tensor& gate, const Tensor& up) {
  check_swiglu_input(gate, "gate", gate);
  check_swiglu_input(up, "up", gate);
  check_same(up, "up", gate, "gate");
  const c10::cuda::CUDAGuard guard(gate.device());
  Tensor out = empty_as(gate);
  mk::SwigluArgs a = flat_args(gate);
  a.gate = gate.data_ptr();
  a.up = up.data_ptr();
  a.out = out.data_ptr();
  check_launch(mk::swiglu_fwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_swiglu_fwd");
  return out;
}

std::tuple<Tensor, Tensor> swiglu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up) {
  check_swiglu_input(gate, "gate", gate);
  check_swiglu_input(up, "up", gate);
  check_swiglu_input(dout, "dout", gate);
  check_same(up, "up", gate, "gate");
  check_same(dout, "dout", gate, "gate");
  const c10::cuda::CUDAGuard guard(gate.device());
  Tensor dgate = empty_as(gate);
  Tensor dup = empty_as(up);
  mk::SwigluArgs a = flat_args(gate);
  a.dout = dout.data_ptr();
  a.gate = gate.data_ptr();
  a.up = up.data_ptr();
  a.dgate = dgate.data_ptr();
  a.dup = dup.data_ptr();
  check_launch(mk::swiglu_bwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_swiglu_bwd");
  return {dgate, dup};
}

// gate_up (..., 2 * ffn) -> (rows, ffn) problem with up at +ffn.
mk::SwigluArgs packed_args(const Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, "gate_up's last dim must be even (2 * ffn), got ",
              gate_up.sizes());
  mk::SwigluArgs a{};
  const int64_t ffn = gate_up.size(-1) / 2;
  a.rows = ffn > 0 ? gate_up.numel() / (2 * ffn) : 0;
  a.cols = ffn;
  a.in_row_stride = 2 * ffn;
  a.out_row_stride = ffn;
  a.dtype = dtype_of(gate_up, "gate_up");
  return a;
}

std::vector<int64_t> packed_out_shape(const Tensor& gate_up) {
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() /= 2;
  return shape;
}

Tensor swiglu_packed_fwd(const Tensor& gate_up) {
  check_swiglu_input(gate_up, "gate_up", gate_up);
  mk::SwigluArgs a = packed_args(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  Tensor out = at::empty(packed_out_shape(gate_up), gate_up.options());
  char* base = static_cast<char*>(gate_up.data_ptr());
  a.gate = base;
  a.up = base + a.cols * gate_up.element_size();
  a.out = out.data_ptr();
  check_launch(mk::swiglu_fwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_swiglu_packed_fwd");
  return out;
}

Tensor swiglu_packed_bwd(const Tensor& dout, const Tensor& gate_up) {
  check_swiglu_input(gate_up, "gate_up", gate_up);
  check_swiglu_input(dout, "dout", gate_up);
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(packed_out_shape(gate_up)), "dout must have shape ",
              at::IntArrayRef(packed_out_shape(gate_up)), ", got ", dout.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == gate_up.scalar_type(), "dout must have gate_up's dtype");
  mk::SwigluArgs a = packed_args(gate_up);
  const c10::cuda::CUDAGuard guard(gate_up.device());
  Tensor dgate_up = empty_as(gate_up);
  const int64_t half_bytes = a.cols * gate_up.element_size();
  a.dout = dout.data_ptr();
  a.gate = gate_up.data_ptr();
  a.up = static_cast<const char*>(gate_up.data_ptr()) + half_bytes;
  a.dgate = dgate_up.data_ptr();
  a.dup = static_cast<char*>(dgate_up.data_ptr()) + half_bytes;
  check_launch(mk::swiglu_bwd(a, c10::cuda::getCurrentCUDAStream()), "cuda_swiglu_packed_bwd");
  return dgate_up;
}

}  // namespace

// A TORCH_LIBRARY block owns the namespace's schema definitions; the Triton ops of the same
// namespace are torch.library.custom_op FRAGMENTs, which coexist with it in either load order.
TORCH_LIBRARY(meditron_kernels, m) {
  m.def("cuda_rms_norm_fwd(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("cuda_rms_norm_residual_fwd(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("cuda_rms_norm_bwd(Tensor dy, Tensor h, Tensor weight, Tensor? dh, float eps, bool need_dweight)"
        " -> (Tensor, Tensor)");
  m.def("cuda_apply_rotary(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved,"
        " bool conjugate) -> (Tensor, Tensor)");
  m.def("cuda_swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("cuda_swiglu_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("cuda_swiglu_packed_fwd(Tensor gate_up) -> Tensor");
  m.def("cuda_swiglu_packed_bwd(Tensor dout, Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(meditron_kernels, CUDA, m) {
  m.impl("cuda_rms_norm_fwd", &rms_norm_fwd);
  m.impl("cuda_rms_norm_residual_fwd", &rms_norm_residual_fwd);
  m.impl("cuda_rms_norm_bwd", &rms_norm_bwd);
  m.impl("cuda_apply_rotary", &apply_rotary);
  m.impl("cuda_swiglu_fwd", &swiglu_fwd);
  m.impl("cuda_swiglu_bwd", &swiglu_bwd);
  m.impl("cuda_swiglu_packed_fwd", &swiglu_packed_fwd);
  m.impl("cuda_swiglu_packed_bwd", &swiglu_packed_bwd);
}

// `import meditron_kernels._C` loads the library (running the registrations above); the module
// itself is empty, so no pybind11 is compiled in.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "meditron_kernels CUDA ops (torch.ops.meditron_kernels)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
