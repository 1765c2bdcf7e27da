/* A decode step's kernels on x86-64 CPUs with AVX2 and FMA (dsocr_torch/native.py compiles and loads this file):
 * products of float32 activations with weights stored as int8 (one float32 scale per output row) or bfloat16,
 * and attention of one query per sequence over its KV cache.
 *
 * A decode step reads each weight and each cached key and value once, so these are bound by memory: each thread
 * walks its rows in address order (what the hardware prefetchers follow), widens 8 weights at a time to float32
 * and accumulates with FMAs into four independent sums. The arithmetic is float32 throughout; only the order of
 * the additions differs from the eager references (dsocr_torch/weight_only.py, torch's attention), which the
 * kernels are checked against.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Below this many weight elements one thread does the whole product: waking the others costs more. */
#define PARALLEL_MIN_ELEMENTS (1 << 16)

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen_int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

static inline __m256 widen_bf16(const uint16_t* p) {
    /* bfloat16 is the high half of a float32: shift the 16 bits into place. */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

static inline float scalar_bf16(uint16_t bits) {
    union { uint32_t u; float f; } v = {(uint32_t)bits << 16};
    return v.f;
}

#define DEFINE_DOT(NAME, TYPE, WIDEN, SCALAR)                                           \
    static inline float NAME(const TYPE* row, const float* x, int64_t in) {             \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                      \
        int64_t k = 0;                                                                   \
        for (; k + 32 <= in; k += 32) {                                                  \
            a0 = _mm256_fmadd_ps(WIDEN(row + k), _mm256_loadu_ps(x + k), a0);            \
            a1 = _mm256_fmadd_ps(WIDEN(row + k + 8), _mm256_loadu_ps(x + k + 8), a1);    \
            a2 = _mm256_fmadd_ps(WIDEN(row + k + 16), _mm256_loadu_ps(x + k + 16), a2);  \
            a3 = _mm256_fmadd_ps(WIDEN(row + k + 24), _mm256_loadu_ps(x + k + 24), a3);  \
        }                                                                                \
        for (; k + 8 <= in; k += 8) a0 = _mm256_fmadd_ps(WIDEN(row + k), _mm256_loadu_ps(x + k), a0); \
        float total = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));  \
        for (; k < in; k++) total += SCALAR(row[k]) * x[k];                              \
        return total;                                                                    \
    }

#define AS_FLOAT(v) ((float)(v))
DEFINE_DOT(dot_int8, int8_t, widen_int8, AS_FLOAT)
DEFINE_DOT(dot_bf16, uint16_t, widen_bf16, scalar_bf16)

/* out[r] = scales[r] * sum_k w[r, k] * x[k]; w [rows, in] row-major. */
void dsocr_row_product_int8(const float* x, const int8_t* w, const float* scales, float* out, int64_t rows,
                            int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * in >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) out[r] = scales[r] * dot_int8(w + r * in, x, in);
}

/* out[r] = sum_k w[r, k] * x[k]; w [rows, in] bfloat16 bits, row-major. */
void dsocr_row_product_bf16(const float* x, const uint16_t* w, float* out, int64_t rows, int64_t in, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * in >= PARALLEL_MIN_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) out[r] = dot_bf16(w + r * in, x, in);
}

/* One token through k routed SwiGLU experts, summed with the router's weights, in one call (one fork of the
 * threads instead of two products per expert). Expert e's weights start at e times a whole expert's size in
 * each stack: gate_up [E, 2I, hidden] (gate rows, then up rows), down [E, hidden, I]; the scales of int8
 * [E, 2I] and [E, hidden] (NULL for bfloat16). scratch holds k * 3I floats. */
#define DEFINE_EXPERTS(NAME, TYPE, DOT)                                                                      \
    void NAME(const float* x, const int64_t* ids, const float* routing, int64_t k, const TYPE* gate_up,      \
              const float* gate_up_scales, const TYPE* down, const float* down_scales, int64_t hidden,       \
              int64_t inter, float* scratch, float* out, int threads) {                                      \
        float* both = scratch;           /* [k, 2I] */                                                       \
        float* act = scratch + k * 2 * inter; /* [k, I] */                                                   \
        _Pragma("omp parallel num_threads(threads)")                                                         \
        {                                                                                                    \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t i = 0; i < k * 2 * inter; i++) {                                                    \
                int64_t e = ids[i / (2 * inter)], r = i % (2 * inter);                                       \
                float v = DOT(gate_up + (e * 2 * inter + r) * hidden, x, hidden);                            \
                both[i] = gate_up_scales ? v * gate_up_scales[e * 2 * inter + r] : v;                        \
            }                                                                                                \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t i = 0; i < k * inter; i++) {                                                        \
                float gate = both[(i / inter) * 2 * inter + i % inter];                                      \
                float up = both[(i / inter) * 2 * inter + inter + i % inter];                                \
                act[i] = gate / (1.0f + expf(-gate)) * up;                                                   \
            }                                                                                                \
            _Pragma("omp for schedule(static)")                                                              \
            for (int64_t h = 0; h < hidden; h++) {                                                           \
                float total = 0.0f;                                                                          \
                for (int64_t j = 0; j < k; j++) {                                                            \
                    int64_t e = ids[j];                                                                      \
                    float v = DOT(down + (e * hidden + h) * inter, act + j * inter, inter);                  \
                    total += routing[j] * (down_scales ? v * down_scales[e * hidden + h] : v);               \
                }                                                                                            \
                out[h] = total;                                                                              \
            }                                                                                                \
        }                                                                                                    \
    }

DEFINE_EXPERTS(dsocr_experts_int8, int8_t, dot_int8)
DEFINE_EXPERTS(dsocr_experts_bf16, uint16_t, dot_bf16)

DEFINE_DOT(dot_f32, float, _mm256_loadu_ps, AS_FLOAT)

/* o[0:dim] += p * v[0:dim] */
static inline void add_scaled(float* o, float p, const float* v, int64_t dim) {
    __m256 scale = _mm256_set1_ps(p);
    int64_t j = 0;
    for (; j + 8 <= dim; j += 8)
        _mm256_storeu_ps(o + j, _mm256_fmadd_ps(scale, _mm256_loadu_ps(v + j), _mm256_loadu_ps(o + j)));
    for (; j < dim; j++) o[j] += p * v[j];
}

/* A decode step's attention: one query per (lane, head) over the first lengths[lane] cached positions of its lane
 * (at most span), softmax(q . k * scale) . v, in float32. q and out [lanes, heads, dim]; keys and values point
 * at a layer's cache, [lanes, kv_heads, capacity, dim] with the given lane and head strides (in floats), both
 * laid out alike; query head h reads key head h / (heads / kv_heads). scratch holds lanes * heads * span floats.
 * Each (lane, head) reads its keys, then its values, in address order. */
void dsocr_decode_attention(const float* q, const float* keys, const float* values, const int64_t* lengths,
                            int64_t lanes, int64_t heads, int64_t kv_heads, int64_t dim, int64_t lane_stride,
                            int64_t head_stride, int64_t span, float scale, float* scratch, float* out,
                            int threads) {
    int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < lanes * heads; i++) {
        int64_t lane = i / heads, head = i % heads, length = lengths[lane] < span ? lengths[lane] : span;
        const float* query = q + i * dim;
        const float* k = keys + lane * lane_stride + (head / group) * head_stride;
        const float* v = values + lane * lane_stride + (head / group) * head_stride;
        float* p = scratch + i * span;
        float* o = out + i * dim;
        float peak = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < length; t++) {
            p[t] = scale * dot_f32(k + t * dim, query, dim);
            peak = p[t] > peak ? p[t] : peak;
        }
        for (int64_t t = 0; t < length; t++) {
            p[t] = expf(p[t] - peak);
            total += p[t];
        }
        for (int64_t j = 0; j < dim; j++) o[j] = 0.0f;
        float inverse = 1.0f / total;
        for (int64_t t = 0; t < length; t++) add_scaled(o, p[t] * inverse, v + t * dim, dim);
    }
}
