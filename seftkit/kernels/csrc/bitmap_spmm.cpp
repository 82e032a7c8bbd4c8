// Sparse weight x dense activation products for decode-size batches on CPU.
//
// Weight format ("bitmap"): for every output row, one keep-bit per input column (uint32 words, bit j of word w
// is column 32*w + j) and the kept values packed in column order. Row r's values start at row_ptr[r]. N:M
// weights use the same layout: for 2:4 the 4-bit group mask *is* the in-group position code (1 bit/weight),
// so one kernel serves both. Bytes per weight = (1 - sparsity) * sizeof(value) + 1/8.
//
// The products are memory bound at batch 1, so the kernels expand the packed values back into dense vector
// registers (AVX-512 VBMI2 vpexpand, or a table-driven shuffle on AVX2) and multiply with the dense activation
// block: the work per weight is constant and there are no gathers. Activations are padded with zeros to a
// whole number of 32-column words, so the padded tail needs no special case (its keep-bits are zero).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <climits>
#include <cstring>

namespace {

// Instruction-set levels, best last. The Python side may cap the level (tests, fallbacks).
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

constexpr int64_t kWordBits = 32;
constexpr int64_t kBatchTile = 4;  // activation rows that share one decoded weight row (registers)
constexpr int64_t kRowBlock = 32;  // output rows per block, re-read from L1/L2 across batch tiles

int64_t cpu_isa() {
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vbmi2");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return kAvx512Bf16;
  if (avx512) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
  return kPortable;
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline float load_value(const float* p) { return *p; }
inline float load_value(const uint16_t* p) { return bf16_to_float(*p); }

// One output row for `B` activation rows: y[b] = sum_c w[c] * x[b][c].
struct RowArgs {
  const uint32_t* bits;  // this row's keep-bits
  int64_t words;
  const void* values;    // this row's first kept value
  const void* x;         // activation row 0 (fp32, or bf16 for kAvx512Bf16), stride x_stride elements
  int64_t x_stride;
  float* y;              // output row 0 at this column, stride y_stride
  int64_t y_stride;
};

template <typename V, int B>
void row_portable(const RowArgs& a) {
  const V* v = static_cast<const V*>(a.values);
  const float* x = static_cast<const float*>(a.x);
  float acc[B] = {};
  for (int64_t w = 0; w < a.words; ++w) {
    for (uint32_t m = a.bits[w]; m; m &= m - 1) {
      int64_t col = w * kWordBits + __builtin_ctz(m);
      float value = load_value(v++);
      for (int b = 0; b < B; ++b) acc[b] += value * x[b * a.x_stride + col];
    }
  }
  for (int b = 0; b < B; ++b) a.y[b * a.y_stride] = acc[b];
}

// AVX2: each 8-column group of a keep-word is rebuilt as 8 fp32 weights with one table-driven shuffle, so a
// group costs a load, a shuffle and B FMAs whatever its density; the value offsets of a word's four groups
// come from popcounts of its prefixes, so the only serial chain is one add per word. At batch 1 the four
// groups also feed four accumulators, or the FMA latency (not memory) would set the speed.
struct ExpandTables {
  // bf16: byte shuffle of 8 packed bf16 values (both 128-bit halves hold them) into the high halves of 8 fp32
  // lanes; 0x80 zeroes a byte, so cleared lanes come out as 0.0f and the widening is free.
  alignas(32) std::array<std::array<uint8_t, 32>, 256> bf16{};
  // fp32: lane permutation of 8 packed values; cleared lanes get the sign bit, which selects zero in a blend.
  alignas(32) std::array<std::array<int32_t, 8>, 256> f32{};
  ExpandTables() {
    for (int mask = 0; mask < 256; ++mask) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane) {
        const bool kept = mask >> lane & 1;
        const uint8_t lo = kept ? static_cast<uint8_t>(2 * next) : 0x80, hi = kept ? static_cast<uint8_t>(2 * next + 1) : 0x80;
        bf16[mask][4 * lane] = bf16[mask][4 * lane + 1] = 0x80;
        bf16[mask][4 * lane + 2] = lo;
        bf16[mask][4 * lane + 3] = hi;
        f32[mask][lane] = kept ? next : INT32_MIN;
        next += kept;
      }
    }
  }
};
const ExpandTables kExpand;

#define SEFTKIT_AVX2 "avx2,fma,popcnt"
constexpr int64_t kPrefetchBytes = 1024;

// Both read 8 values even when fewer are kept: packed values end with padding (formats.VALUE_PAD).
__attribute__((target(SEFTKIT_AVX2), always_inline)) inline __m256 expand8(uint32_t mask, const uint16_t* v) {
  __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  __m256i control = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.bf16[mask].data()));
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(packed, control));
}
__attribute__((target(SEFTKIT_AVX2), always_inline)) inline __m256 expand8(uint32_t mask, const float* v) {
  __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.f32[mask].data()));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(v), perm), _mm256_setzero_ps(),
                          _mm256_castsi256_ps(perm));
}

template <typename V, int B>
__attribute__((target(SEFTKIT_AVX2), always_inline)) inline void avx2_group(uint32_t mask, const V* v, const float* xc,
                                                                           int64_t x_stride, __m256* acc) {
  __m256 dense = expand8(mask, v);
  for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(dense, _mm256_loadu_ps(xc + b * x_stride), acc[b]);
}

template <typename V, int B>
__attribute__((target(SEFTKIT_AVX2))) void row_avx2(const RowArgs& a) {
  // P accumulator sets: 4 at batch 1-2 (one per group), 2 above (16 ymm registers hold no more).
  constexpr int P = B <= 2 ? 4 : 2;
  const V* v = static_cast<const V*>(a.values);
  const float* x = static_cast<const float*>(a.x);
  __m256 acc[P][B];
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < B; ++b) acc[p][b] = _mm256_setzero_ps();
  for (int64_t w = 0; w < a.words; ++w) {
    const uint32_t word = a.bits[w];
    const float* xc = x + w * kWordBits;
    // The value stream is the one that misses cache; a word consumes a third of a line at 70% bf16, so one
    // prefetch per word, well ahead, keeps it in flight without a branch.
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    const V* v1 = v + __builtin_popcount(word & 0xFFu);
    const V* v2 = v + __builtin_popcount(word & 0xFFFFu);
    const V* v3 = v + __builtin_popcount(word & 0xFFFFFFu);
    avx2_group<V, B>(word & 0xFF, v, xc, a.x_stride, acc[0]);
    avx2_group<V, B>(word >> 8 & 0xFF, v1, xc + 8, a.x_stride, acc[1 % P]);
    avx2_group<V, B>(word >> 16 & 0xFF, v2, xc + 16, a.x_stride, acc[2 % P]);
    avx2_group<V, B>(word >> 24, v3, xc + 24, a.x_stride, acc[3 % P]);
    v += __builtin_popcount(word);
  }
  for (int b = 0; b < B; ++b) {
    __m256 sum = acc[0][b];
    for (int p = 1; p < P; ++p) sum = _mm256_add_ps(sum, acc[p][b]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    a.y[b * a.y_stride] = _mm_cvtss_f32(s);
  }
}

#define SEFTKIT_AVX512 "avx512f,avx512bw,avx512vbmi2,fma,popcnt"

template <int B>
__attribute__((target(SEFTKIT_AVX512), always_inline)) inline const float* f32_word(
    uint32_t word, const float* v, const float* xc, int64_t x_stride, __m512* acc) {
  __mmask16 lo = static_cast<__mmask16>(word), hi = static_cast<__mmask16>(word >> 16);
  __m512 v0 = _mm512_maskz_expandloadu_ps(lo, v);
  v += __builtin_popcount(lo);
  __m512 v1 = _mm512_maskz_expandloadu_ps(hi, v);
  for (int b = 0; b < B; ++b) {
    acc[b] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xc + b * x_stride), acc[b]);
    acc[b] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xc + b * x_stride + 16), acc[b]);
  }
  return v + __builtin_popcount(hi);
}

// Even and odd words accumulate separately: at batch 1 a single accumulator would serialise every FMA
// on its latency, and the row would run slower than memory delivers it. The value stream is prefetched as on
// AVX2, once per two words. (Same in the kernels below.)
template <int B>
__attribute__((target(SEFTKIT_AVX512))) void row_avx512_f32(const RowArgs& a) {
  const float* v = static_cast<const float*>(a.values);
  const float* x = static_cast<const float*>(a.x);
  __m512 even[B], odd[B];
  for (int b = 0; b < B; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 1 < a.words; w += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    v = f32_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
    v = f32_word<B>(a.bits[w + 1], v, x + (w + 1) * kWordBits, a.x_stride, odd);
  }
  if (w < a.words) f32_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
  for (int b = 0; b < B; ++b) a.y[b * a.y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(even[b], odd[b]));
}

// bf16 weights, fp32 activations: expand 32 bf16 values, widen to two fp32 vectors, FMA.
template <int B>
__attribute__((target(SEFTKIT_AVX512), always_inline)) inline const uint16_t* bf16_word(
    uint32_t word, const uint16_t* v, const float* xc, int64_t x_stride, __m512* acc) {
  __m512i packed = _mm512_maskz_expandloadu_epi16(word, v);
  __m512 v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(packed)), 16));
  __m512 v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(packed, 1)), 16));
  for (int b = 0; b < B; ++b) {
    acc[b] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(xc + b * x_stride), acc[b]);
    acc[b] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(xc + b * x_stride + 16), acc[b]);
  }
  return v + __builtin_popcount(word);
}

template <int B>
__attribute__((target(SEFTKIT_AVX512))) void row_avx512_bf16(const RowArgs& a) {
  const uint16_t* v = static_cast<const uint16_t*>(a.values);
  const float* x = static_cast<const float*>(a.x);
  __m512 even[B], odd[B];
  for (int b = 0; b < B; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 1 < a.words; w += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    v = bf16_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
    v = bf16_word<B>(a.bits[w + 1], v, x + (w + 1) * kWordBits, a.x_stride, odd);
  }
  if (w < a.words) bf16_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
  for (int b = 0; b < B; ++b) a.y[b * a.y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(even[b], odd[b]));
}

// bf16 weights and bf16 activations: one vdpbf16ps does 32 multiply-adds (exact bf16 products, fp32 sums).
template <int B>
__attribute__((target(SEFTKIT_AVX512 ",avx512bf16"), always_inline)) inline const uint16_t* dpbf16_word(
    uint32_t word, const uint16_t* v, const uint16_t* xc, int64_t x_stride, __m512* acc) {
  __m512i packed = _mm512_maskz_expandloadu_epi16(word, v);
  for (int b = 0; b < B; ++b) {
    __m512i xb = _mm512_loadu_si512(xc + b * x_stride);
    acc[b] = _mm512_dpbf16_ps(acc[b], reinterpret_cast<__m512bh&>(packed), reinterpret_cast<__m512bh&>(xb));
  }
  return v + __builtin_popcount(word);
}

template <int B>
__attribute__((target(SEFTKIT_AVX512 ",avx512bf16"))) void row_avx512_dpbf16(const RowArgs& a) {
  const uint16_t* v = static_cast<const uint16_t*>(a.values);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  __m512 even[B], odd[B];
  for (int b = 0; b < B; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  int64_t w = 0;
  for (; w + 1 < a.words; w += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    v = dpbf16_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
    v = dpbf16_word<B>(a.bits[w + 1], v, x + (w + 1) * kWordBits, a.x_stride, odd);
  }
  if (w < a.words) dpbf16_word<B>(a.bits[w], v, x + w * kWordBits, a.x_stride, even);
  for (int b = 0; b < B; ++b) a.y[b * a.y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(even[b], odd[b]));
}

using RowFn = void (*)(const RowArgs&);

template <int B>
RowFn pick_row(int64_t isa, bool bf16) {
  switch (isa) {
    case kAvx512Bf16: return bf16 ? row_avx512_dpbf16<B> : row_avx512_f32<B>;
    case kAvx512: return bf16 ? row_avx512_bf16<B> : row_avx512_f32<B>;
    case kAvx2: return bf16 ? row_avx2<uint16_t, B> : row_avx2<float, B>;
    default: return bf16 ? row_portable<uint16_t, B> : row_portable<float, B>;
  }
}

RowFn pick(int64_t isa, bool bf16, int64_t batch) {
  switch (batch) {
    case 1: return pick_row<1>(isa, bf16);
    case 2: return pick_row<2>(isa, bf16);
    case 3: return pick_row<3>(isa, bf16);
    default: return pick_row<4>(isa, bf16);
  }
}

// The activations as the kernels read them: fp32 (bf16 for the bf16 dot product), rows padded with zeros to
// whole keep-words. Used in place when x already is that; otherwise converted and padded in one pass, since at
// decode sizes separate aten copies cost as much as a small layer's product.
torch::Tensor kernel_input(const torch::Tensor& x, bool bf16_x, int64_t padded) {
  const auto want = bf16_x ? at::kBFloat16 : at::kFloat;
  if (x.scalar_type() == want && x.size(1) == padded && x.is_contiguous()) return x;
  const auto src = (x.scalar_type() == want || x.scalar_type() == at::kBFloat16 ? x : x.to(at::kFloat)).contiguous();
  auto xp = at::empty({x.size(0), padded}, x.options().dtype(want));
  const int64_t in = src.size(1);
  for (int64_t b = 0; b < src.size(0); ++b) {
    if (src.scalar_type() == want) {
      const int64_t size = src.element_size();
      char* dst = static_cast<char*>(xp.data_ptr()) + b * padded * size;
      std::memcpy(dst, static_cast<const char*>(src.data_ptr()) + b * in * size, in * size);
      std::memset(dst + in * size, 0, (padded - in) * size);
    } else {  // bf16 activations widened for the fp32 paths: exact
      const auto* row = reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>()) + b * in;
      float* dst = xp.data_ptr<float>() + b * padded;
      for (int64_t c = 0; c < in; ++c) dst[c] = bf16_to_float(row[c]);
      std::fill(dst + in, dst + padded, 0.0f);
    }
  }
  return xp;
}

// y[B, out] = x[B, in] @ W.T for a bitmap-packed W, in x's dtype; runs at min(isa, what this CPU supports).
torch::Tensor bitmap_matmul(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& bits,
                            const torch::Tensor& row_ptr, int64_t in_features, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be [batch, ", in_features, "]");
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && bits.device().is_cpu() && row_ptr.device().is_cpu(),
              "the bitmap kernels run on CPU tensors only");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "values must be float32 or bfloat16");
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.is_contiguous(), "bits must be int32 [out, words]");
  const int64_t out_features = bits.size(0), words = bits.size(1);
  TORCH_CHECK(words * kWordBits >= in_features && (words - 1) * kWordBits < in_features, "bits has the wrong width");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.numel() == out_features + 1, "row_ptr must be int64 [out+1]");
  const bool bf16 = values.scalar_type() == at::kBFloat16;
  isa = std::min(isa, cpu_isa());
  // The bf16 dot product needs bf16 activations; fp32 activations keep their precision on the FMA path.
  if (isa == kAvx512Bf16 && x.scalar_type() != at::kBFloat16) isa = kAvx512;
  const bool bf16_x = bf16 && isa == kAvx512Bf16;
  const int64_t batch = x.size(0), padded = words * kWordBits;
  const auto xp = kernel_input(x, bf16_x, padded);
  const bool bf16_y = x.scalar_type() == at::kBFloat16;
  auto y = torch::empty({batch, out_features}, x.options().dtype(bf16_y ? at::kBFloat16 : at::kFloat));
  const auto* bits_p = reinterpret_cast<const uint32_t*>(bits.data_ptr<int32_t>());
  const auto* ptr_p = row_ptr.data_ptr<int64_t>();
  const char* values_p = static_cast<const char*>(values.data_ptr());
  const char* x_p = static_cast<const char*>(xp.data_ptr());
  const int64_t value_size = values.element_size(), x_size = xp.element_size();
  char* y_p = static_cast<char*>(y.data_ptr());
  at::parallel_for(0, out_features, kRowBlock, [&](int64_t begin, int64_t end) {
    float block[kBatchTile][kRowBlock];  // one tile's fp32 sums, stored to y (rounded to bf16 there) at once
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      for (int64_t b0 = 0; b0 < batch; b0 += kBatchTile) {
        const int64_t tile = std::min(kBatchTile, batch - b0);
        RowFn fn = pick(isa, bf16, tile);
        for (int64_t r = r0; r < r1; ++r) {
          RowArgs args{bits_p + r * words, words, values_p + ptr_p[r] * value_size,
                       x_p + b0 * padded * x_size, padded, &block[0][r - r0], kRowBlock};
          fn(args);
        }
        for (int64_t b = 0; b < tile; ++b) {
          const int64_t offset = (b0 + b) * out_features + r0;
          if (bf16_y) {
            auto* out = reinterpret_cast<at::BFloat16*>(y_p) + offset;
            for (int64_t i = 0; i < r1 - r0; ++i) out[i] = at::BFloat16(block[b][i]);
          } else {
            std::memcpy(reinterpret_cast<float*>(y_p) + offset, block[b], (r1 - r0) * sizeof(float));
          }
        }
      }
    }
  });
  return x.scalar_type() == at::kFloat || bf16_y ? y : y.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", &cpu_isa, "Best kernel level this CPU supports: 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 BF16");
  m.def("bitmap_matmul", &bitmap_matmul, "x @ W.T for a bitmap-packed sparse W",
        py::arg("x"), py::arg("values"), py::arg("bits"), py::arg("row_ptr"), py::arg("in_features"),
        py::arg("isa"));
}
