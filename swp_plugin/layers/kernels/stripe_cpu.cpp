// Fast CPU stripe convolution (float32, inference): output-side shift-add with cache-sized tiles.
//
// For each tile (a few images, or a block of output rows of one image) and each stride phase:
//   Y = W_phase (S_phase x C) @ X_phase_tile (C x T)          one BLAS sgemm, no im2col
// then every output row is bias + the sum of its stripes' rows of Y, shifted by the stripe's kernel
// offset (the tile's Y is still in cache). Stride s is handled by splitting the input into s*s phases
// (polyphase), so a stripe reads its phase image with a stride-1 shift. Zero padding is the range clip.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

struct Phase {
  int64_t a, b, start, count, qy_min, qy_max, hph, wph;
};

constexpr int64_t kMargin = 64;  // zero floats before and after the GEMM output buffer

struct Tile {
  int64_t n0, nb, r0, r1;
};

// Column-major sgemm of row-major C(m x n) = A(m x k) @ B(k x n) with leading dims lda, ldb, ldc.
inline void gemm_rowmajor(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float* c, int64_t ldc) {
  const char no = 'N';
  const float one = 1.f, zero = 0.f;
  int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  int ia = static_cast<int>(lda), ib = static_cast<int>(ldb), ic = static_cast<int>(ldc);
  sgemm_(&no, &no, &in, &im, &ik, &one, b, &ib, a, &ia, &zero, c, &ic);
}

#if defined(__AVX512F__)
// Own AVX-512 GEMM: Y (rows x n, ld ldy) = Wpk @ B (C x n, ld ldb), where Wpk holds the rows in blocks of
// MR, k-major (C x MR floats per block, zero-padded rows). MKL's sgemm takes its AVX2 path on AMD CPUs, at
// half the speed of this kernel (and of oneDNN's dense convolution) there.
constexpr int64_t MR = 12;

inline void gemm_packed(int64_t rows, int64_t n, int64_t C, const float* wpk, const float* b, int64_t ldb, float* y,
                        int64_t ldy) {
  for (int64_t r0 = 0; r0 < rows; r0 += MR) {
    const float* wb = wpk + (r0 / MR) * C * MR;
    const int64_t nr = std::min<int64_t>(MR, rows - r0);
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t nc = std::min<int64_t>(32, n - j);
      const __mmask16 m0 = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
      const __mmask16 m1 = nc >= 32 ? 0xFFFF : nc > 16 ? static_cast<__mmask16>((1u << (nc - 16)) - 1) : 0;
      // every index into acc0/acc1 is a compile-time constant (unrolled loops): they stay in registers
      __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
      const float* bp = b + j;
      for (int64_t k = 0; k < C; ++k) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, bp + k * ldb);
        const __m512 b1 = _mm512_maskz_loadu_ps(m1, bp + k * ldb + 16);
        const float* a = wb + k * MR;
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) {
          const __m512 av = _mm512_set1_ps(a[r]);
          acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
          acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
        }
      }
      float* yp = y + r0 * ldy + j;
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        if (r < nr) {
          _mm512_mask_storeu_ps(yp + r * ldy, m0, acc0[r]);
          _mm512_mask_storeu_ps(yp + r * ldy + 16, m1, acc1[r]);
        }
      }
    }
  }
}
#else
constexpr int64_t MR = 1;
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

// Weights of each phase in the layout the GEMM reads (row blocks of MR, k-major; plain rows for BLAS).
at::Tensor pack_weight(const at::Tensor& weight_, const at::Tensor& phase_info_) {
  const at::Tensor w = weight_.contiguous(), pinfo = phase_info_.contiguous();
  const int64_t C = w.size(1);
  const int64_t* pi = pinfo.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t p = 0; p < pinfo.size(0); ++p) total += (pi[6 * p + 3] + MR - 1) / MR * MR * C;
  at::Tensor out = at::empty({std::max<int64_t>(total, 1)}, w.options());
  float* dst = out.data_ptr<float>();
  const float* src = w.data_ptr<float>();
  for (int64_t p = 0; p < pinfo.size(0); ++p) {
    const int64_t start = pi[6 * p + 2], count = pi[6 * p + 3];
    for (int64_t r0 = 0; r0 < count; r0 += MR)
      for (int64_t k = 0; k < C; ++k)
        for (int64_t r = 0; r < MR; ++r) *dst++ = r0 + r < count ? src[(start + r0 + r) * C + k] : 0.f;
  }
  return out;
}

void run_tile(const Tile& t, const float* x, const float* w, const std::vector<Phase>& phases, const int64_t* ptr,
              const int64_t* ent, const float* bias, float* out, int64_t C, int64_t H, int64_t W, int64_t O,
              int64_t out_h, int64_t out_w, int64_t sh, int64_t sw, std::vector<float>& xbuf,
              std::vector<float>& ybuf) {
  const int64_t P = static_cast<int64_t>(phases.size());
  std::vector<int64_t> u0(P), rows(P), cols(P), yoff(P), woff(P);
  int64_t ytotal = 0, wtotal = 0;
  for (int64_t p = 0; p < P; ++p) {
    const Phase& ph = phases[p];
    woff[p] = wtotal;
    wtotal += (ph.count + MR - 1) / MR * MR * C;
    u0[p] = std::max<int64_t>(0, t.r0 + ph.qy_min);
    const int64_t u1 = std::min<int64_t>(ph.hph, t.r1 - 1 + ph.qy_max + 1);
    rows[p] = std::max<int64_t>(0, u1 - u0[p]);
    cols[p] = t.nb * rows[p] * ph.wph;
    yoff[p] = ytotal;
    ytotal += ph.count * cols[p];
  }
  // Y lives at ybuf + kMargin: the narrow shift-add reads up to kMargin floats past a stripe's rows
  if (static_cast<int64_t>(ybuf.size()) < ytotal + 2 * kMargin) ybuf.resize(ytotal + 2 * kMargin, 0.f);
  for (int64_t p = 0; p < P; ++p) {
    const Phase& ph = phases[p];
    if (cols[p] == 0 || ph.count == 0) continue;
    const float* bmat;
    int64_t ldb;
    if (sh == 1 && sw == 1 && t.nb == 1) {  // a view of the input: rows u0.. of image n0, all channels
      bmat = x + t.n0 * C * H * W + u0[p] * W;
      ldb = H * W;
    } else {  // copy the phase rows of nb images into a (C x nb*rows*wph) buffer
      if (static_cast<int64_t>(xbuf.size()) < C * cols[p]) xbuf.resize(C * cols[p]);
      float* dst = xbuf.data();
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t nl = 0; nl < t.nb; ++nl) {
          const float* img = x + ((t.n0 + nl) * C + c) * H * W;
          for (int64_t r = 0; r < rows[p]; ++r) {
            const float* src = img + ((u0[p] + r) * sh + ph.a) * W + ph.b;
            if (sw == 1) {
              std::memcpy(dst, src, sizeof(float) * ph.wph);
            } else {
              for (int64_t v = 0; v < ph.wph; ++v) dst[v] = src[v * sw];
            }
            dst += ph.wph;
          }
        }
      }
      bmat = xbuf.data();
      ldb = cols[p];
    }
#if defined(__AVX512F__)
    gemm_packed(ph.count, cols[p], C, w + woff[p], bmat, ldb, ybuf.data() + kMargin + yoff[p], cols[p]);
#else
    gemm_rowmajor(ph.count, cols[p], C, w + woff[p], C, bmat, ldb, ybuf.data() + kMargin + yoff[p], cols[p]);
#endif
  }
  // shift-add: out[n, o, h, :] = bias[o] + sum over stripes e of o of Y_e[h + qy_e, : + qx_e]
  // Narrow images (out_w < 32, same width as Y): one flat add over the stripe's rows, the columns that
  // would wrap around a row edge masked out by a per-shift pattern; wide ones: row by row.
  const float* Y = ybuf.data() + kMargin;
  const int64_t tile_len = (t.r1 - t.r0) * out_w;
  const bool narrow = out_w < 32;
  std::vector<std::vector<uint16_t>> patterns;
  for (int64_t nl = 0; nl < t.nb; ++nl) {
    const int64_t n = t.n0 + nl;
    for (int64_t o = 0; o < O; ++o) {
      const float b0 = bias ? bias[o] : 0.f;
      float* oimg = out + ((n * O + o) * out_h + t.r0) * out_w;
      for (int64_t i = 0; i < tile_len; ++i) oimg[i] = b0;
      for (int64_t e = ptr[o]; e < ptr[o + 1]; ++e) {
        const int64_t* en = ent + 4 * e;  // local row, qy, qx, phase
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
          add_masked(odst, ysrc, pat.data(), (h_hi - h_lo) * out_w);
        } else {
          for (int64_t h = h_lo; h < h_hi; ++h, odst += out_w, ysrc += wph) add_row(odst + lo, ysrc + lo, hi - lo);
        }
      }
    }
  }
}

// weight_: pack_weight(weight, phase_info), C = x.size(1)
at::Tensor stripe_conv_forward(const at::Tensor& x_, const at::Tensor& weight_, const at::Tensor& phase_info_,
                               const at::Tensor& ptr_, const at::Tensor& entries_, const std::optional<at::Tensor>& bias_,
                               int64_t out_h, int64_t out_w, int64_t sh, int64_t sw, int64_t tile_pixels) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "x: float32 CPU NCHW");
  TORCH_CHECK(weight_.dim() == 1 && weight_.scalar_type() == at::kFloat, "weight: float32, from pack");
  const at::Tensor x = x_.contiguous(), w = weight_.contiguous();
  const at::Tensor pinfo = phase_info_.contiguous(), ptr = ptr_.contiguous(), ent = entries_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), O = ptr.size(0) - 1;
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) bias = bias_->contiguous();
  at::Tensor out = at::empty({N, O, out_h, out_w}, x.options());
  if (N == 0 || out_h <= 0 || out_w <= 0) return out;

  std::vector<Phase> phases;
  const int64_t* pi = pinfo.data_ptr<int64_t>();
  for (int64_t p = 0; p < pinfo.size(0); ++p) {
    Phase ph{pi[6 * p], pi[6 * p + 1], pi[6 * p + 2], pi[6 * p + 3], pi[6 * p + 4], pi[6 * p + 5], 0, 0};
    ph.hph = H > ph.a ? (H - ph.a + sh - 1) / sh : 0;
    ph.wph = W > ph.b ? (W - ph.b + sw - 1) / sw : 0;
    phases.push_back(ph);
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

  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t* pp = ptr.data_ptr<int64_t>();
  const int64_t* ep = ent.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  if (ntiles == 1) {  // one tile: let BLAS use the threads
    std::vector<float> xbuf, ybuf;
    run_tile(tiles[0], xp, wp, phases, pp, ep, bp, op, C, H, W, O, out_h, out_w, sh, sw, xbuf, ybuf);
    return out;
  }
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xbuf, ybuf;
    for (int64_t i = begin; i < end; ++i)
      run_tile(tiles[i], xp, wp, phases, pp, ep, bp, op, C, H, W, O, out_h, out_w, sh, sw, xbuf, ybuf);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(swp_stripe, m) {
  m.def("pack(Tensor weight, Tensor phase_info) -> Tensor");
  m.def("forward(Tensor x, Tensor weight, Tensor phase_info, Tensor ptr, Tensor entries, Tensor? bias, "
        "int out_h, int out_w, int sh, int sw, int tile_pixels) -> Tensor");
}

TORCH_LIBRARY_IMPL(swp_stripe, CPU, m) {
  m.impl("pack", &pack_weight);
  m.impl("forward", &stripe_conv_forward);
}
