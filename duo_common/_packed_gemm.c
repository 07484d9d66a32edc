/* duo.common._packed_gemm: Y = X · Wᵀ (+ bias) for a few rows of X against a weight packed once at load.
 *
 * Why: speculative decoding pays when scoring k proposed tokens costs about as much as scoring one, because
 * the weights are read once. On a CPU, the BLAS kernels torch calls for 2-32 rows re-pack or re-read the
 * weight and cost up to 3x a single row. This kernel streams the weight exactly once per call, whatever
 * the number of rows, from a layout made for it: the weight [N][K] is stored as column panels
 * [ceil(N/32)][K][32] (zero padded), so each step over K reads one row of 32 weights and updates a tile of
 * rows x outputs held in vector registers.
 *
 * Two instruction sets, chosen at run time (the best this CPU has; a caller may ask for the other to test):
 *   avx512  tiles of up to 14 rows x 32 outputs in 16-float registers;
 *   avx2    (with FMA) tiles of up to 6 rows x 16 outputs (half a panel) in 8-float registers.
 *
 * Storage formats (the caller packs; duo.common.packed_linear chooses the smallest that is *exact*):
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
 * Numerics: every output is one fused-multiply-add chain over k = 0 .. K-1 in order, then + bias, the same
 * whatever the number of rows, their position in X, the storage format or the instruction set, so a row's
 * result never depends on what it is batched with nor on which of the two kernels ran.
 *
 * Threads: set_threads(n) gives calls n - 1 helper threads; a call's panels are then dealt out a few at a
 * time to whichever of the caller and its helpers is free (a helper that the OS runs late does less, none
 * waits for a slow one), and each output is still computed by one thread as one chain, so the results do
 * not depend on the thread count either. One call at a time uses the helpers; a concurrent call runs alone.
 *
 * Built as an optional extension (setup.py, with -ffp-contract=off so (d * q) + m is never fused); each
 * instruction set's code is compiled for that target only and runs only where the CPU has it, so the
 * module imports on any x86-64 CPU.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "_packed_gemm_api.h"

#define PANEL 32  /* output columns per panel */
#define BLOCK 32  /* k positions sharing one scale and offset (FORMAT_I8_BLOCKS) */

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_I8_BLOCKS = 2, FORMATS = 3 };

/* One instruction set's kernels: all rows of X against one panel, per storage format, and the widening of a
 * compact panel to float32 (for calls with more rows than compact_rows_max: see gemm()). */
typedef void (*panel_rows_fn)(const float *x, int rows, int k_dim, const void *panel, const float *scale,
                              const float *offset, float *y, int n, int n0, const float *bias);
typedef void (*widen_panel_fn)(const void *panel, const float *scale, const float *offset, int k_dim, float *out);
typedef struct {
    const char *name;
    int (*cpu_runs)(void);  /* whether this CPU has the instructions */
    int compact_rows_max;
    panel_rows_fn panel_rows[FORMATS];
    widen_panel_fn widen_panel[FORMATS];  /* NULL for FORMAT_F32 */
} kernel_set;

/* Per-format entry points for one instruction set's always-inline panel_rows and widen_panel, so the format
 * is a constant inside the inner loops. */
#define PANEL_ROWS_ENTRY(ISA, TARGET, FORMAT, SUFFIX)                                                               \
    __attribute__((target(TARGET))) static void panel_rows_##ISA##_##SUFFIX(                                        \
        const float *x, int rows, int k_dim, const void *panel, const float *scale, const float *offset, float *y, \
        int n, int n0, const float *bias) {                                                                          \
        panel_rows_##ISA(x, rows, k_dim, panel, scale, offset, FORMAT, y, n, n0, bias);                              \
    }
#define WIDEN_PANEL_ENTRY(ISA, TARGET, FORMAT, SUFFIX)                                                              \
    __attribute__((target(TARGET))) static void widen_panel_##ISA##_##SUFFIX(                                       \
        const void *panel, const float *scale, const float *offset, int k_dim, float *out) {                        \
        widen_panel_##ISA(panel, scale, offset, FORMAT, k_dim, out);                                                 \
    }
#define ENTRY_POINTS(ISA, TARGET)                                                                                    \
    PANEL_ROWS_ENTRY(ISA, TARGET, FORMAT_F32, f32)                                                                   \
    PANEL_ROWS_ENTRY(ISA, TARGET, FORMAT_BF16, bf16)                                                                 \
    PANEL_ROWS_ENTRY(ISA, TARGET, FORMAT_I8_BLOCKS, i8)                                                              \
    WIDEN_PANEL_ENTRY(ISA, TARGET, FORMAT_BF16, bf16)                                                                \
    WIDEN_PANEL_ENTRY(ISA, TARGET, FORMAT_I8_BLOCKS, i8)
#define KERNEL_SET(ISA, COMPACT_ROWS_MAX)                                                                            \
    {#ISA, cpu_has_##ISA, COMPACT_ROWS_MAX,                                                                         \
     {panel_rows_##ISA##_f32, panel_rows_##ISA##_bf16, panel_rows_##ISA##_i8},                                       \
     {NULL, widen_panel_##ISA##_bf16, widen_panel_##ISA##_i8}}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DUO_HAVE_X86_BUILD 1
#define ROWS_MAX 14        /* avx512: rows per register tile: 2 x 14 accumulators + 2 weight registers <= 32 */
#define ROWS_MAX_I8 12     /* avx512, compact formats: tiles also hold a block's scales and offsets */
#define HALF 16            /* avx2: a tile covers half a panel, two 8-float registers per row */
#define ROWS_MAX_AVX2 6    /* avx2: 2 x 6 accumulators + 2 weights + the broadcast x <= 16 registers */
#define PREFETCH_BYTES 8192

/* Row k of a panel as float32 (w0: columns 0-15, w1: 16-31); d0, d1, m0, m1 hold the scales and offsets
 * of k's block (FORMAT_I8_BLOCKS). The one definition of the widening, for tile() and widen_panel() alike,
 * so a row's products are the same whichever path it takes. */
__attribute__((target("avx512f"), always_inline)) static inline void panel_row_avx512(
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
__attribute__((target("avx512f"), always_inline)) static inline void block_scales_avx512(
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
__attribute__((target("avx512f,fma"), always_inline)) static inline void tile_avx512(
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
        block_scales_avx512(scale, offset, format, k0, &d0, &d1, &m0, &m1);
        for (int k = k0; k < k_end; k++) {
            panel_row_avx512(panel, format, k, d0, d1, m0, m1, &w0, &w1);
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
 * widened panel from cache instead of widening it again (panel_row_avx512(), as tile() widens). */
__attribute__((target("avx512f"))) static inline void widen_panel_avx512(
    const void *panel, const float *scale, const float *offset, int format, int k_dim, float *out) {
    for (int k0 = 0; k0 < k_dim; k0 += BLOCK) {
        int k_end = k0 + BLOCK < k_dim ? k0 + BLOCK : k_dim;
        __m512 d0, d1, m0, m1, w0, w1;
        block_scales_avx512(scale, offset, format, k0, &d0, &d1, &m0, &m1);
        for (int k = k0; k < k_end; k++) {
            panel_row_avx512(panel, format, k, d0, d1, m0, m1, &w0, &w1);
            _mm512_storeu_ps(out + (size_t)k * PANEL, w0);
            _mm512_storeu_ps(out + (size_t)k * PANEL + 16, w1);
        }
    }
}

#define TILE_CASE_AVX512(R) \
    case R: tile_avx512(x + (size_t)r0 * k_dim, k_dim, panel, scale, offset, format, y + (size_t)r0 * n, n, n0, bias, R); \
        break;

/* All rows against one panel. More rows than a tile holds: tiles of equal height (16 = 8 + 8, not 14 + 2,
 * whose 2-row tile would leave the FMA units waiting), each re-reading the panel from cache. */
__attribute__((target("avx512f,fma"), always_inline)) static inline void panel_rows_avx512(
    const float *x, int rows, int k_dim, const void *panel, const float *scale, const float *offset, int format,
    float *y, int n, int n0, const float *bias) {
    int rows_max = format == FORMAT_F32 ? ROWS_MAX : ROWS_MAX_I8;
    int tiles = (rows + rows_max - 1) / rows_max;
    for (int t = 0, r0 = 0; t < tiles; t++) {
        int height = (rows - r0) / (tiles - t);
        switch (height) {
            TILE_CASE_AVX512(1) TILE_CASE_AVX512(2) TILE_CASE_AVX512(3) TILE_CASE_AVX512(4) TILE_CASE_AVX512(5) TILE_CASE_AVX512(6) TILE_CASE_AVX512(7)
            TILE_CASE_AVX512(8) TILE_CASE_AVX512(9) TILE_CASE_AVX512(10) TILE_CASE_AVX512(11) TILE_CASE_AVX512(12) TILE_CASE_AVX512(13) TILE_CASE_AVX512(14)
        }
        r0 += height;
    }
}

ENTRY_POINTS(avx512, "avx512f,fma")

/* avx2: columns c0 .. c0 + 15 of row k of a panel as float32 (w0, w1: 8 columns each), as panel_row_avx512
 * computes them. The first half's pass prefetches the whole row, so the second half reads it from cache. */
__attribute__((target("avx2,fma"), always_inline)) static inline void panel_row_avx2(
    const void *panel, int format, int k, int c0, __m256 d0, __m256 d1, __m256 m0, __m256 m1, __m256 *w0,
    __m256 *w1) {
    if (format == FORMAT_F32) {
        const float *w = (const float *)panel + (size_t)k * PANEL;
        if (c0 == 0) {
            _mm_prefetch((const char *)w + PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *)w + PREFETCH_BYTES + 64, _MM_HINT_T0);
        }
        *w0 = _mm256_loadu_ps(w + c0), *w1 = _mm256_loadu_ps(w + c0 + 8);
    } else if (format == FORMAT_BF16) {
        const uint16_t *w = (const uint16_t *)panel + (size_t)k * PANEL;
        if (c0 == 0)
            _mm_prefetch((const char *)w + PREFETCH_BYTES / 2, _MM_HINT_T0);
        *w0 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c0))), 16));
        *w1 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + c0 + 8))), 16));
    } else {
        const int8_t *q = (const int8_t *)panel + (size_t)k * PANEL;
        if (c0 == 0)
            _mm_prefetch((const char *)q + PREFETCH_BYTES / 4, _MM_HINT_T0);
        __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + c0))));
        __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + c0 + 8))));
        *w0 = _mm256_add_ps(_mm256_mul_ps(q0, d0), m0);  /* (d * q) + m: never fused (-ffp-contract=off) */
        *w1 = _mm256_add_ps(_mm256_mul_ps(q1, d1), m1);
    }
}

/* avx2: the scales and offsets of columns c0 .. c0 + 15 in the block starting at k0 (zeros but for
 * FORMAT_I8_BLOCKS). */
__attribute__((target("avx2"), always_inline)) static inline void block_scales_avx2(
    const float *scale, const float *offset, int format, int k0, int c0, __m256 *d0, __m256 *d1, __m256 *m0,
    __m256 *m1) {
    *d0 = *d1 = *m0 = *m1 = _mm256_setzero_ps();
    if (format == FORMAT_I8_BLOCKS) {
        const float *d = scale + (size_t)(k0 / BLOCK) * PANEL + c0, *m = offset + (size_t)(k0 / BLOCK) * PANEL + c0;
        *d0 = _mm256_loadu_ps(d), *d1 = _mm256_loadu_ps(d + 8);
        *m0 = _mm256_loadu_ps(m), *m1 = _mm256_loadu_ps(m + 8);
    }
}

/* avx2: rows x 16 outputs (columns c0 .. c0 + 15 of one panel), as tile_avx512 does for 32. */
__attribute__((target("avx2,fma"), always_inline)) static inline void tile_avx2(
    const float *x, int k_dim, const void *panel, const float *scale, const float *offset, int format, float *y,
    int n, int n0, int c0, const float *bias, int rows) {
    __m256 acc0[ROWS_MAX_AVX2], acc1[ROWS_MAX_AVX2];
    for (int r = 0; r < rows; r++) {
        acc0[r] = _mm256_setzero_ps();
        acc1[r] = _mm256_setzero_ps();
    }
    for (int k0 = 0; k0 < k_dim; k0 += BLOCK) {
        int k_end = k0 + BLOCK < k_dim ? k0 + BLOCK : k_dim;
        __m256 d0, d1, m0, m1, w0, w1;
        block_scales_avx2(scale, offset, format, k0, c0, &d0, &d1, &m0, &m1);
        for (int k = k0; k < k_end; k++) {
            panel_row_avx2(panel, format, k, c0, d0, d1, m0, m1, &w0, &w1);
            for (int r = 0; r < rows; r++) {
                __m256 xv = _mm256_broadcast_ss(x + (size_t)r * k_dim + k);
                acc0[r] = _mm256_fmadd_ps(xv, w0, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(xv, w1, acc1[r]);
            }
        }
    }
    int cols = n - n0 - c0 < HALF ? n - n0 - c0 : HALF;
    float b[HALF] = {0};
    if (bias)
        memcpy(b, bias + n0 + c0, (size_t)cols * sizeof(float));
    __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    for (int r = 0; r < rows; r++) {
        float *out = y + (size_t)r * n + n0 + c0;
        if (cols == HALF) {
            _mm256_storeu_ps(out, _mm256_add_ps(acc0[r], b0));
            _mm256_storeu_ps(out + 8, _mm256_add_ps(acc1[r], b1));
        } else {  /* the last panel's padding columns are not stored */
            float full[HALF];
            _mm256_storeu_ps(full, _mm256_add_ps(acc0[r], b0));
            _mm256_storeu_ps(full + 8, _mm256_add_ps(acc1[r], b1));
            memcpy(out, full, (size_t)cols * sizeof(float));
        }
    }
}

__attribute__((target("avx2,fma"), always_inline)) static inline void widen_panel_avx2(
    const void *panel, const float *scale, const float *offset, int format, int k_dim, float *out) {
    for (int k0 = 0; k0 < k_dim; k0 += BLOCK) {
        int k_end = k0 + BLOCK < k_dim ? k0 + BLOCK : k_dim;
        for (int c0 = 0; c0 < PANEL; c0 += HALF) {
            __m256 d0, d1, m0, m1, w0, w1;
            block_scales_avx2(scale, offset, format, k0, c0, &d0, &d1, &m0, &m1);
            for (int k = k0; k < k_end; k++) {
                panel_row_avx2(panel, format, k, c0, d0, d1, m0, m1, &w0, &w1);
                _mm256_storeu_ps(out + (size_t)k * PANEL + c0, w0);
                _mm256_storeu_ps(out + (size_t)k * PANEL + c0 + 8, w1);
            }
        }
    }
}

#define TILE_CASE_AVX2(R)                                                                                      \
    case R:                                                                                                   \
        tile_avx2(x + (size_t)r0 * k_dim, k_dim, panel, scale, offset, format, y + (size_t)r0 * n, n, n0, c0, \
                  bias, R);                                                                                   \
        break;

/* avx2: all rows against one panel, half a panel at a time, in tiles of equal height. */
__attribute__((target("avx2,fma"), always_inline)) static inline void panel_rows_avx2(
    const float *x, int rows, int k_dim, const void *panel, const float *scale, const float *offset, int format,
    float *y, int n, int n0, const float *bias) {
    int tiles = (rows + ROWS_MAX_AVX2 - 1) / ROWS_MAX_AVX2;
    for (int c0 = 0; c0 < PANEL && n0 + c0 < n; c0 += HALF) {
        for (int t = 0, r0 = 0; t < tiles; t++) {
            int height = (rows - r0) / (tiles - t);
            switch (height) {
                TILE_CASE_AVX2(1) TILE_CASE_AVX2(2) TILE_CASE_AVX2(3) TILE_CASE_AVX2(4) TILE_CASE_AVX2(5)
                TILE_CASE_AVX2(6)
            }
            r0 += height;
        }
    }
}

ENTRY_POINTS(avx2, "avx2,fma")

static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

static int cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static const kernel_set KERNEL_SETS[] = {KERNEL_SET(avx512, ROWS_MAX_I8), KERNEL_SET(avx2, ROWS_MAX_AVX2)};
#define KERNEL_SET_COUNT (int)(sizeof(KERNEL_SETS) / sizeof(KERNEL_SETS[0]))
#else
#define KERNEL_SET_COUNT 0
static const kernel_set KERNEL_SETS[1];
#endif

/* The kernel set of that name, if this CPU can run it; NULL otherwise. */
static const kernel_set *kernel_set_named(const char *name) {
    for (int i = 0; i < KERNEL_SET_COUNT; i++)
        if (!strcmp(KERNEL_SETS[i].name, name))
            return KERNEL_SETS[i].cpu_runs() ? &KERNEL_SETS[i] : NULL;
    return NULL;
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

/* One call's work: panels [0, panels) of y = x . W^T (+ bias). */
typedef struct {
    const kernel_set *set;
    const float *x;
    int rows, k_dim;
    const void *weights;
    int format;
    const float *scales, *offsets;
    int n;
    float *y;
    const float *bias;
    int panels;
} gemm_call;

/* Panels first .. first + count - 1 of the call. Returns 0, or -1 when a scratch panel cannot be allocated. */
static int run_panels(const gemm_call *c, int first, int count) {
    static const size_t element_bytes[FORMATS] = {sizeof(float), sizeof(uint16_t), sizeof(int8_t)};
    size_t panel_size = (size_t)c->k_dim * PANEL, blocks_size = (size_t)(c->k_dim / BLOCK) * PANEL;
    float *widened = NULL;
    if (c->format != FORMAT_F32 && c->rows > c->set->compact_rows_max && !(widened = scratch_panel(panel_size)))
        return -1;
    for (int p = first; p < first + count && p < c->panels; p++) {
        const void *panel = (const char *)c->weights + p * panel_size * element_bytes[c->format];
        const float *scale = c->format == FORMAT_I8_BLOCKS ? c->scales + p * blocks_size : NULL;
        const float *offset = c->format == FORMAT_I8_BLOCKS ? c->offsets + p * blocks_size : NULL;
        if (widened) {
            c->set->widen_panel[c->format](panel, scale, offset, c->k_dim, widened);
            c->set->panel_rows[FORMAT_F32](c->x, c->rows, c->k_dim, widened, NULL, NULL, c->y, c->n, p * PANEL,
                                           c->bias);
        } else {
            c->set->panel_rows[c->format](c->x, c->rows, c->k_dim, panel, scale, offset, c->y, c->n, p * PANEL,
                                          c->bias);
        }
    }
    return 0;
}

/* The helper threads. A call is published in `shared`; `ticket` deals its panels: the high 32 bits are the
 * call's panel count (0 between calls), the low 32 the next panel to take, so one atomic fetch-and-add tells
 * a helper both which panels are its and whether they belong to the call it read (a helper that comes late
 * finds the limit reached, or 0). `done` counts finished panels; the caller returns when all are. Helpers
 * spin briefly between calls (a layer's products follow each other within microseconds), then sleep. */
#define MAX_THREADS 64
#define CHUNK 2            /* panels taken at a time */
#define SPIN_NS 50000      /* how long a helper spins for the next call before it sleeps */

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;   /* held by the call using the helpers */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static gemm_call shared;
static _Atomic uint64_t ticket;
static atomic_int done, failed, sleepers;
static atomic_uint generation;
static int helpers;        /* started so far */
static atomic_int wanted;  /* threads a call uses, the caller included: helpers 1 .. wanted - 1 take part */

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#else
#define cpu_relax() ((void)0)
#endif

static int take_and_run(void) {
    int ran = 0;
    for (;;) {
        uint64_t t = atomic_fetch_add(&ticket, CHUNK);
        int limit = (int)(t >> 32), first = (int)(t & 0xffffffffu);
        if (first >= limit)
            return ran;
        int count = first + CHUNK <= limit ? CHUNK : limit - first;
        if (run_panels(&shared, first, count))
            atomic_store(&failed, 1);
        atomic_fetch_add(&done, count);
        ran = 1;
    }
}

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Spin (a pause instruction at a time: its length differs between CPUs, so the clock bounds the spin)
 * until `generation` moves from `seen` or SPIN_NS have passed; returns whether it moved. */
static int spin_for_call(unsigned seen) {
    long long until = now_ns() + SPIN_NS;
    for (int spin = 0; atomic_load(&generation) == seen; spin++) {
        cpu_relax();
        if (spin % 64 == 63 && now_ns() > until)
            return 0;
    }
    return 1;
}

static void *helper_main(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&generation);
    for (;;) {
        spin_for_call(seen);
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while (atomic_load(&generation) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = atomic_load(&generation);
        if (id < atomic_load(&wanted))
            take_and_run();
    }
    return NULL;
}

/* Threads for later calls, the caller included (1: no helpers). Returns the number in effect. */
static int set_threads(int threads) {
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    pthread_mutex_lock(&pool_lock);
    while (helpers < threads - 1) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper_main, (void *)(intptr_t)(helpers + 1)))
            break;
        pthread_detach(thread);
        helpers++;
    }
    atomic_store(&wanted, helpers + 1 < threads ? helpers + 1 : threads);
    pthread_mutex_unlock(&pool_lock);
    return atomic_load(&wanted);
}

/* y = x . W^T (+ bias), panel by panel, with the helpers when there are some, they are free and the call has
 * panels enough for two. Returns 0, or -1 when a scratch panel cannot be allocated. */
static int gemm(const kernel_set *set, const float *x, int rows, int k_dim, const void *weights, int format,
                const float *scales, const float *offsets, int n, float *y, const float *bias) {
    gemm_call call = {set, x, rows, k_dim, weights, format, scales, offsets, n, y, bias, (n + PANEL - 1) / PANEL};
    if (atomic_load(&wanted) < 2 || call.panels < 2 * CHUNK || pthread_mutex_trylock(&pool_lock))
        return run_panels(&call, 0, call.panels);
    shared = call;
    atomic_store(&done, 0);
    atomic_store(&failed, 0);
    atomic_store(&ticket, (uint64_t)call.panels << 32);  /* publishes `shared` to whoever takes a panel */
    atomic_fetch_add(&generation, 1);
    if (atomic_load(&sleepers)) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    take_and_run();
    long long yield_after = now_ns() + SPIN_NS;
    for (int spin = 0; atomic_load(&done) < call.panels; spin++) {  /* a helper finishes its last panels */
        cpu_relax();
        if (spin % 64 == 63 && now_ns() > yield_after)
            sched_yield();  /* it may be waiting for this core */
    }
    atomic_store(&ticket, 0);  /* late helpers find nothing to take */
    int status = atomic_load(&failed) ? -1 : 0;
    pthread_mutex_unlock(&pool_lock);
    return status;
}

static PyObject *py_instruction_sets(PyObject *self, PyObject *unused) {
    PyObject *names = PyList_New(0);
    for (int i = 0; names && i < KERNEL_SET_COUNT; i++) {
        if (!KERNEL_SETS[i].cpu_runs())
            continue;
        PyObject *name = PyUnicode_FromString(KERNEL_SETS[i].name);
        if (!name || PyList_Append(names, name)) {
            Py_XDECREF(name);
            Py_CLEAR(names);
            break;
        }
        Py_DECREF(name);
    }
    return names;
}

/* gemm(instruction_set, x, rows, k, weights, format, scales, offsets, n, y, bias): addresses as integers
 * (torch data_ptr()); scales and offsets only for FORMAT_I8_BLOCKS, bias 0 for none. The caller
 * (duo.common.packed_linear) owns validation: dtypes, contiguity, shapes, panel layout. */
static PyObject *py_gemm(PyObject *self, PyObject *args) {
    const char *set_name;
    unsigned long long x, weights, scales, offsets, y, bias;
    int rows, k_dim, format, n;
    if (!PyArg_ParseTuple(args, "sKiiKiKKiKK", &set_name, &x, &rows, &k_dim, &weights, &format, &scales, &offsets,
                          &n, &y, &bias))
        return NULL;
    if (rows < 0 || k_dim <= 0 || n <= 0 || !x || !weights || !y) {
        PyErr_SetString(PyExc_ValueError, "gemm: bad shape or null buffer");
        return NULL;
    }
    if (format < FORMAT_F32 || format > FORMAT_I8_BLOCKS
        || (format == FORMAT_I8_BLOCKS && (k_dim % BLOCK || !scales || !offsets))) {
        PyErr_SetString(PyExc_ValueError, "gemm: bad weight format");
        return NULL;
    }
    const kernel_set *set = kernel_set_named(set_name);
    if (!set) {
        PyErr_Format(PyExc_RuntimeError, "gemm: this CPU cannot run the '%s' kernels", set_name);
        return NULL;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = gemm(set, (const float *)(uintptr_t)x, rows, k_dim, (const void *)(uintptr_t)weights, format,
                  (const float *)(uintptr_t)scales, (const float *)(uintptr_t)offsets, n, (float *)(uintptr_t)y,
                  bias ? (const float *)(uintptr_t)bias : NULL);
    Py_END_ALLOW_THREADS
    if (status)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int threads;
    if (!PyArg_ParseTuple(args, "i", &threads))
        return NULL;
    return PyLong_FromLong(set_threads(threads));
}

static PyMethodDef methods[] = {
    {"instruction_sets", py_instruction_sets, METH_NOARGS,
     "The kernel sets this CPU can run, best first (empty: gemm() cannot run here)."},
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(instruction_set, ...): y[rows][n] = x[rows][k] . W^T (+ bias), W packed in 32-column panels."},
    {"set_threads", py_set_threads, METH_VARARGS,
     "set_threads(n): threads for later calls, the caller included; returns the number in effect."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_packed_gemm", NULL, -1, methods};

static const void *api_kernel_set(const char *name) { return kernel_set_named(name); }

static int api_gemm(const void *set, const float *x, int rows, int k_dim, const void *weights, int format,
                    const float *scales, const float *offsets, int n, float *y, const float *bias) {
    return gemm((const kernel_set *)set, x, rows, k_dim, weights, format, scales, offsets, n, y, bias);
}

static const packed_gemm_api API = {api_kernel_set, api_gemm};

PyMODINIT_FUNC PyInit__packed_gemm(void) {
    PyObject *m = PyModule_Create(&module);
    PyObject *capsule = m ? PyCapsule_New((void *)&API, PACKED_GEMM_CAPSULE, NULL) : NULL;
    if (!capsule || PyModule_AddObject(m, "_C_API", capsule)) {
        Py_XDECREF(capsule);
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
