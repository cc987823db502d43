// CUDA kernels of the fused ops: one extern "C" entry per op and dtype (f32, f64, f16,
// bf16), each computing in float (double for f64). The host side is src/cuda.rs; the
// matrix products of `linear` and `linear_cross_entropy` run on cuBLAS through candle.

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ double load(double v) { return v; }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <typename T> __device__ __forceinline__ T store(double v);
template <> __device__ __forceinline__ double store<double>(double v) { return v; }

__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }
__device__ __forceinline__ float acc_log(float v) { return logf(v); }
__device__ __forceinline__ double acc_log(double v) { return log(v); }
__device__ __forceinline__ float acc_rsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double acc_rsqrt(double v) { return rsqrt(v); }
__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

// The sum of `v` over a block of `blockDim.x` threads (a multiple of 32, at most 1024);
// every thread gets it.
template <typename A> __device__ A block_sum(A v) {
    __shared__ A partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    A total = 0;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += partial[w];
    return total;
}

// The maximum of `v` over the block, as block_sum.
template <typename A> __device__ A block_max(A v) {
    __shared__ A partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, offset));
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    A total = partial[0];
    for (int w = 1; w < (int)(blockDim.x / 32); ++w) total = max(total, partial[w]);
    return total;
}

// The sum of `v` over a warp; every lane gets it.
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// ---- RMSNorm: one block per row ---------------------------------------------------------

template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, uint32_t n, double eps) {
    typedef typename Acc<T>::type A;
    const T* row = x + (size_t)blockIdx.x * n;
    T* out = y + (size_t)blockIdx.x * n;
    A squares = 0;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) { A v = load(row[i]); squares += v * v; }
    A r = acc_rsqrt(block_sum(squares) / (A)n + (A)eps);
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) out[i] = store<T>(load(row[i]) * r * load(w[i]));
}

// dx for each row, and each row's share of dw added into `dw_acc` (float or double).
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, typename Acc<T>::type* dw_acc,
                             uint32_t n, double eps) {
    typedef typename Acc<T>::type A;
    size_t base = (size_t)blockIdx.x * n;
    A squares = 0, gx = 0;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        A v = load(x[base + i]);
        squares += v * v;
        gx += load(dy[base + i]) * load(w[i]) * v;
    }
    A r = acc_rsqrt(block_sum(squares) / (A)n + (A)eps);
    A correction = block_sum(gx) / (A)n * r * r * r;
    for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
        A v = load(x[base + i]), g = load(dy[base + i]);
        dx[base + i] = store<T>(r * g * load(w[i]) - v * correction);
        atomicAdd(&dw_acc[i], g * v * r);
    }
}

// ---- SwiGLU: elementwise --------------------------------------------------------------

template <typename T> __device__ void swiglu_fwd(const T* g, const T* u, T* h, size_t n) {
    typedef typename Acc<T>::type A;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        A x = load(g[i]);
        h[i] = store<T>(x / ((A)1 + acc_exp(-x)) * load(u[i]));
    }
}

template <typename T> __device__ void swiglu_bwd(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n) {
    typedef typename Acc<T>::type A;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        A x = load(g[i]), up = load(u[i]), d = load(dh[i]);
        A s = (A)1 / ((A)1 + acc_exp(-x));
        du[i] = store<T>(d * x * s);
        dg[i] = store<T>(d * up * s * ((A)1 + x * ((A)1 - s)));
    }
}

// ---- RoPE: one thread per rotated pair; x (batch, seq, heads, dim) ------------------------

template <typename T>
__device__ void rope(const T* x, const T* cos, const T* sin, T* y, uint32_t seq, uint32_t heads, uint32_t dim,
                     size_t pairs, int inverse) {
    typedef typename Acc<T>::type A;
    uint32_t half = dim / 2;
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        size_t row = p / half;  // (batch, position, head)
        uint32_t j = p % half;
        uint32_t t = (row / heads) % seq;
        size_t at = row * dim + j;
        A x1 = load(x[at]), x2 = load(x[at + half]);
        A c = load(cos[t * half + j]), s = load(sin[t * half + j]);
        if (inverse) s = -s;
        y[at] = store<T>(x1 * c - x2 * s);
        y[at + half] = store<T>(x2 * c + x1 * s);
    }
}

// ---- Cross-entropy: one block per row of logits -----------------------------------------

// Adds the row's `lse - z[target]` into `total` (float or double).
template <typename T>
__device__ void cross_entropy_fwd(const T* z, const uint32_t* targets, typename Acc<T>::type* total,
                                  uint32_t classes) {
    typedef typename Acc<T>::type A;
    const T* row = z + (size_t)blockIdx.x * classes;
    A m = -INFINITY;
    for (uint32_t i = threadIdx.x; i < classes; i += blockDim.x) m = max(m, (A)load(row[i]));
    m = block_max(m);
    A sum = 0;
    for (uint32_t i = threadIdx.x; i < classes; i += blockDim.x) sum += acc_exp(load(row[i]) - m);
    sum = block_sum(sum);
    if (threadIdx.x == 0) atomicAdd(total, m + acc_log(sum) - (A)load(row[targets[blockIdx.x]]));
}

// `loss = total / rows`, in the logits' dtype.
template <typename T> __device__ void cross_entropy_mean(const typename Acc<T>::type* total, T* loss, uint32_t rows) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *loss = store<T>(*total / (typename Acc<T>::type)rows);
}

// dz = (softmax(z) - onehot) * scale / rows, in place when dz == z; `scale` a device scalar.
template <typename T>
__device__ void cross_entropy_bwd(const T* z, const uint32_t* targets, const T* scale, T* dz, uint32_t classes,
                                  uint32_t rows) {
    typedef typename Acc<T>::type A;
    size_t base = (size_t)blockIdx.x * classes;
    A m = -INFINITY;
    for (uint32_t i = threadIdx.x; i < classes; i += blockDim.x) m = max(m, (A)load(z[base + i]));
    m = block_max(m);
    A sum = 0;
    for (uint32_t i = threadIdx.x; i < classes; i += blockDim.x) sum += acc_exp(load(z[base + i]) - m);
    A lse = m + acc_log(block_sum(sum));
    A factor = (A)load(*scale) / (A)rows;
    uint32_t target = targets[blockIdx.x];
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < classes; i += blockDim.x) {
        A p = acc_exp(load(z[base + i]) - lse) - (i == target ? (A)1 : (A)0);
        dz[base + i] = store<T>(p * factor);
    }
}

// ---- Causal attention, (batch, seq, heads, dim): one warp per query row --------------------
// A lane holds dims lane, lane + 32, ... (at most 8: head dims up to 256).

#define MAX_PER_LANE 8

// The row's output with an online softmax over keys 0..=i.
template <typename T>
__device__ void attention_fwd(const T* q, const T* k, const T* v, T* o, uint32_t batch, uint32_t seq,
                              uint32_t heads, uint32_t kv_heads, uint32_t dim, double scale) {
    typedef typename Acc<T>::type A;
    uint32_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
    size_t row = (size_t)blockIdx.x * warps + threadIdx.x / 32;  // (batch, head, i)
    if (row >= (size_t)batch * heads * seq) return;
    uint32_t i = row % seq, h = (row / seq) % heads, b = row / ((size_t)seq * heads);
    uint32_t kv = h / (heads / kv_heads);
    const T* qi = q + (((size_t)b * seq + i) * heads + h) * dim;
    A qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        qv[c] = d < dim ? (A)load(qi[d]) : (A)0;
        acc[c] = 0;
    }
    A m = -INFINITY, l = 0;
    for (uint32_t j = 0; j <= i; ++j) {
        const T* kj = k + (((size_t)b * seq + j) * kv_heads + kv) * dim;
        const T* vj = v + (((size_t)b * seq + j) * kv_heads + kv) * dim;
        A s = 0;
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            uint32_t d = lane + 32 * c;
            if (d < dim) s += qv[c] * (A)load(kj[d]);
        }
        s = warp_sum(s) * (A)scale;
        A next = max(m, s);
        A correction = acc_exp(m - next), p = acc_exp(s - next);
        l = l * correction + p;
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            uint32_t d = lane + 32 * c;
            if (d < dim) acc[c] = acc[c] * correction + p * (A)load(vj[d]);
        }
        m = next;
    }
    T* oi = o + (((size_t)b * seq + i) * heads + h) * dim;
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        if (d < dim) oi[d] = store<T>(acc[c] / l);
    }
}

// Per query row: its log-sum-exp (recomputed) and D = dO . O, each (batch, head, i).
template <typename T>
__device__ void attention_bwd_rows(const T* q, const T* k, const T* o, const T* dout, float* lse, float* delta,
                                   uint32_t batch, uint32_t seq, uint32_t heads, uint32_t kv_heads, uint32_t dim,
                                   double scale) {
    typedef typename Acc<T>::type A;
    uint32_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
    size_t row = (size_t)blockIdx.x * warps + threadIdx.x / 32;
    if (row >= (size_t)batch * heads * seq) return;
    uint32_t i = row % seq, h = (row / seq) % heads, b = row / ((size_t)seq * heads);
    uint32_t kv = h / (heads / kv_heads);
    size_t at = (((size_t)b * seq + i) * heads + h) * dim;
    A qv[MAX_PER_LANE], dd = 0;
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        qv[c] = d < dim ? (A)load(q[at + d]) : (A)0;
        if (d < dim) dd += (A)load(o[at + d]) * (A)load(dout[at + d]);
    }
    A m = -INFINITY, l = 0;
    for (uint32_t j = 0; j <= i; ++j) {
        const T* kj = k + (((size_t)b * seq + j) * kv_heads + kv) * dim;
        A s = 0;
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            uint32_t d = lane + 32 * c;
            if (d < dim) s += qv[c] * (A)load(kj[d]);
        }
        s = warp_sum(s) * (A)scale;
        A next = max(m, s);
        l = l * acc_exp(m - next) + acc_exp(s - next);
        m = next;
    }
    dd = warp_sum(dd);
    if (lane == 0) {
        lse[row] = (float)(m + acc_log(l));
        delta[row] = (float)dd;
    }
}

// dQ_i = scale * sum_{j<=i} dS_ij K_j, dS_ij = P_ij (dO_i . V_j - D_i): one warp per query row.
template <typename T>
__device__ void attention_bwd_dq(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                 const float* delta, T* dq, uint32_t batch, uint32_t seq, uint32_t heads,
                                 uint32_t kv_heads, uint32_t dim, double scale) {
    typedef typename Acc<T>::type A;
    uint32_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
    size_t row = (size_t)blockIdx.x * warps + threadIdx.x / 32;
    if (row >= (size_t)batch * heads * seq) return;
    uint32_t i = row % seq, h = (row / seq) % heads, b = row / ((size_t)seq * heads);
    uint32_t kv = h / (heads / kv_heads);
    size_t at = (((size_t)b * seq + i) * heads + h) * dim;
    A qv[MAX_PER_LANE], dov[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        qv[c] = d < dim ? (A)load(q[at + d]) : (A)0;
        dov[c] = d < dim ? (A)load(dout[at + d]) : (A)0;
        acc[c] = 0;
    }
    A lse_i = lse[row], delta_i = delta[row];
    for (uint32_t j = 0; j <= i; ++j) {
        size_t kvat = (((size_t)b * seq + j) * kv_heads + kv) * dim;
        A s = 0, dp = 0;
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            uint32_t d = lane + 32 * c;
            if (d < dim) {
                s += qv[c] * (A)load(k[kvat + d]);
                dp += dov[c] * (A)load(v[kvat + d]);
            }
        }
        s = warp_sum(s) * (A)scale;
        dp = warp_sum(dp);
        A ds = acc_exp(s - lse_i) * (dp - delta_i);
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            uint32_t d = lane + 32 * c;
            if (d < dim) acc[c] += ds * (A)load(k[kvat + d]);
        }
    }
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        if (d < dim) dq[at + d] = store<T>(acc[c] * (A)scale);
    }
}

// dK_j = scale * sum over the group's query heads and i >= j of dS_ij Q_i, dV_j = sum of
// P_ij dO_i: one warp per key row of a key/value head.
template <typename T>
__device__ void attention_bwd_dkv(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                  const float* delta, T* dk, T* dv, uint32_t batch, uint32_t seq, uint32_t heads,
                                  uint32_t kv_heads, uint32_t dim, double scale) {
    typedef typename Acc<T>::type A;
    uint32_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
    size_t row = (size_t)blockIdx.x * warps + threadIdx.x / 32;  // (batch, kv head, j)
    if (row >= (size_t)batch * kv_heads * seq) return;
    uint32_t j = row % seq, kv = (row / seq) % kv_heads, b = row / ((size_t)seq * kv_heads);
    uint32_t group = heads / kv_heads;
    size_t kvat = (((size_t)b * seq + j) * kv_heads + kv) * dim;
    A kv_k[MAX_PER_LANE], kv_v[MAX_PER_LANE], acc_k[MAX_PER_LANE], acc_v[MAX_PER_LANE];
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        kv_k[c] = d < dim ? (A)load(k[kvat + d]) : (A)0;
        kv_v[c] = d < dim ? (A)load(v[kvat + d]) : (A)0;
        acc_k[c] = 0;
        acc_v[c] = 0;
    }
    for (uint32_t h = kv * group; h < (kv + 1) * group; ++h) {
        for (uint32_t i = j; i < seq; ++i) {
            size_t at = (((size_t)b * seq + i) * heads + h) * dim;
            size_t stat = ((size_t)b * heads + h) * seq + i;
            A s = 0, dp = 0;
            for (int c = 0; c < MAX_PER_LANE; ++c) {
                uint32_t d = lane + 32 * c;
                if (d < dim) {
                    s += (A)load(q[at + d]) * kv_k[c];
                    dp += (A)load(dout[at + d]) * kv_v[c];
                }
            }
            s = warp_sum(s) * (A)scale;
            dp = warp_sum(dp);
            A p = acc_exp(s - (A)lse[stat]);
            A ds = p * (dp - (A)delta[stat]);
            for (int c = 0; c < MAX_PER_LANE; ++c) {
                uint32_t d = lane + 32 * c;
                if (d < dim) {
                    acc_k[c] += ds * (A)load(q[at + d]);
                    acc_v[c] += p * (A)load(dout[at + d]);
                }
            }
        }
    }
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        uint32_t d = lane + 32 * c;
        if (d < dim) {
            dk[kvat + d] = store<T>(acc_k[c] * (A)scale);
            dv[kvat + d] = store<T>(acc_v[c]);
        }
    }
}

// ---- AdamW, in place (f32 and f64): candle-nn's arithmetic, an added zero per product ----

template <typename T> __device__ __forceinline__ T scaled(T x, double c) { return x * (T)c + (T)0; }

template <typename T> __device__ void adamw_moment(T* s, const T* g, size_t n, double beta, int squared) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        T grad = squared ? g[i] * g[i] : g[i];
        s[i] = scaled(s[i], beta) + scaled(grad, 1.0 - beta);
    }
}

template <typename T>
__device__ void adamw_parameter(T* theta, const T* m, const T* v, size_t n, double lr, double eps, double weight_decay,
                                double scale_m, double scale_v) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        T decayed = scaled(theta[i], 1.0 - lr * weight_decay);
        T adjusted = scaled(m[i], scale_m) / (acc_sqrt(scaled(v[i], scale_v)) + (T)eps);
        theta[i] = decayed - scaled(adjusted, lr);
    }
}

// ---- Conversion of an accumulator (float or double) into the output dtype ---------------

template <typename T> __device__ void convert(const typename Acc<T>::type* from, T* to, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        to[i] = store<T>(from[i]);
}

// ---- Entry points, one per op and dtype ---------------------------------------------------

#define FOR_DTYPES(MACRO) MACRO(float, f32) MACRO(double, f64) MACRO(__half, f16) MACRO(__nv_bfloat16, bf16)

#define ENTRIES(T, S)                                                                                             \
    extern "C" __global__ void rms_norm_fwd_##S(const T* x, const T* w, T* y, uint32_t n, double eps) {           \
        rms_norm_fwd<T>(x, w, y, n, eps);                                                                          \
    }                                                                                                              \
    extern "C" __global__ void rms_norm_bwd_##S(const T* x, const T* w, const T* dy, T* dx,                        \
                                                Acc<T>::type* dw_acc, uint32_t n, double eps) {                    \
        rms_norm_bwd<T>(x, w, dy, dx, dw_acc, n, eps);                                                             \
    }                                                                                                              \
    extern "C" __global__ void swiglu_fwd_##S(const T* g, const T* u, T* h, size_t n) { swiglu_fwd<T>(g, u, h, n); } \
    extern "C" __global__ void swiglu_bwd_##S(const T* g, const T* u, const T* dh, T* dg, T* du, size_t n) {       \
        swiglu_bwd<T>(g, u, dh, dg, du, n);                                                                        \
    }                                                                                                              \
    extern "C" __global__ void rope_##S(const T* x, const T* c, const T* s, T* y, uint32_t seq, uint32_t heads,   \
                                        uint32_t dim, size_t pairs, int inverse) {                                 \
        rope<T>(x, c, s, y, seq, heads, dim, pairs, inverse);                                                      \
    }                                                                                                              \
    extern "C" __global__ void cross_entropy_fwd_##S(const T* z, const uint32_t* t, Acc<T>::type* total,          \
                                                     uint32_t classes) {                                           \
        cross_entropy_fwd<T>(z, t, total, classes);                                                                \
    }                                                                                                              \
    extern "C" __global__ void cross_entropy_mean_##S(const Acc<T>::type* total, T* loss, uint32_t rows) {        \
        cross_entropy_mean<T>(total, loss, rows);                                                                  \
    }                                                                                                              \
    extern "C" __global__ void cross_entropy_bwd_##S(const T* z, const uint32_t* t, const T* scale, T* dz,        \
                                                     uint32_t classes, uint32_t rows) {                            \
        cross_entropy_bwd<T>(z, t, scale, dz, classes, rows);                                                      \
    }                                                                                                              \
    extern "C" __global__ void cross_entropy_bwd_inplace_##S(T* z, const uint32_t* t, const T* scale,            \
                                                             uint32_t classes, uint32_t rows) {                    \
        cross_entropy_bwd<T>(z, t, scale, z, classes, rows);                                                       \
    }                                                                                                              \
    extern "C" __global__ void attention_fwd_##S(const T* q, const T* k, const T* v, T* o, uint32_t batch,        \
                                                 uint32_t seq, uint32_t heads, uint32_t kv_heads, uint32_t dim,   \
                                                 double scale) {                                                   \
        attention_fwd<T>(q, k, v, o, batch, seq, heads, kv_heads, dim, scale);                                     \
    }                                                                                                              \
    extern "C" __global__ void attention_bwd_rows_##S(const T* q, const T* k, const T* o, const T* dout,          \
                                                      float* lse, float* delta, uint32_t batch, uint32_t seq,     \
                                                      uint32_t heads, uint32_t kv_heads, uint32_t dim,            \
                                                      double scale) {                                              \
        attention_bwd_rows<T>(q, k, o, dout, lse, delta, batch, seq, heads, kv_heads, dim, scale);                \
    }                                                                                                              \
    extern "C" __global__ void attention_bwd_dq_##S(const T* q, const T* k, const T* v, const T* dout,            \
                                                    const float* lse, const float* delta, T* dq, uint32_t batch,  \
                                                    uint32_t seq, uint32_t heads, uint32_t kv_heads,              \
                                                    uint32_t dim, double scale) {                                  \
        attention_bwd_dq<T>(q, k, v, dout, lse, delta, dq, batch, seq, heads, kv_heads, dim, scale);              \
    }                                                                                                              \
    extern "C" __global__ void attention_bwd_dkv_##S(const T* q, const T* k, const T* v, const T* dout,           \
                                                     const float* lse, const float* delta, T* dk, T* dv,          \
                                                     uint32_t batch, uint32_t seq, uint32_t heads,                \
                                                     uint32_t kv_heads, uint32_t dim, double scale) {             \
        attention_bwd_dkv<T>(q, k, v, dout, lse, delta, dk, dv, batch, seq, heads, kv_heads, dim, scale);         \
    }                                                                                                              \
    extern "C" __global__ void convert_##S(const Acc<T>::type* from, T* to, size_t n) { convert<T>(from, to, n); }

FOR_DTYPES(ENTRIES)

#define ADAMW_ENTRIES(T, S)                                                                                       \
    extern "C" __global__ void adamw_moment_##S(T* s, const T* g, size_t n, double beta, int squared) {          \
        adamw_moment<T>(s, g, n, beta, squared);                                                                   \
    }                                                                                                              \
    extern "C" __global__ void adamw_parameter_##S(T* theta, const T* m, const T* v, size_t n, double lr,          \
                                                   double eps, double weight_decay, double scale_m,                \
                                                   double scale_v) {                                               \
        adamw_parameter<T>(theta, m, v, n, lr, eps, weight_decay, scale_m, scale_v);                               \
    }

ADAMW_ENTRIES(float, f32)
ADAMW_ENTRIES(double, f64)
