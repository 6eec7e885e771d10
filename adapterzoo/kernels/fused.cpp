// Fused decode-step deltas: one call adds a whole pool's delta at one site, every row at once.
//
// Built by adapterzoo/kernels/__init__.py with the system C++ compiler and called through ctypes
// (plain C ABI, no torch headers: it compiles in about a second). Every function writes all B rows
// of `out` (B, d): out[b] = y[b], plus the delta for the rows it is given. `rows` is NULL (rows
// 0..n-1) or n row numbers; `slots` is NULL (every row at `slot`) or n slots. A row at slot 0 is
// skipped: every type served here holds exactly zero there (`zero_slot_is_identity`). Tables are
// (S, ...) row-major with the slot first, in the pool's dtype; accumulation is in float (bfloat16:
// rounded to bfloat16 where the eager delta rounds, see rnd).
// Returns 0, or -1 when a slot is outside 0..S-1 or a row outside 0..B-1 (nothing is read or written
// out of bounds).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Eight floats in a register (GCC/Clang vector extensions: AVX where the CPU has it, SSE pairs
// otherwise), loaded from float32 or widened from bfloat16.
typedef float f8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

inline f8 load8(const float* p) {
    f8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline f8 load8(const uint16_t* p) {
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    u32x8 u = __builtin_convertvector(h, u32x8) << 16;
    f8 v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

struct F32 {
    using T = float;
    static inline float load(T v) { return v; }
    static inline T store(float f) { return f; }
};

struct BF16 {  // bfloat16 as its bits; stores round to nearest even, as PyTorch's conversion does
    using T = uint16_t;
    static inline float load(T v) {
        uint32_t u = uint32_t(v) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    static inline T store(float f) {
        uint32_t u;
        std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
        u += 0x7fffu + ((u >> 16) & 1u);
        return T(u >> 16);
    }
};

// What the eager delta rounds in bfloat16: every PyTorch op there (a matmul, an add, an activation)
// computes in float and rounds its output to bfloat16. A bfloat16 kernel rounds at the same points,
// so a row's delta does not depend on whether it ran fused or eagerly: the engine prefills a joiner's
// prompt inside a decode step through the kernels (one-token rows) while its solo run prefills it
// eagerly, and rounding once only (float accumulation throughout) changed a joiner's first token.
template <class K>
inline float rnd(float f) {
    if constexpr (std::is_same<K, F32>::value) {
        return f;
    } else {
        return K::load(K::store(f));
    }
}

struct Rows {
    const int64_t *rows, *slots;
    int64_t slot, n, S, B;
    bool valid() const {
        if (!rows && n > B) return false;
        for (int64_t i = 0; i < n; ++i) {
            int64_t s = slots ? slots[i] : slot;
            if (s < 0 || s >= S) return false;
            if (rows && (rows[i] < 0 || rows[i] >= B)) return false;  // a stale plan's row: never written past out
        }
        return true;
    }
};

// out = y, then f(row, slot, out row as float) for every row of `r` not at slot 0. For float32 the
// out row itself is the accumulator; bfloat16 rows are widened to float and rounded once at the end.
template <class K, class F>
int each_row(const Rows& r, void* out_, const void* y_, int64_t B, int64_t d, F f) {
    using T = typename K::T;
    if (!r.valid()) return -1;
    T* out = static_cast<T*>(out_);
    const T* y = static_cast<const T*>(y_);
    if (out != y) std::memcpy(out, y, sizeof(T) * B * d);
    std::vector<float> buffer(std::is_same<K, F32>::value ? 0 : d);
    for (int64_t i = 0; i < r.n; ++i) {
        int64_t s = r.slots ? r.slots[i] : r.slot;
        if (s == 0) continue;
        int64_t row = r.rows ? r.rows[i] : i;
        T* o = out + row * d;
        if constexpr (std::is_same<K, F32>::value) {
            f(row, s, o);
        } else {
            for (int64_t j = 0; j < d; ++j) buffer[j] = K::load(o[j]);
            f(row, s, buffer.data());
            for (int64_t j = 0; j < d; ++j) o[j] = K::store(buffer[j]);
        }
    }
    return 0;
}

// acc[j] += sum_k h[k] * W[k, j]: W (m, d) row-major. 32 columns at a time stay in registers
// over all k (acc is read and written once, not m times; a 16-row Houlsby call of 4 adapters at
// SmolLM2's widths 45 -> 35 us); the last d % 32 columns one by one.
template <class K>
inline void add_expand(float* __restrict__ acc, const float* __restrict__ h, const typename K::T* __restrict__ W,
                       int64_t m, int64_t d) {
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        f8 a0 = load8(acc + j), a1 = load8(acc + j + 8), a2 = load8(acc + j + 16), a3 = load8(acc + j + 24);
        for (int64_t k = 0; k < m; ++k) {
            const float hk = h[k];
            const typename K::T* w = W + k * d + j;
            a0 += hk * load8(w);
            a1 += hk * load8(w + 8);
            a2 += hk * load8(w + 16);
            a3 += hk * load8(w + 24);
        }
        std::memcpy(acc + j, &a0, sizeof a0);
        std::memcpy(acc + j + 8, &a1, sizeof a1);
        std::memcpy(acc + j + 16, &a2, sizeof a2);
        std::memcpy(acc + j + 24, &a3, sizeof a3);
    }
    for (; j < d; ++j) {
        float a = acc[j];
        for (int64_t k = 0; k < m; ++k) a += h[k] * K::load(W[k * d + j]);
        acc[j] = a;
    }
}

// bfloat16: acc[j] += rnd(then(rnd(sum_k h[k] W[k, j]), j)), the product rounded on its own as the
// eager matmul's output is, then combined (LoRA's scale, Houlsby's bias) and rounded again; `t` is a
// d-wide scratch row
template <class K, class Then>
inline void add_expand_rounded(float* acc, float* t, const float* h, const typename K::T* W, int64_t m, int64_t d,
                               Then then) {
    for (int64_t j = 0; j < d; ++j) t[j] = 0.f;
    add_expand<K>(t, h, W, m, d);
    for (int64_t j = 0; j < d; ++j) acc[j] += rnd<K>(then(rnd<K>(t[j]), j));
}

// h[k] = sum_i v[i] * W[i, k]: W (d, m) row-major; the inner loop over k vectorizes (__restrict__:
// without it GCC assumed h might alias W and vectorized nothing, a 16-row Houlsby call 137 -> 77 us)
template <class K>
inline void shrink_any(float* __restrict__ h, const typename K::T* __restrict__ v, const typename K::T* __restrict__ W,
                       int64_t d, int64_t m) {
    for (int64_t k = 0; k < m; ++k) h[k] = 0.f;
    for (int64_t i = 0; i < d; ++i) {
        const float vi = K::load(v[i]);
        const typename K::T* __restrict__ w = W + i * m;
        for (int64_t k = 0; k < m; ++k) h[k] += vi * K::load(w[k]);
    }
}

// A width known when compiled (a multiple of 8): h lives in registers, two accumulators for the
// FMA latency; a 16-row LoRA call (576 -> 8 -> 576) 32 us with shrink_any, 19 us with this. (Left to
// the auto-vectorizer, a fixed r = 8 got its loop over the input vectorized with gathers: 98 us.)
template <class K, int M>
inline void shrink_fixed(float* __restrict__ h, const typename K::T* __restrict__ v,
                         const typename K::T* __restrict__ W, int64_t d) {
    constexpr int N = M / 8;
    f8 a[N] = {}, b[N] = {};
    int64_t i = 0;
    for (; i + 1 < d; i += 2) {
        const float v0 = K::load(v[i]), v1 = K::load(v[i + 1]);
        const typename K::T* w = W + i * M;
        for (int n = 0; n < N; ++n) a[n] += v0 * load8(w + 8 * n);
        for (int n = 0; n < N; ++n) b[n] += v1 * load8(w + M + 8 * n);
    }
    for (; i < d; ++i) {
        const float vi = K::load(v[i]);
        for (int n = 0; n < N; ++n) a[n] += vi * load8(W + i * M + 8 * n);
    }
    for (int n = 0; n < N; ++n) {
        f8 sum = a[n] + b[n];
        std::memcpy(h + 8 * n, &sum, sizeof sum);
    }
}

// h[k] = sum_i v[i] * W[i, k]: W (d, m) row-major
template <class K>
inline void shrink(float* h, const typename K::T* v, const typename K::T* W, int64_t d, int64_t m) {
    switch (m) {
        case 8: return shrink_fixed<K, 8>(h, v, W, d);
        case 16: return shrink_fixed<K, 16>(h, v, W, d);
        case 32: return shrink_fixed<K, 32>(h, v, W, d);
        case 64: return shrink_fixed<K, 64>(h, v, W, d);
        default: return shrink_any<K>(h, v, W, d, m);
    }
}

template <class K>
int adapterbias(void* out, const void* y_, int64_t B, int64_t d, Rows r, const void* v_, const void* L_,
                const void* b_) {
    using T = typename K::T;
    auto y = static_cast<const T*>(y_);
    auto v = static_cast<const T*>(v_);
    auto L = static_cast<const T*>(L_);
    auto b = static_cast<const T*>(b_);
    return each_row<K>(r, out, y_, B, d, [&](int64_t row, int64_t s, float* acc) {
        float alpha = 0.f;  // alpha = L . y + b, from the base's output (before the shift)
        const T* yr = y + row * d;
        const T* l = L + s * d;
        for (int64_t j = 0; j < d; ++j) alpha += K::load(l[j]) * K::load(yr[j]);
        alpha = rnd<K>(rnd<K>(alpha) + K::load(b[s]));
        const T* vs = v + s * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += rnd<K>(alpha * K::load(vs[j]));
    });
}

// BitFit: out[row] = y[row] + bias[slot]. Its eager delta gathers every row's bias into a new
// (n, d) tensor first: a fresh plan's gather at each of 271 sites cost ~25 us, and an engine join
// step of 64 token rows gathers 64 rows of every bias; here each row reads its slot's bias in place.
template <class K>
int bias(void* out, const void* y_, int64_t B, int64_t d, Rows r, const void* b_) {
    using T = typename K::T;
    auto b = static_cast<const T*>(b_);
    return each_row<K>(r, out, y_, B, d, [&](int64_t, int64_t s, float* acc) {
        const T* bs = b + s * d;
        for (int64_t j = 0; j < d; ++j) acc[j] += K::load(bs[j]);
    });
}

template <class K>
int lora(void* out, const void* y, const void* x_, int64_t B, int64_t din, int64_t dout, Rows r, const void* A_,
         const void* Bt_, int64_t rank, const void* scale_) {
    using T = typename K::T;
    auto x = static_cast<const T*>(x_);
    auto A = static_cast<const T*>(A_);
    auto Bt = static_cast<const T*>(Bt_);
    auto scale = static_cast<const T*>(scale_);
    std::vector<float> h(rank);
    std::vector<float> t(std::is_same<K, F32>::value ? 0 : dout);  // bfloat16: h B[s] before the scale
    return each_row<K>(r, out, y, B, dout, [&](int64_t row, int64_t s, float* acc) {
        shrink<K>(h.data(), x + row * din, A + s * din * rank, din, rank);  // h = x A[s]
        const float c = K::load(scale[s]);
        if constexpr (std::is_same<K, F32>::value) {
            for (int64_t k = 0; k < rank; ++k) h[k] *= c;
            add_expand<K>(acc, h.data(), Bt + s * rank * dout, rank, dout);  // + scale h B[s]
        } else {  // rounded where the eager delta rounds: (x A) B, then the scale (see rnd)
            for (int64_t k = 0; k < rank; ++k) h[k] = rnd<K>(h[k]);
            add_expand_rounded<K>(acc, t.data(), h.data(), Bt + s * rank * dout, rank, dout,
                                  [&](float v, int64_t) { return v * c; });
        }
    });
}

inline float activate(float z, int act) {
    switch (act) {
        case 0: return z / (1.f + std::exp(-z));                    // silu / swish
        case 1: return z > 0.f ? z : 0.f;                           // relu
        case 2: return 0.5f * z * (1.f + std::erf(z * 0.70710678118654752f));  // gelu (erf, PyTorch's default)
        default: return std::tanh(z);                              // tanh
    }
}

template <class K>
int bottleneck(void* out, const void* y_, int64_t B, int64_t d, Rows r, const void* down_, const void* db_,
               const void* up_, const void* ub_, int64_t m, int act) {
    using T = typename K::T;
    auto y = static_cast<const T*>(y_);
    auto down = static_cast<const T*>(down_);
    auto db = static_cast<const T*>(db_);
    auto up = static_cast<const T*>(up_);
    auto ub = static_cast<const T*>(ub_);
    std::vector<float> z(m);
    std::vector<float> t(std::is_same<K, F32>::value ? 0 : d);  // bfloat16: z U[s] before the bias
    return each_row<K>(r, out, y_, B, d, [&](int64_t row, int64_t s, float* acc) {
        shrink<K>(z.data(), y + row * d, down + s * d * m, d, m);  // z = f(y D[s] + b_d[s])
        const T* u = ub + s * d;
        if constexpr (std::is_same<K, F32>::value) {
            for (int64_t k = 0; k < m; ++k) z[k] = activate(z[k] + K::load(db[s * m + k]), act);
            add_expand<K>(acc, z.data(), up + s * m * d, m, d);  // + z U[s] + b_u[s]
            for (int64_t j = 0; j < d; ++j) acc[j] += K::load(u[j]);
        } else {  // rounded where the eager delta rounds (see rnd)
            for (int64_t k = 0; k < m; ++k) z[k] = rnd<K>(activate(rnd<K>(rnd<K>(z[k]) + K::load(db[s * m + k])), act));
            add_expand_rounded<K>(acc, t.data(), z.data(), up + s * m * d, m, d,
                                  [&](float v, int64_t j) { return v + K::load(u[j]); });
        }
    });
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16
int az_adapterbias(int dtype, void* out, const void* y, int64_t B, int64_t d, const int64_t* rows,
                   const int64_t* slots, int64_t slot, int64_t n, int64_t S, const void* v, const void* L,
                   const void* b) {
    Rows r{rows, slots, slot, n, S, B};
    return dtype ? adapterbias<BF16>(out, y, B, d, r, v, L, b) : adapterbias<F32>(out, y, B, d, r, v, L, b);
}

int az_bias(int dtype, void* out, const void* y, int64_t B, int64_t d, const int64_t* rows, const int64_t* slots,
            int64_t slot, int64_t n, int64_t S, const void* b) {
    Rows r{rows, slots, slot, n, S, B};
    return dtype ? bias<BF16>(out, y, B, d, r, b) : bias<F32>(out, y, B, d, r, b);
}

int az_lora(int dtype, void* out, const void* y, const void* x, int64_t B, int64_t din, int64_t dout,
            const int64_t* rows, const int64_t* slots, int64_t slot, int64_t n, int64_t S, const void* A,
            const void* Bt, int64_t rank, const void* scale) {
    Rows r{rows, slots, slot, n, S, B};
    return dtype ? lora<BF16>(out, y, x, B, din, dout, r, A, Bt, rank, scale)
                 : lora<F32>(out, y, x, B, din, dout, r, A, Bt, rank, scale);
}

int az_bottleneck(int dtype, void* out, const void* y, int64_t B, int64_t d, const int64_t* rows,
                  const int64_t* slots, int64_t slot, int64_t n, int64_t S, const void* down, const void* db,
                  const void* up, const void* ub, int64_t m, int act) {
    Rows r{rows, slots, slot, n, S, B};
    return dtype ? bottleneck<BF16>(out, y, B, d, r, down, db, up, ub, m, act)
                 : bottleneck<F32>(out, y, B, d, r, down, db, up, ub, m, act);
}
}
