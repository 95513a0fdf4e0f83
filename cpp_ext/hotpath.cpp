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
// loads); the default clone runs on any x86-64. fp16 and int8 dot products use guarded intrinsics.
// aarch64 gets NEON from the baseline.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BOUNCER_X86 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
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
int32_t dot_q8_portable(const int8_t *a, const int8_t *b, py::ssize_t d) {
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
    return dot_q8_portable(a, b, d);
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

// One pass over interleaved pixels writing three planes.
BOUNCER_CLONES void normalize_pass(const uint8_t *src, py::ssize_t n, int c0, int c2, float m0, float m1, float m2,
                                   float s0, float s1, float s2, float *o) {
    float *o0 = o, *o1 = o + n, *o2 = o + 2 * n;
#pragma omp simd
    for (py::ssize_t i = 0; i < n; ++i) {
        const uint8_t *px = src + 3 * i;
        o0[i] = (static_cast<float>(px[c0]) - m0) * s0;
        o1[i] = (static_cast<float>(px[1]) - m1) * s1;
        o2[i] = (static_cast<float>(px[c2]) - m2) * s2;
    }
}

// Sums of one row segment in 32-bit (a segment of 255-valued pixels cannot overflow them).
struct SegStats {
    uint32_t sum, sq, dark, bright;
};

BOUNCER_CLONES SegStats segment_stats(const uint8_t *seg, py::ssize_t n, uint32_t dark, uint32_t bright) {
    uint32_t s = 0, q = 0, nd = 0, nb = 0;
#pragma omp simd reduction(+ : s, q, nd, nb)
    for (py::ssize_t x = 0; x < n; ++x) {
        const uint32_t v = seg[x];
        s += v;
        q += v * v;
        nd += v <= dark;
        nb += v >= bright;
    }
    return {s, q, nd, nb};
}

BOUNCER_CLONES uint32_t row_absdiff(const uint8_t *a, const uint8_t *b, py::ssize_t n) {
    uint32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (py::ssize_t x = 0; x < n; ++x) acc += static_cast<uint32_t>(a[x] > b[x] ? a[x] - b[x] : b[x] - a[x]);
    return acc;
}

// 4-neighbour Laplacian of one interior row: sum and sum of squares (|l| <= 1020, so int32 per row).
BOUNCER_CLONES void row_laplacian(const uint8_t *up, const uint8_t *row, const uint8_t *down, py::ssize_t w,
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

py::array_t<float> normalize_chw(const py::array &img, std::vector<float> mean, std::vector<float> stdv,
                                 bool swap_rb, std::optional<py::array> out) {
    need_dtype<uint8_t>(img, "img", "uint8");
    if (img.ndim() != 3 || img.shape(2) != 3)
        throw py::value_error("img: expected H x W x 3, got shape " + shape_str(img));
    need_contiguous(img, "img");
    if (mean.size() != 3 || stdv.size() != 3) throw py::value_error("mean and std: three values each");
    const py::ssize_t h = img.shape(0), w = img.shape(1);
    py::array_t<float> dst;
    if (out) {
        if (!out->dtype().is(py::dtype::of<float>()) || out->ndim() != 3 || out->shape(0) != 3 ||
            out->shape(1) != h || out->shape(2) != w || !(out->flags() & py::array::c_style))
            throw py::value_error("out: expected a C-contiguous float32 array of shape (3, " + std::to_string(h) +
                                  ", " + std::to_string(w) + ")");
        if (!out->writeable()) throw py::value_error("out: array is read-only");
        dst = py::reinterpret_borrow<py::array_t<float>>(*out);
    } else {
        dst = py::array_t<float>({py::ssize_t(3), h, w});
    }
    const uint8_t *src = static_cast<const uint8_t *>(img.data());
    float *o = dst.mutable_data();
    const float s0 = 1.0f / stdv[0], s1 = 1.0f / stdv[1], s2 = 1.0f / stdv[2];
    const float m0 = mean[0], m1 = mean[1], m2 = mean[2];
    const int c0 = swap_rb ? 2 : 0, c2 = swap_rb ? 0 : 2;  // output channel 0 reads input channel c0
    {
        py::gil_scoped_release release;
        normalize_pass(src, h * w, c0, c2, m0, m1, m2, s0, s1, s2, o);
    }
    return dst;
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
        uint64_t sum = 0, sq = 0, ndark = 0, nbright = 0, adiff = 0;
        int64_t lsum = 0, lsq = 0;
        for (py::ssize_t y = 0; y < h; ++y) {
            const uint8_t *row = g + y * w;
            const int trow = static_cast<int>(y / th) * tiles;
            for (py::ssize_t tx = 0; tx < tiles; ++tx) {
                const SegStats st = segment_stats(row + tx * tw, tw, static_cast<uint32_t>(dark),
                                                  static_cast<uint32_t>(bright));
                tsum[trow + tx] += st.sum;
                tsq[trow + tx] += st.sq;
                sum += st.sum;
                sq += st.sq;
                ndark += st.dark;
                nbright += st.bright;
            }
            if (p) adiff += row_absdiff(row, p + y * w, w);
            if (y >= 1 && y + 1 < h) row_laplacian(row - w, row, row + w, w, &lsum, &lsq);
        }
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
    {
        py::gil_scoped_release release;
        std::vector<float> xn(d), top(k);
        std::vector<int8_t> xq(d);
        for (py::ssize_t i = 0; i < m; ++i) {
            if (!l2n(xs + i * d, d, xn.data())) {
                o[i] = kNaN;
                continue;
            }
            const float xscale = is_i8 ? quantize_row(xn.data(), d, xq.data()) : 1.0f;
            // the k largest similarities, kept sorted descending; top[k-1] is the k-th nearest
            std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
            for (py::ssize_t j = 0; j < n; ++j) {
                float s;
                if (is_f32)
                    s = dot_f32(static_cast<const float *>(bd) + j * d, xn.data(), d);
                else if (is_f16)
                    s = dot_f16(static_cast<const uint16_t *>(bd) + j * d, xn.data(), d);
                else
                    s = static_cast<float>(dot_q8(static_cast<const int8_t *>(bd) + j * d, xq.data(), d)) *
                        (scales[j] * xscale);
                if (s > top[k - 1]) {
                    int pos = k - 1;
                    while (pos > 0 && top[pos - 1] < s) {
                        top[pos] = top[pos - 1];
                        --pos;
                    }
                    top[pos] = s;
                }
            }
            o[i] = 1.0f - top[k - 1];
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

py::array_t<float> fuse(const py::array &scores, const py::array &median, const py::array &scale) {
    need_rows(scores, "scores");
    const py::ssize_t m = scores.shape(0), h = scores.shape(1);
    for (const auto *a : {&median, &scale}) {
        if (!a->dtype().is(py::dtype::of<double>()) || a->ndim() != 1 || a->shape(0) != h)
            throw py::value_error("median/scale: expected shape (" + std::to_string(h) + ",)");
        need_contiguous(*a, "median/scale");
    }
    py::array_t<float> out(m);
    const float *s = static_cast<const float *>(scores.data());
    const double *md = static_cast<const double *>(median.data());
    const double *sc = static_cast<const double *>(scale.data());
    float *o = out.mutable_data();
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < m; ++i) {
            double acc = 0.0;
            for (py::ssize_t j = 0; j < h; ++j) acc += (s[i * h + j] - md[j]) / sc[j];
            o[i] = static_cast<float>(acc / h);
        }
    }
    return out;
}

}  // namespace

PYBIND11_MODULE(_hotpath, m) {
    m.doc() = "C++ hot path of the Bouncer guard; see bouncer/runtime/kernels/reference.py for the specification.";
    m.def("normalize_chw", &normalize_chw, py::arg("img"), py::arg("mean"), py::arg("std"), py::arg("swap_rb"),
          py::arg("out") = py::none());
    m.def("quality_stats", &quality_stats, py::arg("grey"), py::arg("prev"), py::arg("tiles"), py::arg("dark"),
          py::arg("bright"));
    m.def("linear_probs", &linear_probs, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("temperature"));
    m.def("mahalanobis", &mahalanobis, py::arg("x"), py::arg("means"), py::arg("basis"), py::arg("inv_evals"),
          py::arg("inv_rest"), py::arg("means_proj"));
    m.def("knn_score", &knn_score, py::arg("x"), py::arg("bank"), py::arg("k"), py::arg("bank_scale") = py::none());
    m.def("spatial_max", &spatial_max, py::arg("fmap"));
    m.def("fuse", &fuse, py::arg("scores"), py::arg("median"), py::arg("scale"));
}
