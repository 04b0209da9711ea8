// pyflex._C: the C++ (OpenMP) CPU backend of the τ-masked LoRA linear (docs/op.md).
//
// It exposes `lora_forward` and `lora_backward` with exactly the signatures and semantics of
// pyflex/reference.py (the spec). GEMMs go through ATen (MKL / oneDNN); the memory-bound per-token work
// (row norms, the Gram ratio, the mask, gathers of active rows, the scatter of the delta into y, u·z dots)
// runs in OpenMP loops over rows with accumulation in the compute dtype: float32, or float64 for float64
// inputs. The up-projection B z_i and the dA / dB GEMMs run over active rows only. `nf4_dequantize` expands a
// 4-bit (NF4) base into the dense temporary that lora_forward / lora_backward then run on (OpenMP over scale blocks).
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Same constant as pyflex.reference.NORM_EPS: ‖y0_i‖ is clamped to at least this.
constexpr double kNormEps = 1e-6;

// Rows below this many scalar operations run on one thread: spawning a team costs more than the work.
constexpr int64_t kParallelWork = 32768;

inline int num_threads_for(int64_t rows, int64_t row_work) {
#ifdef _OPENMP
  if (rows < 2 || rows * std::max<int64_t>(row_work, 1) < kParallelWork) return 1;
  return static_cast<int>(std::min<int64_t>(at::get_num_threads(), rows));
#else
  (void)rows;
  (void)row_work;
  return 1;
#endif
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------------
// argument checks: the ops layer validates user input; these guard direct calls and say which argument
// ---------------------------------------------------------------------------------------------------
void check_cpu_2d(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "pyflex._C: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 2, "pyflex._C: ", name, " must be 2-D, got shape ", t.sizes());
}

void check_shape(const Tensor& t, const char* name, int64_t rows, int64_t cols) {
  check_cpu_2d(t, name);
  TORCH_CHECK_VALUE(t.size(0) == rows && t.size(1) == cols, "pyflex._C: ", name, " must have shape (", rows, ", ",
                    cols, "), got ", t.sizes());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "pyflex._C: ", name, ".dtype=", t.scalar_type(), " must be ", dtype);
}

void check_vector(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "pyflex._C: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "pyflex._C: ", name, " must have shape (", n, ",), got ",
                    t.sizes());
}

const Tensor& require(const OptTensor& t, const char* name, const char* why) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), "pyflex._C: ", name, " is None but is needed ", why);
  return *t;
}

// absmax_scale has one fp32 factor per absmax_blocksize blocks (double quantization).
bool absmax_absmax_ok(const Tensor& absmax_scale, int64_t n_blocks, int64_t absmax_blocksize) {
  return absmax_blocksize > 0 && absmax_scale.numel() >= (n_blocks + absmax_blocksize - 1) / absmax_blocksize;
}

// Indices of the rows with mask[i] == true, in increasing order (what mask.nonzero() gives).
std::vector<int64_t> active_rows(const Tensor& mask) {
  const Tensor m = mask.contiguous();
  const bool* p = m.data_ptr<bool>();
  const int64_t M = m.numel();
  std::vector<int64_t> idx;
  idx.reserve(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i)
    if (p[i]) idx.push_back(i);
  return idx;
}

// out[k, :] = cast<acc_t>(src[rows[k], :]) * (scale ? scale[rows[k]] : 1): a compacted copy of the active
// rows in the compute dtype, the per-row scale folded in.
template <typename scalar_t, typename acc_t>
Tensor gather_rows(const Tensor& src, const std::vector<int64_t>& rows, const acc_t* scale, at::ScalarType cdt) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t C = src.size(1);
  Tensor out = at::empty({n, C}, src.options().dtype(cdt));
  const scalar_t* s = src.data_ptr<scalar_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const int nt = num_threads_for(n, C);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = rows[k];
    const scalar_t* srow = s + i * C;
    acc_t* orow = o + k * C;
    const acc_t c = scale ? scale[i] : acc_t(1);
    for (int64_t j = 0; j < C; ++j) orow[j] = static_cast<acc_t>(srow[j]) * c;
  }
  return out;
}

// dst[rows[k], :] = cast<scalar_t>(cast<acc_t>(dst[rows[k], :]) + add[k, :] * (mul ? mul[rows[k], :] : 1)):
// the scatter of a compacted delta into the active rows of dst, rounded once.
template <typename scalar_t, typename acc_t>
void scatter_add_rows(Tensor& dst, const std::vector<int64_t>& rows, const Tensor& add, const scalar_t* mul) {
  const int64_t n = static_cast<int64_t>(rows.size());
  const int64_t C = dst.size(1);
  scalar_t* d = dst.data_ptr<scalar_t>();
  const acc_t* a = add.data_ptr<acc_t>();
  const int nt = num_threads_for(n, C);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = rows[k];
    scalar_t* drow = d + i * C;
    const acc_t* arow = a + k * C;
    if (mul) {
      const scalar_t* mrow = mul + i * C;
      for (int64_t j = 0; j < C; ++j)
        drow[j] = static_cast<scalar_t>(static_cast<acc_t>(drow[j]) + arow[j] * static_cast<acc_t>(mrow[j]));
    } else {
      for (int64_t j = 0; j < C; ++j) drow[j] = static_cast<scalar_t>(static_cast<acc_t>(drow[j]) + arow[j]);
    }
  }
}

// Per token: ‖y0_i‖² (an N-wide pass over the bias-free y0 = x W0ᵀ), z_iᵀ G z_i from zG = z G, ρ_i and m_i = 1[ρ_i ≥ τ].
template <typename scalar_t>
void ratio_and_mask(const Tensor& y0, const Tensor& z, const Tensor& zG, const Tensor& cscale, double tau,
                    Tensor& ratio, Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = y0.size(0), N = y0.size(1), r = z.size(1);
  const scalar_t* yp = y0.data_ptr<scalar_t>();
  const acc_t* zp = z.data_ptr<acc_t>();
  const acc_t* zgp = zG.data_ptr<acc_t>();
  const acc_t* cp = cscale.data_ptr<acc_t>();
  acc_t* rp = ratio.data_ptr<acc_t>();
  bool* mp = mask.data_ptr<bool>();
  const acc_t tau_v = static_cast<acc_t>(tau);
  const acc_t eps = static_cast<acc_t>(kNormEps);
  const int nt = num_threads_for(M, N + r);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < M; ++i) {
    const scalar_t* yrow = yp + i * N;
    acc_t y_sq = 0;
    for (int64_t j = 0; j < N; ++j) {
      const acc_t v = static_cast<acc_t>(yrow[j]);
      y_sq += v * v;
    }
    acc_t d_sq = 0;
    for (int64_t k = 0; k < r; ++k) d_sq += zgp[i * r + k] * zp[i * r + k];
    d_sq = std::max(d_sq, acc_t(0));  // rounding can make it slightly negative
    const acc_t rho = std::abs(cp[i]) * std::sqrt(d_sq) / std::max(std::sqrt(y_sq), eps);
    rp[i] = rho;
    mp[i] = rho >= tau_v;
  }
}

// out_i = Σ_k a_ik b_ik for (M, r) a and b in the compute dtype.
template <typename acc_t>
void row_dots(const Tensor& a, const Tensor& b, Tensor& out) {
  const int64_t M = a.size(0), r = a.size(1);
  const acc_t* ap = a.data_ptr<acc_t>();
  const acc_t* bp = b.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const int nt = num_threads_for(M, r);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t i = 0; i < M; ++i) {
    acc_t s = 0;
    for (int64_t k = 0; k < r; ++k) s += ap[i * r + k] * bp[i * r + k];
    o[i] = s;
  }
}

// ---------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, OptTensor, Tensor> lora_forward(const Tensor& x_in, const Tensor& weight_in,
                                                           const OptTensor& bias_in, const Tensor& lora_A_in,
                                                           const Tensor& lora_B_in, const Tensor& x_lora_in,
                                                           const Tensor& cscale_in, std::optional<double> tau) {
  check_cpu_2d(x_in, "x");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  check_cpu_2d(weight_in, "weight");
  const int64_t N = weight_in.size(0);
  check_shape(weight_in, "weight", N, K);
  check_cpu_2d(lora_A_in, "lora_A");
  const int64_t r = lora_A_in.size(0);
  TORCH_CHECK_VALUE(r >= 1, "pyflex._C: lora_A has rank r=0; the LoRA rank must be >= 1");
  check_shape(lora_A_in, "lora_A", r, K);
  check_shape(lora_B_in, "lora_B", N, r);
  check_shape(x_lora_in, "x_lora", M, K);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "pyflex._C: x.dtype=", dtype, " is not a floating dtype");
  check_dtype(weight_in, "weight", dtype);
  check_dtype(lora_A_in, "lora_A", dtype);
  check_dtype(lora_B_in, "lora_B", dtype);
  check_dtype(x_lora_in, "x_lora", dtype);
  const auto cdt = compute_dtype(dtype);
  check_vector(cscale_in, "cscale", M);
  check_dtype(cscale_in, "cscale", cdt);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    check_vector(*bias_in, "bias", N);
    check_dtype(*bias_in, "bias", dtype);
  }
  if (tau.has_value())
    TORCH_CHECK_VALUE(std::isfinite(*tau), "pyflex._C: tau=", *tau, " is not finite");

  const Tensor x = x_in.contiguous();
  const Tensor cscale = cscale_in.contiguous();
  // y0 in the input dtype, as F.linear computes it. y is built in place on y0. With the mask on, the bias is
  // added after the ratio: PEFT_S eq. 4 divides by ‖W0 x_i‖, without the bias.
  const bool bias_after_ratio = has_bias && tau.has_value();
  Tensor y = has_bias && !bias_after_ratio ? at::addmm(*bias_in, x, weight_in.t()) : at::mm(x, weight_in.t());
  y = y.contiguous();
  const Tensor Bc = lora_B_in.to(cdt);
  const Tensor z = at::mm(x_lora_in.to(cdt), lora_A_in.to(cdt).t()).contiguous();  // (M, r)
  Tensor mask = at::empty({M}, x.options().dtype(at::kBool));
  OptTensor ratio;

  std::vector<int64_t> rows;
  if (!tau.has_value()) {
    mask.fill_(true);
  } else {
    // ‖d_i‖² = c_i² z_iᵀ G z_i with G = BᵀB: O(r²) per token instead of an N-wide pass over B z_i.
    const Tensor zG = at::mm(z, at::mm(Bc.t(), Bc)).contiguous();  // (M, r)
    Tensor rt = at::empty({M}, x.options().dtype(cdt));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pyflex_lora_ratio", [&] {
      ratio_and_mask<scalar_t>(y, z, zG, cscale, *tau, rt, mask);
    });
    ratio = rt;
    if (bias_after_ratio) y.add_(*bias_in);
  }

  if (!tau.has_value() && dtype == cdt) {
    // No mask and y already in the compute dtype: one GEMM accumulates the delta into y.
    y.addmm_(z * cscale.unsqueeze(1), Bc.t());
  } else {
    if (!tau.has_value()) {
      rows.resize(static_cast<size_t>(M));
      for (int64_t i = 0; i < M; ++i) rows[i] = i;
    } else {
      rows = active_rows(mask);
    }
    if (!rows.empty()) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pyflex_lora_delta", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        // B z_i only for active tokens: gather c_i·z_i, one (Ma, r) × (r, N) GEMM, scatter into y.
        const Tensor zc = gather_rows<acc_t, acc_t>(z, rows, cscale.data_ptr<acc_t>(), cdt);
        const Tensor delta = at::mm(zc, Bc.t()).contiguous();  // (Ma, N)
        scatter_add_rows<scalar_t, acc_t>(y, rows, delta, nullptr);
      });
    }
  }
  return std::make_tuple(y, z, ratio, mask);
}

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------
using BackwardTuple = std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor>;

BackwardTuple lora_backward(const Tensor& gy_in, const OptTensor& x, const OptTensor& weight,
                            const OptTensor& lora_A, const Tensor& lora_B, const OptTensor& x_lora,
                            const OptTensor& z_in, const Tensor& cscale_in, const Tensor& mask, bool need_dx,
                            bool need_dweight, bool need_dbias, bool need_adapter, bool need_uz,
                            const OptTensor& dropout_scale) {
  check_cpu_2d(gy_in, "gy");
  const int64_t M = gy_in.size(0), N = gy_in.size(1);
  const auto dtype = gy_in.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "pyflex._C: gy.dtype=", dtype, " is not a floating dtype");
  const auto cdt = compute_dtype(dtype);
  check_cpu_2d(lora_B, "lora_B");
  const int64_t r = lora_B.size(1);
  check_shape(lora_B, "lora_B", N, r);
  check_dtype(lora_B, "lora_B", dtype);
  check_vector(cscale_in, "cscale", M);
  check_dtype(cscale_in, "cscale", cdt);
  check_vector(mask, "mask", M);
  check_dtype(mask, "mask", at::kBool);

  const Tensor gy = gy_in.contiguous();
  OptTensor dx, dweight, dbias, dA, dB, uz;

  int64_t K = -1;
  if (need_dx) {
    const Tensor& w = require(weight, "weight", "for dx (need_dx=True)");
    const Tensor& a = require(lora_A, "lora_A", "for dx (need_dx=True)");
    check_cpu_2d(w, "weight");
    K = w.size(1);
    check_shape(w, "weight", N, K);
    check_dtype(w, "weight", dtype);
    check_shape(a, "lora_A", r, K);
    check_dtype(a, "lora_A", dtype);
    dx = at::mm(gy, w).contiguous();  // (M, K), input dtype
  }
  if (need_dweight) {
    const Tensor& xx = require(x, "x", "for dweight (need_dweight=True)");
    check_cpu_2d(xx, "x");
    check_dtype(xx, "x", dtype);
    TORCH_CHECK_VALUE(xx.size(0) == M, "pyflex._C: x must have ", M, " rows like gy, got shape ", xx.sizes());
    dweight = at::mm(gy.t(), xx);
  }
  if (need_dbias) dbias = gy.sum(0);

  if (!(need_dx || need_adapter || need_uz)) return std::make_tuple(dx, dweight, dbias, dA, dB, uz);

  Tensor z;
  if (need_adapter || need_uz) {
    z = require(z_in, "z", "for the adapter gradients or u·z").contiguous();
    check_shape(z, "z", M, r);
    check_dtype(z, "z", cdt);
  }
  Tensor xl;
  if (need_adapter) {
    xl = require(x_lora, "x_lora", "for dA (need_adapter=True)").contiguous();
    check_cpu_2d(xl, "x_lora");
    check_dtype(xl, "x_lora", dtype);
    TORCH_CHECK_VALUE(xl.size(0) == M, "pyflex._C: x_lora must have ", M, " rows like gy, got shape ", xl.sizes());
    if (K >= 0) check_shape(xl, "x_lora", M, K);
  }
  Tensor ds;
  if (need_dx && dropout_scale.has_value() && dropout_scale->defined()) {
    ds = dropout_scale->contiguous();
    check_shape(ds, "dropout_scale", M, K);
    check_dtype(ds, "dropout_scale", dtype);
  }

  const Tensor cscale = cscale_in.contiguous();
  const Tensor Bc = lora_B.to(cdt);
  const std::vector<int64_t> rows = active_rows(mask);
  const int64_t Ma = static_cast<int64_t>(rows.size());
  const bool all_active = Ma == M;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "pyflex_lora_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* cp = cscale.data_ptr<acc_t>();

    // gy_a: the active rows of gy in the compute dtype (all of gy, uncopied, when every row is active in
    // float32/float64).
    Tensor gy_a;
    auto get_gy_a = [&]() -> const Tensor& {
      if (!gy_a.defined()) gy_a = (all_active && dtype == cdt) ? gy : gather_rows<scalar_t, acc_t>(gy, rows, nullptr, cdt);
      return gy_a;
    };

    // u_a = Bᵀ gy_i on active rows (Ma, r); uz_i = u_i·z_i on every row when asked.
    Tensor u_a;
    if (need_uz) {
      const Tensor u = at::mm(all_active ? get_gy_a() : gy.to(cdt), Bc).contiguous();  // (M, r)
      Tensor uzt = at::empty({M}, gy.options().dtype(cdt));
      row_dots<acc_t>(u, z, uzt);
      uz = uzt;
      if (Ma > 0 && (need_dx || need_adapter)) u_a = all_active ? u : gather_rows<acc_t, acc_t>(u, rows, nullptr, cdt);
    } else if (Ma > 0) {
      u_a = at::mm(get_gy_a(), Bc).contiguous();
    }

    if (!(need_dx || need_adapter)) return;  // only u·z was asked for (τ or the gate trains alone)
    if (Ma == 0) {
      if (need_adapter) {
        dA = at::zeros({r, xl.size(1)}, lora_B.options());
        dB = at::zeros_like(lora_B);
      }
      return;
    }

    // v_i = c_i·u_i for active rows (masked rows are zero and never materialised).
    Tensor v_a = at::empty({Ma, r}, gy.options().dtype(cdt));
    {
      const acc_t* up = u_a.data_ptr<acc_t>();
      acc_t* vp = v_a.data_ptr<acc_t>();
      for (int64_t k = 0; k < Ma; ++k) {
        const acc_t c = cp[rows[k]];
        for (int64_t j = 0; j < r; ++j) vp[k * r + j] = up[k * r + j] * c;
      }
    }

    if (need_dx) {
      const Tensor Ac = lora_A->to(cdt);
      if (all_active && dtype == cdt && !ds.defined()) {
        dx->addmm_(v_a, Ac);
      } else {
        const Tensor lora_dx = at::mm(v_a, Ac).contiguous();  // (Ma, K)
        scatter_add_rows<scalar_t, acc_t>(*dx, rows, lora_dx, ds.defined() ? ds.data_ptr<scalar_t>() : nullptr);
      }
    }
    if (need_adapter) {
      // Masked rows contribute nothing to dA / dB: both GEMMs run over the compacted active rows.
      const Tensor xl_a = (all_active && dtype == cdt) ? xl : gather_rows<scalar_t, acc_t>(xl, rows, nullptr, cdt);
      dA = at::mm(v_a.t(), xl_a).to(dtype);
      const Tensor zc_a = gather_rows<acc_t, acc_t>(z, rows, cp, cdt);  // c_i·z_i
      dB = at::mm(get_gy_a().t(), zc_a).to(dtype);
    }
  });
  return std::make_tuple(dx, dweight, dbias, dA, dB, uz);
}

// ---------------------------------------------------------------------------------------------------
// NF4 dequantization (docs/op.md, "Quantized base"; the format is pyflex/lora/nf4.py's): a 4-bit base is expanded
// into a dense temporary in the call's dtype, then the dense op above runs on it.
//   scale[b]   = fp32(absmax_code[absmax[b]] * absmax_scale[b / absmax_blocksize]) + absmax_offset   (double quant)
//   out.flat[i] = out_t(fp32(code[nibble(i)] * scale[i / blocksize]))                  (round to nearest even)
// Bit-identical to NF4Weight.dequantize and bitsandbytes: every product is one fp32 multiply and the nested
// scale's add a separate fp32 add (CMakeLists.txt builds with -ffp-contract=off, so no FMA merges them).
// ---------------------------------------------------------------------------------------------------
template <typename out_t>
void nf4_dequantize_blocks(const uint8_t* packed, const float* code, const float* absmax_f, const uint8_t* absmax_q,
                           const float* absmax_code, const float* absmax_scale, float absmax_offset, int64_t numel,
                           int64_t blocksize, int64_t absmax_blocksize, out_t* out) {
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const int nt = num_threads_for(n_blocks, blocksize);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < n_blocks; ++b) {
    float scale;
    if (absmax_q != nullptr) {
      const float product = absmax_code[absmax_q[b]] * absmax_scale[b / absmax_blocksize];
      scale = product + absmax_offset;
    } else {
      scale = absmax_f[b];
    }
    // Within a block an element depends only on its 4-bit code: the 16 possible outputs are computed once (one
    // fp32 product and one rounding each, as per element), then every byte is two table lookups.
    out_t value[16];
    for (int c = 0; c < 16; ++c) value[c] = static_cast<out_t>(code[c] * scale);
    const int64_t first = b * blocksize;                                  // even: blocksize is even
    const int64_t last = std::min(first + blocksize, numel);              // one past the block's last element
    const int64_t pairs = (last - first) / 2;
    const uint8_t* p = packed + first / 2;
    out_t* o = out + first;
    for (int64_t j = 0; j < pairs; ++j) {
      const uint8_t byte = p[j];
      o[2 * j] = value[byte >> 4];                                        // high nibble first
      o[2 * j + 1] = value[byte & 15];
    }
    if ((last - first) % 2) o[2 * pairs] = value[p[pairs] >> 4];
  }
}

Tensor nf4_dequantize(const Tensor& packed_in, const Tensor& code_in, const Tensor& absmax_in,
                      const OptTensor& absmax_code_in, const OptTensor& absmax_scale_in,
                      const OptTensor& absmax_offset_in, int64_t blocksize, int64_t absmax_blocksize, Tensor out) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous(),
                    "pyflex._C.nf4_dequantize: out must be a contiguous 2-D CPU tensor (N, K), got ", out.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(out.scalar_type()), "pyflex._C.nf4_dequantize: out.dtype=", out.scalar_type(),
                   " is not a floating dtype");
  const int64_t numel = out.numel();
  TORCH_CHECK_VALUE(blocksize > 0 && blocksize % 2 == 0, "pyflex._C.nf4_dequantize: blocksize=", blocksize,
                    " must be positive and even");
  const int64_t n_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(packed_in.device().is_cpu() && packed_in.scalar_type() == at::kByte &&
                        packed_in.numel() >= (numel + 1) / 2,
                    "pyflex._C.nf4_dequantize: packed must be CPU uint8 with ", (numel + 1) / 2, " bytes");
  TORCH_CHECK_VALUE(code_in.device().is_cpu() && code_in.scalar_type() == at::kFloat && code_in.numel() == 16,
                    "pyflex._C.nf4_dequantize: code must be CPU fp32 (16,)");
  const bool nested = absmax_code_in.has_value() && absmax_code_in->defined();
  TORCH_CHECK_VALUE(absmax_in.device().is_cpu() && absmax_in.numel() >= n_blocks &&
                        absmax_in.scalar_type() == (nested ? at::kByte : at::kFloat),
                    "pyflex._C.nf4_dequantize: absmax must be CPU ", nested ? "uint8" : "fp32", " with ", n_blocks,
                    " blocks");
  Tensor absmax_code, absmax_scale;
  float absmax_offset = 0.0f;
  if (nested) {
    absmax_code = absmax_code_in->contiguous();
    absmax_scale = require(absmax_scale_in, "absmax_scale", "with double quantization").contiguous();
    const Tensor& offset = require(absmax_offset_in, "absmax_offset", "with double quantization");
    TORCH_CHECK_VALUE(absmax_code.scalar_type() == at::kFloat && absmax_code.numel() == 256 &&
                          absmax_scale.scalar_type() == at::kFloat && offset.scalar_type() == at::kFloat &&
                          offset.numel() == 1 && absmax_absmax_ok(absmax_scale, n_blocks, absmax_blocksize),
                      "pyflex._C.nf4_dequantize: double quantization needs fp32 absmax_code (256,), fp32 "
                      "absmax_scale (ceil(n_blocks / absmax_blocksize),) and an fp32 absmax_offset");
    absmax_offset = offset.item<float>();
  }
  if (numel == 0) return out;
  const Tensor packed = packed_in.contiguous();
  const Tensor absmax = absmax_in.contiguous();
  const Tensor code = code_in.contiguous();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "pyflex_nf4_dequantize", [&] {
    nf4_dequantize_blocks<scalar_t>(p, code.data_ptr<float>(), nested ? nullptr : absmax.data_ptr<float>(),
                                    nested ? absmax.data_ptr<uint8_t>() : nullptr,
                                    nested ? absmax_code.data_ptr<float>() : nullptr,
                                    nested ? absmax_scale.data_ptr<float>() : nullptr, absmax_offset, numel, blocksize,
                                    absmax_blocksize, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Torch's own translator lives in torch._C's pybind11 internals, which this module (built against the
  // pybind11 installed here) may not share: map c10 errors to the Python exceptions they stand for, without
  // the C++ backtrace.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.doc() = "pyflex C++ (OpenMP) CPU backend of the tau-masked LoRA linear; same API as pyflex.reference";
  m.def("lora_forward", &lora_forward, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("x_lora"), py::arg("cscale"), py::arg("tau"),
        "Forward on flattened tokens: returns (y, z, ratio or None, mask). See pyflex.reference.lora_forward.");
  m.def("lora_backward", &lora_backward, py::arg("gy"), py::arg("x"), py::arg("weight"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("x_lora"), py::arg("z"), py::arg("cscale"), py::arg("mask"), py::kw_only(),
        py::arg("need_dx"), py::arg("need_dweight"), py::arg("need_dbias"), py::arg("need_adapter"),
        py::arg("need_uz"), py::arg("dropout_scale") = py::none(),
        "Backward given gy: returns (dx, dweight, dbias, dA, dB, uz), None where not computed. "
        "See pyflex.reference.lora_backward.");
  m.def("nf4_dequantize", &nf4_dequantize, py::arg("packed"), py::arg("code"), py::arg("absmax"),
        py::arg("absmax_code"), py::arg("absmax_scale"), py::arg("absmax_offset"), py::arg("blocksize"),
        py::arg("absmax_blocksize"), py::arg("out"),
        "Dequantize an NF4 weight into out (N, K), bit-identical to pyflex.lora.nf4.NF4Weight.dequantize; returns out.");
}
