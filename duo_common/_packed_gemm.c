/* duo_common._packed_gemm: Y = X · Wᵀ (+ bias) for a few rows of X against a weight packed once at load.
 *
 * Why: speculative decoding pays when scoring k proposed tokens costs about as much as scoring one, because
 * the weights are read once. On a CPU, the BLAS kernels torch calls for 2-32 rows re-pack or re-read the
 * weight and cost up to 3x a single row. This kernel streams the weight exactly once per call, whatever
 * the number of rows, from a layout made for it: the weight [N][K] is stored as column panels
 * [ceil(N/32)][K][32] (zero padded), so each step over K reads one row of 32 weights and updates up to
 * ROWS_MAX rows x 32 outputs held in AVX-512 registers.
 *
 * Storage formats (the caller packs; duo_common.packed_linear chooses the smallest that is *exact*):
 *   FORMAT_F32        panels of float32.
 *   FORMAT_BF16       panels of bfloat16 bits, for weights that are bfloat16 values (a bfloat16 checkpoint
 *                     run in float32): widened to float32 exactly.
 *   FORMAT_I8_BLOCKS  panels of int8 q with, per column and block of 32 consecutive k, a float32 scale d and
 *                     offset m, for weights that are exactly d * q + m (weights dequantised from a GGUF file,
 *                     like the default target): rebuilt as (d * q) + m, two roundings as the packer checked.
 * Compact weights are widened to float32 before they are multiplied (in registers, step by step, for as many
 * rows as one tile holds; else once per panel into a float32 scratch panel that every tile reads from
 * cache): the products see the model's weights bit for bit, only fewer bytes come from memory.
 *
 * Numerics: every output is one fused-multiply-add chain over k = 0 .. K-1 in order, the same whatever the
 * number of rows, their position in X or the storage format, so a row's result never depends on what it is
 * batched with.
 *
 * Built as an optional extension (setup.py, with -ffp-contract=off so (d * q) + m is never fused); the
 * AVX-512 code is compiled for that target only and runs only where avx512_supported() says so, so the
 * module imports on any x86-64 CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_I8_BLOCKS = 2 };

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DUO_HAVE_AVX512_BUILD 1
#define PANEL 32           /* output columns per panel: two 16-float registers */
#define BLOCK 32           /* k positions sharing one scale and offset (FORMAT_I8_BLOCKS) */
#define ROWS_MAX 14        /* rows per register tile: 2 x 14 accumulators + 2 weight registers <= 32 */
#define ROWS_MAX_I8 12     /* compact formats: tiles also hold a block's scales and offsets (4 registers) */
#define PREFETCH_BYTES 8192

/* Row k of a panel as float32 (w0: columns 0-15, w1: 16-31); d0, d1, m0, m1 hold the scales and offsets
 * of k's block (FORMAT_I8_BLOCKS). The one definition of the widening, for tile() and widen_panel() alike,
 * so a row's products are the same whichever path it takes. */
__attribute__((target("avx512f"), always_inline)) static inline void panel_row(
    const void *panel, int format, int k, __m512 d0, __m512 d1, __m512 m0, __m512 m1, __m512 *w0, __m512 *w1) {
    if (format == FORMAT_F32) {
        const float *w = (const float *)panel + (size_t)k * PANEL;
        _mm_prefetch((const char *)w + PREFETCH_BYTES, _MM_HINT_T0);
        _mm_prefetch((const char *)w + PREFETCH_BYTES + 64, _MM_HINT_T0);
        *w0 = _mm512_loadu_ps(w), *w1 = _mm512_loadu_ps(w + 16);
    } else if (format == FORMAT_BF16) {
        const uint16_t *w = (const uint16_t *)panel + (size_t)k * PANEL;
        _mm_prefetch((const char *)w + PREFETCH_BYTES / 2, _MM_HINT_T0);
        *w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
        *w1 = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + 16))), 16));
    } else {
        const int8_t *q = (const int8_t *)panel + (size_t)k * PANEL;
        _mm_prefetch((const char *)q + PREFETCH_BYTES / 4, _MM_HINT_T0);
        __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
        __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
        *w0 = _mm512_add_ps(_mm512_mul_ps(q0, d0), m0);  /* (d * q) + m: never fused (-ffp-contract=off) */
        *w1 = _mm512_add_ps(_mm512_mul_ps(q1, d1), m1);
    }
}

/* The scales and offsets of the block starting at k0 (FORMAT_I8_BLOCKS; zeros otherwise). */
__attribute__((target("avx512f"), always_inline)) static inline void block_scales(
    const float *scale, const float *offset, int format, int k0, __m512 *d0, __m512 *d1, __m512 *m0, __m512 *m1) {
    *d0 = *d1 = *m0 = *m1 = _mm512_setzero_ps();
    if (format == FORMAT_I8_BLOCKS) {
        const float *d = scale + (size_t)(k0 / BLOCK) * PANEL, *m = offset + (size_t)(k0 / BLOCK) * PANEL;
        *d0 = _mm512_loadu_ps(d), *d1 = _mm512_loadu_ps(d + 16);
        *m0 = _mm512_loadu_ps(m), *m1 = _mm512_loadu_ps(m + 16);
    }
}

/* rows x 32 outputs of one panel: for each k, the panel's 32 weights are loaded (widened to float32 for
 * compact formats, in registers) and multiplied into every row's accumulators. Inlined with constant
 * format and rows, so the accumulators live in registers. */
__attribute__((target("avx512f,fma"), always_inline)) static inline void tile(
    const float *x, int k_dim, const void *panel, const float *scale, const float *offset, int format,
    float *y, int n, int n0, const float *bias, int rows) {
    __m512 acc0[ROWS_MAX], acc1[ROWS_MAX];
    int cols = n - n0 < PANEL ? n - n0 : PANEL;
    __mmask16 mask0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
    __mmask16 mask1 = cols <= 16 ? (__mmask16)0
                      : (cols >= 32 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - 16)) - 1u));
    for (int r = 0; r < rows; r++) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (int k0 = 0; k0 < k_dim; k0 += BLOCK) {
        int k_end = k0 + BLOCK < k_dim ? k0 + BLOCK : k_dim;
        __m512 d0, d1, m0, m1, w0, w1;
        block_scales(scale, offset, format, k0, &d0, &d1, &m0, &m1);
        for (int k = k0; k < k_end; k++) {
            panel_row(panel, format, k, d0, d1, m0, m1, &w0, &w1);
            for (int r = 0; r < rows; r++) {
                __m512 xv = _mm512_set1_ps(x[(size_t)r * k_dim + k]);
                acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
            }
        }
    }
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias + n0) : _mm512_setzero_ps();
    __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        _mm512_mask_storeu_ps(y + (size_t)r * n + n0, mask0, _mm512_add_ps(acc0[r], b0));
        _mm512_mask_storeu_ps(y + (size_t)r * n + n0 + 16, mask1, _mm512_add_ps(acc1[r], b1));
    }
}

/* Widening a whole panel to float32, for calls with more rows than one tile holds: every tile then reads the
 * widened panel from cache instead of widening it again (panel_row(), as tile() widens). */
__attribute__((target("avx512f"))) static void widen_panel(
    const void *panel, const float *scale, const float *offset, int format, int k_dim, float *out) {
    for (int k0 = 0; k0 < k_dim; k0 += BLOCK) {
        int k_end = k0 + BLOCK < k_dim ? k0 + BLOCK : k_dim;
        __m512 d0, d1, m0, m1, w0, w1;
        block_scales(scale, offset, format, k0, &d0, &d1, &m0, &m1);
        for (int k = k0; k < k_end; k++) {
            panel_row(panel, format, k, d0, d1, m0, m1, &w0, &w1);
            _mm512_storeu_ps(out + (size_t)k * PANEL, w0);
            _mm512_storeu_ps(out + (size_t)k * PANEL + 16, w1);
        }
    }
}

/* One float32 panel of scratch per thread (callers run concurrently with the GIL released), kept for the
 * thread's life: K x 128 bytes for the largest K it has seen. */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *scratch_panel(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

#define TILE_CASE(R) \
    case R: tile(x + (size_t)r0 * k_dim, k_dim, panel, scale, offset, format, y + (size_t)r0 * n, n, n0, bias, R); \
        break;

/* All rows against one panel. More rows than a tile holds: tiles of equal height (16 = 8 + 8, not 14 + 2,
 * whose 2-row tile would leave the FMA units waiting), each re-reading the panel from cache. */
__attribute__((target("avx512f,fma"), always_inline)) static inline void panel_rows(
    const float *x, int rows, int k_dim, const void *panel, const float *scale, const float *offset, int format,
    float *y, int n, int n0, const float *bias) {
    int rows_max = format == FORMAT_F32 ? ROWS_MAX : ROWS_MAX_I8;
    int tiles = (rows + rows_max - 1) / rows_max;
    for (int t = 0, r0 = 0; t < tiles; t++) {
        int height = (rows - r0) / (tiles - t);
        switch (height) {
            TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7)
            TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12) TILE_CASE(13) TILE_CASE(14)
        }
        r0 += height;
    }
}

/* Returns 0, or -1 when a scratch panel cannot be allocated. */
__attribute__((target("avx512f,fma"))) static int gemm_avx512(
    const float *x, int rows, int k_dim, const void *weights, int format, const float *scales,
    const float *offsets, int n, float *y, const float *bias) {
    int panels = (n + PANEL - 1) / PANEL;
    size_t panel_size = (size_t)k_dim * PANEL, blocks_size = (size_t)(k_dim / BLOCK) * PANEL;
    float *widened = NULL;
    if (format != FORMAT_F32 && rows > ROWS_MAX_I8 && !(widened = scratch_panel(panel_size)))
        return -1;
    for (int p = 0; p < panels; p++) {
        int n0 = p * PANEL;
        if (widened) {
            if (format == FORMAT_BF16)
                widen_panel((const uint16_t *)weights + p * panel_size, NULL, NULL, format, k_dim, widened);
            else
                widen_panel((const int8_t *)weights + p * panel_size, scales + p * blocks_size,
                            offsets + p * blocks_size, format, k_dim, widened);
            panel_rows(x, rows, k_dim, widened, NULL, NULL, FORMAT_F32, y, n, n0, bias);
            continue;
        }
        switch (format) {
        case FORMAT_F32:
            panel_rows(x, rows, k_dim, (const float *)weights + p * panel_size, NULL, NULL, FORMAT_F32, y, n, n0, bias);
            break;
        case FORMAT_BF16:
            panel_rows(x, rows, k_dim, (const uint16_t *)weights + p * panel_size, NULL, NULL, FORMAT_BF16, y, n, n0,
                       bias);
            break;
        default:
            panel_rows(x, rows, k_dim, (const int8_t *)weights + p * panel_size, scales + p * blocks_size,
                       offsets + p * blocks_size, FORMAT_I8_BLOCKS, y, n, n0, bias);
        }
    }
    return 0;
}
#endif

static int cpu_supported(void) {
#ifdef DUO_HAVE_AVX512_BUILD
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

static PyObject *py_avx512_supported(PyObject *self, PyObject *unused) {
    return PyBool_FromLong(cpu_supported());
}

/* gemm(x, rows, k, weights, format, scales, offsets, n, y, bias): addresses as integers (torch
 * data_ptr()); scales and offsets only for FORMAT_I8_BLOCKS, bias 0 for none. The caller
 * (duo_common.packed_linear) owns validation: dtypes, contiguity, shapes, panel layout. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    unsigned long long x, weights, scales, offsets, y, bias;
    int rows, k_dim, format, n;
    if (!PyArg_ParseTuple(args, "KiiKiKKiKK", &x, &rows, &k_dim, &weights, &format, &scales, &offsets, &n, &y, &bias))
        return NULL;
    if (rows < 0 || k_dim <= 0 || n <= 0 || !x || !weights || !y) {
        PyErr_SetString(PyExc_ValueError, "gemm: bad shape or null buffer");
        return NULL;
    }
    if (format < FORMAT_F32 || format > FORMAT_I8_BLOCKS
        || (format == FORMAT_I8_BLOCKS && (k_dim % 32 || !scales || !offsets))) {
        PyErr_SetString(PyExc_ValueError, "gemm: bad weight format");
        return NULL;
    }
#ifdef DUO_HAVE_AVX512_BUILD
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "gemm: this CPU has no AVX-512F");
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gemm_avx512((const float *)(uintptr_t)x, rows, k_dim, (const void *)(uintptr_t)weights, format,
                         (const float *)(uintptr_t)scales, (const float *)(uintptr_t)offsets, n,
                         (float *)(uintptr_t)y, bias ? (const float *)(uintptr_t)bias : NULL);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "gemm: built without AVX-512 support");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"avx512_supported", py_avx512_supported, METH_NOARGS, "Whether this CPU can run gemm()."},
    {"gemm", py_gemm, METH_VARARGS, "y[rows][n] = x[rows][k] . W^T (+ bias), W packed in 32-column panels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed_gemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__packed_gemm(void) { return PyModule_Create(&module); }
