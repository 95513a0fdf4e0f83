// bouncer._hotpath: the per-frame kernels of the guard, fused and GIL-free.
//
// Each function matches its numpy reference in bouncer/runtime/kernels/reference.py (the
// specification): same arguments, same results within the tolerances tests/test_kernels.py states,
// same TypeError/ValueError for wrong dtypes, shapes or contiguity. Inputs are read in place (zero
// copy); outputs are new arrays unless an `out` buffer is given.
//
// Portability: plain C++17. Loops are written for the compiler's auto-vectoriser (`omp simd`
// reductions, no -ffast-math so NaN/inf keep their meaning); on x86-64 the dot products are also
// compiled for AVX2 and picked at run time (target_clones; a Haswell clone was slower: it gathers strided
// loads); the default clone runs on any x86-64. fp16 and int8 dot products and the halving's byte
// compaction use intrinsics behind CPU checks, the bilinear kernel's 4x4 transpose uses baseline SSE; on
// aarch64 the int8 dot product uses NEON intrinsics (in the baseline: no check). Each has a portable
// path (BOUNCER_PORTABLE builds only those; scripts/asan_kernels tests both builds on x86-64,
// scripts/arm64_check both aarch64 builds under QEMU). The bilinear kernel's pixel arithmetic uses GCC/Clang
// vector extensions, which map to SSE and NEON alike.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

// BOUNCER_PORTABLE compiles only the portable paths, so CI tests them on both architectures.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(BOUNCER_PORTABLE)
#include <immintrin.h>
#define BOUNCER_X86 1
#endif
// aarch64: NEON is in the baseline, so its paths need no CPU check (BOUNCER_PORTABLE still builds without them)
#if defined(__aarch64__) && !defined(BOUNCER_PORTABLE)
#include <arm_neon.h>
#define BOUNCER_NEON 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(BOUNCER_NO_CLONES)
#define BOUNCER_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BOUNCER_CLONES
#endif

namespace {

constexpr double kEps = 1e-6;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// ---- argument checks: the same messages as the reference --------------------------------------

std::string shape_str(const py::array &a) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        s += std::to_string(a.shape(i));
        s += (a.ndim() == 1 || i + 1 < a.ndim()) ? (i + 1 < a.ndim() ? ", " : ",") : "";
    }
    return s + ")";
}

template <typename T>
void need_dtype(const py::array &a, const char *name, const char *what) {
    if (!py::isinstance<py::array_t<T>>(a) || !a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + ": expected " + what + ", got " +
                             std::string(py::str(a.dtype())));
}

void need_contiguous(const py::array &a, const char *name) {
    if (!(a.flags() & py::array::c_style))
        throw py::value_error(std::string(name) + ": must be C-contiguous");
}

void need_rows(const py::array &a, const char *name, py::ssize_t dim = -1) {
    need_dtype<float>(a, name, "a float32 array");
    if (a.ndim() != 2)
        throw py::value_error(std::string(name) + ": expected 2 dimensions (rows x features), got shape " +
                              shape_str(a));
    if (dim >= 0 && a.shape(1) != dim)
        throw py::value_error(std::string(name) + ": rows have " + std::to_string(a.shape(1)) +
                              " features, expected " + std::to_string(dim));
    need_contiguous(a, name);
}

// ---- small numeric helpers ---------------------------------------------------------------------

// Unit vector of a row in `out`; false if the row holds NaN or inf.
bool l2n(const float *x, py::ssize_t d, float *out) {
    double ss = 0.0;
    bool finite = true;
    for (py::ssize_t i = 0; i < d; ++i) {
        const double v = x[i];
        finite &= std::isfinite(x[i]);
        ss += v * v;
    }
    if (!finite) return false;
    const float inv = static_cast<float>(1.0 / (std::sqrt(ss) + kEps));
#pragma omp simd
    for (py::ssize_t i = 0; i < d; ++i) out[i] = x[i] * inv;
    return true;
}

BOUNCER_CLONES float dot_f32(const float *a, const float *b, py::ssize_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (py::ssize_t i = 0; i < d; ++i) acc += a[i] * b[i];
    return acc;
}

// IEEE half -> float for finite values (banks are validated finite): shift exponent and mantissa into
// place and rescale by 2^112, which also handles subnormals. Branch-free, so the loop vectorises.
inline float half_to_float(uint16_t h) {
    uint32_t bits = static_cast<uint32_t>(h & 0x7fffu) << 13;
    float f;
    std::memcpy(&f, &bits, 4);
    f *= 5.192296858534828e+33f;  // 2^112
    uint32_t out;
    std::memcpy(&out, &f, 4);
    out |= static_cast<uint32_t>(h & 0x8000u) << 16;
    std::memcpy(&f, &out, 4);
    return f;
}

float dot_f16_portable(const uint16_t *a, const float *b, py::ssize_t d) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (py::ssize_t i = 0; i < d; ++i) acc += half_to_float(a[i]) * b[i];
    return acc;
}

// int8 x int8 -> int32 dot product (query quantised once per frame, bank rows as stored).
[[maybe_unused]] int32_t dot_q8_portable(const int8_t *a, const int8_t *b, py::ssize_t d) {
    int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (py::ssize_t i = 0; i < d; ++i) acc += int32_t(a[i]) * int32_t(b[i]);
    return acc;
}

#ifdef BOUNCER_X86
__attribute__((target("avx2"))) inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) float dot_f16_avx2(const uint16_t *a, const float *b, py::ssize_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    py::ssize_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i))),
                               _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i + 8))),
                               _mm256_loadu_ps(b + i + 8), acc1);
    }
    float acc = hsum256(_mm256_add_ps(acc0, acc1));
    for (; i < d; ++i) acc += half_to_float(a[i]) * b[i];
    return acc;
}

__attribute__((target("avx2"))) int32_t dot_q8_avx2(const int8_t *a, const int8_t *b, py::ssize_t d) {
    __m256i acc = _mm256_setzero_si256();
    py::ssize_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(a + i)));
        const __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b + i)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    int32_t total = _mm_cvtsi128_si32(s);
    for (; i < d; ++i) total += int32_t(a[i]) * int32_t(b[i]);
    return total;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif

#ifdef BOUNCER_NEON
// (An fp16 dot product with the hardware's FCVTL would take its inner loop from 19 instructions per 8 values to
// 9, but QEMU emulates FCVTL by a call, so only hardware can time it: until then aarch64 runs the portable
// loop, which GCC vectorises with NEON bit operations and ran 1.8x faster than FCVTL under QEMU.)

// int8 x int8 -> int32: widening multiplies (SMULL) into 16 bits (|a b| <= 128 * 128 = 16384 fits), pairwise
// add-accumulate (SADALP) into 32.
int32_t dot_q8_neon(const int8_t *a, const int8_t *b, py::ssize_t d) {
    int32x4_t acc = vdupq_n_s32(0);
    py::ssize_t i = 0;
    for (; i + 16 <= d; i += 16) {
        const int8x16_t va = vld1q_s8(a + i), vb = vld1q_s8(b + i);
        acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(va), vget_low_s8(vb)));
        acc = vpadalq_s16(acc, vmull_high_s8(va, vb));
    }
    int32_t total = vaddvq_s32(acc);
    for (; i < d; ++i) total += int32_t(a[i]) * int32_t(b[i]);
    return total;
}
#endif

inline float dot_f16(const uint16_t *a, const float *b, py::ssize_t d) {
#ifdef BOUNCER_X86
    if (kHasAvx2) return dot_f16_avx2(a, b, d);
#endif
    return dot_f16_portable(a, b, d);
}

inline int32_t dot_q8(const int8_t *a, const int8_t *b, py::ssize_t d) {
#ifdef BOUNCER_X86
    if (kHasAvx2) return dot_q8_avx2(a, b, d);
#endif
#ifdef BOUNCER_NEON
    return dot_q8_neon(a, b, d);
#else
    return dot_q8_portable(a, b, d);
#endif
}

// Symmetric int8 of a unit row, as reference.quantize_bank does for bank rows: returns the scale.
float quantize_row(const float *x, py::ssize_t d, int8_t *q) {
    float mx = 0.f;
    for (py::ssize_t i = 0; i < d; ++i) mx = std::max(mx, std::fabs(x[i]));
    const float scale = mx > 0.f ? mx / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (py::ssize_t i = 0; i < d; ++i)
        q[i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(x[i] * inv))));
    return scale;
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t h) { return half_to_float(h); }

// y[r] = sum_d x[d] * m[d, r] for a row-major D x R matrix (x^T M) of float32 or float16 (half the bytes
// to stream, which is what bounds this product).
template <typename T>
void vecmat_portable(const float *x, const T *m, py::ssize_t d, py::ssize_t r, float *y) {
    std::fill(y, y + r, 0.f);
    for (py::ssize_t i = 0; i < d; ++i) {
        const float xi = x[i];
        const T *row = m + i * r;
#pragma omp simd
        for (py::ssize_t j = 0; j < r; ++j) y[j] += xi * to_float(row[j]);
    }
}

#ifdef BOUNCER_X86
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
}

// 64 outputs at a time held in eight registers, so each matrix element is loaded once.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void vecmat_avx2(const float *x, const T *m, py::ssize_t d, py::ssize_t r,
                                                          float *y) {
    py::ssize_t j0 = 0;
    for (; j0 + 64 <= r; j0 += 64) {
        __m256 a[8];
        for (auto &v : a) v = _mm256_setzero_ps();
        for (py::ssize_t i = 0; i < d; ++i) {
            const __m256 xi = _mm256_set1_ps(x[i]);
            const T *row = m + i * r + j0;
            for (int k = 0; k < 8; ++k) a[k] = _mm256_fmadd_ps(xi, load8(row + 8 * k), a[k]);
        }
        for (int k = 0; k < 8; ++k) _mm256_storeu_ps(y + j0 + 8 * k, a[k]);
    }
    if (j0 < r) {  // the remaining columns
        std::vector<float> tail(r - j0);
        for (py::ssize_t i = 0; i < d; ++i)
            for (py::ssize_t j = j0; j < r; ++j) tail[j - j0] += x[i] * to_float(m[i * r + j]);
        std::copy(tail.begin(), tail.end(), y + j0);
    }
}
#endif

template <typename T>
inline void vecmat(const float *x, const T *m, py::ssize_t d, py::ssize_t r, float *y) {
#ifdef BOUNCER_X86
    if (kHasAvx2) return vecmat_avx2(x, m, d, r, y);
#endif
    vecmat_portable(x, m, d, r, y);
}

// ---- bilinear resize + normalise (reference.resize_normalize) ------------------------------------
//
// Pixel centres aligned as OpenCV's INTER_LINEAR. Per output row: the two source rows blended into one
// float row (vectorised), then per output pixel one 4-float load of each neighbour (B, G, R and the next
// B), one lerp over all three channels at once and the normalisation, stored to the three planes.

struct Taps {
    std::vector<int32_t> i0;  // left (top) neighbour; the right (bottom) one is i0 + 1
    std::vector<float> w;     // the weight of i0 + 1
};

// The source row buffer holds one extra pixel (a copy of the last), so i0 + 1 is always readable.
Taps make_taps(py::ssize_t src, py::ssize_t n) {
    Taps t{std::vector<int32_t>(n), std::vector<float>(n)};
    const double scale = static_cast<double>(src) / static_cast<double>(n);
    for (py::ssize_t o = 0; o < n; ++o) {
        const double s = std::max(0.0, (static_cast<double>(o) + 0.5) * scale - 0.5);
        const py::ssize_t i = static_cast<py::ssize_t>(s);  // floor: s >= 0
        const bool inside = i < src - 1;
        t.i0[o] = static_cast<int32_t>(inside ? i : src - 1);
        t.w[o] = inside ? static_cast<float>(s - static_cast<double>(i)) : 0.f;
    }
    return t;
}

BOUNCER_CLONES void lerp_rows(const uint8_t *a, const uint8_t *b, float w, py::ssize_t n, float *out) {
#pragma omp simd
    for (py::ssize_t j = 0; j < n; ++j) {
        const float fa = a[j];
        out[j] = fa + w * (static_cast<float>(b[j]) - fa);
    }
}

typedef float v4f __attribute__((vector_size(16)));

inline v4f load4(const float *p) {
    v4f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline v4f lerp_pixel(const float *row, const Taps &tx, py::ssize_t x, v4f mean, v4f inv_std) {
    const float *p = row + 3 * tx.i0[x];
    const v4f a = load4(p), b = load4(p + 3);
    return (a + tx.w[x] * (b - a) - mean) * inv_std;
}

// One output row: row holds (width + 1) pixels plus one float of slack, lanes 0..2 are B, G, R. Stores
// bound this loop (three planes), so on x86-64 four pixels are transposed into three 4-float stores.
inline void lerp_pixels(const float *row, const Taps &tx, py::ssize_t n, v4f mean, v4f inv_std, bool swap_rb,
                        float *p0, float *p1, float *p2) {
    float *lane0 = swap_rb ? p2 : p0, *lane2 = swap_rb ? p0 : p2;  // plane of input B, of input R
    py::ssize_t x = 0;
#ifdef BOUNCER_X86
    for (; x + 4 <= n; x += 4) {
        __m128 v0 = lerp_pixel(row, tx, x, mean, inv_std), v1 = lerp_pixel(row, tx, x + 1, mean, inv_std);
        __m128 v2 = lerp_pixel(row, tx, x + 2, mean, inv_std), v3 = lerp_pixel(row, tx, x + 3, mean, inv_std);
        _MM_TRANSPOSE4_PS(v0, v1, v2, v3);  // v0: four B values, v1: G, v2: R
        _mm_storeu_ps(lane0 + x, v0);
        _mm_storeu_ps(p1 + x, v1);
        _mm_storeu_ps(lane2 + x, v2);
    }
#endif
    for (; x < n; ++x) {
        const v4f v = lerp_pixel(row, tx, x, mean, inv_std);
        lane0[x] = v[0];
        p1[x] = v[1];
        lane2[x] = v[2];
    }
}

// ---- 2x2 box halving (reference.halve) ------------------------------------------------------------
//
// Interleaved BGR defeats the auto-vectoriser's pairing of neighbours (they sit 3 bytes apart), so the
// row is done in two steps: the rounded mean of the 2x2 box starting at *every* byte (plain, vectorised),
// then a compaction keeping the 3 bytes of every 6 that start a pixel pair (SSSE3 byte shuffles on x86-64,
// 8 pixels per step; a copy loop elsewhere).

BOUNCER_CLONES void box_means(const uint8_t *r0, const uint8_t *r1, py::ssize_t n, uint8_t *t) {
#pragma omp simd
    for (py::ssize_t j = 0; j < n; ++j)
        t[j] = static_cast<uint8_t>(uint16_t(uint16_t(r0[j]) + r1[j] + r0[j + 3] + r1[j + 3] + 2) >> 2);
}

void keep_pixel_pairs_portable(const uint8_t *t, py::ssize_t from, py::ssize_t ow, uint8_t *out) {
    for (py::ssize_t x = from; x < ow; ++x) std::memcpy(out + 3 * x, t + 6 * x, 3);
}

#ifdef BOUNCER_X86
// t must hold 6 * ow + 16 readable bytes.
__attribute__((target("ssse3"))) void keep_pixel_pairs_ssse3(const uint8_t *t, py::ssize_t ow, uint8_t *out) {
    // 48 bytes of t (three vectors) hold 8 pixel pairs; these masks gather their first pixels into 24 bytes
    const __m128i m0 = _mm_setr_epi8(0, 1, 2, 6, 7, 8, 12, 13, 14, -1, -1, -1, -1, -1, -1, -1);
    const __m128i m1 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 4, 8, 9, 10, 14);
    const __m128i m1h = _mm_setr_epi8(15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m128i m2 = _mm_setr_epi8(-1, 0, 4, 5, 6, 10, 11, 12, -1, -1, -1, -1, -1, -1, -1, -1);
    py::ssize_t x = 0;
    for (; x + 8 <= ow; x += 8) {
        const uint8_t *c = t + 6 * x;
        const __m128i c0 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(c));
        const __m128i c1 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(c + 16));
        const __m128i c2 = _mm_loadu_si128(reinterpret_cast<const __m128i *>(c + 32));
        const __m128i lo = _mm_or_si128(_mm_shuffle_epi8(c0, m0), _mm_shuffle_epi8(c1, m1));
        const __m128i hi = _mm_or_si128(_mm_shuffle_epi8(c1, m1h), _mm_shuffle_epi8(c2, m2));
        _mm_storeu_si128(reinterpret_cast<__m128i *>(out + 3 * x), lo);
        _mm_storel_epi64(reinterpret_cast<__m128i *>(out + 3 * x + 16), hi);
    }
    keep_pixel_pairs_portable(t, x, ow, out);
}

const bool kHasSsse3 = __builtin_cpu_supports("ssse3");
#endif

inline void keep_pixel_pairs(const uint8_t *t, py::ssize_t ow, uint8_t *out) {
#ifdef BOUNCER_X86
    if (kHasSsse3) return keep_pixel_pairs_ssse3(t, ow, out);
#endif
    keep_pixel_pairs_portable(t, 0, ow, out);
}

#define BOUNCER_INLINE inline __attribute__((always_inline))

BOUNCER_INLINE uint32_t row_absdiff(const uint8_t *a, const uint8_t *b, py::ssize_t n) {
    uint32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (py::ssize_t x = 0; x < n; ++x) acc += static_cast<uint32_t>(a[x] > b[x] ? a[x] - b[x] : b[x] - a[x]);
    return acc;
}

// 4-neighbour Laplacian of one interior row: sum and sum of squares (|l| <= 1020, so int32 per row).
BOUNCER_INLINE void row_laplacian(const uint8_t *up, const uint8_t *row, const uint8_t *down, py::ssize_t w,
                                  int64_t *sum, int64_t *sq) {
    int32_t ls = 0;
    uint32_t lq = 0;
#pragma omp simd reduction(+ : ls, lq)
    for (py::ssize_t x = 1; x < w - 1; ++x) {
        const int32_t l = int32_t(up[x]) + down[x] + row[x - 1] + row[x + 1] - 4 * int32_t(row[x]);
        ls += l;
        lq += static_cast<uint32_t>(l * l);
    }
    *sum += ls;
    *sq += lq;
}

struct FrameSums {
    uint64_t sum = 0, sq = 0, dark = 0, bright = 0, adiff = 0;
    int64_t lsum = 0, lsq = 0;
};

// Per-column running sums over each band of tile rows (a vectorised pass over whole rows, no reduction
// per row), reduced to tiles once per band: short per-tile reductions on every row cost more than the
// arithmetic. Column sums of squares fit 32 bits for bands of up to 66,000 rows.
BOUNCER_CLONES FrameSums frame_sums(const uint8_t *g, const uint8_t *p, py::ssize_t h, py::ssize_t w, int tiles,
                                    uint32_t dark, uint32_t bright, uint64_t *tsum, uint64_t *tsq) {
    FrameSums f;
    const py::ssize_t th = h / tiles, tw = w / tiles;
    std::vector<uint32_t> cols(4 * w);
    uint32_t *cs = cols.data(), *cq = cs + w, *cd = cq + w, *cb = cd + w;
    for (py::ssize_t ty = 0; ty < tiles; ++ty) {
        std::fill(cols.begin(), cols.end(), 0u);
        for (py::ssize_t y = ty * th; y < (ty + 1) * th; ++y) {
            const uint8_t *row = g + y * w;
#pragma omp simd
            for (py::ssize_t x = 0; x < w; ++x) {
                const uint32_t v = row[x];
                cs[x] += v;
                cq[x] += v * v;
                cd[x] += v <= dark;
                cb[x] += v >= bright;
            }
            if (p) f.adiff += row_absdiff(row, p + y * w, w);
            if (y >= 1 && y + 1 < h) row_laplacian(row - w, row, row + w, w, &f.lsum, &f.lsq);
        }
        for (py::ssize_t tx = 0; tx < tiles; ++tx) {
            uint64_t s = 0, q = 0;
            for (py::ssize_t x = tx * tw; x < (tx + 1) * tw; ++x) {
                s += cs[x];
                q += cq[x];
            }
            tsum[ty * tiles + tx] = s;
            tsq[ty * tiles + tx] = q;
            f.sum += s;
            f.sq += q;
        }
        for (py::ssize_t x = 0; x < w; ++x) {
            f.dark += cd[x];
            f.bright += cb[x];
        }
    }
    return f;
}

// Maximum of a channel; NaN if any element is NaN (as numpy's max).
BOUNCER_CLONES float channel_max(const float *p, py::ssize_t n) {
    float mx = -std::numeric_limits<float>::infinity();
    int32_t nans = 0;
#pragma omp simd reduction(max : mx) reduction(+ : nans)
    for (py::ssize_t j = 0; j < n; ++j) {
        nans += p[j] != p[j];
        mx = p[j] > mx ? p[j] : mx;
    }
    return nans ? kNaN : mx;
}

// ---- kernels -----------------------------------------------------------------------------------

// A BGR uint8 H x W x 3 image, C-contiguous, each side at least `least` pixels.
void need_bgr(const py::array &img, py::ssize_t least) {
    need_dtype<uint8_t>(img, "img", "uint8");
    if (img.ndim() != 3 || img.shape(2) != 3 || img.shape(0) < least || img.shape(1) < least)
        throw py::value_error("img: expected H x W x 3 with H, W >= " + std::to_string(least) + ", got shape " +
                              shape_str(img));
    need_contiguous(img, "img");
}

py::array resize_normalize(const py::array &img, std::vector<float> mean, std::vector<float> stdv, bool swap_rb,
                           py::array out, std::optional<std::vector<py::ssize_t>> rect) {
    need_bgr(img, 1);
    if (mean.size() != 3 || stdv.size() != 3) throw py::value_error("mean and std: three values each");
    if (!out.dtype().is(py::dtype::of<float>()) || out.ndim() != 3 || out.shape(0) != 3 ||
        !(out.flags() & py::array::c_style))
        throw py::value_error("out: expected a C-contiguous float32 array of shape (3, H, W)");
    if (!out.writeable()) throw py::value_error("out: array is read-only");
    const py::ssize_t oh = out.shape(1), ow = out.shape(2);
    const std::vector<py::ssize_t> r = rect ? *rect : std::vector<py::ssize_t>{0, 0, oh, ow};
    if (r.size() != 4 || r[0] < 0 || r[1] < 0 || r[2] < 1 || r[3] < 1 || r[0] + r[2] > oh || r[1] + r[3] > ow)
        throw py::value_error("rect: expected (top, left, height, width) inside the output " + shape_str(out));
    const uint8_t *src = static_cast<const uint8_t *>(img.data());
    float *o = static_cast<float *>(out.mutable_data());
    const py::ssize_t h = img.shape(0), w = img.shape(1), stride = w * 3, plane = oh * ow;
    // lanes are the input's B, G, R; mean and std are given in the model's channel order
    const int c0 = swap_rb ? 2 : 0, c2 = swap_rb ? 0 : 2;
    const v4f m = {mean[c0], mean[1], mean[c2], 0.f};
    const v4f is = {1.0f / stdv[c0], 1.0f / stdv[1], 1.0f / stdv[c2], 0.f};
    {
        py::gil_scoped_release release;
        const Taps ty = make_taps(h, r[2]), tx = make_taps(w, r[3]);
        std::vector<float> row(stride + 4);
        for (py::ssize_t y = 0; y < r[2]; ++y) {
            const uint8_t *a = src + ty.i0[y] * stride;
            lerp_rows(a, ty.w[y] != 0.f ? a + stride : a, ty.w[y], stride, row.data());
            std::copy(row.data() + stride - 3, row.data() + stride, row.data() + stride);  // the extra pixel
            float *p0 = o + (r[0] + y) * ow + r[1];
            lerp_pixels(row.data(), tx, r[3], m, is, swap_rb, p0, p0 + plane, p0 + 2 * plane);
        }
    }
    return out;
}

// Output row y of a halving (rows `stride` bytes apart); t: scratch of 6 * ow + 16 bytes.
void halve_row(const uint8_t *src, py::ssize_t stride, py::ssize_t y, py::ssize_t ow, uint8_t *t, uint8_t *out) {
    const uint8_t *r0 = src + 2 * y * stride;
    box_means(r0, r0 + stride, 6 * ow - 3, t);  // box starts up to the last pair's third byte
    keep_pixel_pairs(t, ow, out);
}

// OpenCV's 8-bit BGR2GRAY exactly: BT.601 weights in 15-bit fixed point, rounded.
BOUNCER_CLONES void luma_row(const uint8_t *bgr, py::ssize_t n, uint8_t *out) {
#pragma omp simd
    for (py::ssize_t x = 0; x < n; ++x)
        out[x] = static_cast<uint8_t>((uint32_t(bgr[3 * x]) * 3735u + uint32_t(bgr[3 * x + 1]) * 19235u +
                                       uint32_t(bgr[3 * x + 2]) * 9798u + 16384u) >>
                                      15);
}

py::array_t<uint8_t> halve(const py::array &img) {
    need_bgr(img, 2);
    const py::ssize_t oh = img.shape(0) / 2, ow = img.shape(1) / 2, stride = img.shape(1) * 3;
    py::array_t<uint8_t> result({oh, ow, py::ssize_t(3)});
    const uint8_t *src = static_cast<const uint8_t *>(img.data());
    uint8_t *o = result.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<uint8_t> t(6 * ow + 16, 0);
        for (py::ssize_t y = 0; y < oh; ++y) halve_row(src, stride, y, ow, t.data(), o + y * ow * 3);
    }
    return result;
}

// The halving and, from each pair of its rows while they are in L1, the grey image of it halved again:
// the model's input and the quality statistics' input in one pass over the frame.
py::tuple halve_with_grey(const py::array &img) {
    need_bgr(img, 4);
    const py::ssize_t oh = img.shape(0) / 2, ow = img.shape(1) / 2, stride = img.shape(1) * 3;
    const py::ssize_t gh = oh / 2, gw = ow / 2;
    py::array_t<uint8_t> half({oh, ow, py::ssize_t(3)}), grey({gh, gw});
    const uint8_t *src = static_cast<const uint8_t *>(img.data());
    uint8_t *o = half.mutable_data(), *g = grey.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<uint8_t> t(6 * ow + 16, 0), quarter(3 * gw + 16, 0);
        for (py::ssize_t y = 0; y < oh; ++y) {
            halve_row(src, stride, y, ow, t.data(), o + y * ow * 3);
            if (y % 2 == 1 && y / 2 < gh) {
                halve_row(o, ow * 3, y / 2, gw, t.data(), quarter.data());
                luma_row(quarter.data(), gw, g + (y / 2) * gw);
            }
        }
    }
    return py::make_tuple(half, grey);
}

py::array_t<double> quality_stats(const py::array &grey, std::optional<py::array> prev, int tiles, int dark,
                                  int bright) {
    need_dtype<uint8_t>(grey, "grey", "uint8");
    if (grey.ndim() != 2 || grey.shape(0) < 3 || grey.shape(1) < 3)
        throw py::value_error("grey: expected a 2-d image of at least 3 x 3, got shape " + shape_str(grey));
    need_contiguous(grey, "grey");
    const py::ssize_t h = grey.shape(0), w = grey.shape(1);
    if (tiles < 1 || h % tiles || w % tiles)
        throw py::value_error("tiles: " + std::to_string(tiles) + " does not divide the image " + std::to_string(h) +
                              " x " + std::to_string(w));
    const uint8_t *p = nullptr;
    if (prev) {
        if (!prev->dtype().is(py::dtype::of<uint8_t>()) || prev->ndim() != 2 || prev->shape(0) != h ||
            prev->shape(1) != w)
            throw py::value_error("prev: expected a uint8 image of the same shape as grey");
        need_contiguous(*prev, "prev");
        p = static_cast<const uint8_t *>(prev->data());
    }
    const uint8_t *g = static_cast<const uint8_t *>(grey.data());
    py::array_t<double> result(7);
    double *r = result.mutable_data();
    {
        py::gil_scoped_release release;
        const int nt = tiles * tiles;
        const py::ssize_t th = h / tiles, tw = w / tiles;
        std::vector<uint64_t> tsum(nt, 0), tsq(nt, 0);
        FrameSums f = frame_sums(g, p, h, w, tiles, static_cast<uint32_t>(dark), static_cast<uint32_t>(bright),
                                 tsum.data(), tsq.data());
        const uint64_t sum = f.sum, sq = f.sq, ndark = f.dark, nbright = f.bright, adiff = f.adiff;
        const int64_t lsum = f.lsum, lsq = f.lsq;
        const double n = static_cast<double>(h * w);
        const double mean = sum / n;
        r[0] = mean;
        r[1] = std::sqrt(std::max(0.0, static_cast<double>(sq) / n - mean * mean));
        r[2] = ndark / n;
        r[3] = nbright / n;
        const double ln = static_cast<double>((h - 2) * (w - 2));
        const double lmean = lsum / ln;
        r[4] = std::max(0.0, static_cast<double>(lsq) / ln - lmean * lmean);
        const double tn = static_cast<double>(th * tw);
        double tmin = std::numeric_limits<double>::infinity();
        for (int t = 0; t < nt; ++t) {
            const double m = tsum[t] / tn;
            tmin = std::min(tmin, std::sqrt(std::max(0.0, static_cast<double>(tsq[t]) / tn - m * m)));
        }
        r[5] = tmin;
        r[6] = p ? adiff / n : std::numeric_limits<double>::quiet_NaN();
    }
    return result;
}

py::array_t<float> linear_probs(const py::array &x, const py::array &weight, const py::array &bias, double temperature) {
    need_rows(weight, "weight");
    const py::ssize_t c = weight.shape(0), d = weight.shape(1);
    need_rows(x, "x", d);
    need_dtype<float>(bias, "bias", "a float32 array");
    if (bias.ndim() != 1 || bias.shape(0) != c)
        throw py::value_error("bias: expected shape (" + std::to_string(c) + ",), got " + shape_str(bias));
    need_contiguous(bias, "bias");
    if (!(temperature > 0)) throw py::value_error("temperature must be positive");
    const py::ssize_t m = x.shape(0);
    py::array_t<float> out({m, c});
    const float *xs = static_cast<const float *>(x.data());
    const float *ws = static_cast<const float *>(weight.data());
    const float *bs = static_cast<const float *>(bias.data());
    float *o = out.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<float> xn(d);
        std::vector<double> z(c);
        for (py::ssize_t i = 0; i < m; ++i) {
            float *oi = o + i * c;
            if (!l2n(xs + i * d, d, xn.data())) {
                std::fill(oi, oi + c, kNaN);
                continue;
            }
            double zmax = -std::numeric_limits<double>::infinity();
            for (py::ssize_t k = 0; k < c; ++k) {
                z[k] = (static_cast<double>(dot_f32(xn.data(), ws + k * d, d)) + bs[k]) / temperature;
                zmax = std::max(zmax, z[k]);
            }
            double total = 0.0;
            for (py::ssize_t k = 0; k < c; ++k) total += (z[k] = std::exp(z[k] - zmax));
            for (py::ssize_t k = 0; k < c; ++k) oi[k] = static_cast<float>(z[k] / total);
        }
    }
    return out;
}

py::array_t<float> mahalanobis(const py::array &x, const py::array &means, const py::array &basis,
                               const py::array &inv_evals, double inv_rest, const py::array &means_proj) {
    need_rows(means, "means");
    const py::ssize_t c = means.shape(0), d = means.shape(1);
    const bool basis_f16 = basis.dtype().kind() == 'f' && basis.dtype().itemsize() == 2;
    if (!basis_f16) need_dtype<float>(basis, "basis", "a float32 or float16 array");
    if (basis.ndim() != 2) throw py::value_error("basis: expected 2 dimensions, got shape " + shape_str(basis));
    need_contiguous(basis, "basis");
    need_rows(x, "x", d);
    const py::ssize_t r = basis.shape(1);
    need_dtype<float>(inv_evals, "inv_evals", "a float32 array");
    if (basis.shape(0) != d || inv_evals.ndim() != 1 || inv_evals.shape(0) != r)
        throw py::value_error("basis " + shape_str(basis) + " / inv_evals " + shape_str(inv_evals) +
                              " do not match means " + shape_str(means));
    need_contiguous(inv_evals, "inv_evals");
    need_rows(means_proj, "means_proj", r);
    if (means_proj.shape(0) != c) throw py::value_error("means_proj: expected one row per mean");
    const py::ssize_t m = x.shape(0);
    py::array_t<float> out({m, c});
    const float *xs = static_cast<const float *>(x.data());
    const float *ms = static_cast<const float *>(means.data());
    const void *bs = basis.data();
    const float *ie = static_cast<const float *>(inv_evals.data());
    const float *mp = static_cast<const float *>(means_proj.data());
    float *o = out.mutable_data();
    {
        py::gil_scoped_release release;
        std::vector<float> xn(d), proj(r);
        std::vector<double> msq(c);
        for (py::ssize_t k = 0; k < c; ++k) msq[k] = dot_f32(ms + k * d, ms + k * d, d);
        for (py::ssize_t i = 0; i < m; ++i) {
            float *oi = o + i * c;
            if (!l2n(xs + i * d, d, xn.data())) {
                std::fill(oi, oi + c, kNaN);
                continue;
            }
            if (basis_f16)
                vecmat(xn.data(), static_cast<const uint16_t *>(bs), d, r, proj.data());
            else
                vecmat(xn.data(), static_cast<const float *>(bs), d, r, proj.data());
            const double xsq = dot_f32(xn.data(), xn.data(), d);
            for (py::ssize_t k = 0; k < c; ++k) {
                const float *mk = mp + k * r;
                float in_basis = 0.f, psq = 0.f;
#pragma omp simd reduction(+ : in_basis, psq)
                for (py::ssize_t j = 0; j < r; ++j) {
                    const float dp = proj[j] - mk[j];
                    in_basis += dp * dp * ie[j];
                    psq += dp * dp;
                }
                const double sq = xsq - 2.0 * dot_f32(xn.data(), ms + k * d, d) + msq[k];
                oi[k] = static_cast<float>(in_basis + std::max(0.0, sq - psq) * inv_rest);
            }
        }
    }
    return out;
}

// Eight queries against one bank row at once: the row is loaded once for eight dot products instead of once each,
// which is what made many queries (a patch head's 784 per frame) slower than numpy's matrix product. Rows of x8
// are the eight queries, d apart. The portable path of `knn_many` (x86-64 with AVX2 and FMA uses block4x16).
BOUNCER_CLONES void dot8_f32(const float *row, const float *x8, py::ssize_t d, float *s) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
    const float *x0 = x8, *x1 = x8 + d, *x2 = x8 + 2 * d, *x3 = x8 + 3 * d;
    const float *x4 = x8 + 4 * d, *x5 = x8 + 5 * d, *x6 = x8 + 6 * d, *x7 = x8 + 7 * d;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (py::ssize_t t = 0; t < d; ++t) {
        const float b = row[t];
        a0 += b * x0[t];
        a1 += b * x1[t];
        a2 += b * x2[t];
        a3 += b * x3[t];
        a4 += b * x4[t];
        a5 += b * x5[t];
        a6 += b * x6[t];
        a7 += b * x7[t];
    }
    s[0] = a0, s[1] = a1, s[2] = a2, s[3] = a3, s[4] = a4, s[5] = a5, s[6] = a6, s[7] = a7;
}

BOUNCER_CLONES void widen_f16(const uint16_t *a, py::ssize_t d, float *out) {
#pragma omp simd
    for (py::ssize_t t = 0; t < d; ++t) out[t] = half_to_float(a[t]);
}

// the k largest similarities, kept sorted descending; top[k-1] is the k-th nearest
inline void keep_top(float *top, int k, float s) {
    if (s <= top[k - 1]) return;
    int pos = k - 1;
    while (pos > 0 && top[pos - 1] < s) {
        top[pos] = top[pos - 1];
        --pos;
    }
    top[pos] = s;
}

// A part's worth of multiply-adds below which another thread costs more than it saves (~1 ms of work: a
// second thread waits for a core the backbone's or BLAS's spinning threads may still hold)
constexpr py::ssize_t kThreadWork = 40000000;

// Many queries against a float bank, as a matrix product is done: a chunk of bank rows (widened once if float16)
// stays in cache while every query passes it, eight queries at a time. Writes 1 - the k-th similarity per query.
#if defined(BOUNCER_X86)
// Four queries against sixteen bank rows held transposed (cT: d x 16), in sixteen-lane FMA registers: the GEMM
// micro-kernel numpy's BLAS uses, without its horizontal sums per dot product. s: 4 x 16 similarities.
__attribute__((target("avx2,fma"))) void block4x16(const float *cT, const float *x, py::ssize_t d, float *s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, e0 = a0, e1 = a0;
    for (py::ssize_t t = 0; t < d; ++t) {
        const __m256 lo = _mm256_loadu_ps(cT + t * 16), hi = _mm256_loadu_ps(cT + t * 16 + 8);
        const __m256 x0 = _mm256_broadcast_ss(x + t), x1 = _mm256_broadcast_ss(x + d + t);
        const __m256 x2 = _mm256_broadcast_ss(x + 2 * d + t), x3 = _mm256_broadcast_ss(x + 3 * d + t);
        a0 = _mm256_fmadd_ps(x0, lo, a0), a1 = _mm256_fmadd_ps(x0, hi, a1);
        b0 = _mm256_fmadd_ps(x1, lo, b0), b1 = _mm256_fmadd_ps(x1, hi, b1);
        c0 = _mm256_fmadd_ps(x2, lo, c0), c1 = _mm256_fmadd_ps(x2, hi, c1);
        e0 = _mm256_fmadd_ps(x3, lo, e0), e1 = _mm256_fmadd_ps(x3, hi, e1);
    }
    _mm256_storeu_ps(s, a0), _mm256_storeu_ps(s + 8, a1), _mm256_storeu_ps(s + 16, b0), _mm256_storeu_ps(s + 24, b1);
    _mm256_storeu_ps(s + 32, c0), _mm256_storeu_ps(s + 40, c1), _mm256_storeu_ps(s + 48, e0);
    _mm256_storeu_ps(s + 56, e1);
}

bool has_fma() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
const bool kHasFma = has_fma();

// knn_many on AVX2+FMA: the bank in chunks of sixteen rows, widened and transposed once per chunk, every query
// passing each chunk four at a time. Rows past the bank's end are zero and never kept.
void knn_many_fma(const float *xn, py::ssize_t mq, const void *bd, bool is_f16, py::ssize_t n,
                  py::ssize_t d, int k, float *top) {
    std::vector<float> cT(d * 16), rowbuf(d);
    float sims[64];
    const py::ssize_t blocks = mq / 4 * 4;
    for (py::ssize_t j0 = 0; j0 < n; j0 += 16) {
        const py::ssize_t rows = std::min<py::ssize_t>(16, n - j0);
        std::fill(cT.begin(), cT.end(), 0.f);
        for (py::ssize_t r = 0; r < rows; ++r) {
            const float *row = static_cast<const float *>(bd) + (j0 + r) * d;
            if (is_f16) {
                widen_f16(static_cast<const uint16_t *>(bd) + (j0 + r) * d, d, rowbuf.data());
                row = rowbuf.data();
            }
            for (py::ssize_t t = 0; t < d; ++t) cT[t * 16 + r] = row[t];
        }
        for (py::ssize_t i0 = 0; i0 < blocks; i0 += 4) {
            block4x16(cT.data(), xn + i0 * d, d, sims);
            for (int q = 0; q < 4; ++q)
                for (py::ssize_t r = 0; r < rows; ++r) keep_top(top + (i0 + q) * k, k, sims[q * 16 + r]);
        }
        for (py::ssize_t i = blocks; i < mq; ++i)
            for (py::ssize_t r = 0; r < rows; ++r) {
                float dot = 0.f;
                for (py::ssize_t t = 0; t < d; ++t) dot += xn[i * d + t] * cT[t * 16 + r];
                keep_top(top + i * k, k, dot);
            }
    }
}
#endif

void knn_many(const float *xs, py::ssize_t m, const void *bd, bool is_f16, py::ssize_t n, py::ssize_t d, int k,
              float *o) {
    const float lowest = -std::numeric_limits<float>::infinity();
    constexpr py::ssize_t kChunk = 64, kQueries = 4096;  // bank rows per chunk; queries held at once
    std::vector<float> chunk(is_f16 ? kChunk * d : 0);
    for (py::ssize_t base = 0; base < m; base += kQueries) {
        const py::ssize_t mq = std::min(kQueries, m - base), blocks = mq / 8 * 8;
        const float *xb = xs + base * d;
        std::vector<float> xn(mq * d), top(mq * k, lowest);
        std::vector<char> valid(mq);
        for (py::ssize_t i = 0; i < mq; ++i) {
            valid[i] = l2n(xb + i * d, d, xn.data() + i * d);
            if (!valid[i]) std::fill(xn.begin() + i * d, xn.begin() + (i + 1) * d, 0.f);
        }
#if defined(BOUNCER_X86)
        if (kHasFma) {
            knn_many_fma(xn.data(), mq, bd, is_f16, n, d, k, top.data());
            for (py::ssize_t i = 0; i < mq; ++i) o[base + i] = valid[i] ? 1.0f - top[i * k + k - 1] : kNaN;
            continue;
        }
#endif
        float sims[8];
        for (py::ssize_t j0 = 0; j0 < n; j0 += kChunk) {
            const py::ssize_t rows = std::min(kChunk, n - j0);
            const float *c = is_f16 ? chunk.data() : static_cast<const float *>(bd) + j0 * d;
            if (is_f16)
                for (py::ssize_t r = 0; r < rows; ++r)
                    widen_f16(static_cast<const uint16_t *>(bd) + (j0 + r) * d, d, chunk.data() + r * d);
            for (py::ssize_t i0 = 0; i0 < blocks; i0 += 8)
                for (py::ssize_t r = 0; r < rows; ++r) {
                    dot8_f32(c + r * d, xn.data() + i0 * d, d, sims);
                    for (int q = 0; q < 8; ++q) keep_top(top.data() + (i0 + q) * k, k, sims[q]);
                }
            for (py::ssize_t i = blocks; i < mq; ++i)
                for (py::ssize_t r = 0; r < rows; ++r)
                    keep_top(top.data() + i * k, k, dot_f32(c + r * d, xn.data() + i * d, d));
        }
        for (py::ssize_t i = 0; i < mq; ++i) o[base + i] = valid[i] ? 1.0f - top[i * k + k - 1] : kNaN;
    }
}

py::array_t<float> knn_score(const py::array &x, const py::array &bank, int k, std::optional<py::array> bank_scale) {
    const bool is_f32 = bank.dtype().is(py::dtype::of<float>());
    const bool is_f16 = bank.dtype().kind() == 'f' && bank.dtype().itemsize() == 2;
    const bool is_i8 = bank.dtype().is(py::dtype::of<int8_t>());
    if (!(is_f32 || is_f16 || is_i8) || bank.ndim() != 2)
        throw py::type_error("bank: expected a 2-d float32, float16 or int8 array, got " +
                             std::string(py::str(bank.dtype())) + " " + shape_str(bank));
    need_contiguous(bank, "bank");
    const py::ssize_t n = bank.shape(0), d = bank.shape(1);
    need_rows(x, "x", d);
    if (k < 1 || k > n) throw py::value_error("k: " + std::to_string(k) + " outside 1.." + std::to_string(n));
    const float *scales = nullptr;
    if (is_i8) {
        if (!bank_scale || !bank_scale->dtype().is(py::dtype::of<float>()) || bank_scale->ndim() != 1 ||
            bank_scale->shape(0) != n)
            throw py::value_error("bank_scale: an int8 bank needs one float32 scale per row");
        need_contiguous(*bank_scale, "bank_scale");
        scales = static_cast<const float *>(bank_scale->data());
    }
    const py::ssize_t m = x.shape(0);
    py::array_t<float> out(m);
    const float *xs = static_cast<const float *>(x.data());
    const void *bd = bank.data();
    float *o = out.mutable_data();
    const float lowest = -std::numeric_limits<float>::infinity();
    {
        py::gil_scoped_release release;
        if (is_i8) {
            std::vector<float> xn(d), top(k);
            std::vector<int8_t> xq(d);
            for (py::ssize_t i = 0; i < m; ++i) {
                if (!l2n(xs + i * d, d, xn.data())) {
                    o[i] = kNaN;
                    continue;
                }
                const float xscale = quantize_row(xn.data(), d, xq.data());
                std::fill(top.begin(), top.end(), lowest);
                for (py::ssize_t j = 0; j < n; ++j)
                    keep_top(top.data(), k,
                             static_cast<float>(dot_q8(static_cast<const int8_t *>(bd) + j * d, xq.data(), d)) *
                                 (scales[j] * xscale));
                o[i] = 1.0f - top[k - 1];
            }
        } else if (m < 8) {  // a frame's pooled vector or a few: one dot product per bank row
            std::vector<float> xn(d), top(k);
            for (py::ssize_t i = 0; i < m; ++i) {
                if (!l2n(xs + i * d, d, xn.data())) {
                    o[i] = kNaN;
                    continue;
                }
                std::fill(top.begin(), top.end(), lowest);
                for (py::ssize_t j = 0; j < n; ++j)
                    keep_top(top.data(), k, is_f32 ? dot_f32(static_cast<const float *>(bd) + j * d, xn.data(), d)
                                                   : dot_f16(static_cast<const uint16_t *>(bd) + j * d, xn.data(), d));
                o[i] = 1.0f - top[k - 1];
            }
        } else {
            // many queries (a patch head's hundreds per frame): split over the cores (the backbone is idle while
            // the heads score, and numpy's matrix product uses every core too), each part as `knn_many` does it
            const py::ssize_t parts = std::max<py::ssize_t>(
                1, std::min<py::ssize_t>({static_cast<py::ssize_t>(std::thread::hardware_concurrency()), 4,
                                          m * n * d / kThreadWork}));
            const py::ssize_t per = (m + parts - 1) / parts;
            std::vector<std::thread> threads;
            for (py::ssize_t p = 1; p < parts; ++p) {
                const py::ssize_t lo = std::min(m, p * per), hi = std::min(m, lo + per);
                if (lo < hi) threads.emplace_back(knn_many, xs + lo * d, hi - lo, bd, is_f16, n, d, k, o + lo);
            }
            knn_many(xs, std::min(m, per), bd, is_f16, n, d, k, o);
            for (auto &t : threads) t.join();
        }
    }
    return out;
}

py::array_t<float> spatial_max(const py::array &fmap) {
    need_dtype<float>(fmap, "fmap", "float32");
    if (fmap.ndim() != 4 || fmap.shape(2) * fmap.shape(3) == 0)
        throw py::value_error("fmap: expected a non-empty N x C x H x W map, got shape " + shape_str(fmap));
    need_contiguous(fmap, "fmap");
    const py::ssize_t n = fmap.shape(0), c = fmap.shape(1), hw = fmap.shape(2) * fmap.shape(3);
    py::array_t<float> out({n, c});
    const float *f = static_cast<const float *>(fmap.data());
    float *o = out.mutable_data();
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < n * c; ++i) o[i] = channel_max(f + i * hw, hw);
    }
    return out;
}

py::array_t<float> fuse(const py::array &scores, const py::array &knots_x, const py::array &knots_y,
                        const py::array &slope_lo, const py::array &slope_hi, int combine) {
    need_rows(scores, "scores");
    const py::ssize_t m = scores.shape(0), h = scores.shape(1);
    const std::string hs = std::to_string(h);
    if (!knots_x.dtype().is(py::dtype::of<double>()) || knots_x.ndim() != 2 || knots_x.shape(0) != h ||
        knots_x.shape(1) < 2)
        throw py::value_error("knots_x: expected float64 shape (" + hs + ", K >= 2)");
    const py::ssize_t k = knots_x.shape(1);
    if (!knots_y.dtype().is(py::dtype::of<double>()) || knots_y.ndim() != 2 || knots_y.shape(0) != h ||
        knots_y.shape(1) != k)
        throw py::value_error("knots_y: expected float64 shape " + shape_str(knots_x));
    for (const auto *a : {&slope_lo, &slope_hi}) {
        if (!a->dtype().is(py::dtype::of<double>()) || a->ndim() != 1 || a->shape(0) != h)
            throw py::value_error("slope_lo/slope_hi: expected float64 shape (" + hs + ",)");
    }
    need_contiguous(knots_x, "knots_x");
    need_contiguous(knots_y, "knots_y");
    need_contiguous(slope_lo, "slope_lo");
    need_contiguous(slope_hi, "slope_hi");
    if (combine < 0 || combine > 2)
        throw py::value_error("combine: expected 0 (mean), 1 (max) or 2 (sum), got " + std::to_string(combine));
    py::array_t<float> out(m);
    const float *s = static_cast<const float *>(scores.data());
    const double *kx = static_cast<const double *>(knots_x.data());
    const double *ky = static_cast<const double *>(knots_y.data());
    const double *lo = static_cast<const double *>(slope_lo.data());
    const double *hi = static_cast<const double *>(slope_hi.data());
    float *o = out.mutable_data();
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < m; ++i) {
            double acc = combine == 1 ? -std::numeric_limits<double>::infinity() : 0.0;
            bool nan = false;
            for (py::ssize_t j = 0; j < h; ++j) {
                const double v = s[i * h + j];
                const double *x = kx + j * k, *y = ky + j * k;
                double u;
                if (std::isnan(v)) {
                    nan = true;
                    continue;
                } else if (v < x[0]) {
                    u = y[0] + lo[j] * (v - x[0]);
                } else if (v > x[k - 1]) {
                    u = y[k - 1] + hi[j] * (v - x[k - 1]);
                } else {
                    // the last knot <= v (as numpy's interp: at a knot, its own value)
                    const py::ssize_t r = std::upper_bound(x, x + k, v) - x;  // 1..k
                    if (r >= k) {
                        u = y[k - 1];
                    } else {
                        const double t = (v - x[r - 1]) / (x[r] - x[r - 1]);
                        u = y[r - 1] + t * (y[r] - y[r - 1]);
                    }
                }
                acc = combine == 1 ? std::max(acc, u) : acc + u;
            }
            if (nan || h == 0)
                o[i] = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
            else
                o[i] = static_cast<float>(combine == 0 ? acc / h : acc);
        }
    }
    return out;
}

// ---- detectors: decoding a raw YOLO-family output and class-aware NMS ---------------------------

py::tuple decode_boxes(const py::array &raw, int layout, int n_classes, double min_score, int max_candidates) {
    need_dtype<float>(raw, "raw", "a float32 array");
    if (raw.ndim() != 2) throw py::value_error("raw: expected 2 dimensions, got shape " + shape_str(raw));
    need_contiguous(raw, "raw");
    if (layout != 0 && layout != 1)
        throw py::value_error("layout: expected 0 (ultralytics) or 1 (yolox), got " + std::to_string(layout));
    if (n_classes < 1) throw py::value_error("n_classes: at least 1, got " + std::to_string(n_classes));
    if (max_candidates < 1)
        throw py::value_error("max_candidates: at least 1, got " + std::to_string(max_candidates));
    const py::ssize_t width = 4 + n_classes + layout;
    if ((layout == 0 ? raw.shape(0) : raw.shape(1)) != width)
        throw py::value_error(std::string("raw: layout ") + (layout == 0 ? "ultralytics" : "yolox") + " with " +
                              std::to_string(n_classes) + " classes needs " + std::to_string(width) +
                              " values per candidate, got shape " + shape_str(raw));
    const py::ssize_t n = layout == 0 ? raw.shape(1) : raw.shape(0);
    const float *r = static_cast<const float *>(raw.data());
    const float floor = static_cast<float>(min_score);
    // value v of candidate i: (4 + C) x N rows (ultralytics) or N x (5 + C) columns (YOLOX)
    auto at = [&](py::ssize_t i, py::ssize_t v) { return layout == 0 ? r[v * n + i] : r[i * width + v]; };
    auto score = [&](py::ssize_t i, py::ssize_t c) {
        return layout == 0 ? r[(4 + c) * n + i] : r[i * width + 5 + c] * r[i * width + 4];
    };
    // `poison` sums value * 0 over a candidate's values: 0 while all are finite, NaN once one is NaN or inf. Unlike
    // std::isfinite in the loop, that vectorises: one pass over the (4 + C) x N output at memory speed.
    std::vector<float> best(n, -std::numeric_limits<float>::infinity()), poison(n, 0.f);
    std::vector<py::ssize_t> keep;
    int bad = 0;
    {
        py::gil_scoped_release release;
        float *bp = best.data(), *pp = poison.data();
        if (layout == 0) {  // row by row: each row is contiguous over the candidates
            for (py::ssize_t v = 0; v < width; ++v) {
                const float *row = r + v * n;
                if (v < 4) {
#pragma omp simd
                    for (py::ssize_t i = 0; i < n; ++i) pp[i] += row[i] * 0.f;
                } else {
#pragma omp simd
                    for (py::ssize_t i = 0; i < n; ++i) {
                        pp[i] += row[i] * 0.f;
                        bp[i] = bp[i] < row[i] ? row[i] : bp[i];
                    }
                }
            }
        } else {
            for (py::ssize_t i = 0; i < n; ++i) {
                for (py::ssize_t v = 0; v < width; ++v) pp[i] += r[i * width + v] * 0.f;
                for (py::ssize_t c = 0; c < n_classes; ++c) {
                    const float sc = score(i, c);
                    bp[i] = bp[i] < sc ? sc : bp[i];
                }
            }
        }
        for (py::ssize_t i = 0; i < n; ++i) {
            if (!(pp[i] == 0.f)) {
                ++bad;
            } else if (best[i] >= floor) {
                keep.push_back(i);
            }
        }
        // best first, ties by index (numpy's stable argsort): a strict order, so a partial sort of the first
        // max_candidates gives the same as sorting all
        auto before = [&](py::ssize_t a, py::ssize_t b) { return best[a] > best[b] || (best[a] == best[b] && a < b); };
        const auto take = std::min<std::size_t>(keep.size(), static_cast<std::size_t>(max_candidates));
        std::partial_sort(keep.begin(), keep.begin() + take, keep.end(), before);
        keep.resize(take);
    }
    const py::ssize_t m = static_cast<py::ssize_t>(keep.size());
    py::array_t<float> boxes({m, py::ssize_t(4)});
    py::array_t<float> scores({m, py::ssize_t(n_classes)});
    float *b = boxes.mutable_data();
    float *s = scores.mutable_data();
    {
        py::gil_scoped_release release;
        for (py::ssize_t k = 0; k < m; ++k) {
            const py::ssize_t i = keep[k];
            const float hw = at(i, 2) * 0.5f, hh = at(i, 3) * 0.5f;
            b[k * 4 + 0] = at(i, 0) - hw;
            b[k * 4 + 1] = at(i, 1) - hh;
            b[k * 4 + 2] = at(i, 0) + hw;
            b[k * 4 + 3] = at(i, 1) + hh;
            for (py::ssize_t c = 0; c < n_classes; ++c) s[k * n_classes + c] = score(i, c);
        }
    }
    return py::make_tuple(boxes, scores, bad);
}

py::array_t<int64_t> nms(const py::array &boxes, const py::array &scores, double iou_threshold) {
    need_rows(boxes, "boxes", 4);
    need_rows(scores, "scores");
    const py::ssize_t m = boxes.shape(0), c = scores.shape(1);
    if (scores.shape(0) != m)
        throw py::value_error("scores: " + std::to_string(scores.shape(0)) + " rows for " + std::to_string(m) +
                              " boxes");
    if (!(iou_threshold >= 0.0 && iou_threshold <= 1.0))
        throw py::value_error("iou_threshold: expected 0..1, got " + std::to_string(iou_threshold));
    const float *b = static_cast<const float *>(boxes.data());
    const float *s = static_cast<const float *>(scores.data());
    std::vector<py::ssize_t> order, kept;
    std::vector<py::ssize_t> cls(m, 0);
    std::vector<float> best(m, 0.f);
    std::vector<double> area(m, 0.0);
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; c > 0 && i < m; ++i) {
            bool finite = true;
            for (int v = 0; v < 4; ++v) finite &= std::isfinite(b[i * 4 + v]);
            for (py::ssize_t j = 0; j < c; ++j) finite &= std::isfinite(s[i * c + j]);
            if (!finite) continue;
            py::ssize_t arg = 0;  // the first maximum, as numpy's argmax
            for (py::ssize_t j = 1; j < c; ++j)
                if (s[i * c + j] > s[i * c + arg]) arg = j;
            cls[i] = arg;
            best[i] = s[i * c + arg];
            area[i] = std::max(double(b[i * 4 + 2]) - double(b[i * 4 + 0]), 0.0) *
                      std::max(double(b[i * 4 + 3]) - double(b[i * 4 + 1]), 0.0);
            order.push_back(i);
        }
        std::stable_sort(order.begin(), order.end(), [&](py::ssize_t x, py::ssize_t y) { return best[x] > best[y]; });
        for (const py::ssize_t i : order) {
            bool drop = false;
            for (const py::ssize_t j : kept) {
                if (cls[j] != cls[i]) continue;
                const double w = std::max(std::min(double(b[j * 4 + 2]), double(b[i * 4 + 2])) -
                                              std::max(double(b[j * 4 + 0]), double(b[i * 4 + 0])),
                                          0.0);
                const double h = std::max(std::min(double(b[j * 4 + 3]), double(b[i * 4 + 3])) -
                                              std::max(double(b[j * 4 + 1]), double(b[i * 4 + 1])),
                                          0.0);
                const double inter = w * h, uni = area[j] + area[i] - inter;
                if (uni > 0 && inter / uni > iou_threshold) {
                    drop = true;
                    break;
                }
            }
            if (!drop) kept.push_back(i);
        }
    }
    py::array_t<int64_t> out(static_cast<py::ssize_t>(kept.size()));
    std::copy(kept.begin(), kept.end(), out.mutable_data());
    return out;
}

}  // namespace

PYBIND11_MODULE(_hotpath, m) {
    m.doc() = "C++ hot path of the Bouncer guard; see bouncer/runtime/kernels/reference.py for the specification.";
    m.def("resize_normalize", &resize_normalize, py::arg("img"), py::arg("mean"), py::arg("std"), py::arg("swap_rb"),
          py::arg("out"), py::arg("rect") = py::none());
    m.def("halve", &halve, py::arg("img"));
    m.def("halve_with_grey", &halve_with_grey, py::arg("img"));
    m.def("quality_stats", &quality_stats, py::arg("grey"), py::arg("prev"), py::arg("tiles"), py::arg("dark"),
          py::arg("bright"));
    m.def("linear_probs", &linear_probs, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("temperature"));
    m.def("mahalanobis", &mahalanobis, py::arg("x"), py::arg("means"), py::arg("basis"), py::arg("inv_evals"),
          py::arg("inv_rest"), py::arg("means_proj"));
    m.def("knn_score", &knn_score, py::arg("x"), py::arg("bank"), py::arg("k"), py::arg("bank_scale") = py::none());
    m.def("spatial_max", &spatial_max, py::arg("fmap"));
    m.def("fuse", &fuse, py::arg("scores"), py::arg("knots_x"), py::arg("knots_y"), py::arg("slope_lo"),
          py::arg("slope_hi"), py::arg("combine"));
    m.def("decode_boxes", &decode_boxes, py::arg("raw"), py::arg("layout"), py::arg("n_classes"), py::arg("min_score"),
          py::arg("max_candidates"));
    m.def("nms", &nms, py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"));
}
