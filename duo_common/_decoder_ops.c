/* duo.common._decoder_ops: the small operations between a decoder layer's matrix products, in C.
 *
 * Why: once the matrix products are cheap (_packed_gemm), a CPU forward pass over a few tokens spends about
 * as long again in the operations between them (norms, rotary embedding, attention over the cache, the
 * gated activation), each a handful of tiny torch calls: 30-40 calls of ~10 us per layer. Here each is one
 * call over plain float32 buffers.
 *
 * Numerics: every result of a row (a token) is computed from that row alone, in a fixed order, so it never
 * depends on how many rows share the call (batch invariance, as in _packed_gemm). Elementwise steps round
 * as transformers' Llama code does (mul and add separately: built with -ffp-contract=off); reductions (the
 * norm's mean, attention's dot products and sums) run in 8 interleaved partial sums combined in a fixed
 * order, so they differ from torch's own summation order only in the last bits.
 *
 * exp() is computed 8 at a time (exp8: within about 2 ulp, where torch's own is within 1). Attention, exp() and
 * the gating use AVX2 (cpu_supported()); the rest is plain C. Functions take addresses as integers
 * (torch data_ptr()); duo.common.decoder_ops owns validation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__x86_64__) || !defined(__GNUC__)
#error "duo.common._decoder_ops is built for x86-64 with GCC or Clang (setup.py builds it only there)"
#endif
#include <immintrin.h>

#include "_packed_gemm_api.h"

#define LANES 8

/* sum of a[i] * b[i] over n, in LANES interleaved partial sums combined pairwise. */
static inline float dot(const float *a, const float *b, int n) {
    float acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; i++, l++)
        acc[l] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* out[r] = weight * (x[r] * 1 / sqrt(mean(x[r]^2) + eps)), as transformers' LlamaRMSNorm in float32. */
static void rms_norm(const float *x, int rows, int dim, const float *weight, float eps, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * dim;
        float *o = out + (size_t)r * dim;
        float scale = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
        for (int i = 0; i < dim; i++)
            o[i] = weight[i] * (xr[i] * scale);
    }
}

/* One head vector rotated by the rotary embedding: x * cos + rotate_half(x) * sin. */
static inline void rotate(const float *x, const float *cos, const float *sin, int d, float *out) {
    int half = d / 2;
    for (int i = 0; i < half; i++)
        out[i] = x[i] * cos[i] + -x[i + half] * sin[i];
    for (int i = half; i < d; i++)
        out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

/* Splits rows of fused q|k|v projections: q rotated into q_out [rows][heads][d], k rotated into k_out and v
 * copied into v_out, each [kv_heads][..][d] with kv heads `kv_head_stride` floats apart and row r at r * d
 * (a cache's buffers at the first new position, or [kv_heads][rows][d]); cos and sin are [rows][d]. */
static void rotary_split(const float *qkv, int rows, int heads, int kv_heads, int d, const float *cos,
                         const float *sin, float *q_out, float *k_out, float *v_out, size_t kv_head_stride) {
    int width = (heads + 2 * kv_heads) * d;
    for (int r = 0; r < rows; r++) {
        const float *row = qkv + (size_t)r * width, *c = cos + (size_t)r * d, *s = sin + (size_t)r * d;
        for (int h = 0; h < heads; h++)
            rotate(row + h * d, c, s, d, q_out + ((size_t)r * heads + h) * d);
        for (int h = 0; h < kv_heads; h++) {
            rotate(row + (heads + h) * d, c, s, d, k_out + h * kv_head_stride + (size_t)r * d);
            memcpy(v_out + h * kv_head_stride + (size_t)r * d, row + (heads + kv_heads + h) * d,
                   (size_t)d * sizeof(float));
        }
    }
}

/* Scores of one query row over the cache, kept for its softmax: per thread, grown as needed. */
static __thread float *scores;
static __thread size_t scores_size;

static float *scores_buffer(size_t n) {
    if (n > scores_size) {
        free(scores);
        scores = malloc(n * sizeof(float));
        scores_size = scores ? n : 0;
    }
    return scores;
}

/* An additive mask's "not visible": -inf, or the most negative float (transformers' masks use finfo.min,
 * whose exp() underflows to exactly 0 in a softmax: leaving the position out computes the same sums). */
static inline int hidden_position(const float *mask, int j) { return mask && mask[j] <= -FLT_MAX; }

/* exp() of 8 floats, Cephes' single-precision method (as in avx_mathfun): e^x = 2^n * e^g with
 * n = round(x / ln 2) and g = x - n ln 2 (ln 2 in two parts), e^g by a degree-6 polynomial; within about
 * 2 ulp of the true value. Below -87 the result is 0 (the true value is under 1.7e-38, a subnormal or
 * 0 in glibc: the difference is below any float32 sum it joins); above 88.38, infinity. Elementwise, so
 * each lane's result is its own. */
__attribute__((target("avx2"))) static inline __m256 exp8(__m256 x) {
    __m256 negligible = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                             _mm256_set1_ps(0.5f)));
    __m256 g = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    g = _mm256_sub_ps(g, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_add_ps(_mm256_mul_ps(y, g), _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, g), _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_add_ps(_mm256_mul_ps(y, g), _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_add_ps(_mm256_mul_ps(y, g), _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_add_ps(_mm256_mul_ps(y, g), _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(g, g)), g), _mm256_set1_ps(1.0f));
    __m256i two_to_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(negligible, _mm256_mul_ps(y, _mm256_castsi256_ps(two_to_n)));
}

/* exp() of n floats in place, 8 at a time. */
__attribute__((target("avx2"))) static void exp_in_place(float *v, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
    if (i < n) {
        float tail[8] = {0};
        memcpy(tail, v + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        memcpy(v + i, tail, (size_t)(n - i) * sizeof(float));
    }
}

/* dot() for d a multiple of 8, in AVX2 registers: the same 8 partial sums, combined in the same order. */
__attribute__((target("avx2"))) static inline float dot8(const float *a, const float *b, int d) {
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < d; i += 8)
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));  /* a0+a4 .. a3+a7 */
    t = _mm_add_ps(t, _mm_movehl_ps(t, t));  /* (a0+a4)+(a2+a6), (a1+a5)+(a3+a7) */
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

/* o[i] = sum over visible j, in order, of p[j] * v[j][i], for d a multiple of 8: columns in blocks of 32
 * (four independent sums in registers), then of 8. */
__attribute__((target("avx2"))) static inline void weighted_sum8(const float *p, const float *v, const float *mask,
                                                                 int end, int d, float *o) {
    int c = 0;
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < end; j++) {
            if (hidden_position(mask, j))
                continue;
            const float *vj = v + (size_t)j * d + c;
            __m256 pj = _mm256_set1_ps(p[j]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(pj, _mm256_loadu_ps(vj)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(pj, _mm256_loadu_ps(vj + 8)));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(pj, _mm256_loadu_ps(vj + 16)));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(pj, _mm256_loadu_ps(vj + 24)));
        }
        _mm256_storeu_ps(o + c, a0), _mm256_storeu_ps(o + c + 8, a1);
        _mm256_storeu_ps(o + c + 16, a2), _mm256_storeu_ps(o + c + 24, a3);
    }
    for (; c < d; c += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int j = 0; j < end; j++)
            if (!hidden_position(mask, j))
                a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(v + (size_t)j * d + c)));
        _mm256_storeu_ps(o + c, a);
    }
}

/* Attention of q [rows][heads][d] over keys and values [kv_heads][kv_len] (head h uses kv head
 * h / (heads / kv_heads); positions of a head `head_stride` floats apart, each row d floats; d a multiple
 * of 8). Row r sees the positions its additive mask row mask[r] does not hide, adding the mask to their
 * scores; with no mask, the positions up to past + r (causal). Softmax as torch computes it: exp(s - max)
 * / sum. A row that sees nothing gets zeros. out [rows][heads * d]. Returns -1 when out of memory. */
__attribute__((target("avx2"))) static int attention(
    const float *q, int rows, int heads, int kv_heads, int d, const float *keys, const float *values,
    size_t head_stride, int kv_len, const float *mask, int past, float scale, float *out) {
    float *s = scores_buffer((size_t)kv_len);
    if (!s)
        return -1;
    int groups = heads / kv_heads;
    for (int r = 0; r < rows; r++) {
        const float *m = mask ? mask + (size_t)r * kv_len : NULL;
        int end = m ? kv_len : (past + r + 1 < kv_len ? past + r + 1 : kv_len);
        for (int h = 0; h < heads; h++) {
            const float *qv = q + ((size_t)r * heads + h) * d;
            const float *k = keys + (size_t)(h / groups) * head_stride;
            float *o = out + ((size_t)r * heads + h) * d;
            float highest = -INFINITY, total = 0.0f;
            for (int j = 0; j < end; j++) {
                if (hidden_position(m, j)) {
                    s[j] = -INFINITY;  /* exp() below makes it exactly 0, adding nothing to the sums */
                    continue;
                }
                s[j] = dot8(qv, k + (size_t)j * d, d) * scale;
                if (m)
                    s[j] += m[j];
                if (s[j] > highest)
                    highest = s[j];
            }
            if (highest == -INFINITY) {  /* sees nothing */
                memset(o, 0, (size_t)d * sizeof(float));
                continue;
            }
            for (int j = 0; j < end; j++)
                s[j] -= highest;
            exp_in_place(s, end);
            for (int j = 0; j < end; j++)
                total += s[j];
            for (int j = 0; j < end; j++)
                s[j] /= total;
            weighted_sum8(s, values + (size_t)(h / groups) * head_stride, m, end, d, o);
        }
    }
    return 0;
}

/* out[r] = silu(gate) * up for rows of fused gate|up [rows][2 * width]; silu(g) = g / (1 + exp(-g)). */
__attribute__((target("avx2"))) static void silu_mul(const float *gate_up, int rows, int width, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *g = gate_up + (size_t)r * 2 * width, *u = g + width;
        float *o = out + (size_t)r * width;
        for (int i = 0; i < width; i++)
            o[i] = -g[i];
        exp_in_place(o, width);
        for (int i = 0; i < width; i++)
            o[i] = g[i] / (1.0f + o[i]) * u[i];
    }
}

/* A whole decoder layer for a few rows, in place on hidden [rows][hidden]: the products through the packed
 * kernel (duo.common._packed_gemm, reached through its capsule), the operations between them as above, and
 * the new keys and values written into the cache's buffers. Each step computes exactly what the separate
 * calls of duo.common.lean_llama compute (the same functions, the same order). */
typedef struct {
    const void *weights;
    int format;
    const float *scales, *offsets;
    int n, k;
    const float *bias;
} product;

typedef struct {
    const void *kernels;  /* the packed kernel's instruction set */
    int hidden, heads, kv_heads, d, intermediate;
    const float *input_norm, *post_norm;
    float input_eps, post_eps, scale;
    product qkv, o, gate_up, down;
} layer_def;

static const packed_gemm_api *gemm_api;

static int multiply(const layer_def *L, const product *p, const float *x, int rows, float *y) {
    return gemm_api->gemm(L->kernels, x, rows, p->k, p->weights, p->format, p->scales, p->offsets, p->n, y, p->bias);
}

static void add_into(float *h, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        h[i] = h[i] + x[i];
}

/* The layer's working buffers, per thread, grown as needed. */
static __thread float *layer_scratch;
static __thread size_t layer_scratch_size;

/* One sequence's rows in a pass: `rows` consecutive rows of hidden, attending over their own cache. */
typedef struct {
    int rows;
    float *key_buffer, *value_buffer;  /* the cache's buffers [kv_heads][capacity][d], `past` positions held */
    int capacity, past;
    const float *mask;                 /* [rows][past + rows] additive, or NULL: causal */
} segment;

/* The layer for the rows of several sequences at once: the norms and products run over all rows (each row's
 * result is its own, so a sequence computes the same numbers whatever shares the pass), rotary embedding and
 * attention per sequence, over its own cache. cos and sin hold every row's tables. */
static int run_layer(const layer_def *L, float *h, const float *cos, const float *sin, const segment *segs,
                     int nsegs) {
    int rows = 0;
    for (int i = 0; i < nsegs; i++)
        rows += segs[i].rows;
    size_t H = (size_t)L->hidden, qkv_width = (size_t)(L->heads + 2 * L->kv_heads) * L->d;
    size_t attn_width = (size_t)L->heads * L->d, I = (size_t)L->intermediate;
    size_t need = (size_t)rows * (H + qkv_width + 2 * attn_width + H + 3 * I);
    if (need > layer_scratch_size) {
        free(layer_scratch);
        layer_scratch = malloc(need * sizeof(float));
        layer_scratch_size = layer_scratch ? need : 0;
        if (!layer_scratch)
            return -1;
    }
    float *normed = layer_scratch, *qkv = normed + rows * H, *q = qkv + rows * qkv_width;
    float *attended = q + rows * attn_width, *projected = attended + rows * attn_width;
    float *gate_up = projected + rows * H, *act = gate_up + rows * 2 * I;

    rms_norm(h, rows, L->hidden, L->input_norm, L->input_eps, normed);
    if (multiply(L, &L->qkv, normed, rows, qkv))
        return -1;
    for (int i = 0, first = 0; i < nsegs; first += segs[i].rows, i++) {
        const segment *s = &segs[i];
        size_t head_stride = (size_t)s->capacity * L->d;
        rotary_split(qkv + first * qkv_width, s->rows, L->heads, L->kv_heads, L->d, cos + (size_t)first * L->d,
                     sin + (size_t)first * L->d, q + first * attn_width, s->key_buffer + (size_t)s->past * L->d,
                     s->value_buffer + (size_t)s->past * L->d, head_stride);
        if (attention(q + first * attn_width, s->rows, L->heads, L->kv_heads, L->d, s->key_buffer, s->value_buffer,
                      head_stride, s->past + s->rows, s->mask, s->past, L->scale, attended + first * attn_width))
            return -1;
    }
    if (multiply(L, &L->o, attended, rows, projected))
        return -1;
    add_into(h, projected, rows * H);
    rms_norm(h, rows, L->hidden, L->post_norm, L->post_eps, normed);
    if (multiply(L, &L->gate_up, normed, rows, gate_up))
        return -1;
    silu_mul(gate_up, rows, L->intermediate, act);
    if (multiply(L, &L->down, act, rows, projected))
        return -1;
    add_into(h, projected, rows * H);
    return 0;
}

static void free_layer(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, "duo.common._decoder_ops.layer")); }

#define PTR(v) ((float *)(uintptr_t)(v))

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    unsigned long long x, weight, out;
    int rows, dim;
    float eps;
    if (!PyArg_ParseTuple(args, "KiiKfK", &x, &rows, &dim, &weight, &eps, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rms_norm(PTR(x), rows, dim, PTR(weight), eps, PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rotary_split(PyObject *self, PyObject *args) {
    unsigned long long qkv, cos, sin, q_out, k_out, v_out;
    int rows, heads, kv_heads, d;
    if (!PyArg_ParseTuple(args, "KiiiiKKKKK", &qkv, &rows, &heads, &kv_heads, &d, &cos, &sin, &q_out, &k_out,
                          &v_out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rotary_split(PTR(qkv), rows, heads, kv_heads, d, PTR(cos), PTR(sin), PTR(q_out), PTR(k_out), PTR(v_out),
                 (size_t)rows * d);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    unsigned long long q, keys, values, head_stride, mask, out;
    int rows, heads, kv_heads, d, kv_len, past;
    float scale;
    if (!PyArg_ParseTuple(args, "KiiiiKKKiKifK", &q, &rows, &heads, &kv_heads, &d, &keys, &values, &head_stride,
                          &kv_len, &mask, &past, &scale, &out))
        return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = attention(PTR(q), rows, heads, kv_heads, d, PTR(keys), PTR(values), (size_t)head_stride, kv_len,
                       mask ? PTR(mask) : NULL, past, scale, PTR(out));
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    unsigned long long gate_up, out;
    int rows, width;
    if (!PyArg_ParseTuple(args, "KiiK", &gate_up, &rows, &width, &out))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    silu_mul(PTR(gate_up), rows, width, PTR(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int parse_product(PyObject *tuple, product *p) {
    unsigned long long weights, scales, offsets, bias;
    if (!PyArg_ParseTuple(tuple, "KiKKiiK", &weights, &p->format, &scales, &offsets, &p->n, &p->k, &bias))
        return -1;
    p->weights = (const void *)(uintptr_t)weights;
    p->scales = PTR(scales), p->offsets = PTR(offsets), p->bias = bias ? PTR(bias) : NULL;
    return 0;
}

/* layer(instruction_set, hidden, heads, kv_heads, head_dim, intermediate, input_norm, input_eps, post_norm,
 * post_eps, scale, qkv, o, gate_up, down) -> capsule; each product (weights, format, scales, offsets, n, k,
 * bias). The caller keeps every buffer alive as long as the capsule. */
static PyObject *py_layer(PyObject *self, PyObject *args) {
    const char *set_name;
    unsigned long long input_norm, post_norm;
    PyObject *products[4];
    layer_def *L = calloc(1, sizeof(layer_def));
    if (!L)
        return PyErr_NoMemory();
    if (!PyArg_ParseTuple(args, "siiiiiKfKffO!O!O!O!", &set_name, &L->hidden, &L->heads, &L->kv_heads, &L->d,
                          &L->intermediate, &input_norm, &L->input_eps, &post_norm, &L->post_eps, &L->scale,
                          &PyTuple_Type, &products[0], &PyTuple_Type, &products[1], &PyTuple_Type, &products[2],
                          &PyTuple_Type, &products[3])
        || parse_product(products[0], &L->qkv) || parse_product(products[1], &L->o)
        || parse_product(products[2], &L->gate_up) || parse_product(products[3], &L->down)) {
        free(L);
        return NULL;
    }
    L->input_norm = PTR(input_norm), L->post_norm = PTR(post_norm);
    L->kernels = gemm_api ? gemm_api->kernel_set(set_name) : NULL;
    if (!L->kernels || L->d % 8 || L->heads % L->kv_heads) {
        free(L);
        PyErr_Format(PyExc_ValueError, "layer: no '%s' packed kernel here, or heads that do not fit", set_name);
        return NULL;
    }
    PyObject *capsule = PyCapsule_New(L, "duo.common._decoder_ops.layer", free_layer);
    if (!capsule)
        free(L);
    return capsule;
}

/* run_layer(layer, hidden, cos, sin, segments): segments a sequence of
 * (rows, key_buffer, value_buffer, capacity, past, mask) tuples, one per sequence, in hidden's row order. */
static PyObject *py_run_layer(PyObject *self, PyObject *args) {
    PyObject *capsule, *seq;
    unsigned long long hidden, cos, sin;
    if (!PyArg_ParseTuple(args, "OKKKO", &capsule, &hidden, &cos, &sin, &seq))
        return NULL;
    const layer_def *L = PyCapsule_GetPointer(capsule, "duo.common._decoder_ops.layer");
    if (!L)
        return NULL;
    PyObject *items = PySequence_Fast(seq, "run_layer: segments must be a sequence");
    if (!items)
        return NULL;
    Py_ssize_t nsegs = PySequence_Fast_GET_SIZE(items);
    segment *segs = nsegs > 0 ? calloc((size_t)nsegs, sizeof(segment)) : NULL;
    if (nsegs <= 0 || !segs) {
        Py_DECREF(items);
        free(segs);
        if (nsegs <= 0)
            PyErr_SetString(PyExc_ValueError, "run_layer: no segments");
        return nsegs <= 0 ? NULL : PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < nsegs; i++) {
        unsigned long long keys, values, mask;
        segment *s = &segs[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "iKKiiK", &s->rows, &keys, &values, &s->capacity,
                              &s->past, &mask)) {
            Py_DECREF(items);
            free(segs);
            return NULL;
        }
        if (s->rows <= 0 || s->past < 0 || s->past + s->rows > s->capacity) {
            Py_DECREF(items);
            free(segs);
            PyErr_SetString(PyExc_ValueError, "run_layer: a segment's rows do not fit its cache's buffers");
            return NULL;
        }
        s->key_buffer = PTR(keys);
        s->value_buffer = PTR(values);
        s->mask = mask ? PTR(mask) : NULL;
    }
    Py_DECREF(items);
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_layer(L, PTR(hidden), PTR(cos), PTR(sin), segs, (int)nsegs);
    Py_END_ALLOW_THREADS
    free(segs);
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_cpu_supported(PyObject *self, PyObject *unused) {
    __builtin_cpu_init();
    return PyBool_FromLong(__builtin_cpu_supports("avx2"));
}

static PyMethodDef methods[] = {
    {"cpu_supported", py_cpu_supported, METH_NOARGS, "Whether this CPU runs these functions (AVX2)."},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, rows, dim, weight, eps, out)"},
    {"rotary_split", py_rotary_split, METH_VARARGS,
     "rotary_split(qkv, rows, heads, kv_heads, head_dim, cos, sin, q_out, k_out, v_out)"},
    {"attention", py_attention, METH_VARARGS,
     "attention(q, rows, heads, kv_heads, head_dim, keys, values, head_stride, kv_len, mask, past, scale, out)"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu_mul(gate_up, rows, width, out)"},
    {"layer", py_layer, METH_VARARGS, "A decoder layer's definition for run_layer(), as a capsule."},
    {"run_layer", py_run_layer, METH_VARARGS,
     "run_layer(layer, hidden, cos, sin, segments): segments of (rows, key_buffer, value_buffer, capacity, past, mask)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decoder_ops", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decoder_ops(void) {
    /* The packed kernel, for run_layer(); without it the module still serves its single operations. */
    PyObject *kernel_module = PyImport_ImportModule("duo.common._packed_gemm");
    gemm_api = kernel_module ? PyCapsule_Import(PACKED_GEMM_CAPSULE, 0) : NULL;
    Py_XDECREF(kernel_module);
    if (!gemm_api)
        PyErr_Clear();
    return PyModule_Create(&module);
}
