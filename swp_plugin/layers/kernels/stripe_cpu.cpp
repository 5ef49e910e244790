// Fast CPU stripe convolution (float32, inference): output-side shift-add with cache-sized tiles.
//
// For each tile (a few images, or a block of output rows of one image) and each stride phase:
//   Y = W_phase (S_phase x C) @ X_phase_tile (C x T)          one GEMM, no im2col
// then every output row is bias (+ residual) + the sum of its stripes' rows of Y, shifted by the stripe's kernel
// offset (the tile's Y is still in cache), then the activation. Stride s is handled by splitting the input into
// s*s phases (polyphase), so a stripe reads its phase image with a stride-1 shift. Zero padding is the range clip.
//
// Weights are read as they are stored: row-major (S x C); `rows` lists them in the kernel's (stride phase) order
// where that differs. Nothing derived from the weights is kept between calls.
//
// Built with -DSWP_CHECKED (the sanitizer build), every pointer range a vector instruction touches is checked
// against the buffer it must stay in (AddressSanitizer does not see AVX-512 masked loads and stores).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

#if defined(SWP_CHECKED)
// [p, p + n) must lie in [base, base + size)
#define SWP_RANGE(p, n, base, size)                                                                          \
  TORCH_CHECK((n) <= 0 || ((p) >= (base) && (p) + (n) <= (base) + (size)), "swp_stripe: out-of-range access ", \
              #p, " (offset ", (p) - (base), ", length ", (n), ", buffer ", (size), ") at line ", __LINE__)
#else
#define SWP_RANGE(p, n, base, size) ((void)0)
#endif

struct Phase {
  int64_t a, b, start, count, qy_min, qy_max, hph, wph;
};

constexpr int64_t kMargin = 64;  // zero floats before and after the GEMM output buffer

enum Activation : int64_t { kNone = 0, kRelu = 1 };

struct Tile {
  int64_t n0, nb, r0, r1;
};

struct Buffers {  // per thread
  std::vector<float> x, y, a;
};

// Row-major C(m x n) = A(m x k) @ B(k x n), leading dims lda, ldb, ldc.
#if defined(__AVX512F__)
// Own AVX-512 micro-kernel (12 rows x 32 columns of C in registers). MKL's sgemm takes its AVX2 path on AMD
// CPUs, at half the speed of this kernel (and of oneDNN's dense convolution) there.
constexpr int64_t MR = 12;

inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const int64_t* arows,
                 const float* b, int64_t ldb, float* c, int64_t ldc, std::vector<float>& /*abuf*/) {
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    const int64_t nr = std::min<int64_t>(MR, m - r0);
    const float* ar[MR];
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {  // extra rows (r >= nr) repeat the last one and are not stored
      const int64_t row = r0 + std::min<int64_t>(r, nr - 1);
      ar[r] = a + (arows ? arows[row] : row) * lda;
    }
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t nc = std::min<int64_t>(32, n - j);
      const __mmask16 m0 = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
      const __mmask16 m1 = nc >= 32 ? 0xFFFF : nc > 16 ? static_cast<__mmask16>((1u << (nc - 16)) - 1) : 0;
      // every index into acc0/acc1 is a compile-time constant (unrolled loops): they stay in registers
      __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
      const float* bp = b + j;
      for (int64_t kk = 0; kk < k; ++kk) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, bp + kk * ldb);
        const __m512 b1 = _mm512_maskz_loadu_ps(m1, bp + kk * ldb + 16);
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) {
          const __m512 av = _mm512_set1_ps(ar[r][kk]);
          acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
          acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
      }
      float* cp = c + r0 * ldc + j;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        if (r < nr) {
          _mm512_mask_storeu_ps(cp + r * ldc, m0, acc0[r]);
          _mm512_mask_storeu_ps(cp + r * ldc + 16, m1, acc1[r]);
        }
      }
    }
  }
}
#else
inline void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const int64_t* arows,
                 const float* b, int64_t ldb, float* c, int64_t ldc, std::vector<float>& abuf) {
  if (arows) {  // BLAS needs A contiguous: gather its rows
    abuf.resize(m * k);
    for (int64_t r = 0; r < m; ++r) std::memcpy(abuf.data() + r * k, a + arows[r] * lda, sizeof(float) * k);
    a = abuf.data();
    lda = k;
  }
  // column-major sgemm of the transposed problem
  const char no = 'N';
  const float one = 1.f, zero = 0.f;
  int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&no, &no, &in, &im, &ik, &one, b, &ib, a, &ia, &zero, c, &ic);
}
#endif

// dst[i] += src[i], i < len
inline void add_row(float* dst, const float* src, int64_t len) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), _mm512_loadu_ps(src + i)));
  if (i < len) {
    const __mmask16 m = static_cast<__mmask16>((1u << (len - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst + i), _mm512_maskz_loadu_ps(m, src + i)));
  }
#else
  for (int64_t i = 0; i < len; ++i) dst[i] += src[i];
#endif
}

// dst[i] += src[i] where bit i of the pattern is set, i < len (pattern: one 16-bit word per 16 floats)
inline void add_masked(float* dst, const float* src, const uint16_t* pattern, int64_t len) {
#if defined(__AVX512F__)
  for (int64_t i = 0, c = 0; i < len; i += 16, ++c) {
    const __mmask16 m = len - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - i)) - 1);
    const __m512 d = _mm512_maskz_loadu_ps(m, dst + i);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_add_ps(d, _mm512_maskz_loadu_ps(pattern[c] & m, src + i)));
  }
#else
  for (int64_t i = 0; i < len; ++i)
    if ((pattern[i / 16] >> (i % 16)) & 1) dst[i] += src[i];
#endif
}

inline void apply_activation(float* p, int64_t len, int64_t act) {
  if (act == kRelu)
    for (int64_t i = 0; i < len; ++i) p[i] = p[i] > 0.f ? p[i] : 0.f;
}

struct Layer {  // everything a tile needs, read-only
  const float *x, *w, *bias, *residual;
  float* out;
  const std::vector<Phase>* phases;
  const int64_t *ptr, *ent, *rows;  // rows: weight row of each stripe in kernel (phase) order, or null: identity
  int64_t N, C, H, W, O, S, out_h, out_w, sh, sw, act;
};

void run_tile(const Tile& t, const Layer& L, Buffers& buf) {
  const std::vector<Phase>& phases = *L.phases;
  const int64_t P = static_cast<int64_t>(phases.size()), C = L.C, H = L.H, W = L.W, out_w = L.out_w;
  std::vector<int64_t> u0(P), rows(P), cols(P), yoff(P);
  int64_t ytotal = 0;
  for (int64_t p = 0; p < P; ++p) {
    const Phase& ph = phases[p];
    u0[p] = std::max<int64_t>(0, t.r0 + ph.qy_min);
    const int64_t u1 = std::min<int64_t>(ph.hph, t.r1 - 1 + ph.qy_max + 1);
    rows[p] = std::max<int64_t>(0, u1 - u0[p]);
    cols[p] = t.nb * rows[p] * ph.wph;
    yoff[p] = ytotal;
    ytotal += ph.count * cols[p];
  }
  // Y lives at y + kMargin: the narrow shift-add's masked loads may address up to kMargin floats past a row
  const int64_t ysize = ytotal + 2 * kMargin;
  if (static_cast<int64_t>(buf.y.size()) < ysize) buf.y.resize(ysize, 0.f);
  float* Y = buf.y.data() + kMargin;
  for (int64_t p = 0; p < P; ++p) {
    const Phase& ph = phases[p];
    if (cols[p] == 0 || ph.count == 0) continue;
    const float* bmat;
    int64_t ldb;
    if (L.sh == 1 && L.sw == 1 && t.nb == 1) {  // a view of the input: rows u0.. of image n0, all channels
      bmat = L.x + t.n0 * C * H * W + u0[p] * W;
      ldb = H * W;
      SWP_RANGE(bmat, (C - 1) * ldb + cols[p], L.x, L.N * C * H * W);
    } else {  // copy the phase rows of nb images into a (C x nb*rows*wph) buffer
      if (static_cast<int64_t>(buf.x.size()) < C * cols[p]) buf.x.resize(C * cols[p]);
      float* dst = buf.x.data();
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t nl = 0; nl < t.nb; ++nl) {
          const float* img = L.x + ((t.n0 + nl) * C + c) * H * W;
          for (int64_t r = 0; r < rows[p]; ++r) {
            const float* src = img + ((u0[p] + r) * L.sh + ph.a) * W + ph.b;
            SWP_RANGE(src, (ph.wph - 1) * L.sw + 1, L.x, L.N * C * H * W);
            if (L.sw == 1) {
              std::memcpy(dst, src, sizeof(float) * ph.wph);
            } else {
              for (int64_t v = 0; v < ph.wph; ++v) dst[v] = src[v * L.sw];
            }
            dst += ph.wph;
          }
        }
      }
      bmat = buf.x.data();
      ldb = cols[p];
    }
    SWP_RANGE(Y + yoff[p], ph.count * cols[p], buf.y.data(), ysize);
    const int64_t* arows = L.rows ? L.rows + ph.start : nullptr;
#if defined(SWP_CHECKED)
    for (int64_t r = 0; r < ph.count; ++r) SWP_RANGE(L.w + (arows ? arows[r] : ph.start + r) * C, C, L.w, L.S * C);
#endif
    gemm(ph.count, cols[p], C, arows ? L.w : L.w + ph.start * C, C, arows, bmat, ldb, Y + yoff[p], cols[p], buf.a);
  }
  // shift-add: out[n, o, h, :] = act(bias[o] + residual + sum over stripes e of o of Y_e[h + qy_e, : + qx_e])
  // Narrow images (out_w < 32, same width as Y): one flat add over the stripe's rows, the columns that
  // would wrap around a row edge masked out by a per-shift pattern; wide ones: row by row.
  const int64_t tile_len = (t.r1 - t.r0) * out_w;
  const int64_t out_size = L.N * L.O * L.out_h * out_w;
  const bool narrow = out_w < 32;
  std::vector<std::vector<uint16_t>> patterns;
  for (int64_t nl = 0; nl < t.nb; ++nl) {
    const int64_t n = t.n0 + nl;
    for (int64_t o = 0; o < L.O; ++o) {
      const float b0 = L.bias ? L.bias[o] : 0.f;
      const int64_t offset = ((n * L.O + o) * L.out_h + t.r0) * out_w;
      float* oimg = L.out + offset;
      if (L.residual) {
        const float* res = L.residual + offset;
        for (int64_t i = 0; i < tile_len; ++i) oimg[i] = b0 + res[i];
      } else {
        for (int64_t i = 0; i < tile_len; ++i) oimg[i] = b0;
      }
      for (int64_t e = L.ptr[o]; e < L.ptr[o + 1]; ++e) {
        const int64_t* en = L.ent + 4 * e;  // local row, qy, qx, phase
        const int64_t p = en[3], qy = en[1], qx = en[2], wph = phases[p].wph;
        const int64_t h_lo = std::max<int64_t>(t.r0, u0[p] - qy);
        const int64_t h_hi = std::min<int64_t>(t.r1, u0[p] + rows[p] - qy);
        const int64_t lo = std::max<int64_t>(0, -qx), hi = std::min<int64_t>(out_w, wph - qx);
        if (h_lo >= h_hi || lo >= hi) continue;
        const float* ysrc = Y + yoff[p] + en[0] * cols[p] + (nl * rows[p] + h_lo + qy - u0[p]) * wph + qx;
        float* odst = oimg + (h_lo - t.r0) * out_w;
        if (narrow && wph == out_w && qx >= -kMargin && qx <= kMargin) {
          const int64_t key = qx + kMargin;
          if (static_cast<int64_t>(patterns.size()) <= key) patterns.resize(key + 1);
          std::vector<uint16_t>& pat = patterns[key];
          if (pat.empty()) {
            pat.assign((tile_len + 15) / 16, 0);
            for (int64_t i = 0; i < tile_len; ++i)
              if (i % out_w >= lo && i % out_w < hi) pat[i / 16] |= static_cast<uint16_t>(1u << (i % 16));
          }
          const int64_t len = (h_hi - h_lo) * out_w;
          SWP_RANGE(odst, len, L.out, out_size);
          SWP_RANGE(ysrc, (len + 15) / 16 * 16, buf.y.data(), ysize);  // the masked loads' address range
          add_masked(odst, ysrc, pat.data(), len);
        } else {
          for (int64_t h = h_lo; h < h_hi; ++h, odst += out_w, ysrc += wph) {
            SWP_RANGE(odst + lo, hi - lo, L.out, out_size);
            SWP_RANGE(ysrc + lo, hi - lo, buf.y.data(), ysize);
            add_row(odst + lo, ysrc + lo, hi - lo);
          }
        }
      }
      apply_activation(oimg, tile_len, L.act);
    }
  }
}

// weight_: (S, C) float32, rows in phase order; C = x.size(1)
at::Tensor stripe_conv_forward(const at::Tensor& x_, const at::Tensor& weight_, const std::optional<at::Tensor>& rows_,
                               const at::Tensor& phase_info_, const at::Tensor& ptr_, const at::Tensor& entries_,
                               const std::optional<at::Tensor>& bias_,
                               const std::optional<at::Tensor>& residual_, int64_t out_h, int64_t out_w, int64_t sh,
                               int64_t sw, int64_t tile_pixels, int64_t act) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "x: float32 CPU NCHW");
  TORCH_CHECK(weight_.dim() == 2 && weight_.scalar_type() == at::kFloat && weight_.size(1) == x_.size(1),
              "weight: float32 (S, C) with C = x.size(1)");
  TORCH_CHECK(act == kNone || act == kRelu, "act: 0 (none) or 1 (relu)");
  TORCH_CHECK(sh >= 1 && sw >= 1 && tile_pixels >= 1 && out_h >= 0 && out_w >= 0, "bad geometry");
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const at::Tensor pinfo = phase_info_.contiguous(), ptr = ptr_.contiguous(), ent = entries_.contiguous();
  TORCH_CHECK(pinfo.scalar_type() == at::kLong && ptr.scalar_type() == at::kLong && ent.scalar_type() == at::kLong,
              "plan tensors: int64");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = ptr.size(0) - 1;
  TORCH_CHECK(ent.dim() == 2 && ent.size(1) == 4 && ent.size(0) == w.size(0) && pinfo.dim() == 2 &&
              pinfo.size(1) == 6, "plan does not match the weight");
  at::Tensor bias, residual, order;
  if (rows_.has_value() && rows_->defined()) {
    order = rows_->contiguous();
    TORCH_CHECK(order.scalar_type() == at::kLong && order.numel() == w.size(0), "rows: int64 (S,)");
    const int64_t* rp = order.data_ptr<int64_t>();
    for (int64_t i = 0; i < order.numel(); ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < w.size(0), "rows: out of range");
  }
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == O, "bias: float32 (O,)");
  }
  at::Tensor out = at::empty({N, O, out_h, out_w}, x.options());
  if (residual_.has_value() && residual_->defined()) {
    residual = residual_->contiguous();
    TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.sizes() == out.sizes(), "residual: output's shape");
  }
  if (N == 0 || O == 0 || out_h == 0 || out_w == 0) return out;

  std::vector<Phase> phases;
  const int64_t* pi = pinfo.data_ptr<int64_t>();
  for (int64_t p = 0; p < pinfo.size(0); ++p) {
    Phase ph{pi[6 * p], pi[6 * p + 1], pi[6 * p + 2], pi[6 * p + 3], pi[6 * p + 4], pi[6 * p + 5], 0, 0};
    TORCH_CHECK(ph.start >= 0 && ph.count >= 0 && ph.start + ph.count <= w.size(0), "plan phase out of range");
    ph.hph = H > ph.a ? (H - ph.a + sh - 1) / sh : 0;
    ph.wph = W > ph.b ? (W - ph.b + sw - 1) / sw : 0;
    phases.push_back(ph);
  }
  const int64_t* pp = ptr.data_ptr<int64_t>();
  const int64_t* ep = ent.data_ptr<int64_t>();
  TORCH_CHECK(pp[0] == 0 && pp[O] == ent.size(0), "plan: bad stripe pointers");
  for (int64_t e = 0; e < ent.size(0); ++e) {
    const int64_t p = ep[4 * e + 3], local = ep[4 * e];
    TORCH_CHECK(p >= 0 && p < pinfo.size(0) && local >= 0 && local < phases[p].count, "plan: bad stripe entry");
  }
  // tiles: whole images (several when they are small) or row blocks of one image, at least one per thread
  const int64_t threads = at::get_num_threads();
  const int64_t img = out_h * out_w;
  int64_t nb = 1, rows = out_h;
  if (img >= tile_pixels) {
    rows = std::max<int64_t>(1, tile_pixels / out_w);
  } else {
    nb = std::max<int64_t>(1, std::min<int64_t>(N, tile_pixels / img));
  }
  auto count = [&]() { return ((N + nb - 1) / nb) * ((out_h + rows - 1) / rows); };
  if (count() < threads && nb > 1) nb = std::max<int64_t>(1, (N + threads - 1) / threads);
  if (count() < threads && nb == 1 && out_h > 1) {
    const int64_t blocks = std::min<int64_t>(out_h, (threads + N - 1) / N);
    rows = (out_h + blocks - 1) / blocks;
  }
  std::vector<Tile> tiles;
  for (int64_t n0 = 0; n0 < N; n0 += nb)
    for (int64_t r0 = 0; r0 < out_h; r0 += rows)
      tiles.push_back({n0, std::min(nb, N - n0), r0, std::min(out_h, r0 + rows)});

  const Layer L{x.data_ptr<float>(), w.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
                residual.defined() ? residual.data_ptr<float>() : nullptr, out.data_ptr<float>(), &phases, pp, ep,
                order.defined() ? order.data_ptr<int64_t>() : nullptr,
                N, C, H, W, O, w.size(0), out_h, out_w, sh, sw, act};
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  if (ntiles == 1) {
    Buffers buf;
    run_tile(tiles[0], L, buf);
    return out;
  }
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    Buffers buf;
    for (int64_t i = begin; i < end; ++i) run_tile(tiles[i], L, buf);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(swp_stripe, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor? rows, Tensor phase_info, Tensor ptr, Tensor entries, Tensor? bias, "
        "Tensor? residual, int out_h, int out_w, int sh, int sw, int tile_pixels, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(swp_stripe, CPU, m) { m.impl("forward", &stripe_conv_forward); }
