/*
 * normexport RMSNorm CUDA kernel: C interface.
 *
 *   s = x (+ residual)
 *   y = s / sqrt(mean(s^2 over the last dim) + eps) * gamma (+ bias)
 *   residual_out = s            (only when residual is given)
 *
 * x, residual, y and residual_out are dense row-major [rows, hidden] tensors; gamma and bias are [hidden]. Every
 * tensor has the same dtype; the statistics are accumulated in fp32 whatever the dtype. The library needs the CUDA
 * runtime only (no TensorRT), so it can be called from ctypes, from the TensorRT plugin, or from any C/C++ code.
 */
#ifndef NORMEXPORT_RMSNORM_KERNEL_H
#define NORMEXPORT_RMSNORM_KERNEL_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#if defined(_WIN32)
#define NORMEXPORT_RMSNORM_API __declspec(dllexport)
#else
#define NORMEXPORT_RMSNORM_API __attribute__((visibility("default")))
#endif

/* Bumped whenever the C interface below changes; returned by normexport_rmsnorm_version(). */
#define NORMEXPORT_RMSNORM_ABI_VERSION 1

/* dtype codes of normexport_rmsnorm_forward(). */
#define NORMEXPORT_RMSNORM_FLOAT32 0
#define NORMEXPORT_RMSNORM_FLOAT16 1
#define NORMEXPORT_RMSNORM_BFLOAT16 2

#ifdef __cplusplus
extern "C" {
#endif

/*
 * How a call is executed; filled by normexport_rmsnorm_plan() with the same logic normexport_rmsnorm_forward() uses.
 *   vec_elems        elements per vector load/store (16 bytes when every pointer and the hidden size allow it,
 *                    else 8 bytes, else one element)
 *   items_per_thread vectors each thread keeps in registers between the reduction and the write (0: the row does
 *                    not fit in registers and is read twice)
 *   threads_per_row  threads that cooperate on one row (a power of two <= 32: part of a warp; else the whole block)
 *   rows_per_block   rows one thread block handles at a time
 *   block_threads    threads per block
 */
typedef struct NormexportRmsnormPlan
{
    int32_t vec_elems;
    int32_t items_per_thread;
    int32_t threads_per_row;
    int32_t rows_per_block;
    int32_t block_threads;
} NormexportRmsnormPlan;

/*
 * Launch the RMSNorm kernel on `stream` (asynchronous).
 *
 *   dtype         NORMEXPORT_RMSNORM_FLOAT32 (0), _FLOAT16 (1) or _BFLOAT16 (2); all tensors share it
 *   x             [rows, hidden] input (device)
 *   residual      [rows, hidden] or NULL: when given, s = x + residual is normalized
 *   gamma         [hidden] scale (device)
 *   bias          [hidden] or NULL: added after the scale
 *   y             [rows, hidden] output (device)
 *   residual_out  [rows, hidden] or NULL: receives s = x + residual (needs residual)
 *   rows, hidden  sizes; rows == 0 or hidden == 0 is a no-op; hidden must be < 2^31
 *   eps           added to the mean square (>= 0)
 *
 * Outputs must not overlap the inputs. Returns a cudaError_t value: 0 (cudaSuccess) when the launch was queued,
 * cudaErrorInvalidValue (1) for bad arguments, otherwise the launch error (see normexport_rmsnorm_error_string()).
 */
NORMEXPORT_RMSNORM_API int normexport_rmsnorm_forward(int dtype, const void* x, const void* residual,
    const void* gamma, const void* bias, void* y, void* residual_out, int64_t rows, int64_t hidden, float eps,
    cudaStream_t stream);

/* Fill *plan for a call with these arguments, without touching the GPU. Returns 0, or cudaErrorInvalidValue. */
NORMEXPORT_RMSNORM_API int normexport_rmsnorm_plan(int dtype, const void* x, const void* residual, const void* gamma,
    const void* bias, const void* y, const void* residual_out, int64_t hidden, NormexportRmsnormPlan* plan);

/* NORMEXPORT_RMSNORM_ABI_VERSION of the library. */
NORMEXPORT_RMSNORM_API int normexport_rmsnorm_version(void);

/* Text for a code returned by normexport_rmsnorm_forward(). */
NORMEXPORT_RMSNORM_API const char* normexport_rmsnorm_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* NORMEXPORT_RMSNORM_KERNEL_H */
