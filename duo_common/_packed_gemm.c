/* duo_common._packed_gemm: Y = X · Wᵀ (+ bias) for a few rows of X against a weight packed once at load.
 *
 * Why: speculative decoding pays when scoring k proposed tokens costs about as much as scoring one, because
 * the weights are read once. On a CPU, the BLAS kernels torch calls for 2-32 rows re-pack or re-read the
 * weight and cost up to 3x a single row. This kernel streams the weight exactly once per call, whatever
 * the number of rows, from a layout made for it: the weight [N][K] is stored as column panels
 * P[ceil(N/32)][K][32] (zero padded), so each step over K reads 128 contiguous bytes and updates up to
 * ROWS_MAX rows x 32 outputs held in AVX-512 registers.
 *
 * Numerics: every output is one fused-multiply-add chain over k = 0 .. K-1 in order, the same whatever the
 * number of rows or their position in X, so a row's result never depends on what it is batched with.
 *
 * Built as an optional extension (setup.py); the AVX-512 code is compiled for that target only and runs
 * only where avx512_supported() says so, so the module imports on any x86-64 CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DUO_HAVE_AVX512_BUILD 1
#define PANEL 32          /* output columns per panel: two 16-float registers */
#ifndef ROWS_MAX
#define ROWS_MAX 14
#endif
#ifndef PREFETCH_FLOATS
#define PREFETCH_FLOATS 1024
#endif

__attribute__((target("avx512f,fma"), always_inline)) static inline void tile(
    const float *x, int k_dim, const float *panel, float *y, int n, int n0, const float *bias, int rows) {
    __m512 acc0[ROWS_MAX], acc1[ROWS_MAX];
    int cols = n - n0 < PANEL ? n - n0 : PANEL;
    __mmask16 mask0 = cols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cols) - 1u);
    __mmask16 mask1 = cols <= 16 ? (__mmask16)0 : (cols >= 32 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - 16)) - 1u));
    for (int r = 0; r < rows; r++) {
        acc0[r] = _mm512_setzero_ps();
        acc1[r] = _mm512_setzero_ps();
    }
    for (int k = 0; k < k_dim; k++) {
        const float *w = panel + (size_t)k * PANEL;
        _mm_prefetch((const char *)(w + PREFETCH_FLOATS), PF_HINT);
        _mm_prefetch((const char *)(w + PREFETCH_FLOATS + 16), PF_HINT);
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[(size_t)r * k_dim + k]);
            acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
        }
    }
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask0, bias + n0) : _mm512_setzero_ps();
    __m512 b1 = bias ? _mm512_maskz_loadu_ps(mask1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        _mm512_mask_storeu_ps(y + (size_t)r * n + n0, mask0, _mm512_add_ps(acc0[r], b0));
        _mm512_mask_storeu_ps(y + (size_t)r * n + n0 + 16, mask1, _mm512_add_ps(acc1[r], b1));
    }
}

/* The row count as a compile-time constant in each case, so the tile's accumulators live in registers. */
#define TILE_CASE(R) \
    case R: tile(x + (size_t)r0 * k_dim, k_dim, panel, y + (size_t)r0 * n, n, n0, bias, R); break;

__attribute__((target("avx512f,fma"))) static void gemm_avx512(
    const float *x, int rows, int k_dim, const float *packed, int n, float *y, const float *bias) {
    int panels = (n + PANEL - 1) / PANEL;
    for (int p = 0; p < panels; p++) {
        const float *panel = packed + (size_t)p * k_dim * PANEL;
        int n0 = p * PANEL;
        /* Rows beyond ROWS_MAX re-read this panel from cache, not from memory. */
        for (int r0 = 0; r0 < rows; r0 += ROWS_MAX) {
            switch (rows - r0 < ROWS_MAX ? rows - r0 : ROWS_MAX) {
                TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7)
#if ROWS_MAX > 7
                TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12) TILE_CASE(13) TILE_CASE(14)
#endif
            }
        }
    }
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

/* gemm(x, rows, k, packed, n, y, bias): addresses as integers (torch data_ptr()), bias 0 for none.
 * The caller (duo_common.packed_linear) owns validation: float32, contiguous, shapes, panel layout. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    unsigned long long x, packed, y, bias;
    int rows, k_dim, n;
    if (!PyArg_ParseTuple(args, "KiiKiKK", &x, &rows, &k_dim, &packed, &n, &y, &bias))
        return NULL;
    if (rows < 0 || k_dim <= 0 || n <= 0 || !x || !packed || !y) {
        PyErr_SetString(PyExc_ValueError, "gemm: bad shape or null buffer");
        return NULL;
    }
#ifdef DUO_HAVE_AVX512_BUILD
    if (!cpu_supported()) {
        PyErr_SetString(PyExc_RuntimeError, "gemm: this CPU has no AVX-512F");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    gemm_avx512((const float *)(uintptr_t)x, rows, k_dim, (const float *)(uintptr_t)packed, n,
                (float *)(uintptr_t)y, bias ? (const float *)(uintptr_t)bias : NULL);
    Py_END_ALLOW_THREADS
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
