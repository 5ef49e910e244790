// Fast CPU stripe convolution (float32, inference): implicit GEMM over the shifted input.
//
// The stripes are grouped by kernel position into weight panels of up to MR stripes, packed (C x MR, one float
// per stripe and input channel, consecutive for a panel's rows). For a panel at position (qy, qx) of stride phase
// p and a run of output pixels, the register tile computes the panel's 1x1 products over the phase image shifted
// by (qy, qx) (a masked vector load per W pixels and input channel: the shift is an offset into the input, zero
// padding is the lane mask) and adds each row straight into its output channel at those pixels. No intermediate
// buffer, no second pass: bias (+ residual) is written before a tile's panels, the activation after them.
// Stride s is handled by splitting the input into s*s phase images once per call (polyphase), so every panel
// reads its phase with a stride-1 shift. Where every output channel is one panel row at shift (0, 0) (1x1 convs),
// the register tiles store bias, residual and activation themselves (the output is written once, never read);
// else the output is filled with the bias (+ residual) first and the activation applied after the panels.
//
// Work items are (images, output pixel tile, output channel range); channel ranges (split at runtime by stripe
// counts) give both threads work at batch 1 on small images. A panel's rows are sorted by output channel, so a
// channel range takes a contiguous run of each panel's rows: no two threads write the same output channel.
//
// The plan is checked at every call (cheap: O(panels)): malformed plans raise, they never read out of bounds.
// Built with -DSWP_CHECKED (the sanitizer build), every pointer range a vector instruction touches is checked
// against the buffer it must stay in (AddressSanitizer does not see masked vector loads and stores).
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(SWP_CHECKED)
// [p, p + n) must lie in [base, base + size)
#define SWP_RANGE(p, n, base, size)                                                                          \
  TORCH_CHECK((n) <= 0 || ((p) >= (base) && (p) + (n) <= (base) + (size)), "swp_stripe: out-of-range access ", \
              #p, " (offset ", (p) - (base), ", length ", (n), ", buffer ", (size), ") at line ", __LINE__)
#else
#define SWP_RANGE(p, n, base, size) ((void)0)
#endif

// ---------------------------------------------------------------- vectors
// W float32 lanes: AVX-512 (16 lanes, 32 registers) where the build targets it, else AVX2 + FMA (8 lanes, 16
// registers), else portable loops (8 lanes). A lane mask is a uint32_t of W bits everywhere; Mask holds it in the
// form the masked loads and stores take (masked lanes are neither read nor written: no fault past a buffer's end).
#if defined(__AVX512F__)
#define SWP_SIMD 1
constexpr int W = 16, kRegs = 32, kVMax = 8;
using Vf = __m512;
struct Mask {
  __mmask16 k;
};
inline Mask vmask(uint32_t bits) { return {static_cast<__mmask16>(bits)}; }
inline Vf vzero() { return _mm512_setzero_ps(); }
inline Vf vset(float a) { return _mm512_set1_ps(a); }
inline Vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vf vload(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m.k, p); }
inline void vstore(float* p, Vf v) { _mm512_storeu_ps(p, v); }
inline void vstore(float* p, Mask m, Vf v) { _mm512_mask_storeu_ps(p, m.k, v); }
inline Vf vfma(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
inline Vf vadd(Vf a, Vf b) { return _mm512_add_ps(a, b); }
#elif defined(__AVX2__) && defined(__FMA__)
#define SWP_SIMD 1
constexpr int W = 8, kRegs = 16, kVMax = 6;
using Vf = __m256;
struct Mask {
  __m256i m;
};
inline Mask vmask(uint32_t bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return {_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), sel), sel)};
}
inline Vf vzero() { return _mm256_setzero_ps(); }
inline Vf vset(float a) { return _mm256_set1_ps(a); }
inline Vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline Vf vload(const float* p, Mask m) { return _mm256_maskload_ps(p, m.m); }
inline void vstore(float* p, Vf v) { _mm256_storeu_ps(p, v); }
inline void vstore(float* p, Mask m, Vf v) { _mm256_maskstore_ps(p, m.m, v); }
inline Vf vfma(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline Vf vadd(Vf a, Vf b) { return _mm256_add_ps(a, b); }
#else
constexpr int W = 8, kRegs = 16, kVMax = 6;
#endif
#if defined(SWP_SIMD)
// max(a, 0) lane by lane; NaN -> 0 (the second operand), as the ReLU pass
inline Vf vrelu(Vf a) {
#if defined(__AVX512F__)
  return _mm512_max_ps(a, _mm512_setzero_ps());
#else
  return _mm256_max_ps(a, _mm256_setzero_ps());
#endif
}
// the even floats of p[0, 2W), in order
inline Vf even_floats(const float* p) {
#if defined(__AVX512F__)
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_permutex2var_ps(_mm512_loadu_ps(p), idx, _mm512_loadu_ps(p + W));
#else
  const __m256 e = _mm256_shuffle_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + W), _MM_SHUFFLE(2, 0, 2, 0));
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
#endif
}
#endif

constexpr int64_t MR = 6;     // rows (stripes) of a weight panel
constexpr int64_t kHead = 4;  // a panel's plan row: phase, qy, qx, rows; then MR output channels
constexpr int64_t kMaxShift = int64_t{1} << 24, kMaxDim = int64_t{1} << 28;
constexpr uint32_t kAll = (1u << W) - 1u;
constexpr int64_t kMinSplit = 128;  // fewest output pixels of a tile split off for a thread (else: channels)
// input channels ahead that the micro-kernel prefetches its taps' input: the channel planes lie a plane apart,
// further than the hardware prefetchers follow (resnet50 at batch 1, 20% kept: 9% faster with 4 than without,
// equal from 2 to 8; resnet18 2-5%; AVX-512 build)
constexpr int64_t kPrefetch = 4;

enum Activation : int64_t { kNone = 0, kRelu = 1 };

// vectors of a register tile, by its rows: R*V accumulators, V inputs and a broadcast fit the registers
constexpr int vmax(int r) { return std::min(kVMax, (kRegs - 1) / (r + 1)); }

// ---------------------------------------------------------------- block cache
// The kernel's outputs and scratch buffers come from a cache of freed blocks: a block of tens of MB (batch 8 at
// 224) freed to the C library goes back to the system and faults in again, page by page, at its next use (1.5 us
// per 4 KB page here: a resnet18 stem call at batch 8 spent half its time so). A freed block is kept while the
// cache holds at most `limit` bytes of free blocks; a request takes the smallest free block of at least its size
// and at most 1/4 larger, of those the most recently freed (it is still in the CPU's caches: ResNet56 at batch
// 64, whose 16-channel layers free several 4 MB blocks per call, ran 8-10% faster than when the oldest was
// taken). Thread-safe (a tensor is freed on any thread); never destroyed (tensors outlive statics).
class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }
  c10::DataPtr allocate(size_t n) override {
    const size_t size = std::max<size_t>(kAlign, (n + kAlign - 1) / kAlign * kAlign);
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first - size <= size / 4) {
        it = std::prev(free_.upper_bound(it->first));  // of that size, the most recently freed: still in cache
        const auto [have, block] = *it;
        free_.erase(it);
        cached_ -= have;
        return make(block.first, have);
      }
    }
    return make(c10::alloc_cpu(size), size);
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  int64_t set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    const int64_t old = static_cast<int64_t>(limit_);
    limit_ = static_cast<size_t>(std::max<int64_t>(0, bytes));
    trim();
    return old;
  }
  int64_t cached() {
    std::lock_guard<std::mutex> g(mu_);
    return static_cast<int64_t>(cached_);
  }

 private:
  struct Block {
    BlockCache* cache;
    void* p;
    size_t size;
  };
  static constexpr size_t kAlign = 4096;
  c10::DataPtr make(void* p, size_t size) {
    return {p, new Block{this, p, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    b->cache->put(b->p, b->size);
    delete b;
  }
  void put(void* p, size_t size) {
    std::lock_guard<std::mutex> g(mu_);
    if (size > limit_) {  // (never kept: it would evict the others first)
      c10::free_cpu(p);
      return;
    }
    free_.emplace(size, std::make_pair(p, ++clock_));
    cached_ += size;
    trim();
  }
  void trim() {  // (lock held) free the least recently freed blocks down to the limit
    while (cached_ > limit_ && !free_.empty()) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second.second < oldest->second.second) oldest = it;
      c10::free_cpu(oldest->second.first);
      cached_ -= oldest->first;
      free_.erase(oldest);
    }
  }
  std::mutex mu_;
  std::multimap<size_t, std::pair<void*, uint64_t>> free_;  // size -> block, when it was freed
  size_t cached_ = 0, limit_ = size_t{256} << 20;
  uint64_t clock_ = 0;
};

// an uninitialised float32 CPU tensor of `sizes` from the block cache
at::Tensor cached_empty(at::IntArrayRef sizes) {
  return at::detail::empty_generic(sizes, &BlockCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   std::nullopt);
}

struct Vec {  // W output pixels of one image, consecutive in the output and (shifted) in the input
  int64_t n;                // image (read by the range checks of the sanitizer build)
  int64_t y0, x0;           // output coordinates of lane 0
  int64_t in_off, obase;    // lane 0's input offset at shift (0, 0) from a phase's origin; its output offset
  uint32_t lanes;           // lanes inside the item (bit i)
  bool one_row;             // every lane in output row y0
  int32_t ys[W], xs[W];     // output coordinates of each lane
};

struct Tap {                // one vector at a panel's position: where it reads, which lanes
  const float* in;
  int64_t obase;            // output offset of lane 0 (image and pixel; + channel * Q per row)
  uint32_t load, store;     // lanes read from the input (inside the phase image), lanes written
};

struct Phase {
  int64_t a, b, hph, wph;          // phase row/col, phase image size
  int64_t pitch, cstride, origin;  // in the buffer the kernel reads: row and channel strides, offset of (0, 0)
};

// The zero border around the phase images that makes every shifted read of the panels that meet the image a
// full vector in bounds: panel shifts within [ymin, ymax] x [xmin, xmax] (0 included); per image, P x C planes
// of rows x pitch floats, phase pixel (u, v) at (u - ymin) * pitch + v - xmin of its plane.
struct Border {
  int64_t ymin = 0, ymax = 0, xmin = 0, xmax = 0, rows = 0, pitch = 0, plane = 0, img = 0;
};

struct Layer {  // everything an item needs, read-only
  const float* x;          // input (stride 1) or phase buffer
  int64_t img_stride;      // floats per image in x
  const float* packed;     // (panels, C, MR)
  const int64_t* panels;   // (panels, kHead + MR)
  int64_t num_panels;
  const std::vector<Phase>* phases;
  const float *bias, *residual;
  float* out;
  int64_t N, C, O, out_h, out_w, act;
  int64_t x_size;
  int64_t kc;              // input channels per block (the block's input tile stays in the L2 cache)
  const Border* border;    // x holds zero-bordered phase images (every tap a full vector in bounds), or null
  bool fused = false;      // every output channel has one writer, which stores bias, residual and activation
  bool pack = false;       // the taps' input is packed per item and block of input channels (pack_taps)
};

struct Item {
  int64_t n0, nb, q0, q1, c0, c1;  // images [n0, n0 + nb), output pixels [q0, q1) of each, channels [c0, c1)
};

// How a register tile writes its rows: added to the output (kAdd), or - where its panel is the only writer of
// those output channels - stored with the bias (+ residual) on the first block of input channels (kInit) and the
// activation on the last (kFinal): no separate bias and activation passes, no read of the output
enum Store : int { kAdd = 0, kInit = 1, kFinal = 2 };

struct Epi {
  int mode;                // Store bits
  const float* bias;       // the tile's R row biases (kInit)
  const float* residual;   // laid out as the output, or null (kInit)
  int64_t act;             // (kFinal)
};

using Kernel = void (*)(const float* w, int64_t C, int64_t ldx, int64_t c0, const Tap* taps, float* out,
                       const int64_t* orow, const Epi& e);

// out[orow[r] + taps[v].obase + i] += sum_c w[c * MR + r] * taps[v].in[(c0 + c) * ldx + i] for the taps' lanes,
// c < C (a block of the input channels); with e.mode's kInit, = instead of += and the bias (+ residual) added;
// with kFinal, the activation applied. Masked: some tap reads fewer than all lanes
template <int R, int V, bool Masked>
void micro(const float* w, int64_t C, int64_t ldx, int64_t c0, const Tap* taps, float* out, const int64_t* orow,
           const Epi& e) {
  if constexpr (V <= vmax(R)) {
#if defined(SWP_SIMD)
    // every index into acc is a compile-time constant (unrolled loops): it stays in registers
    Vf acc[R][V];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = vzero();
    const float* b[V];
    Mask m[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      b[v] = taps[v].in + c0 * ldx;
      if constexpr (Masked) m[v] = vmask(taps[v].load);
    }
    const int64_t ahead = kPrefetch * ldx;
    for (int64_t c = 0, off = 0; c < C; ++c, off += ldx) {
      Vf bv[V];
      // (a prefetch never faults: past the last channel it reads nothing the kernel uses)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) _mm_prefetch(reinterpret_cast<const char*>(b[v] + off + ahead), _MM_HINT_T0);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        if constexpr (Masked) {
          bv[v] = vload(b[v] + off, m[v]);
        } else {
          bv[v] = vload(b[v] + off);
        }
      }
      const float* wc = w + c * MR;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const Vf a = vset(wc[r]);
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] = vfma(a, bv[v], acc[r][v]);
      }
    }
    if (e.mode == kAdd) {  // (the common case kept lean: the general loop below is ~1% slower on 3x3 convs)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        const uint32_t store = taps[v].store;
        const Mask sm = vmask(store);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          float* o = out + orow[r] + taps[v].obase;
          if (store == kAll) {
            vstore(o, vadd(vload(o), acc[r][v]));
          } else {
            vstore(o, sm, vadd(vload(o, sm), acc[r][v]));
          }
        }
      }
      return;
    }
    const bool init = e.mode & kInit, relu = (e.mode & kFinal) && e.act == kRelu;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const uint32_t store = taps[v].store;
      const bool all = store == kAll;
      const Mask sm = vmask(store);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int64_t at = orow[r] + taps[v].obase;
        float* o = out + at;
        Vf t = acc[r][v];
        if (init) {
          t = vadd(t, vset(e.bias[r]));
          if (e.residual) t = vadd(t, all ? vload(e.residual + at) : vload(e.residual + at, sm));
        } else {
          t = vadd(t, all ? vload(o) : vload(o, sm));
        }
        if (relu) t = vrelu(t);
        if (all) {
          vstore(o, t);
        } else {
          vstore(o, sm, t);
        }
      }
    }
#else
    float acc[R][V * W] = {};
    for (int64_t c = 0, off = 0; c < C; ++c, off += ldx) {
      float bv[V * W];
      for (int v = 0; v < V; ++v)
        for (int i = 0; i < W; ++i) bv[v * W + i] = (taps[v].load >> i) & 1u ? taps[v].in[c0 * ldx + off + i] : 0.f;
      const float* wc = w + c * MR;
      for (int r = 0; r < R; ++r) {
        const float a = wc[r];
        for (int i = 0; i < V * W; ++i) acc[r][i] += a * bv[i];
      }
    }
    const bool init = e.mode & kInit, relu = (e.mode & kFinal) && e.act == kRelu;
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) {
        const int64_t at = orow[r] + taps[v].obase;
        float* o = out + at;
        for (int i = 0; i < W; ++i) {
          if (!((taps[v].store >> i) & 1u)) continue;
          float t = acc[r][v * W + i] + (init ? e.bias[r] + (e.residual ? e.residual[at + i] : 0.f) : o[i]);
          o[i] = relu ? (t > 0.f ? t : 0.f) : t;  // (as the ReLU pass: NaN -> 0)
        }
      }
#endif
  }
}

template <int R, bool Masked, int... V>
constexpr void fill_row(Kernel (&row)[kVMax + 1], std::integer_sequence<int, V...>) {
  ((row[V + 1] = &micro<R, V + 1, Masked>), ...);
}

template <bool Masked, int... R>
struct Table {
  Kernel k[MR + 1][kVMax + 1] = {};
  constexpr Table() { ((fill_row<R + 1, Masked>(k[R + 1], std::make_integer_sequence<int, kVMax>{})), ...); }
};

template <bool Masked, int... R>
constexpr auto make_table(std::integer_sequence<int, R...>) { return Table<Masked, R...>{}; }

const auto kFull = make_table<false>(std::make_integer_sequence<int, MR>{});
const auto kMasked = make_table<true>(std::make_integer_sequence<int, MR>{});

// the vectors of an item's output pixels (lanes inside [q0, q1) of each image); flat: a vector may span rows
// (the phase images are as wide as the output), else each vector lies in one output row
void make_vectors(const Item& it, const Layer& L, bool flat, std::vector<Vec>& vecs) {
  vecs.clear();
  vecs.reserve(static_cast<size_t>(it.nb * ((it.q1 - it.q0) / W + (flat ? 1 : (it.q1 - it.q0) / L.out_w + 1))));
  const int64_t ow = L.out_w, pitch = (*L.phases)[0].pitch;  // (every phase has the same pitch)
  for (int64_t n = it.n0; n < it.n0 + it.nb; ++n) {
    auto push = [&](int64_t q, int64_t len) {
      Vec v;
      v.n = n, v.y0 = q / ow, v.x0 = q % ow;
      v.in_off = n * L.img_stride + v.y0 * pitch + v.x0, v.obase = n * L.O * L.out_h * ow + q;
      v.lanes = len >= W ? kAll : (1u << len) - 1u;
      v.one_row = v.x0 + std::min<int64_t>(len, W) <= ow;
      int32_t y = static_cast<int32_t>(v.y0), x = static_cast<int32_t>(v.x0);
      for (int i = 0; i < W; ++i) {  // lane i: output pixel q + i (no division per lane)
        v.ys[i] = y, v.xs[i] = x;
        if (++x == ow) x = 0, ++y;
      }
      vecs.push_back(v);
    };
    if (flat) {
      for (int64_t q = it.q0; q < it.q1; q += W) push(q, std::min<int64_t>(W, it.q1 - q));
    } else {
      for (int64_t q = it.q0; q < it.q1; q += ow)  // items are whole rows here
        for (int64_t x = 0; x < ow; x += W) push(q + x, std::min<int64_t>(W, ow - x));
    }
  }
}

// lanes of v whose input pixel (y + qy, x + qx) lies inside an hph x wph phase image
// (coordinates < kMaxDim and shifts < kMaxShift: every sum fits an int32)
inline uint32_t load_lanes(const Vec& v, int64_t qy, int64_t qx, int64_t hph, int64_t wph) {
#if defined(__AVX512F__)
  const __m512i y = _mm512_add_epi32(_mm512_loadu_si512(v.ys), _mm512_set1_epi32(static_cast<int32_t>(qy)));
  const __m512i x = _mm512_add_epi32(_mm512_loadu_si512(v.xs), _mm512_set1_epi32(static_cast<int32_t>(qx)));
  const __m512i neg = _mm512_set1_epi32(-1);
  const __m512i h = _mm512_set1_epi32(static_cast<int32_t>(hph)), w = _mm512_set1_epi32(static_cast<int32_t>(wph));
  const __mmask16 ok = _mm512_cmpgt_epi32_mask(y, neg) & _mm512_cmpgt_epi32_mask(h, y) &
                       _mm512_cmpgt_epi32_mask(x, neg) & _mm512_cmpgt_epi32_mask(w, x);
  return static_cast<uint32_t>(ok) & v.lanes;
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256i y = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.ys)),
                                     _mm256_set1_epi32(static_cast<int32_t>(qy)));
  const __m256i x = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v.xs)),
                                     _mm256_set1_epi32(static_cast<int32_t>(qx)));
  const __m256i neg = _mm256_set1_epi32(-1);
  const __m256i ok = _mm256_and_si256(
      _mm256_and_si256(_mm256_cmpgt_epi32(y, neg), _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(hph)), y)),
      _mm256_and_si256(_mm256_cmpgt_epi32(x, neg), _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(wph)), x)));
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(ok))) & v.lanes;
#else
  uint32_t m = 0;
  for (int i = 0; i < W; ++i) {
    const int64_t y = v.ys[i] + qy, x = v.xs[i] + qx;
    m |= static_cast<uint32_t>(y >= 0 && y < hph && x >= 0 && x < wph) << i;
  }
  return m & v.lanes;
#endif
}

struct Work {  // per thread
  std::vector<Vec> vecs;
  std::vector<Tap> taps;
  std::vector<float> panel;  // packed input panel (L.pack): per tap, its block of input channels x W lanes
  std::vector<Tap> ptaps;    // the taps into it
};

// Single-writer convs (1x1) with at least kPackMin input channels read their input from a packed panel per item
// and block of input channels (resnet50's 1x1 convs of 256-2048 input channels 5-13% faster, the whole net 2-6%;
// at 128 channels no faster at batch 8). Not for convs of several positions: each position's taps read shifted
// input, so each would pack again (resnet50's 256-channel 3x3 convs at 14x14 were 27-38% slower so).
constexpr int64_t kPackMin = 256;

// The input of an item's taps for input channels [k0, k0 + kc) copied to wk.panel, tap after tap (kc x W floats
// each, lanes not read as zeros), and wk.ptaps pointing there: the micro-kernel then reads each tap sequentially
// (W floats per channel) instead of one vector per input plane (a page every few channels at 56x56: TLB misses)
void pack_taps(Work& wk, int64_t nt, int64_t k0, int64_t kc, int64_t ldx) {
  wk.panel.resize(static_cast<size_t>(nt * kc * W));
  wk.ptaps.resize(static_cast<size_t>(nt));
  for (int64_t i = 0; i < nt; ++i) {
    const Tap& t = wk.taps[i];
    const float* src = t.in + k0 * ldx;
    float* dst = wk.panel.data() + i * kc * W;
#if defined(SWP_SIMD)
    if (t.load == kAll) {
      for (int64_t c = 0; c < kc; ++c) vstore(dst + c * W, vload(src + c * ldx));
    } else {
      const Mask m = vmask(t.load);
      for (int64_t c = 0; c < kc; ++c) vstore(dst + c * W, vload(src + c * ldx, m));
    }
#else
    for (int64_t c = 0; c < kc; ++c)
      for (int l = 0; l < W; ++l) dst[c * W + l] = (t.load >> l) & 1u ? src[c * ldx + l] : 0.f;
#endif
    wk.ptaps[i] = {dst, t.obase, kAll, t.store};
  }
}

void run_item(const Item& it, const Layer& L, bool flat, Work& wk) {
  const int64_t Q = L.out_h * L.out_w, C = L.C, O = L.O;
  const int64_t out_size = L.N * O * Q;
  // bias (+ residual) first: the panels add into the output (fused: the panels store them)
  if (!L.fused)
  for (int64_t n = it.n0; n < it.n0 + it.nb; ++n)
    for (int64_t o = it.c0; o < it.c1; ++o) {
      const int64_t offset = (n * O + o) * Q;
      float* dst = L.out + offset + it.q0;
      const float b0 = L.bias ? L.bias[o] : 0.f;
      const int64_t len = it.q1 - it.q0;
      if (L.residual) {
        const float* res = L.residual + offset + it.q0;
        for (int64_t i = 0; i < len; ++i) dst[i] = b0 + res[i];
      } else {
        for (int64_t i = 0; i < len; ++i) dst[i] = b0;
      }
    }
  make_vectors(it, L, flat, wk.vecs);
  wk.taps.resize(wk.vecs.size());
  int64_t orow[MR], nt = 0;
  for (int64_t k0 = 0; k0 < C; k0 += L.kc) {
  const int64_t kc = std::min(L.kc, C - k0);
  int64_t key_phase = -1, key_qy = 0, key_qx = 0, first_of_position = -1;
  for (int64_t p = 0; p < L.num_panels; ++p) {
    const int64_t* pr = L.panels + p * (kHead + MR);
    const int64_t rows = pr[3];
    const int64_t* outs = pr + kHead;
    if (outs[0] >= it.c1 || outs[rows - 1] < it.c0) continue;
    int64_t r0 = 0, r1 = rows;
    while (outs[r0] < it.c0) ++r0;
    while (outs[r1 - 1] >= it.c1) --r1;
    const Phase& ph = (*L.phases)[pr[0]];
    const int64_t qy = pr[1], qx = pr[2], ldx = ph.cstride;
    const Border* bd = L.border;
    // bordered: a panel that never meets its phase image is outside the border (it adds zeros)
    if (bd && (qy < bd->ymin || qy > bd->ymax || qx < bd->xmin || qx > bd->xmax)) continue;
    if (pr[0] != key_phase || qy != key_qy || qx != key_qx) {  // the taps of this position
      key_phase = pr[0], key_qy = qy, key_qx = qx, first_of_position = p;
      nt = 0;
      const int64_t shift = ph.origin + qy * ph.pitch + qx;
      for (const Vec& v : wk.vecs) {
        uint32_t load = kAll;
        const int64_t y = v.y0 + qy, x = v.x0 + qx;
        if (bd || v.one_row) {  // one output row: a row outside the image, or only columns outside it: skip it
          if (y < 0 || y >= ph.hph || x + W <= 0 || x >= ph.wph) continue;
          if (!bd) {  // (bordered: the border makes every lane readable) the lanes i with 0 <= x + i < wph
            load = v.lanes;
            if (x < 0) load &= kAll << (-x);
            if (x + W > ph.wph) load &= (1u << (ph.wph - x)) - 1u;
            if (!load) continue;
          }
        } else {
          load = load_lanes(v, qy, qx, ph.hph, ph.wph);
          if (!load) continue;
        }
        const uint32_t valid = load;
        const float* in = L.x + v.in_off + shift;
        // every written lane valid and the whole vector inside the buffer: read it unmasked (the lanes not
        // written only feed accumulators that are never stored; masked loads are slow, at page ends above all)
        const int64_t at = (in - L.x);
        if (load == v.lanes && at >= 0 && at + (C - 1) * ldx + W <= L.x_size) load = kAll;
#if defined(SWP_CHECKED)
        {  // every lane read inside the buffer; the valid ones inside their image's phase plane
          const int64_t first = __builtin_ctz(load), last = 31 - __builtin_clz(load);
          SWP_RANGE(in + first, (C - 1) * ldx + last - first + 1, L.x, L.x_size);
          const int64_t vfirst = __builtin_ctz(valid), vlast = 31 - __builtin_clz(valid);
          // (bordered: the phase's planes start at origin + ymin * pitch + xmin, ymin and xmin <= 0)
          const int64_t plane = bd ? bd->plane : ldx;  // (unbordered: the channel stride)
          const int64_t start = bd ? ph.origin + bd->ymin * bd->pitch + bd->xmin : ph.origin;
          SWP_RANGE(in + vfirst, (C - 1) * ldx + vlast - vfirst + 1, L.x + v.n * L.img_stride + start, C * plane);
        }
#endif
        wk.taps[nt++] = {in, v.obase, load, v.lanes};
      }
    }
    if (nt == 0) continue;
    if (L.pack && p == first_of_position) pack_taps(wk, nt, k0, kc, ldx);
    const int R = static_cast<int>(r1 - r0);
    for (int64_t r = r0; r < r1; ++r) orow[r - r0] = outs[r] * Q;
    const float* w = L.packed + p * C * MR + k0 * MR + r0;
    SWP_RANGE(w, (kc - 1) * MR + R, L.packed, L.num_panels * C * MR);
#if defined(SWP_CHECKED)
    for (int64_t i = 0; i < nt; ++i) {
      const Tap& t = wk.taps[i];
      const int64_t first = __builtin_ctz(t.store), last = 31 - __builtin_clz(t.store);
      for (int r = 0; r < R; ++r) {
        SWP_RANGE(L.out + orow[r] + t.obase + first, last - first + 1, L.out, out_size);
        if (L.fused && L.residual) SWP_RANGE(L.residual + orow[r] + t.obase + first, last - first + 1, L.residual, out_size);
      }
    }
#endif
    (void)out_size;
    float brow[MR];
    for (int64_t r = r0; r < r1; ++r) brow[r - r0] = L.bias ? L.bias[outs[r]] : 0.f;
    const Epi e{L.fused ? (k0 == 0 ? kInit : kAdd) | (k0 + kc >= C ? kFinal : kAdd) : kAdd, brow, L.residual, L.act};
    const int64_t T = nt, V = vmax(R);
    const Tap* taps = L.pack ? wk.ptaps.data() : wk.taps.data();
    const int64_t tap_ldx = L.pack ? W : ldx, tap_c0 = L.pack ? 0 : k0;  // (packed: the panel holds [k0, k0 + kc))
    for (int64_t t = 0; t < T; t += V) {
      const int64_t nv = std::min<int64_t>(V, T - t);
      const Tap* tp = taps + t;
      bool full = true;
      for (int64_t v = 0; v < nv; ++v) full = full && tp[v].load == kAll;
      (full ? kFull.k[R][nv] : kMasked.k[R][nv])(w, kc, tap_ldx, tap_c0, tp, L.out, orow, e);
    }
  }
  }
  if (L.act == kRelu && !L.fused)
    for (int64_t n = it.n0; n < it.n0 + it.nb; ++n)
      for (int64_t o = it.c0; o < it.c1; ++o) {
        float* dst = L.out + (n * O + o) * Q + it.q0;
        for (int64_t i = 0; i < it.q1 - it.q0; ++i) dst[i] = dst[i] > 0.f ? dst[i] : 0.f;
      }
}

// ---------------------------------------------------------------- few input channels (the stem)
// With C_in <= kFew a panel's K loop is too short for its read-modify-write of the output. There, each output
// channel's stripes are summed in registers instead (K = its stripes x C_in, one accumulator per vector of an
// output row), over zero-padded phase images: every load is a full vector inside the buffer (no masks), the
// output is written once.
constexpr int64_t kFew = 8;
constexpr int kVF = 14;  // vectors of one output row chunk (one accumulator each)

struct FewStripe {
  int64_t off;       // offset of the stripe's shift in an image's padded phase buffer
  const float* w;    // its weights, stride MR per input channel
};

struct Few {  // everything a row block needs, read-only
  const float* buf;  // (N, P, C, plane) padded phase images
  int64_t img, plane, pitch, C, O, out_h, out_w, act;
  const std::vector<int64_t>* ptr;     // (O + 1) CSR of each output channel's stripes
  const std::vector<FewStripe>* stripes;
  const float *bias, *residual;
  float* out;
  int64_t buf_size, out_size;
};

// out[n, o, y, x0 + i] = act(bias + residual + sum over o's stripes and c of w * buf[...]), V vectors of W pixels
template <int V>
void few_chunk(const Few& F, int64_t n, int64_t o, int64_t y, int64_t x0) {
  const float* base = F.buf + n * F.img + y * F.pitch + x0;
  const int64_t C = F.C, plane = F.plane;
#if defined(SWP_SIMD)
  Vf acc[V];
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) acc[v] = vzero();
  for (int64_t j = (*F.ptr)[o]; j < (*F.ptr)[o + 1]; ++j) {
    const FewStripe& st = (*F.stripes)[j];
    const float* src = base + st.off;
    SWP_RANGE(src, (C - 1) * plane + V * W, F.buf, F.buf_size);
    for (int64_t c = 0; c < C; ++c, src += plane) {
      const Vf a = vset(st.w[c * MR]);
#pragma GCC unroll 16
      for (int v = 0; v < V; ++v) acc[v] = vfma(a, vload(src + v * W), acc[v]);
    }
  }
#else
  float acc[V * W] = {};
  for (int64_t j = (*F.ptr)[o]; j < (*F.ptr)[o + 1]; ++j) {
    const FewStripe& st = (*F.stripes)[j];
    const float* src = base + st.off;
    SWP_RANGE(src, (C - 1) * plane + V * W, F.buf, F.buf_size);
    for (int64_t c = 0; c < C; ++c, src += plane) {
      const float a = st.w[c * MR];
      for (int i = 0; i < V * W; ++i) acc[i] += a * src[i];
    }
  }
#endif
  const int64_t offset = ((n * F.O + o) * F.out_h + y) * F.out_w + x0;
  const float b0 = F.bias ? F.bias[o] : 0.f;
#if defined(SWP_SIMD)
  // the chunk's first `full` vectors are whole, the rest (at most one) has `tail` lanes
  const int64_t full = std::min<int64_t>(V, (F.out_w - x0) / W), tail = std::min<int64_t>(V * W, F.out_w - x0) - full * W;
  float* const dst = F.out + offset;
  const float* const res = F.residual ? F.residual + offset : nullptr;  // (loads of F's members hoisted: the
  const bool relu = F.act == kRelu;                                      // stores below may alias them)
  SWP_RANGE(dst, full * W + tail, F.out, F.out_size);
  const Vf bv = vset(b0);
  const Mask m = vmask((1u << tail) - 1u);
#pragma GCC unroll 16
  for (int v = 0; v < V; ++v) {
    Vf t = vadd(acc[v], bv);
    if (v < full) {
      if (res) t = vadd(t, vload(res + v * W));
      if (relu) t = vrelu(t);
      vstore(dst + v * W, t);
    } else if (v == full && tail) {
      if (res) t = vadd(t, vload(res + v * W, m));
      if (relu) t = vrelu(t);
      vstore(dst + v * W, m, t);
    }
  }
#else
  for (int v = 0; v < V; ++v) {
    const int64_t len = std::min<int64_t>(W, F.out_w - x0 - v * W);
    float* dst = F.out + offset + v * W;
    SWP_RANGE(dst, len, F.out, F.out_size);
    const float* res = F.residual ? F.residual + offset + v * W : nullptr;
    for (int64_t i = 0; i < len; ++i) {
      const float t = acc[v * W + i] + b0 + (res ? res[i] : 0.f);
      dst[i] = F.act == kRelu && t < 0.f ? 0.f : t;
    }
  }
#endif
}

template <int... V>
constexpr std::array<void (*)(const Few&, int64_t, int64_t, int64_t, int64_t), kVF + 1> few_table(
    std::integer_sequence<int, V...>) {
  return {nullptr, &few_chunk<V + 1>...};
}
const auto kFewChunks = few_table(std::make_integer_sequence<int, kVF>{});

void few_rows(const Few& F, int64_t n, int64_t r0, int64_t r1) {
  for (int64_t o = 0; o < F.O; ++o)
    for (int64_t y = r0; y < r1; ++y)
      for (int64_t x0 = 0; x0 < F.out_w; x0 += kVF * W) {
        const int64_t nv = std::min<int64_t>(kVF, (F.out_w - x0 + W - 1) / W);
        kFewChunks[nv](F, n, o, y, x0);
      }
}

// The channel stride of a phase image copy: at least `floats`, a multiple of 16 floats (a cache line) with an odd
// quotient, so that the rows of consecutive channels that a register tile reads start in distinct sets of the L1
// cache (at a stride near a multiple of 4 KB, e.g. 29 x 34 floats, 64 channels share a few sets and evict each
// other; found on stride-2 convs at 56x56). The copy is made anyway: the padding costs nothing but memory.
inline int64_t spread_stride(int64_t floats) {
  int64_t lines = (floats + 15) / 16;
  if (lines % 2 == 0) ++lines;
  return lines * 16;
}

// the border of the panels that meet their phase image (plan already checked)
Border make_border(const int64_t* panels, int64_t num_panels, int64_t out_h, int64_t out_w,
                   const std::vector<Phase>& phases, int64_t C) {
  Border bd;
  const int64_t* pr = panels;
  for (int64_t p = 0; p < num_panels; ++p, pr += kHead + MR) {
    const Phase& ph = phases[pr[0]];
    const int64_t qy = pr[1], qx = pr[2];
    if (qy >= ph.hph || qy + out_h <= 0 || qx >= ph.wph || qx + out_w <= 0) continue;
    bd.ymin = std::min(bd.ymin, qy), bd.ymax = std::max(bd.ymax, qy);
    bd.xmin = std::min(bd.xmin, qx), bd.xmax = std::max(bd.xmax, qx);
  }
  bd.rows = out_h + bd.ymax - bd.ymin;
  bd.pitch = (out_w + W - 1) / W * W + bd.xmax - bd.xmin;
  bd.plane = spread_stride(bd.rows * bd.pitch);
  bd.img = static_cast<int64_t>(phases.size()) * C * bd.plane;
  return bd;
}

// compact phase images (no border: every phase as wide as the output, rows up to the tallest phase's)
Border compact_border(const std::vector<Phase>& phases, int64_t out_w, int64_t C) {
  Border b;
  for (const Phase& ph : phases) b.rows = std::max(b.rows, ph.hph);
  b.pitch = out_w;
  b.plane = spread_stride(b.rows * b.pitch);
  b.img = static_cast<int64_t>(phases.size()) * C * b.plane;
  return b;
}

// phase column v of `row` (stride sw) at drow[v], v in [v0, v1); row[v * sw] lies inside the row for these v
inline void gather_columns(const float* row, float* drow, int64_t v0, int64_t v1, int64_t sw, int64_t row_len) {
  if (sw == 1) {
    if (v1 > v0) std::memcpy(drow + v0, row + v0, static_cast<size_t>(v1 - v0) * sizeof(float));
    return;
  }
  int64_t v = v0;
#if defined(SWP_SIMD)
  if (sw == 2) {  // 2W input floats -> their W even ones; only while the 2W lie inside the row
    for (; v + W <= v1 && 2 * v + 2 * W <= row_len; v += W) {
      SWP_RANGE(row + 2 * v, 2 * W, row, row_len);
      vstore(drow + v, even_floats(row + 2 * v));
    }
  }
#endif
  (void)row_len;
  for (; v < v1; ++v) drow[v] = row[v * sw];
}

// x's phase images with the zero border bd: (N, P, C) planes of bd.plane floats, each rows x pitch and zero
// padding; every float written once (the border as zeros, the rest copied: no zero fill of the whole buffer first)
at::Tensor bordered_phases(const float* x, int64_t N, int64_t C, int64_t H, int64_t W_in, int64_t sh, int64_t sw,
                           const std::vector<Phase>& phases, const Border& bd) {
  const int64_t P = static_cast<int64_t>(phases.size());
  at::Tensor bufT = cached_empty({std::max<int64_t>(1, N * bd.img)});
  float* buf = bufT.data_ptr<float>();
  const int64_t size = bufT.numel();
  (void)size;
  at::parallel_for(0, N * P * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / (P * C), p = (i / C) % P, c = i % C;
      const Phase& ph = phases[p];
      const float* src = x + (n * C + c) * H * W_in;
      float* d = buf + n * bd.img + (p * C + c) * bd.plane;
      SWP_RANGE(d, bd.plane, buf, size);
      // phase columns [v0, v1) are copied (column v at drow[v], drow = the row's start - xmin); ymin, xmin <= 0
      const int64_t v0 = std::max<int64_t>(0, bd.xmin), v1 = std::max(v0, std::min(ph.wph, bd.pitch + bd.xmin));
      for (int64_t rr = 0; rr < bd.rows; ++rr) {
        float* line = d + rr * bd.pitch;
        const int64_t u = rr + bd.ymin;
        if (u < 0 || u >= ph.hph || v1 == v0) {
          std::memset(line, 0, static_cast<size_t>(bd.pitch) * sizeof(float));
          continue;
        }
        float* drow = line - bd.xmin;
        std::memset(line, 0, static_cast<size_t>(v0 - bd.xmin) * sizeof(float));
        std::memset(drow + v1, 0, static_cast<size_t>(bd.pitch + bd.xmin - v1) * sizeof(float));
        gather_columns(src + (u * sh + ph.a) * W_in + ph.b, drow, v0, v1, sw, W_in - ph.b);
      }
      std::memset(d + bd.rows * bd.pitch, 0, static_cast<size_t>(bd.plane - bd.rows * bd.pitch) * sizeof(float));
    }
  });
  return bufT;
}

// A channel stride of a multiple of 2 KB maps the C channel rows that a register tile reads for one vector to
// one or two sets of the L1 cache (8 ways): they evict each other and the panels run from L2 (a standalone copy
// of the micro-kernel, 16 channels: about 1.7x slower at a 4096-byte channel stride than at 4160 bytes). Such an
// input (CIFAR's 32x32 and 16x32 planes) is copied first, with the channel stride padded by kChannelPad floats
// (one cache line: consecutive channels in consecutive sets). Not in the AVX-512 build: there (measured on a CPU
// with a 12-way 48 KB L1, the taps prefetched) the copy cost more than it saved: ResNet56 and VGG16-BN at 32x32,
// batch 64, 8% and 5% faster without it, batch 1 within 3% either way.
constexpr int64_t kSetAliased = 512, kChannelPad = 16;
constexpr bool kPadAliased = W == 8;

// x's `planes` planes of `plane` floats at a channel stride of `cstride` (>= plane) floats, the padding zeroed.
// Each plane is copied in `parts` consecutive pieces, piece-major: with one part per thread, a thread copies the
// same part of every plane, the rows that its pixel tile of the output then reads (they stay in its core's cache).
at::Tensor padded_channels(const float* x, int64_t planes, int64_t plane, int64_t cstride, int64_t parts) {
  at::Tensor bufT = cached_empty({std::max<int64_t>(1, planes * cstride)});
  float* buf = bufT.data_ptr<float>();
  const int64_t size = bufT.numel();
  (void)size;
  at::parallel_for(0, planes * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t part = i / planes, p = i % planes;
      const int64_t a = plane * part / parts, b = plane * (part + 1) / parts;
      float* d = buf + p * cstride;
      SWP_RANGE(d + a, b - a, buf, size);
      std::memcpy(d + a, x + p * plane + a, static_cast<size_t>(b - a) * sizeof(float));
      if (part == parts - 1) std::memset(d + plane, 0, static_cast<size_t>(cstride - plane) * sizeof(float));
    }
  });
  return bufT;
}

// the few-channel path for the whole call (plan already checked)
void run_few(const float* x, int64_t N, int64_t C, int64_t H, int64_t W_in, int64_t sh, int64_t sw,
             const std::vector<Phase>& phases, const Layer& L) {
  const int64_t O = L.O, out_h = L.out_h, out_w = L.out_w, P = static_cast<int64_t>(phases.size());
  // each output channel's stripes (those whose window meets the phase image: the others add zeros)
  std::vector<std::vector<std::array<int64_t, 4>>> by_out(O);  // phase, qy, qx, packed row index
  const Border bd = make_border(L.panels, L.num_panels, out_h, out_w, phases, C);
  const int64_t* pr = L.panels;
  for (int64_t p = 0; p < L.num_panels; ++p, pr += kHead + MR) {
    const int64_t qy = pr[1], qx = pr[2];
    if (qy < bd.ymin || qy > bd.ymax || qx < bd.xmin || qx > bd.xmax) continue;  // never meets the image
    for (int64_t r = 0; r < pr[3]; ++r) by_out[pr[kHead + r]].push_back({pr[0], qy, qx, p * MR + r});
  }
  const int64_t ymin = bd.ymin, ymax = bd.ymax, xmin = bd.xmin, pitch = bd.pitch, plane = bd.plane, img = bd.img;
  const at::Tensor bufT = bordered_phases(x, N, C, H, W_in, sh, sw, phases, bd);
  const float* buf = bufT.data_ptr<float>();
  std::vector<int64_t> ptr(O + 1, 0);
  std::vector<FewStripe> stripes;
  for (int64_t o = 0; o < O; ++o) {
    for (const auto& e : by_out[o]) {
      const int64_t panel = e[3] / MR, r = e[3] % MR;
      stripes.push_back({(e[0] * C) * plane + (e[1] - ymin) * pitch + (e[2] - xmin), L.packed + panel * C * MR + r});
    }
    ptr[o + 1] = static_cast<int64_t>(stripes.size());
  }
  const Few F{buf, img, plane, pitch, C, O, out_h, out_w, L.act, &ptr, &stripes, L.bias, L.residual, L.out,
              bufT.numel(), N * O * out_h * out_w};
  // row blocks whose padded input rows stay in the L1 cache (~24 KB), enough for every thread
  const int64_t threads = at::get_num_threads();
  int64_t per = std::max<int64_t>(1, 6144 / std::max<int64_t>(1, P * C * pitch) - (ymax - ymin));
  per = std::min(per, std::max<int64_t>(1, (N * out_h + 4 * threads - 1) / (4 * threads)));
  const int64_t blocks = (out_h + per - 1) / per;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t n = i / blocks, r0 = (i % blocks) * per;
      few_rows(F, n, r0, std::min(out_h, r0 + per));
    }
  });
}

// Check the plan against the tensors (cheap, every call): a malformed plan raises, never reads out of bounds.
void check_plan(const at::Tensor& packed, const at::Tensor& panels, const at::Tensor& phases, int64_t C, int64_t O,
                int64_t sh, int64_t sw) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == C && packed.size(2) == MR,
              "swp_stripe: packed weights must be (panels, C_in, ", MR, "), got ", packed.sizes());
  TORCH_CHECK(panels.dim() == 2 && panels.size(0) == packed.size(0) && panels.size(1) == kHead + MR,
              "swp_stripe: plan panels must be (", packed.size(0), ", ", kHead + MR, "), got ", panels.sizes());
  TORCH_CHECK(phases.dim() == 2 && phases.size(1) == 2 && phases.size(0) >= 1 && phases.size(0) <= sh * sw,
              "swp_stripe: plan phases must be (P, 2) with 1 <= P <= stride product, got ", phases.sizes());
  const int64_t* ph = phases.data_ptr<int64_t>();
  for (int64_t p = 0; p < phases.size(0); ++p)
    TORCH_CHECK(ph[2 * p] >= 0 && ph[2 * p] < sh && ph[2 * p + 1] >= 0 && ph[2 * p + 1] < sw,
                "swp_stripe: plan phase ", p, " (", ph[2 * p], ", ", ph[2 * p + 1], ") outside the stride");
  const int64_t* pr = panels.data_ptr<int64_t>();
  for (int64_t p = 0; p < panels.size(0); ++p, pr += kHead + MR) {
    TORCH_CHECK(pr[0] >= 0 && pr[0] < phases.size(0), "swp_stripe: plan panel ", p, " has phase ", pr[0]);
    TORCH_CHECK(pr[1] > -kMaxShift && pr[1] < kMaxShift && pr[2] > -kMaxShift && pr[2] < kMaxShift,
                "swp_stripe: plan panel ", p, " has shift (", pr[1], ", ", pr[2], ")");
    TORCH_CHECK(pr[3] >= 1 && pr[3] <= MR, "swp_stripe: plan panel ", p, " has ", pr[3], " rows");
    for (int64_t r = 0; r < pr[3]; ++r)
      TORCH_CHECK(pr[kHead + r] >= 0 && pr[kHead + r] < O && (r == 0 || pr[kHead + r] >= pr[kHead + r - 1]),
                  "swp_stripe: plan panel ", p, " row ", r, ": output channel ", pr[kHead + r],
                  " (must be in [0, ", O, ") and sorted)");
  }
}

// Does every output channel lie in exactly one panel row, at shift (0, 0) of a phase at least as large as the
// output? That panel's taps are then every vector of an item, all lanes: it writes each of its outputs once per
// block of input channels, so it can store the bias, residual and activation itself (1x1 convs; plan checked)
bool single_writers(const int64_t* panels, int64_t num_panels, const std::vector<Phase>& phases, int64_t O,
                    int64_t out_h, int64_t out_w) {
  const int64_t* pr = panels;
  for (int64_t p = 0; p < num_panels; ++p, pr += kHead + MR) {  // (no allocation for the many convs that fail here)
    const Phase& ph = phases[pr[0]];
    if (pr[1] != 0 || pr[2] != 0 || ph.hph < out_h || ph.wph < out_w) return false;
  }
  std::vector<int64_t> writers(static_cast<size_t>(O), 0);
  pr = panels;
  for (int64_t p = 0; p < num_panels; ++p, pr += kHead + MR)
    for (int64_t r = 0; r < pr[3]; ++r) ++writers[pr[kHead + r]];
  return std::all_of(writers.begin(), writers.end(), [](int64_t w) { return w == 1; });
}

// `parts` pixel tiles of each of N images, as even as whole vectors (flat: tile i holds the vectors [nv * i / parts,
// nv * (i + 1) / parts) of the image's nv) or whole rows allow: a tile size rounded up to a vector instead left
// 13 tiles of 784 pixels where 14 were asked, 7 for one thread and 6 for the other (resnet18's 28x28 convs)
void push_tiles(std::vector<Item>& items, int64_t N, int64_t O, int64_t out_h, int64_t out_w, int64_t parts,
                bool flat) {
  const int64_t Q = out_h * out_w, unit = flat ? W : out_w, units = flat ? (Q + W - 1) / W : out_h;
  parts = std::max<int64_t>(1, std::min(parts, units));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < parts; ++i)
      items.push_back({n, 1, units * i / parts * unit, std::min(Q, units * (i + 1) / parts * unit), 0, O});
}

// x (N, C, H, W) float32; packed (panels, C, MR); panels (panels, kHead + MR) int64; phases (P, 2) int64
at::Tensor stripe_conv_forward(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& panels_,
                               const at::Tensor& phases_, const std::optional<at::Tensor>& bias_,
                               const std::optional<at::Tensor>& residual_, int64_t out_channels, int64_t out_h,
                               int64_t out_w, int64_t sh, int64_t sw, int64_t tile_pixels, int64_t act) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "x: float32 CPU NCHW");
  TORCH_CHECK(packed_.scalar_type() == at::kFloat && packed_.device().is_cpu(), "packed weights: float32 CPU");
  TORCH_CHECK(panels_.scalar_type() == at::kLong && phases_.scalar_type() == at::kLong, "plan tensors: int64");
  TORCH_CHECK(act == kNone || act == kRelu, "act: 0 (none) or 1 (relu)");
  TORCH_CHECK(sh >= 1 && sw >= 1 && sh < kMaxDim && sw < kMaxDim && tile_pixels >= 1 && out_h >= 0 && out_w >= 0 &&
                  out_channels >= 0 && out_h < kMaxDim && out_w < kMaxDim,
              "swp_stripe: bad geometry");
  const at::Tensor x = x_.contiguous(), packed = packed_.contiguous();
  const at::Tensor panels = panels_.contiguous(), phases_t = phases_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Win = x.size(3), O = out_channels;
  TORCH_CHECK(H < kMaxDim && Win < kMaxDim, "swp_stripe: input too large");
  check_plan(packed, panels, phases_t, C, O, sh, sw);
  at::Tensor bias, residual;
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == O, "bias: float32 (out_channels,)");
  }
  at::Tensor out = cached_empty({N, O, out_h, out_w});
  if (residual_.has_value() && residual_->defined()) {
    residual = residual_->contiguous();
    TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.sizes() == out.sizes(), "residual: output's shape");
  }
  if (N == 0 || O == 0 || out_h == 0 || out_w == 0) return out;

  std::vector<Phase> phases;
  const int64_t* pi = phases_t.data_ptr<int64_t>();
  bool flat = true;
  for (int64_t p = 0; p < phases_t.size(0); ++p) {
    Phase ph{pi[2 * p], pi[2 * p + 1], 0, 0, 0, 0, 0};
    ph.hph = H > ph.a ? (H - ph.a + sh - 1) / sh : 0;
    ph.wph = Win > ph.b ? (Win - ph.b + sw - 1) / sw : 0;
    // as read at stride 1 (one phase, check_plan: the input itself); bordered strides set their own below
    ph.pitch = ph.wph, ph.cstride = ph.hph * ph.wph, ph.origin = 0;
    flat = flat && ph.wph == out_w;
    phases.push_back(ph);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t kblocks = C > 384 ? (C + 255) / 256 : 1, kc = (C + kblocks - 1) / kblocks;
  if (C <= kFew) {
    const Layer L{nullptr, 0, packed.data_ptr<float>(), panels.data_ptr<int64_t>(), panels.size(0), &phases,
                  bias.defined() ? bias.data_ptr<float>() : nullptr,
                  residual.defined() ? residual.data_ptr<float>() : nullptr, out.data_ptr<float>(), N, C, O, out_h,
                  out_w, act, 0, C, nullptr};
    run_few(x.data_ptr<float>(), N, C, H, Win, sh, sw, phases, L);
    return out;
  }
  // stride 1: the input is the (only) phase image. Else its phase images: compact ones where each is as wide as
  // the output (flat vectors, read like a stride-1 input: masked loads at the edges), else each with the zero
  // border that makes every read a full vector (no masks; vectors by output row, the last of a row part empty).
  // The compact form is 10-20% faster on resnet's stride-2 convs at 56x56 and 28x28 (no empty lanes, smaller
  // copies), equal at 14x14. (At stride 1 a bordered copy costs more than the masked loads it saves: measured on
  // ResNet56's and resnet18's layers.)
  at::Tensor split;
  const float* xb = x.data_ptr<float>();
  int64_t img_stride = C * H * Win;
  const bool compact = (sh > 1 || sw > 1) && flat;
  const bool bordered = (sh > 1 || sw > 1) && !compact;
  Border bd;
  if (compact || bordered) {
    const Border b = compact ? compact_border(phases, out_w, C)
                             : make_border(panels.data_ptr<int64_t>(), panels.size(0), out_h, out_w, phases, C);
    split = bordered_phases(xb, N, C, H, Win, sh, sw, phases, b);
    for (int64_t p = 0; p < static_cast<int64_t>(phases.size()); ++p) {
      Phase& ph = phases[p];
      ph.pitch = b.pitch, ph.cstride = b.plane, ph.origin = p * C * b.plane - b.ymin * b.pitch - b.xmin;
    }
    xb = split.data_ptr<float>();
    img_stride = b.img;
    if (bordered) bd = b, flat = false;
  } else if (kPadAliased && C > kFew && H * Win % kSetAliased == 0) {
    const int64_t cstride = H * Win + kChannelPad;
    split = padded_channels(xb, N * C, H * Win, cstride, N < threads ? threads : 1);
    phases[0].cstride = cstride;
    xb = split.data_ptr<float>();
    img_stride = C * cstride;
  }
  const bool fused = single_writers(panels.data_ptr<int64_t>(), panels.size(0), phases, O, out_h, out_w);
  const Layer L{xb, img_stride, packed.data_ptr<float>(), panels.data_ptr<int64_t>(), panels.size(0), &phases,
                bias.defined() ? bias.data_ptr<float>() : nullptr,
                residual.defined() ? residual.data_ptr<float>() : nullptr, out.data_ptr<float>(), N, C, O, out_h,
                out_w, act, split.defined() ? split.numel() : x.numel(), kc, bordered ? &bd : nullptr, fused,
                fused && C >= kPackMin};

  // items: whole images (several when small) or pixel tiles of one image, enough for every thread
  const int64_t Q = out_h * out_w;
  std::vector<Item> items;
  if (Q > tile_pixels) {
    int64_t tiles = (Q + tile_pixels - 1) / tile_pixels;
    while ((N * tiles) % threads != 0) ++tiles;  // whole rounds over the threads
    push_tiles(items, N, O, out_h, out_w, tiles, flat);
  } else if (N < threads && Q >= threads * kMinSplit) {  // few images: split each into one tile per thread
    push_tiles(items, N, O, out_h, out_w, (threads + N - 1) / N, flat);
  } else {
    int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, tile_pixels / std::max<int64_t>(1, Q)));
    nb = std::min(nb, (N + threads - 1) / threads);
    // whole rounds of items: 3 items of 3, 3 and 2 images on 2 threads leave one thread a third of the work
    // (resnet18's layer4.0.conv1 at batch 8: 30% faster with 4 items of 2)
    while (nb > 1 && ((N + nb - 1) / nb) % threads != 0) --nb;
    for (int64_t n = 0; n < N; n += nb) items.push_back({n, std::min(nb, N - n), 0, Q, 0, O});
  }
  // fewer items than threads: split the output channels too, at equal stripe counts
  const int64_t base_items = static_cast<int64_t>(items.size());
  if (base_items < threads && O > 1) {
    const int64_t ranges = std::min<int64_t>(O, (threads + base_items - 1) / base_items);
    std::vector<int64_t> count(O + 1, 0);
    const int64_t* pr = L.panels;
    for (int64_t p = 0; p < L.num_panels; ++p, pr += kHead + MR)
      for (int64_t r = 0; r < pr[3]; ++r) ++count[pr[kHead + r] + 1];
    for (int64_t o = 0; o < O; ++o) count[o + 1] += count[o];
    std::vector<int64_t> cuts{0};
    for (int64_t g = 1; g < ranges; ++g) {
      const int64_t target = count[O] * g / ranges;
      int64_t o = cuts.back() + 1;
      while (o < O && count[o] < target) ++o;
      if (o < O) cuts.push_back(o);
    }
    cuts.push_back(O);
    std::vector<Item> split_items;
    for (const Item& it : items)
      for (size_t g = 0; g + 1 < cuts.size(); ++g) split_items.push_back({it.n0, it.nb, it.q0, it.q1, cuts[g], cuts[g + 1]});
    items.swap(split_items);
  }
  const int64_t nitems = static_cast<int64_t>(items.size());
  if (nitems == 1) {
    Work wk;
    run_item(items[0], L, flat, wk);
    return out;
  }
  at::parallel_for(0, nitems, 1, [&](int64_t begin, int64_t end) {
    Work wk;
    for (int64_t i = begin; i < end; ++i) run_item(items[i], L, flat, wk);
  });
  return out;
}

// ---------------------------------------------------------------- max pooling
// Max pooling of x (N, C, H, W) float32, dilation 1, floor mode, padding as -inf (skipped): per plane and output
// row, the maximum over the window's rows into a row buffer (contiguous, vectorised), then over the window's
// columns. NaN propagates as in PyTorch's max_pool2d (a NaN is the maximum).
inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }
#if defined(SWP_SIMD)
inline Vf nan_max(Vf m, Vf v) {  // lane by lane as above
#if defined(__AVX512F__)
  const __mmask16 take = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take, m, v);
#else
  const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, m, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_ps(m, v, take);
#endif
}
#endif

at::Tensor max_pool_forward(const at::Tensor& x_, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat && x_.device().is_cpu(),
              "swp_stripe.max_pool2d: x must be float32 CPU (N, C, H, W)");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw &&
                  kh < kMaxDim && kw < kMaxDim && sh < kMaxDim && sw < kMaxDim,
              "swp_stripe.max_pool2d: kernel and stride >= 1, padding in [0, kernel / 2]");
  const at::Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  TORCH_CHECK(H < kMaxDim && Wd < kMaxDim, "swp_stripe.max_pool2d: input too large");
  const int64_t out_h = (H + 2 * ph - kh) / sh + 1, out_w = (Wd + 2 * pw - kw) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= kh && Wd + 2 * pw >= kw, "swp_stripe.max_pool2d: input ", H, "x", Wd,
              " smaller than the window");
  at::Tensor out = cached_empty({N, C, out_h, out_w});
  if (out.numel() == 0) return out;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t padded = Wd + 2 * pw + sw * out_w + kw;  // the row with its -inf border (and slack)
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(padded), -std::numeric_limits<float>::infinity());
    float* r = buf.data() + pw;  // input column i at r[i]; r[-pw, 0) and r[Wd, ...) stay -inf
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* in = src + plane * H * Wd;
      float* o = dst + plane * out_h * out_w;
      for (int64_t y = 0; y < out_h; ++y, o += out_w) {
        const int64_t y0 = std::max<int64_t>(0, y * sh - ph), y1 = std::min(H, y * sh - ph + kh);
        std::memcpy(r, in + y0 * Wd, static_cast<size_t>(Wd) * sizeof(float));  // (y0 < y1: padding <= kh / 2)
        for (int64_t iy = y0 + 1; iy < y1; ++iy) {
          const float* line = in + iy * Wd;
          for (int64_t i = 0; i < Wd; ++i) r[i] = nan_max(r[i], line[i]);
        }
        const float* rp = r - pw;  // window ox starts at rp[ox * sw] (reads below padded: the slack)
        SWP_RANGE(rp + (out_w - 1) * sw, kw, buf.data(), padded);
        int64_t ox0 = 0;
#if defined(SWP_SIMD)
        if (sw == 2)  // W outputs at a time: tap j of each is the even float of the 2W from rp + 2 * ox + j
          for (; ox0 + W <= out_w && 2 * ox0 + kw - 1 + 2 * W <= padded; ox0 += W) {
            SWP_RANGE(rp + 2 * ox0, kw - 1 + 2 * W, buf.data(), padded);
            Vf m = even_floats(rp + 2 * ox0);
            for (int64_t j = 1; j < kw; ++j) m = nan_max(m, even_floats(rp + 2 * ox0 + j));
            vstore(o + ox0, m);
          }
#endif
        for (int64_t ox = ox0; ox < out_w; ++ox) o[ox] = rp[ox * sw];
        for (int64_t j = 1; j < kw; ++j)
          for (int64_t ox = ox0; ox < out_w; ++ox) o[ox] = nan_max(o[ox], rp[ox * sw + j]);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------- stamps
// The stamps (version counter, storage address) of a fixed list of tensors, taken when made: current() tells
// whether none of them was written in place or given new data since. One call for a whole net's kernel layers:
// reading ResNet56's 114 weights' and biases' stamps from Python took about 70 us right after a call of the net
// (their objects out of the caches), 13 us back to back. Holds references to the tensors (as the twin does).
class Stamps final : public torch::CustomClassHolder {
 public:
  explicit Stamps(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    stamps_.reserve(tensors_.size());
    for (const at::Tensor& t : tensors_) stamps_.push_back(stamp(t));
  }
  bool current() const {
    for (size_t i = 0; i < tensors_.size(); ++i)
      if (stamp(tensors_[i]) != stamps_[i]) return false;
    return true;
  }
  bool requires_grad() const {
    return std::any_of(tensors_.begin(), tensors_.end(),
                       [](const at::Tensor& t) { return t.defined() && t.requires_grad(); });
  }

 private:
  static std::pair<int64_t, const void*> stamp(const at::Tensor& t) {
    if (!t.defined()) return {-1, nullptr};
    return {static_cast<int64_t>(t._version()), t.has_storage() ? t.const_data_ptr() : nullptr};
  }
  std::vector<at::Tensor> tensors_;
  std::vector<std::pair<int64_t, const void*>> stamps_;
};

}  // namespace

TORCH_LIBRARY(swp_stripe, m) {
  m.def("forward(Tensor x, Tensor packed, Tensor panels, Tensor phases, Tensor? bias, Tensor? residual, "
        "int out_channels, int out_h, int out_w, int sh, int sw, int tile_pixels, int act) -> Tensor");
  m.def("max_pool2d(Tensor x, int kh, int kw, int sh, int sw, int ph, int pw) -> Tensor");
  // the block cache: set the most bytes of free blocks it keeps (returns the previous limit); bytes it keeps now
  m.def("set_cache_limit(int nbytes) -> int", [](int64_t nbytes) {
    TORCH_CHECK(nbytes >= 0, "swp_stripe.set_cache_limit: nbytes must be >= 0, got ", nbytes);
    return BlockCache::get().set_limit(nbytes);
  });
  m.def("cached_bytes() -> int", []() { return BlockCache::get().cached(); });
  m.class_<Stamps>("Stamps")
      .def(torch::init<std::vector<at::Tensor>>())
      .def("current", &Stamps::current)
      .def("requires_grad", &Stamps::requires_grad);
}

TORCH_LIBRARY_IMPL(swp_stripe, CPU, m) {
  m.impl("forward", &stripe_conv_forward);
  m.impl("max_pool2d", &max_pool_forward);
}
