/*
 * normexport RMSNorm CUDA kernel (see rmsnorm_kernel.h for the interface).
 *
 * The kernel is memory bound: per row it must read x (and residual) once and write y (and the sum) once; gamma and
 * bias are re-read by every row but stay in L1/L2. So:
 *   - loads and stores are 16-byte vectors whenever every pointer is 16-byte aligned and the hidden size is a multiple
 *     of the vector width; 8-byte vectors, then single elements, otherwise;
 *   - the row is kept in registers (as fp32) between the sum of squares and the write, so x is read once; a thread
 *     issues all its loads before it uses any of them;
 *   - small rows (<= 128 vectors) are handled by part of a warp (no shared memory, no __syncthreads), larger rows by
 *     a whole block; rows too long for registers (> 4096 vectors: 32K fp16 or 16K fp32 elements) are read twice, the
 *     second read mostly from L2.
 */
#include "rmsnorm_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace
{

constexpr int kSmallRowBlockThreads = 128; // block size when a row takes at most one warp
constexpr int kMaxCachedThreadsPerRow = 512;
constexpr int kUncachedBlockThreads = 1024;

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}
__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}
__device__ __forceinline__ float toFloat(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

// N elements loaded or stored with one instruction (ld.global.v4.u32 for 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack
{
    T v[N];
};

template <typename T>
struct Args
{
    T const* x;
    T const* residual; // may be null
    T const* gamma;
    T const* bias; // may be null
    T* y;
    T* residualOut; // may be null
    int64_t rows;
    int32_t hidden;
    float eps;
    float invHidden;
};

// Sum of v over the threadsPerRow threads that share a row. threadsPerRow is a power of two <= 32 (a slice of a
// warp: xor shuffles stay inside it) or the whole block (then the block holds a single row). Every thread of the
// block must call this, active or not.
__device__ __forceinline__ float rowSum(float v, int threadsPerRow, float* warpPartials)
{
    int const width = threadsPerRow < 32 ? threadsPerRow : 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        if (offset < width)
        {
            v += __shfl_xor_sync(0xffffffffu, v, offset);
        }
    }
    if (threadsPerRow <= 32)
    {
        return v;
    }
    int const warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0)
    {
        warpPartials[warp] = v;
    }
    __syncthreads();
    int const nWarps = threadsPerRow >> 5;
    float total = 0.F;
    for (int w = 0; w < nWarps; ++w)
    {
        total += warpPartials[w]; // same order in every thread: every thread gets the same bits
    }
    __syncthreads(); // warpPartials is rewritten for the next row
    return total;
}

// The row lives in registers: ITEMS vectors of VEC elements per thread, threadsPerRow threads per row. The cached
// values are the T-rounded s (= x, or x + residual rounded like residual_out), so y is exactly the RMSNorm of what
// residual_out holds, as in the unfused graph Add -> RMSNorm; keeping T rather than fp32 halves the registers for
// 16-bit types.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxCachedThreadsPerRow) rmsnormCachedKernel(Args<T> const a, int const threadsPerRow)
{
    using P = Pack<T, VEC>;
    __shared__ float warpPartials[32];

    int const nVec = a.hidden / VEC;
    int const rowsPerBlock = blockDim.x / threadsPerRow;
    int const group = threadIdx.x / threadsPerRow;
    int const lane = threadIdx.x - group * threadsPerRow;
    P const* __restrict__ gamma = reinterpret_cast<P const*>(a.gamma);
    P const* __restrict__ bias = reinterpret_cast<P const*>(a.bias);

    for (int64_t base = static_cast<int64_t>(blockIdx.x) * rowsPerBlock; base < a.rows;
         base += static_cast<int64_t>(gridDim.x) * rowsPerBlock)
    {
        int64_t const row = base + group;
        bool const active = row < a.rows;
        int64_t const offset = (active ? row : 0) * static_cast<int64_t>(a.hidden);

        P s[ITEMS];
        float sumSquares = 0.F;
        if (active)
        {
            P const* __restrict__ xRow = reinterpret_cast<P const*>(a.x + offset);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i)
            {
                int const idx = lane + i * threadsPerRow;
                s[i] = idx < nVec ? xRow[idx] : P{};
            }
            if (a.residual != nullptr)
            {
                P const* __restrict__ rRow = reinterpret_cast<P const*>(a.residual + offset);
                P r[ITEMS];
#pragma unroll
                for (int i = 0; i < ITEMS; ++i)
                {
                    int const idx = lane + i * threadsPerRow;
                    r[i] = idx < nVec ? rRow[idx] : P{};
                }
#pragma unroll
                for (int i = 0; i < ITEMS; ++i)
                {
#pragma unroll
                    for (int j = 0; j < VEC; ++j)
                    {
                        s[i].v[j] = fromFloat<T>(toFloat(s[i].v[j]) + toFloat(r[i].v[j]));
                    }
                }
                if (a.residualOut != nullptr)
                {
                    P* __restrict__ sRow = reinterpret_cast<P*>(a.residualOut + offset);
#pragma unroll
                    for (int i = 0; i < ITEMS; ++i)
                    {
                        int const idx = lane + i * threadsPerRow;
                        if (idx < nVec)
                        {
                            sRow[idx] = s[i];
                        }
                    }
                }
            }
#pragma unroll
            for (int i = 0; i < ITEMS; ++i)
            {
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                {
                    float const v = toFloat(s[i].v[j]); // zero in the padding slots
                    sumSquares += v * v;
                }
            }
        }

        float const invRms = rsqrtf(rowSum(sumSquares, threadsPerRow, warpPartials) * a.invHidden + a.eps);

        if (active)
        {
            P* __restrict__ yRow = reinterpret_cast<P*>(a.y + offset);
#pragma unroll
            for (int i = 0; i < ITEMS; ++i)
            {
                int const idx = lane + i * threadsPerRow;
                if (idx < nVec)
                {
                    P const g = gamma[idx];
                    P out;
                    if (bias != nullptr)
                    {
                        P const b = bias[idx];
#pragma unroll
                        for (int j = 0; j < VEC; ++j)
                        {
                            out.v[j] = fromFloat<T>(toFloat(s[i].v[j]) * invRms * toFloat(g.v[j]) + toFloat(b.v[j]));
                        }
                    }
                    else
                    {
#pragma unroll
                        for (int j = 0; j < VEC; ++j)
                        {
                            out.v[j] = fromFloat<T>(toFloat(s[i].v[j]) * invRms * toFloat(g.v[j]));
                        }
                    }
                    yRow[idx] = out;
                }
            }
        }
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void loadSum(Args<T> const& a, int64_t offset, int idx, float (&s)[VEC])
{
    using P = Pack<T, VEC>;
    P const xv = reinterpret_cast<P const*>(a.x + offset)[idx];
    if (a.residual != nullptr)
    {
        P const rv = reinterpret_cast<P const*>(a.residual + offset)[idx];
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            s[j] = toFloat(fromFloat<T>(toFloat(xv.v[j]) + toFloat(rv.v[j]))); // rounded like residual_out
        }
    }
    else
    {
#pragma unroll
        for (int j = 0; j < VEC; ++j)
        {
            s[j] = toFloat(xv.v[j]);
        }
    }
}

// Rows too long for registers: one block per row, x (and residual) read twice.
template <typename T, int VEC>
__global__ void __launch_bounds__(kUncachedBlockThreads) rmsnormUncachedKernel(Args<T> const a)
{
    using P = Pack<T, VEC>;
    __shared__ float warpPartials[32];
    int const nVec = a.hidden / VEC;
    P const* __restrict__ gamma = reinterpret_cast<P const*>(a.gamma);
    P const* __restrict__ bias = reinterpret_cast<P const*>(a.bias);

    for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x)
    {
        int64_t const offset = row * static_cast<int64_t>(a.hidden);
        float sumSquares = 0.F;
#pragma unroll 4
        for (int idx = threadIdx.x; idx < nVec; idx += blockDim.x)
        {
            float s[VEC];
            loadSum<T, VEC>(a, offset, idx, s);
            if (a.residualOut != nullptr)
            {
                P out;
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                {
                    out.v[j] = fromFloat<T>(s[j]);
                }
                reinterpret_cast<P*>(a.residualOut + offset)[idx] = out;
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j)
            {
                sumSquares += s[j] * s[j];
            }
        }
        float const invRms = rsqrtf(rowSum(sumSquares, blockDim.x, warpPartials) * a.invHidden + a.eps);
#pragma unroll 4
        for (int idx = threadIdx.x; idx < nVec; idx += blockDim.x)
        {
            float s[VEC];
            loadSum<T, VEC>(a, offset, idx, s);
            P const g = gamma[idx];
            P out;
            if (bias != nullptr)
            {
                P const b = bias[idx];
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                {
                    out.v[j] = fromFloat<T>(s[j] * invRms * toFloat(g.v[j]) + toFloat(b.v[j]));
                }
            }
            else
            {
#pragma unroll
                for (int j = 0; j < VEC; ++j)
                {
                    out.v[j] = fromFloat<T>(s[j] * invRms * toFloat(g.v[j]));
                }
            }
            reinterpret_cast<P*>(a.y + offset)[idx] = out;
        }
    }
}

int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

int32_t nextPowerOfTwo(int64_t v)
{
    int32_t p = 1;
    while (p < v)
    {
        p <<= 1;
    }
    return p;
}

size_t elementSize(int dtype)
{
    return dtype == NORMEXPORT_RMSNORM_FLOAT32 ? 4 : 2;
}

bool validDtype(int dtype)
{
    return dtype == NORMEXPORT_RMSNORM_FLOAT32 || dtype == NORMEXPORT_RMSNORM_FLOAT16
        || dtype == NORMEXPORT_RMSNORM_BFLOAT16;
}

// The one place that decides how a call runs; normexport_rmsnorm_plan() reports it.
void makePlan(int dtype, uintptr_t addressBits, int64_t hidden, NormexportRmsnormPlan* p)
{
    size_t const elem = elementSize(dtype);
    int32_t vec = 1;
    for (size_t bytes : {size_t{16}, size_t{8}})
    {
        int32_t const n = static_cast<int32_t>(bytes / elem);
        if (n > 1 && hidden % n == 0 && addressBits % bytes == 0)
        {
            vec = n;
            break;
        }
    }
    int64_t const nVec = hidden / vec;
    p->vec_elems = vec;
    if (nVec <= 32 * 4)
    {
        p->items_per_thread = 4;
        p->threads_per_row = nextPowerOfTwo(ceilDiv(nVec, 4));
        p->block_threads = kSmallRowBlockThreads;
        p->rows_per_block = kSmallRowBlockThreads / p->threads_per_row;
        return;
    }
    for (int32_t items : {4, 8})
    {
        int64_t const threads = ceilDiv(ceilDiv(nVec, items), 32) * 32;
        if (threads <= kMaxCachedThreadsPerRow)
        {
            p->items_per_thread = items;
            p->threads_per_row = static_cast<int32_t>(threads);
            p->block_threads = static_cast<int32_t>(threads);
            p->rows_per_block = 1;
            return;
        }
    }
    p->items_per_thread = 0;
    p->threads_per_row = kUncachedBlockThreads;
    p->block_threads = kUncachedBlockThreads;
    p->rows_per_block = 1;
}

template <typename T, int VEC>
void launchVec(NormexportRmsnormPlan const& p, Args<T> const& a, cudaStream_t stream)
{
    int64_t const blocks = ceilDiv(a.rows, p.rows_per_block);
    dim3 const grid(static_cast<unsigned>(blocks < INT_MAX ? blocks : INT_MAX)); // kernels loop over the rest
    dim3 const block(p.block_threads);
    switch (p.items_per_thread)
    {
    case 4: rmsnormCachedKernel<T, VEC, 4><<<grid, block, 0, stream>>>(a, p.threads_per_row); break;
    case 8: rmsnormCachedKernel<T, VEC, 8><<<grid, block, 0, stream>>>(a, p.threads_per_row); break;
    default: rmsnormUncachedKernel<T, VEC><<<grid, block, 0, stream>>>(a); break;
    }
}

template <typename T>
void launch(NormexportRmsnormPlan const& p, Args<T> const& a, cudaStream_t stream)
{
    constexpr int kVec16 = static_cast<int>(16 / sizeof(T));
    constexpr int kVec8 = static_cast<int>(8 / sizeof(T));
    if (p.vec_elems == kVec16)
    {
        launchVec<T, kVec16>(p, a, stream);
    }
    else if (p.vec_elems == kVec8)
    {
        launchVec<T, kVec8>(p, a, stream);
    }
    else
    {
        launchVec<T, 1>(p, a, stream);
    }
}

template <typename T>
Args<T> makeArgs(void const* x, void const* residual, void const* gamma, void const* bias, void* y,
    void* residualOut, int64_t rows, int64_t hidden, float eps)
{
    Args<T> a;
    a.x = static_cast<T const*>(x);
    a.residual = static_cast<T const*>(residual);
    a.gamma = static_cast<T const*>(gamma);
    a.bias = static_cast<T const*>(bias);
    a.y = static_cast<T*>(y);
    a.residualOut = static_cast<T*>(residualOut);
    a.rows = rows;
    a.hidden = static_cast<int32_t>(hidden);
    a.eps = eps;
    a.invHidden = static_cast<float>(1.0 / static_cast<double>(hidden));
    return a;
}

uintptr_t addressBits(void const* const* ptrs, int n)
{
    uintptr_t bits = 0;
    for (int i = 0; i < n; ++i)
    {
        bits |= reinterpret_cast<uintptr_t>(ptrs[i]); // null pointers add no bits
    }
    return bits;
}

} // namespace

extern "C" int normexport_rmsnorm_plan(int dtype, void const* x, void const* residual, void const* gamma,
    void const* bias, void const* y, void const* residual_out, int64_t hidden, NormexportRmsnormPlan* plan)
{
    if (!validDtype(dtype) || plan == nullptr || hidden <= 0 || hidden > INT32_MAX)
    {
        return cudaErrorInvalidValue;
    }
    void const* ptrs[] = {x, residual, gamma, bias, y, residual_out};
    makePlan(dtype, addressBits(ptrs, 6), hidden, plan);
    return cudaSuccess;
}

extern "C" int normexport_rmsnorm_forward(int dtype, void const* x, void const* residual, void const* gamma,
    void const* bias, void* y, void* residual_out, int64_t rows, int64_t hidden, float eps, cudaStream_t stream)
{
    if (!validDtype(dtype) || rows < 0 || hidden < 0 || hidden > INT32_MAX || !(eps >= 0.F) || std::isinf(eps))
    {
        return cudaErrorInvalidValue;
    }
    if (rows == 0 || hidden == 0)
    {
        return cudaSuccess;
    }
    if (x == nullptr || gamma == nullptr || y == nullptr || (residual_out != nullptr && residual == nullptr))
    {
        return cudaErrorInvalidValue;
    }
    NormexportRmsnormPlan plan;
    void const* ptrs[] = {x, residual, gamma, bias, y, residual_out};
    makePlan(dtype, addressBits(ptrs, 6), hidden, &plan);
    switch (dtype)
    {
    case NORMEXPORT_RMSNORM_FLOAT32:
        launch<float>(plan, makeArgs<float>(x, residual, gamma, bias, y, residual_out, rows, hidden, eps), stream);
        break;
    case NORMEXPORT_RMSNORM_FLOAT16:
        launch<__half>(plan, makeArgs<__half>(x, residual, gamma, bias, y, residual_out, rows, hidden, eps), stream);
        break;
    default:
        launch<__nv_bfloat16>(
            plan, makeArgs<__nv_bfloat16>(x, residual, gamma, bias, y, residual_out, rows, hidden, eps), stream);
        break;
    }
    return static_cast<int>(cudaGetLastError());
}

extern "C" int normexport_rmsnorm_version(void)
{
    return NORMEXPORT_RMSNORM_ABI_VERSION;
}

extern "C" char const* normexport_rmsnorm_error_string(int code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
