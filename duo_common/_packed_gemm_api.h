/* The packed kernel as other extensions call it (duo.common._decoder_ops), through the capsule
 * duo.common._packed_gemm._C_API. */
#ifndef DUO_PACKED_GEMM_API_H
#define DUO_PACKED_GEMM_API_H

typedef struct {
    /* The kernel set of that name if this CPU runs it ("avx512", "avx2"), else NULL. */
    const void *(*kernel_set)(const char *name);
    /* y[rows][n] = x[rows][k_dim] . W^T (+ bias); 0, or -1 when out of memory. See _packed_gemm.c. */
    int (*gemm)(const void *set, const float *x, int rows, int k_dim, const void *weights, int format,
                const float *scales, const float *offsets, int n, float *y, const float *bias);
} packed_gemm_api;

#define PACKED_GEMM_CAPSULE "duo.common._packed_gemm._C_API"

#endif
