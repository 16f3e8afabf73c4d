// Softmax attention (optionally masked or causal; no additive bias) for x86 CPUs with AVX2 and FMA, called from JAX through
// jax.ffi (built and registered by cpu_kernel.py; the gradient stays in XLA).
//
// Why a kernel: XLA's batched matmuls with a 64-wide contraction reach ~60 GF/s on two
// cores against ~95 for MKL, and the logits of one query block make a round trip through
// memory between the two matmuls. Here each task takes a block of queries of one head:
//   S = (scale q) k^T  ->  P = exp(S - rowmax)  ->  O = P v / rowsum
// with S kept in a per-thread buffer (L2-sized for Whisper's 1500 frames) and both matmuls
// in 6 x 16 register tiles. Each row takes one exact softmax over all keys, as the XLA
// path does (no online rescaling), so results agree with it to float32 rounding.
//
// Layouts: q [..., q_len, heads, dim], k and v [..., kv_len, kv_heads, dim] with
// heads % kv_heads == 0 and dim % 16 == 0; every leading dimension is a batch dimension.
// The masked entry point also takes a boolean mask [..., heads or 1, q_len or 1, kv_len]
// (true = attend) and/or causal rows (key j <= query i, top-left aligned); masked logits
// become the lowest float, so a fully masked row attends uniformly, as the XLA path.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMR = 6;        // query rows per register tile
constexpr int64_t kNR = 16;       // keys (q k^T) or output columns (p v) per register tile
constexpr int64_t kRows = 48;     // query rows per task: logits of 48 x 1500 keys = 288 KiB
constexpr int64_t kKeyChunk = 256;  // keys per pass of p v: a 64 KiB slice of v stays in L2

// A float buffer aligned for 256-bit loads, reused by a thread across calls.
struct Scratch {
  float* data = nullptr;
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      std::free(data);
      data = static_cast<float*>(std::aligned_alloc(32, ((n * 4 + 31) / 32) * 32));
      size = n;
    }
    return data;
  }
  ~Scratch() { std::free(data); }
};

// exp for x <= 0 (logits minus their row max): Cephes' expf polynomial, ~1 ulp; inputs
// below -87.3 (where float32 exp underflows) give exactly 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.33654f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n through the exponent bits; n >= -126 here, so the result stays a normal float.
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// c[MR x 16] = a[MR x dim] (row stride dim) times panel[dim x 16] (k^T for 16 keys); with
// lane_max [MR x 8], each row's running maximum (lane-wise) takes in the new logits.
template <int MR>
inline void qk_tile(const float* a, const float* panel, int64_t dim, float* c, int64_t ldc,
                    float* lane_max) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 b0 = _mm256_load_ps(panel + d * kNR);
    const __m256 b1 = _mm256_load_ps(panel + d * kNR + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * dim + d);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(c + r * ldc, acc[r][0]);
    _mm256_store_ps(c + r * ldc + 8, acc[r][1]);
  }
  if (lane_max) {
    for (int r = 0; r < MR; ++r) {
      const __m256 m = _mm256_max_ps(acc[r][0], acc[r][1]);
      _mm256_store_ps(lane_max + r * 8, _mm256_max_ps(m, _mm256_load_ps(lane_max + r * 8)));
    }
  }
}

// c[MR x 16] += p[MR x n] (row stride ldp) times v[n x 16] (row stride ldv).
template <int MR>
inline void pv_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t n,
                    float* c, int64_t ldc) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_load_ps(c + r * ldc);
    acc[r][1] = _mm256_load_ps(c + r * ldc + 8);
  }
  for (int64_t j = 0; j < n; ++j) {
    const __m256 b0 = _mm256_load_ps(v + j * ldv);
    const __m256 b1 = _mm256_load_ps(v + j * ldv + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(p + r * ldp + j);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(c + r * ldc, acc[r][0]);
    _mm256_store_ps(c + r * ldc + 8, acc[r][1]);
  }
}

// Runs fn(i) for i in [0, n) on the caller and the XLA intra-op pool's other threads.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  // A helper that starts after all work is taken touches only the shared state (and the
  // closure, which it never calls then), so the caller waits for work, not for helpers.
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, n, work]() mutable {
      if (state->next.load() < n) work();
    });
  }
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Shape {
  int64_t batch, q_len, kv_len, heads, kv_heads, dim;
  int64_t kv_pad() const { return (kv_len + kNR - 1) / kNR * kNR; }
};

struct Mask {
  const bool* data = nullptr;  // [batch, heads, q_len, kv_len] with heads, q_len possibly 1
  int64_t heads = 1, q_len = 1;
  bool causal = false;
  bool any() const { return data != nullptr || causal; }
  const bool* row(const Shape& s, int64_t b, int64_t h, int64_t i) const {
    return data + ((b * heads + (heads == 1 ? 0 : h)) * q_len + (q_len == 1 ? 0 : i)) * s.kv_len;
  }
};

// k [kv_len, kv_heads, dim] of one head -> panels [kv_pad / 16][dim][16] (keys zero-padded);
// v of the same head -> [kv_len][dim], contiguous.
void pack_head(const Shape& s, const float* k, const float* v, float* k_panels, float* v_rows) {
  const int64_t stride = s.kv_heads * s.dim;
  std::memset(k_panels, 0, sizeof(float) * s.kv_pad() * s.dim);
  for (int64_t j = 0; j < s.kv_len; ++j) {
    float* panel = k_panels + (j / kNR) * s.dim * kNR + j % kNR;
    const float* kj = k + j * stride;
    for (int64_t d = 0; d < s.dim; ++d) panel[d * kNR] = kj[d];
    std::memcpy(v_rows + j * s.dim, v + j * stride, sizeof(float) * s.dim);
  }
}

// One task: queries [row0, row0 + rows) of head h in batch b.
void attend_block(const Shape& s, const Mask& mask, int64_t b, int64_t h, float scale, const float* q,
                  const float* k_panels, const float* v_rows, float* out, int64_t row0, int64_t rows) {
  thread_local Scratch q_buf, s_buf, o_buf, m_buf;
  const int64_t tiles = (rows + kMR - 1) / kMR, padded = tiles * kMR;
  const int64_t kv_pad = s.kv_pad(), q_stride = s.heads * s.dim;
  float* qs = q_buf.get(padded * s.dim);
  float* logits = s_buf.get(padded * kv_pad);
  float* acc = o_buf.get(padded * s.dim);
  for (int64_t r = 0; r < padded; ++r) {
    for (int64_t d = 0; d < s.dim; ++d)
      qs[r * s.dim + d] = r < rows ? scale * q[(row0 + r) * q_stride + d] : 0.0f;
  }
  // Row maxima over the full 16-key panels come out of the tiles (8 lanes per row); keys
  // of a last partial panel are added one by one, so zero-padded keys never count.
  float* lane_max = m_buf.get(padded * 8);
  for (int64_t i = 0; i < padded * 8; ++i) lane_max[i] = -INFINITY;
  // With a mask the maxima wait for it; causal rows skip the key panels wholly above them
  // (the mask pass fills those logits) and, in p v, the keys past their last row.
  const int64_t full = mask.any() ? 0 : s.kv_len / kNR;
  const auto key_end = [&](int64_t t) {  // keys that tile t's rows can see
    return mask.causal ? std::min(s.kv_len, row0 + (t + 1) * kMR) : s.kv_len;
  };
  for (int64_t p = 0; p < kv_pad / kNR; ++p) {
    for (int64_t t = 0; t < tiles; ++t) {
      if (p * kNR >= key_end(t)) continue;
      qk_tile<kMR>(qs + t * kMR * s.dim, k_panels + p * s.dim * kNR, s.dim,
                   logits + t * kMR * kv_pad + p * kNR, kv_pad, p < full ? lane_max + t * kMR * 8 : nullptr);
    }
  }
  std::vector<float> inv_sum(padded);
  std::vector<int64_t> uniform;  // fully masked causal rows: p v below skips their later keys
  const int64_t vec_end = s.kv_len / 8 * 8;
  const float lowest = std::numeric_limits<float>::lowest();
  for (int64_t r = 0; r < padded; ++r) {
    float* row = logits + r * kv_pad;
    if (mask.any() && r < rows) {
      const int64_t i = row0 + r;
      const bool* keep = mask.data ? mask.row(s, b, h, i) : nullptr;
      const int64_t visible = mask.causal ? std::min(s.kv_len, i + 1) : s.kv_len;
      for (int64_t j = 0; j < visible; ++j) row[j] = (!keep || keep[j]) ? row[j] : lowest;
      std::fill(row + visible, row + s.kv_len, lowest);
    }
    float m = *std::max_element(lane_max + r * 8, lane_max + r * 8 + 8);
    for (int64_t j = full * kNR; j < s.kv_len; ++j) m = std::max(m, row[j]);
    const __m256 vm = _mm256_set1_ps(m);
    alignas(32) float lanes[8];
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t j = 0; j < vec_end; j += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(row + j), vm));
      _mm256_store_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    _mm256_store_ps(lanes, vsum);
    double total = 0.0;
    for (float x : lanes) total += x;
    for (int64_t j = vec_end; j < s.kv_len; ++j) {
      row[j] = std::exp(row[j] - m);
      total += row[j];
    }
    inv_sum[r] = static_cast<float>(1.0 / total);
    if (mask.causal && m == lowest && r < rows) uniform.push_back(r);
  }
  std::memset(acc, 0, sizeof(float) * padded * s.dim);
  for (int64_t j0 = 0; j0 < s.kv_len; j0 += kKeyChunk) {
    const int64_t n = std::min(kKeyChunk, s.kv_len - j0);
    for (int64_t c = 0; c < s.dim; c += kNR) {
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t seen = std::min(n, key_end(t) - j0);  // later keys have p == 0
        if (seen > 0)
          pv_tile<kMR>(logits + t * kMR * kv_pad + j0, kv_pad, v_rows + j0 * s.dim + c, s.dim, seen,
                       acc + t * kMR * s.dim + c, s.dim);
      }
    }
  }
  for (int64_t r : uniform) {  // every key weighs the same, the hidden ones too (XLA's rule)
    float* row = acc + r * s.dim;
    std::fill(row, row + s.dim, 0.0f);
    for (int64_t j = 0; j < s.kv_len; ++j) {
      for (int64_t d = 0; d < s.dim; ++d) row[d] += v_rows[j * s.dim + d];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 w = _mm256_set1_ps(inv_sum[r]);
    float* dst = out + (row0 + r) * q_stride;
    for (int64_t d = 0; d < s.dim; d += 8)
      _mm256_storeu_ps(dst + d, _mm256_mul_ps(w, _mm256_load_ps(acc + r * s.dim + d)));
  }
}

ffi::Error Run(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
               ffi::Buffer<ffi::F32> v, const Mask& mask, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const size_t rank = qd.size();
  if (rank < 3 || kd.size() != rank || vd.size() != rank)
    return ffi::Error::InvalidArgument("attention: q, k and v need the same rank >= 3");
  Shape s{1, qd[rank - 3], kd[rank - 3], qd[rank - 2], kd[rank - 2], qd[rank - 1]};
  for (size_t i = 0; i + 3 < rank; ++i) {
    if (qd[i] != kd[i] || qd[i] != vd[i])
      return ffi::Error::InvalidArgument("attention: q, k and v batch dimensions differ");
    s.batch *= qd[i];
  }
  for (size_t i = rank - 3; i < rank; ++i) {
    if (kd[i] != vd[i]) return ffi::Error::InvalidArgument("attention: k and v shapes differ");
  }
  if (kd[rank - 1] != s.dim || s.dim % kNR != 0 || s.kv_heads == 0 || s.heads % s.kv_heads != 0 ||
      s.kv_len == 0)
    return ffi::Error::InvalidArgument(
        "attention: needs head dim % 16 == 0, equal q/k head dims, heads % kv_heads == 0 and "
        "at least one key");
  if (s.q_len == 0 || s.batch == 0) return ffi::Error::Success();

  const int64_t head_floats = s.kv_pad() * s.dim;
  // Kept by the calling thread between calls: a fresh multi-MiB allocation per call costs
  // page faults (~2 ms for Whisper-small). Helpers only read it during the call.
  thread_local Scratch packed;
  float* k_panels = packed.get(2 * s.batch * s.kv_heads * head_floats);
  if (!k_panels) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "attention: out of memory");
  float* v_rows = k_panels + s.batch * s.kv_heads * head_floats;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float* op = out->typed_data();
  const int64_t kv_batch = s.kv_len * s.kv_heads * s.dim, q_batch = s.q_len * s.heads * s.dim;

  parallel_for(pool, s.batch * s.kv_heads, [&](int64_t i) {
    const int64_t b = i / s.kv_heads, h = i % s.kv_heads;
    pack_head(s, kp + b * kv_batch + h * s.dim, vp + b * kv_batch + h * s.dim,
              k_panels + i * head_floats, v_rows + i * head_floats);
  });
  const int64_t blocks = (s.q_len + kRows - 1) / kRows, groups = s.heads / s.kv_heads;
  parallel_for(pool, s.batch * s.heads * blocks, [&](int64_t i) {
    const int64_t blk = i % blocks, h = (i / blocks) % s.heads, b = i / blocks / s.heads;
    const int64_t packed_head = b * s.kv_heads + h / groups, row0 = blk * kRows;
    attend_block(s, mask, b, h, scale, qp + b * q_batch + h * s.dim, k_panels + packed_head * head_floats,
                 v_rows + packed_head * head_floats, op + b * q_batch + h * s.dim, row0,
                 std::min(kRows, s.q_len - row0));
  });
  return ffi::Error::Success();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out, float scale) {
  return Run(pool, q, k, v, Mask{}, out, scale);
}

ffi::Error MaskedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                           ffi::ResultBuffer<ffi::F32> out, float scale, bool causal) {
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions();
  const size_t rank = qd.size();
  Mask m{reinterpret_cast<const bool*>(mask.typed_data()), 1, 1, causal};
  if (md.size() == 1 && md[0] == 0) {
    m.data = nullptr;  // causal rows only
  } else {
    if (md.size() != rank || rank < 3 || md[rank - 1] != kd[rank - 3] ||
        (md[rank - 3] != 1 && md[rank - 3] != qd[rank - 2]) ||
        (md[rank - 2] != 1 && md[rank - 2] != qd[rank - 3]))
      return ffi::Error::InvalidArgument(
          "attention: the mask must be [..., heads or 1, q_len or 1, kv_len] with q's batch dimensions");
    for (size_t i = 0; i + 3 < rank; ++i) {
      if (md[i] != qd[i]) return ffi::Error::InvalidArgument("attention: mask batch dimensions differ from q's");
    }
    m.heads = md[rank - 3];
    m.q_len = md[rank - 2];
  }
  return Run(pool, q, k, v, m, out, scale);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaudioCpuMaskedAttention, MaskedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxaudioCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
