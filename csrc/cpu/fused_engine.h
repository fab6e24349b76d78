// The fused CPU kernels (fused.h), written once over a vector type V (F8 /
// D4 for AVX2, F16 / D8 for AVX-512) with NR = 2 vectors per register-tile
// row and per chunk of hidden units. Each instruction set's translation unit
// (fused_avx2.cpp, fused_avx512.cpp) is compiled for it as a whole and
// includes this file once, inside its own namespace, after naming its vector
// namespace `simd`; fused.cpp calls in only after checking the processor.
// Nothing here allocates or uses the standard library's templates, so no
// code built for one instruction set is shared with (and run by) another
// translation unit; the helpers below are in an unnamed namespace.
//
// Include only from those files: it has no include guard and opens no
// namespace of its own.

namespace {

using simd::Vec;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// [begin, end) of n items for thread tid of nt, in contiguous ranges.
struct Range {
  int64_t begin, end;
};
inline Range split(int64_t n, int nt, int tid) { return {n * tid / nt, n * (tid + 1) / nt}; }

// The rows of the next register tile of the rows left: at most 6, balanced
// (32 rows are 6+6+5+5+5+5, not 6*5+2).
inline int tile_rows(int64_t left) {
  const int64_t tiles = cdiv(left, 6);
  return int(cdiv(left, tiles));
}

// ------------------------------------------------------------ microkernel
//
// C[MR, NR] (+)= A[MR, K] B[K, NR], NR = two vectors. A is row-major (row
// stride lda), B has row stride ldb (NR for a packed panel, the matrix's
// width when read in place). Only the first nc <= NR columns of C are
// written. Mode: store, add to C, or add a bias row.
enum Mode { kStore, kAdd, kBias };

template <class V, typename T = typename V::scalar>
LF_INLINE void put(T* c, V x0, V x1, int64_t nc, Mode mode, const T* bias) {
  constexpr int W = V::width;
  if (mode == kAdd) {
    x0 = x0 + V::load(c, nc);
    x1 = x1 + V::load(c + W, nc - W);
  } else if (mode == kBias) {
    x0 = x0 + V::load(bias, nc);
    x1 = x1 + V::load(bias + W, nc - W);
  }
  x0.store(c, nc);
  x1.store(c + W, nc - W);
}

#define LF_ROW(r)                                                      \
  if constexpr (MR > r) {                                              \
    const V a = V::bcast(PackedA ? A + k * MR + r : A + r * lda + k);  \
    c##r##0 = simd::fma(a, b0, c##r##0);               \
    c##r##1 = simd::fma(a, b1, c##r##1);               \
  }
#define LF_PUT(r) \
  if constexpr (MR > r) put<V>(C + r * ldc, c##r##0, c##r##1, nc, mode, bias);

// Partial: nc < NR, and B's columns past nc must not be read (B in place).
// PackedA: A is a packed micro-panel, A(r, k) at A[k*MR + r] (lda unused).
template <class V, int MR, bool Partial, bool PackedA, typename T = typename V::scalar>
LF_INLINE void tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, int64_t nc, Mode mode, const T* bias) {
  constexpr int W = V::width;
  auto load = [nc](const T* p, int half) {
    if constexpr (Partial) return V::load(p + half * W, nc - half * W);
    else return V::load(p + half * W);
  };
  V c00 = V::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
    c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  int64_t k = 0;
  if constexpr (MR == 1 && !PackedA) {
    // One row has two chains of dependent FMAs: split k in two for four.
    for (; k + 1 < K; k += 2) {
      const T* b = B + k * ldb;
      const V a0 = V::bcast(A + k), a1 = V::bcast(A + k + 1);
      c00 = simd::fma(a0, load(b, 0), c00);
      c01 = simd::fma(a0, load(b, 1), c01);
      c10 = simd::fma(a1, load(b + ldb, 0), c10);
      c11 = simd::fma(a1, load(b + ldb, 1), c11);
    }
    c00 = c00 + c10;
    c01 = c01 + c11;
  }
  for (; k < K; ++k) {
    const V b0 = load(B + k * ldb, 0), b1 = load(B + k * ldb, 1);
    LF_ROW(0) LF_ROW(1) LF_ROW(2) LF_ROW(3) LF_ROW(4) LF_ROW(5)
  }
  LF_PUT(0) LF_PUT(1) LF_PUT(2) LF_PUT(3) LF_PUT(4) LF_PUT(5)
}
#undef LF_ROW
#undef LF_PUT

template <class V, bool Partial, bool PackedA, typename T = typename V::scalar>
inline void tile_p(int mr, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc, int64_t nc, Mode mode, const T* bias) {
  switch (mr) {
    case 1: return tile<V, 1, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    case 2: return tile<V, 2, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    case 3: return tile<V, 3, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    case 4: return tile<V, 4, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    case 5: return tile<V, 5, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    default: return tile<V, 6, Partial, PackedA>(K, A, lda, B, ldb, C, ldc, nc, mode, bias);
  }
}

// tile<V, mr> for a run-time mr in 1..6 and nc in 1..NR; lda == 0: A packed.
template <class V, typename T = typename V::scalar>
inline void tile_mr(int mr, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, int64_t nc, Mode mode, const T* bias = nullptr) {
  const bool full = nc >= 2 * V::width;
  if (lda == 0) {
    if (full) tile_p<V, false, true>(mr, K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    else tile_p<V, true, true>(mr, K, A, lda, B, ldb, C, ldc, nc, mode, bias);
  } else {
    if (full) tile_p<V, false, false>(mr, K, A, lda, B, ldb, C, ldc, nc, mode, bias);
    else tile_p<V, true, false>(mr, K, A, lda, B, ldb, C, ldc, nc, mode, bias);
  }
}

// col[j] = column j < n (n <= 8) of the first `rows` rows of row-major float
// A (row i at src + i*rs), the rows past `rows` read as zero: an 8x8
// transpose.
inline void transpose8(const float* src, int64_t rs, int rows, int64_t n, __m256 (&col)[8]) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i kmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), idx);
  __m256 r[8];
  for (int i = 0; i < 8; ++i)
    r[i] = i >= rows ? _mm256_setzero_ps()
                     : n == 8 ? _mm256_loadu_ps(src + i * rs)
                              : _mm256_maskload_ps(src + i * rs, kmask);
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // columns 0,1 | 4,5 of rows i, i+1
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // columns 2,3 | 6,7
  }
  for (int h = 0; h < 8; h += 4) {  // rows 0-3, then 4-7
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);      // column 0 | 4
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);  // column 1 | 5
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);  // column 2 | 6
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);  // column 3 | 7
  }
  for (int j = 0; j < 4; ++j) {
    col[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
    col[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
  }
}

// Eight float columns [k, k + n) (n <= 8) of a register tile's mr <= 6 rows
// of row-major A (row r at src + r*rs) to out[j*mr + r], j < n, each column
// stored as 8 lanes that the next columns' stores overwrite past mr, but for
// the columns within 8 of the end of the tile's block (`room` values from
// out): mr lanes.
inline void pack_cols8(const float* src, int64_t rs, int mr, int64_t n, int64_t room,
                       float* out) {
  __m256 col[8];
  transpose8(src, rs, mr, n, col);
  const __m256i rmask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(mr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int64_t j = 0; j < n; ++j) {
    if (j * mr + 8 <= room) _mm256_storeu_ps(out + j * mr, col[j]);
    else _mm256_maskstore_ps(out + j * mr, rmask, col[j]);
  }
}

// Rows [b0, b1) and columns [k0, k0 + kc) of A, element (i, k) at
// A[i*rs + k*cs] (rs = lda, cs = 1 for row-major A; rs = 1, cs = lda for A
// stored transposed), as the packed micro-panels of the tiles tile_rows
// makes of them, one after another. Row-major float A: eight columns at a
// time (pack_cols8), the copy the forward makes of x and h_{t-1}.
template <typename T>
void pack_a(int64_t b0, int64_t b1, const T* A, int64_t rs, int64_t cs, int64_t k0,
            int64_t kc, T* out) {
  for (int64_t b = b0; b < b1;) {
    const int mr = tile_rows(b1 - b);
    if constexpr (sizeof(T) == sizeof(float)) {
      if (cs == 1) {
        for (int64_t k = 0; k < kc; k += 8) {
          const int64_t n = imin(8, kc - k);
          pack_cols8(A + b * rs + k0 + k, rs, mr, n, (kc - k) * mr, out + k * mr);
        }
        out += mr * kc;
        b += mr;
        continue;
      }
    }
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = A + b * rs + (k0 + k) * cs;
      for (int r = 0; r < mr; ++r) out[k * mr + r] = src[r * rs];
    }
    out += mr * kc;
    b += mr;
  }
}

// pack_a for A stored transposed (rs = 1): a tile's rows at each k are
// contiguous, copied as masked vectors.
template <class V, typename T = typename V::scalar>
void pack_at(int64_t b0, int64_t b1, const T* A, int64_t cs, int64_t k0, int64_t kc, T* out) {
  for (int64_t b = b0; b < b1;) {
    const int mr = tile_rows(b1 - b);
    const T* src = A + b + k0 * cs;
    if (mr <= V::width) {
      // One vector per k, stored whole where the next k's values overwrite
      // its lanes past mr (all but the last few k): a masked store each k
      // made this copy 30-40% slower.
      int64_t k = 0;
      for (; (kc - k) * mr >= V::width; ++k) V::load(src + k * cs, mr).store(out + k * mr);
      for (; k < kc; ++k) V::load(src + k * cs, mr).store(out + k * mr, mr);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int r = 0; r < mr; r += V::width)
          V::load(src + k * cs + r, mr - r).store(out + k * mr + r, mr - r);
    }
    out += mr * kc;
    b += mr;
  }
}

// C[rows, nc] (+)= A[rows, K] B[K, nc] for rows in [b0, b1), tile by tile.
template <class V, typename T = typename V::scalar>
inline void gemm_rows(int64_t b0, int64_t b1, int64_t K, const T* A, int64_t lda, const T* B,
                      int64_t ldb, T* C, int64_t ldc, int64_t nc, Mode mode) {
  for (int64_t b = b0; b < b1;) {
    const int mr = tile_rows(b1 - b);
    tile_mr<V>(mr, K, A + b * lda, lda, B, ldb, C + b * ldc, ldc, nc, mode);
    b += mr;
  }
}

// Row and K blocks of the big GEMMs: a packed block of A (per thread) stays
// in L2 while each panel's K block (16 KB with AVX2, 32 KB with AVX-512) is
// reused by all the block's tiles. K blocks of kKC rows with either: C is
// loaded and stored once per K block, and where C is large (the weight
// gradients at H = 1024: 32 MB, in DRAM) 128-row blocks made those loads
// cost 4-6% of a training step (AVX-512, T50 B32 H1024).
constexpr int64_t kMC = 96, kKC = 256;

// One NR-wide panel of B and where its columns go: B's row k at b + k*ldb
// (ldb = NR when packed, the matrix's width when read in place), C (row
// stride ldc), how many of the panel's columns are real, a bias row for them
// (or null).
template <typename T>
struct Panel {
  const T* b;
  int64_t ldb;
  T* c;
  int64_t ldc, ncols;
  const T* bias;
};

// C = A B for M rows, one thread's share: row blocks of at most kMC, the same
// number for every thread (or, for few rows, a share of the panels), K in
// blocks of kKC. panel(p) gives panel p of np; pack(m0, m1, k0, kc, buf)
// packs A's block. The first K block stores (adding the bias, if any), the
// others add (all of them with add). While a panel's tiles run, the next panel's K block is
// fetched into L2, a share per tile (panels lie apart: the hardware
// prefetchers would not see it coming). after_panel() runs after each
// panel's tiles of a K block. With ain, A is read in place (row m at ain +
// m*lda), not packed: the same sums.
struct NoHook {
  void operator()() const {}
};
template <class V, class PackA, class PanelFn, class Hook = NoHook,
          typename T = typename V::scalar>
void gemm_blocks(int nt, int tid, int64_t M, int64_t K, const PackA& pack, int64_t np,
                 const PanelFn& panel, T* ablk, bool add = false, int64_t* claim = nullptr,
                 const Hook& after_panel = Hook(), const T* ain = nullptr, int64_t lda = 0) {
  constexpr int64_t NR = 2 * V::width;
  // Few rows: each thread takes a share of the panels for all rows (packing
  // A twice); else a share of the row blocks for all panels, or with `claim`
  // (a counter shared by the team, 0 before the call) the next block not yet
  // claimed: a thread on a slower core takes fewer.
  const int groups = M >= 4 * nt * kMC ? 1 : nt, g = tid % groups;
  const int64_t p0 = np * g / groups, p1 = np * (g + 1) / groups;
  const int64_t blocks = groups == 1 ? nt * cdiv(M, nt * kMC) : cdiv(M, kMC);
  const bool dynamic = claim != nullptr && groups == 1 && nt > 1;
  for (int64_t blk = dynamic ? __atomic_fetch_add(claim, 1, __ATOMIC_RELAXED) : tid / groups;
       blk < blocks;
       blk = dynamic ? __atomic_fetch_add(claim, 1, __ATOMIC_RELAXED) : blk + nt / groups) {
    const int64_t m0 = M * blk / blocks, m1 = M * (blk + 1) / blocks;
    const int64_t tiles = cdiv(m1 - m0, 6);
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kKC) {
      const int64_t kc = imin(kKC, K - k0);
      if (ain == nullptr) pack(m0, m1, k0, kc, ablk);
      for (int64_t p = p0; p < p1; ++p) {
        const Panel<T> o = panel(p);
        const Mode mode = k0 > 0 || add ? kAdd : o.bias ? kBias : kStore;
        const T* bp = o.b + k0 * o.ldb;
        const T* ap = ain ? ain + m0 * lda + k0 : ablk;
        const char* next = nullptr;
        int64_t lines = 0, done = 0, it = 0;
        if (p + 1 < p1) {
          const Panel<T> nx = panel(p + 1);
          next = reinterpret_cast<const char*>(nx.b + k0 * nx.ldb);
          lines = nx.ldb == NR ? kc * NR * int64_t(sizeof(T)) / 64 : 0;  // packed only
        }
        for (int64_t b = m0; b < m1;) {
          const int mr = tile_rows(m1 - b);
          for (const int64_t upto = lines * ++it / tiles; done < upto; ++done)
            __builtin_prefetch(next + done * 64, 0, 2);
          // And the next tile's rows of C (rows ldc apart: one stream each,
          // which the prefetchers would not follow).
          if (b + mr < m1) {
            const T* nc = o.c + (b + mr) * o.ldc;
            for (int r = tile_rows(m1 - b - mr) - 1; r >= 0; --r) {
              __builtin_prefetch(nc + r * o.ldc, 1, 3);
              __builtin_prefetch(nc + r * o.ldc + NR - 1, 1, 3);
            }
          }
          tile_mr<V>(mr, kc, ap, ain ? lda : 0, bp, o.ldb, o.c + b * o.ldc, o.ldc, o.ncols, mode,
                     o.bias);
          ap += ain ? mr * lda : mr * kc;
          b += mr;
        }
        after_panel();
      }
    }
  }
}

// --------------------------------------------------------- batch-1 kernel
//
// out[j] += dot(a[0, K), w[j * K, ...)) for the `count` <= width rows j of w
// starting at w: W rows read in place, each once, vectorized over k.
template <class V, typename T = typename V::scalar>
LF_INLINE void dot_rows(int64_t K, const T* a, const T* w, int64_t count, T* out) {
  constexpr int W = V::width;
  const T* r[W];
  for (int j = 0; j < W; ++j) r[j] = w + imin(j, count - 1) * K;  // spare lanes repeat a row
  V s[W];
  for (int j = 0; j < W; ++j) s[j] = V::zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    const V x = V::load(a + k);
    for (int j = 0; j < W; ++j) s[j] = simd::fma(x, V::load(r[j] + k), s[j]);
  }
  if (k < K) {
    const V x = V::load(a + k, K - k);
    for (int j = 0; j < W; ++j) s[j] = simd::fma(x, V::load(r[j] + k, K - k), s[j]);
  }
  (V::sums(s) + V::load(out, count)).store(out, count);
}

// ----------------------------------------------------------------- panels
//
// Panel c of w^T for a row-major w [N, K]: out[k*ldo + j] = w[(c*NR + j)*K + k]
// for j < NR, zero past N (ldo = NR: a panel of its own). A gate weight w [4H,
// K] is packed as panels c*4 + q of its gate q's rows (w + q*H*K, N = H): the
// four gates of a chunk of units are adjacent, so a step reads one chunk's
// weights contiguously; pack_gate_panel interleaves them row by row.
template <typename T, int NR>
void pack_rows_panel(const T* w, int64_t N, int64_t K, int64_t c, T* out, int64_t ldo = NR) {
  const int64_t j0 = c * NR, count = imin(NR, N - j0);
  if constexpr (sizeof(T) == sizeof(float)) {  // 8x8 transposes (NR is a multiple of 8)
    for (int64_t k = 0; k < K; k += 8)
      for (int64_t j = 0; j < NR; j += 8) {
        __m256 col[8];
        const int64_t n = imin(8, K - k);
        transpose8(w + (j0 + j) * K + k, K, int(imax(0, imin(8, count - j))), n, col);
        for (int64_t i = 0; i < n; ++i) _mm256_storeu_ps(out + (k + i) * ldo + j, col[i]);
      }
    return;
  }
  for (int64_t j = 0; j < count; ++j)
    for (int64_t k = 0; k < K; ++k) out[k * ldo + j] = w[(j0 + j) * K + k];
  for (int64_t j = count; j < NR; ++j)
    for (int64_t k = 0; k < K; ++k) out[k * ldo + j] = T(0);
}

// Gate panel c of a gate weight w [4H, K] for the gate tiles: the four
// gates' rows of units [c*W, +W) transposed and interleaved, out[k*4W + q*W
// + j] = w[(q*H + c*W + j)*K + k], zero past H.
template <typename T, int W>
void pack_gate_panel(const T* w, int64_t H, int64_t K, int64_t c, T* out) {
  for (int q = 0; q < 4; ++q) pack_rows_panel<T, W>(w + q * H * K, H, K, c, out + q * W, 4 * W);
}

// Column panel c of a row-major matrix m [K, N]: out[k*NR + j] = m[k*N +
// c*NR + j], zero past N (W_hh as the B operand of dh = dgates W_hh).
template <typename T, int NR>
void pack_cols_panel(const T* m, int64_t K, int64_t N, int64_t c, T* out) {
  const int64_t j0 = c * NR, count = imin(NR, N - j0);
  for (int64_t k = 0; k < K; ++k) {
    const T* row = m + k * N + j0;
    T* o = out + k * NR;
    for (int64_t j = 0; j < count; ++j) o[j] = row[j];
    for (int64_t j = count; j < NR; ++j) o[j] = T(0);
  }
}

// ------------------------------------------------------------------- cell
//
// The cell on rows [b0, b1) of a step for the units of chunk c (u0 = c*NR,
// nc of them): gate pre-activations g (row b at g + b*G, gate q at +q*H),
// running cells c_run [B, H] (updated), output h at h_out + b*ldh. With save,
// the activations replace the pre-activations and c_t goes to cells.
template <class V, typename T = typename V::scalar>
LF_INLINE void cell_forward_rows(int64_t b0, int64_t b1, int64_t u0, int64_t nc, int64_t H,
                                 T* g, T* c_run, T* cells, T* h_out, int64_t ldh) {
  using C = X2<V>;  // a chunk of units: nc <= 2 vectors
  const int64_t G = 4 * H;
  for (int64_t b = b0; b < b1; ++b) {
    T* gb = g + b * G + u0;
    C i = C::load(gb, nc), f = C::load(gb + H, nc), gg = C::load(gb + 2 * H, nc),
      o = C::load(gb + 3 * H, nc), c, h;
    T* cr = c_run + b * H + u0;
    cell_forward(i, f, gg, o, C::load(cr, nc), c, h);
    c.store(cr, nc);
    h.store(h_out + b * ldh + u0, nc);
    if (cells != nullptr) {
      c.store(cells + b * H + u0, nc);
      i.store(gb, nc);
      f.store(gb + H, nc);
      gg.store(gb + 2 * H, nc);
      o.store(gb + 3 * H, nc);
    }
  }
}

// ------------------------------------------------------------- gate tile
//
// A step's gates for MR <= 6 rows and one vector of units, all four gates in
// registers, then the cell on them there: nothing goes through memory
// between the products and the cell. 24 accumulators: AVX-512's 32
// registers hold them (AVX2's 16 would hold 3 rows, measured no faster than
// its 6-row GEMM tiles followed by the cell).
//
// acc[r][q] += A(r, k) B[k*4W + q*W + lane] for the MR rows of a packed
// micro-panel A (A(r, k) at A[k*MR + r]) and a gate panel B (pack_gate_panel).
template <class V, int MR, typename T = typename V::scalar>
LF_INLINE void gate_products(int64_t K, const T* A, const T* B, V (&acc)[MR][4]) {
  constexpr int W = V::width;
  for (int64_t k = 0; k < K; ++k) {
    const T* b = B + k * 4 * W;
    const V b0 = V::load(b), b1 = V::load(b + W), b2 = V::load(b + 2 * W), b3 = V::load(b + 3 * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const V a = V::bcast(A + k * MR + r);
      acc[r][0] = simd::fma(a, b0, acc[r][0]);
      acc[r][1] = simd::fma(a, b1, acc[r][1]);
      acc[r][2] = simd::fma(a, b2, acc[r][2]);
      acc[r][3] = simd::fma(a, b3, acc[r][3]);
    }
  }
}

// Where a gate tile's rows start from and go (row r of each at +r*stride):
// the gates' starting values init (gate q at +q*H; ldi = 0: the bias for
// every row), the running cells c_run (updated), h (h_out, stride ldh) and,
// when cells is not null, c_t there and the activations at acts (stride G).
// The first nu <= W units are real.
template <typename T>
struct GateOut {
  const T* init;
  int64_t ldi, H, nu;
  T *c_run, *cells, *acts;
  int64_t G;
  T* h_out;
  int64_t ldh;
};

// Row s of a value of one row (V) or two (X2<V>).
template <class V>
LF_INLINE V row_of(V x, int) { return x; }
template <class V>
LF_INLINE V row_of(X2<V> x, int s) { return s ? x.b : x.a; }

// The cell on `rows` rows from row r (C = V: one; X2<V>: two, their chains
// interleaved) and the stores of its results.
template <class C, typename T>
LF_INLINE void gate_cell(C i, C f, C g, C o, C c_prev, const GateOut<T>& out, int r, int rows) {
  C c, h;
  cell_forward(i, f, g, o, c_prev, c, h);
  const int64_t n = out.nu, H = out.H;
  for (int s = 0; s < rows; ++s) {
    const int64_t row = r + s;
    row_of(c, s).store(out.c_run + row * H, n);
    row_of(h, s).store(out.h_out + row * out.ldh, n);
    if (out.cells != nullptr) {
      row_of(c, s).store(out.cells + row * H, n);
      T* act = out.acts + row * out.G;
      row_of(i, s).store(act, n);
      row_of(f, s).store(act + H, n);
      row_of(g, s).store(act + 2 * H, n);
      row_of(o, s).store(act + 3 * H, n);
    }
  }
}

// gates = init + A1 B1 + A2 B2 for MR rows, then the cell: A1 = x_t and B1
// W_ih's gate panel (K1 = 0: none, the input projection is in init), A2 =
// h_{t-1} and B2 W_hh's.
template <class V, int MR, typename T = typename V::scalar>
LF_INLINE void gate_tile(int64_t K1, const T* A1, const T* B1, int64_t K2, const T* A2,
                         const T* B2, const GateOut<T>& out) {
  const int64_t H = out.H, n = out.nu;
  V acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = V::load(out.init + r * out.ldi + q * H, n);
  if (K1 > 0) gate_products<V, MR>(K1, A1, B1, acc);
  gate_products<V, MR>(K2, A2, B2, acc);
  const auto c_prev = [&](int r) { return V::load(out.c_run + r * H, n); };
#pragma GCC unroll 8
  for (int r = 0; r + 1 < MR; r += 2) {
    using C = X2<V>;
    gate_cell(C(acc[r][0], acc[r + 1][0]), C(acc[r][1], acc[r + 1][1]),
              C(acc[r][2], acc[r + 1][2]), C(acc[r][3], acc[r + 1][3]),
              C(c_prev(r), c_prev(r + 1)), out, r, 2);
  }
  if constexpr (MR % 2 == 1) {
    constexpr int r = MR - 1;
    gate_cell(acc[r][0], acc[r][1], acc[r][2], acc[r][3], c_prev(r), out, r, 1);
  }
}

// gate_tile for a run-time mr in 1..6.
template <class V, typename T = typename V::scalar>
inline void gate_tile_mr(int mr, int64_t K1, const T* A1, const T* B1, int64_t K2, const T* A2,
                         const T* B2, const GateOut<T>& out) {
  switch (mr) {
    case 1: return gate_tile<V, 1>(K1, A1, B1, K2, A2, B2, out);
    case 2: return gate_tile<V, 2>(K1, A1, B1, K2, A2, B2, out);
    case 3: return gate_tile<V, 3>(K1, A1, B1, K2, A2, B2, out);
    case 4: return gate_tile<V, 4>(K1, A1, B1, K2, A2, B2, out);
    case 5: return gate_tile<V, 5>(K1, A1, B1, K2, A2, B2, out);
    default: return gate_tile<V, 6>(K1, A1, B1, K2, A2, B2, out);
  }
}

// Where the forward workspace's parts start (elements) and its size. With
// gate tiles (AVX-512, batch > 1) the steps use gate panels; where both gate
// weights fit in kFuseBytes (the last-level cache, with room to spare) each
// step's tiles take x_t W_ih^T too (fuse_x) and there is no input
// projection: no gates go through memory.
constexpr int64_t kFuseBytes = int64_t(12) << 20;
// Forward::by_rows for gate weights up to this size (each thread reads them
// all every step: they must stay in its L2). Inference 5-17% faster at H =
// 64-128, batch 32-512 (interleaved A/B, AVX-512, 2 threads).
constexpr int64_t kByRowsBytes = int64_t(512) << 10;
struct ForwardLayout {
  bool pack_ih, pack_hh, gate, fuse_x;
  int64_t chunk;  // steps per chunk of the input projection
  int64_t pih, phh, phr, hpre, apack, ring, hpack, xpack, size;
};
template <class V, typename T = typename V::scalar>
ForwardLayout forward_layout(const LayerDims& d, bool proj, bool save, int threads) {
  constexpr int NR = 2 * V::width;
  ForwardLayout l;
  const int64_t G = 4 * d.hidden, chunks = cdiv(d.hidden, NR);
  l.pack_ih = d.rows >= 8;  // else the rows are dot products with W_ih in place
  l.pack_hh = d.batch > 1;  // batch 1: dot products with W_hh in place
  l.gate = simd::kRegisters >= 32 && l.pack_hh;
  l.fuse_x = l.gate && l.pack_ih &&
             (d.input + d.proj) * G * int64_t(sizeof(T)) <= kFuseBytes;
  // The input projection runs a chunk of steps ahead of the recurrence, so
  // the gates the steps read are still in cache: about 1 MB of them.
  const int64_t step_bytes = imax(1, d.batch * G * int64_t(sizeof(T)));
  l.chunk = l.fuse_x ? d.steps : imax(1, imin(d.steps, (int64_t(1) << 20) / step_bytes));
  l.pih = G;  // the combined bias comes first
  l.phh = l.pih + (l.pack_ih ? chunks * 4 * d.input * NR : 0);
  l.phr = l.phh + (l.pack_hh ? chunks * 4 * d.proj * NR : 0);
  l.hpre = l.phr + (proj ? cdiv(d.proj, NR) * d.hidden * NR : 0);
  l.apack = l.hpre + (proj ? d.batch * d.hidden : 0);
  l.ring = l.apack + (l.pack_ih && !l.fuse_x ? threads * kMC * kKC : 0);
  // Without save the chunk's gates live here, not in a.gates.
  l.hpack = l.ring + (save || l.fuse_x ? 0 : l.chunk * d.batch * G);
  // h_{t-1} (and with fuse_x x_t) packed as the step's A operands, one copy
  // per thread.
  l.xpack = l.hpack + (l.pack_hh ? threads * d.batch * d.proj : 0);
  l.size = l.xpack + (l.fuse_x ? threads * d.batch * d.input : 0);
  return l;
}

template <class V, typename T = typename V::scalar>
struct Forward {
  static constexpr int NR = 2 * V::width;
  const LayerDims& d;
  const int64_t* off;
  const ForwardArgs<T>& a;
  int64_t N, B, I, H, P, G, chunks, pchunks, gchunks;
  bool pack_ih, pack_hh, gate, fuse_x, proj, save, by_rows;
  int64_t chunk;
  T *bias, *pih, *phh, *phr, *hpre, *apack, *ring, *hpack, *xpack;

  Forward(const LayerDims& d_, const int64_t* off_, const ForwardArgs<T>& a_, T* work,
          int threads)
      : d(d_), off(off_), a(a_) {
    N = d.rows, B = d.batch, I = d.input, H = d.hidden, P = d.proj, G = 4 * H;
    chunks = cdiv(H, NR);
    pchunks = cdiv(P, NR);
    proj = a.w_hr != nullptr;
    save = a.cells != nullptr;
    const ForwardLayout l = forward_layout<V>(d, proj, save, threads);
    pack_ih = l.pack_ih;
    pack_hh = l.pack_hh;
    gate = l.gate;
    fuse_x = l.fuse_x;
    // Small weights (in every core's L2) and a dense batch: each thread can
    // run its own rows through all the steps (rows do not interact), reading
    // all the weights, with no barrier per step and packing only its rows.
    // (batch_sizes does not increase: dense when its last is B)
    const bool dense = d.steps == 0 || d.batch_sizes[d.steps - 1] == B;
    by_rows = fuse_x && !proj && dense && (I + P) * G * int64_t(sizeof(T)) <= kByRowsBytes;
    gchunks = cdiv(H, V::width);
    chunk = l.chunk;
    bias = work;
    pih = work + l.pih;
    phh = work + l.phh;
    phr = work + l.phr;
    hpre = work + l.hpre;
    apack = work + l.apack;
    ring = work + l.ring;
    hpack = work + l.hpack;
    xpack = work + l.xpack;
  }

  int64_t step_at(int64_t k) const { return d.reverse ? d.steps - 1 - k : k; }

  void pack(int nt, int tid) {
    constexpr int W = V::width;
    if (fuse_x)  // gate panels of W units (gate_tile's B1)
      for (int64_t c = tid; c < gchunks; c += nt)
        pack_gate_panel<T, W>(a.w_ih, H, I, c, pih + c * 4 * W * I);
    else if (pack_ih)
      for (int64_t p = tid; p < chunks * 4; p += nt)
        pack_rows_panel<T, NR>(a.w_ih + (p % 4) * H * I, H, I, p / 4, pih + p * I * NR);
    if (gate)
      for (int64_t c = tid; c < gchunks; c += nt)
        pack_gate_panel<T, W>(a.w_hh, H, P, c, phh + c * 4 * W * P);
    else if (pack_hh)
      for (int64_t p = tid; p < chunks * 4; p += nt)
        pack_rows_panel<T, NR>(a.w_hh + (p % 4) * H * P, H, P, p / 4, phh + p * P * NR);
    if (proj)
      for (int64_t c = tid; c < pchunks; c += nt)
        pack_rows_panel<T, NR>(a.w_hr, P, H, c, phr + c * H * NR);
    if (tid == 0)
      for (int64_t j = 0; j < G; ++j)
        bias[j] = (a.b_ih ? a.b_ih[j] : T(0)) + (a.b_hh ? a.b_hh[j] : T(0));
  }

  // gates = x W_ih^T + bias for the rows [r0, r1), into gx (row r0 first).
  void input_projection(int nt, int tid, int64_t r0, int64_t r1, T* gx) {
    const T* x = a.x + r0 * I;
    if (!pack_ih) {
      for (int64_t r = tid; r < r1 - r0; r += nt) {
        T* g = gx + r * G;
        std::memcpy(g, bias, sizeof(T) * G);
        for (int64_t j = 0; j < G; j += V::width)
          dot_rows<V>(I, x + r * I, a.w_ih + j * I, imin(V::width, G - j), g + j);
      }
      return;
    }
    const auto pack = [&](int64_t m0, int64_t m1, int64_t k0, int64_t kc, T* buf) {
      pack_a(m0, m1, x, I, 1, k0, kc, buf);
    };
    const auto panel = [&](int64_t p) {
      const int64_t c = p / 4, q = p % 4, col = q * H + c * NR;
      return Panel<T>{pih + p * I * NR, NR, gx + col, G, imin(NR, H - c * NR), bias + col};
    };
    gemm_blocks<V>(nt, tid, r1 - r0, I, pack, chunks * 4, panel, apack + tid * kMC * kKC);
  }

  // gates rows [b0, b1) of this step += h_prev W_hh^T for chunk c, then the
  // cell on them. h_prev row b is at hp + b*P (batch 1), or packed for the
  // tiles of [b0, b1) at hpk.
  void step_rows(int64_t b0, int64_t b1, int64_t c, const T* hp, const T* hpk, T* g, T* cells,
                 T* h_out, int64_t ldh) {
    const int64_t u0 = c * NR, nc = imin(NR, H - u0);
    if (!pack_hh) {  // batch 1: W_hh in place
      for (int64_t b = b0; b < b1; ++b)
        for (int q = 0; q < 4; ++q)
          for (int64_t j = 0; j < nc; j += V::width)
            dot_rows<V>(P, hp + b * P, a.w_hh + (q * H + u0 + j) * P, imin(V::width, nc - j),
                        g + b * G + q * H + u0 + j);
      cell_forward_rows<V>(b0, b1, u0, nc, H, g, a.c_n, cells, h_out, ldh);
      return;
    }
    const T* panels = phh + c * 4 * P * NR;
    for (int64_t b = b0; b < b1;) {
      const int mr = tile_rows(b1 - b);
      for (int q = 0; q < 4; ++q)
        tile_mr<V>(mr, P, hpk + (b - b0) * P, 0, panels + q * P * NR, NR, g + b * G + q * H + u0,
                   G, nc, kAdd);
      cell_forward_rows<V>(b, b + mr, u0, nc, H, g, a.c_n, cells, h_out, ldh);
      b += mr;
    }
  }

  // The step's rows [b0, b1) for gate chunk c (units [c*W, +W)) by gate
  // tiles: x_t (fuse_x; packed for the rows' tiles at xpk) and h_{t-1}
  // (packed at hpk) times the gate panels, plus the bias (fuse_x) or the
  // gates the input projection left in g, then the cell.
  void gate_rows(int64_t b0, int64_t b1, int64_t c, const T* xpk, const T* hpk, T* g, T* cells,
                 T* h_out, int64_t ldh) {
    constexpr int W = V::width;
    const int64_t u0 = c * W;
    const T* bx = fuse_x ? pih + c * 4 * W * I : nullptr;
    const T* bh = phh + c * 4 * W * P;
    for (int64_t b = b0; b < b1;) {
      const int mr = tile_rows(b1 - b);
      const GateOut<T> out{fuse_x ? bias + u0 : g + b * G + u0,
                           fuse_x ? 0 : G,
                           H,
                           imin(W, H - u0),
                           a.c_n + b * H + u0,
                           cells ? cells + b * H + u0 : nullptr,
                           cells ? g + b * G + u0 : nullptr,
                           G,
                           h_out + b * ldh + u0,
                           ldh};
      gate_tile_mr<V>(mr, fuse_x ? I : 0, xpk + (b - b0) * I, bx, P, hpk + (b - b0) * P, bh, out);
      b += mr;
    }
  }

  // by_rows: this thread's batch rows through every step, all the units.
  void run_rows(int nt, int tid) {
    const Range mine = split(B, nt, tid);
    T* hpk = hpack + tid * B * P;
    T* xpk = xpack + tid * B * I;
    for (int64_t k = 0; k < d.steps; ++k) {
      const int64_t r0 = off[step_at(k)];
      const T* h_prev = k > 0 ? a.y + off[step_at(k - 1)] * P : a.h0;
      pack_a(mine.begin, mine.end, h_prev, P, 1, 0, P, hpk);
      pack_a(mine.begin, mine.end, a.x + r0 * I, I, 1, 0, I, xpk);
      T* g = save ? a.gates + r0 * G : nullptr;
      T* cells = save ? a.cells + r0 * H : nullptr;
      for (int64_t c = 0; c < gchunks; ++c)
        gate_rows(mine.begin, mine.end, c, xpk, hpk, g, cells, a.y + r0 * P, P);
    }
  }

  void run(int nt, int tid) {
    pack(nt, tid);
#pragma omp barrier
    if (by_rows && nt > 1 && B >= 12 * nt) return run_rows(nt, tid);
    const Range mine = split(gate ? gchunks : chunks, nt, tid);
    const Range pmine = split(pchunks, nt, tid);
    for (int64_t k0 = 0; k0 < d.steps; k0 += chunk) {
      // The chunk's steps are contiguous rows [r_lo, r_hi) in either direction.
      const int64_t k1 = imin(d.steps, k0 + chunk);
      const int64_t t_lo = imin(step_at(k0), step_at(k1 - 1)),
                    t_hi = imax(step_at(k0), step_at(k1 - 1));
      const int64_t r_lo = off[t_lo], r_hi = off[t_hi] + d.batch_sizes[t_hi];
      T* gx = save ? a.gates + r_lo * G : fuse_x ? nullptr : ring;
      if (!fuse_x) {
        input_projection(nt, tid, r_lo, r_hi, gx);
#pragma omp barrier
      }
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = step_at(k), n = d.batch_sizes[t], r0 = off[t];
        // h_{t-1}: the previous step's rows of y, h0 for rows that start here.
        const int64_t tp = k > 0 ? step_at(k - 1) : -1;
        const int64_t n_prev = tp >= 0 ? imin(n, d.batch_sizes[tp]) : 0;
        const T* y_prev = tp >= 0 ? a.y + off[tp] * P : nullptr;
        // The step's gate rows (none with fuse_x and no save: the gates stay
        // in registers).
        T* g = fuse_x && !save ? nullptr : gx + (r0 - r_lo) * G;
        T* cells = save ? a.cells + r0 * H : nullptr;
        T* h_out = proj ? hpre : a.y + r0 * P;
        const int64_t ldh = proj ? H : P;
        // Each thread packs h_{t-1} (and x_t) for its tiles (the step's A
        // operands, read once per gate and chunk).
        T* hpk = hpack + tid * B * P;
        T* xpk = xpack + tid * B * I;
        if (pack_hh) {
          if (n_prev > 0) pack_a(0, n_prev, y_prev, P, 1, 0, P, hpk);
          if (n_prev < n) pack_a(n_prev, n, a.h0, P, 1, 0, P, hpk + n_prev * P);
        }
        if (fuse_x) {
          if (n_prev > 0) pack_a(0, n_prev, a.x + r0 * I, I, 1, 0, I, xpk);
          if (n_prev < n) pack_a(n_prev, n, a.x + r0 * I, I, 1, 0, I, xpk + n_prev * I);
        }
        for (int64_t c = mine.begin; c < mine.end; ++c) {
          if (gate) {
            if (n_prev > 0) gate_rows(0, n_prev, c, xpk, hpk, g, cells, h_out, ldh);
            if (n_prev < n)
              gate_rows(n_prev, n, c, xpk + n_prev * I, hpk + n_prev * P, g, cells, h_out, ldh);
            continue;
          }
          if (n_prev > 0) step_rows(0, n_prev, c, y_prev, hpk, g, cells, h_out, ldh);
          if (n_prev < n) step_rows(n_prev, n, c, a.h0, hpk + n_prev * P, g, cells, h_out, ldh);
        }
        if (proj) {
#pragma omp barrier
          for (int64_t c = pmine.begin; c < pmine.end; ++c)
            gemm_rows<V>(0, n, H, hpre, H, phr + c * H * NR, NR, a.y + r0 * P + c * NR, P,
                         imin(NR, P - c * NR), kStore);
        }
#pragma omp barrier
      }
    }
  }
};

// ------------------------------------------------------------- one step
//
// A call of one step (T = 1, batch > 1: a decoder's step): packing W would
// cost more than the step, so the weights are read in place as the
// microkernel's A operand (its 4 rows: the four gates of one unit, lda = H*K)
// and x and h0 go transposed into batch panels [K, NR] as its B operand. Each
// weight is read once for the whole batch, x W_ih^T and h0 W_hh^T add up in
// the same registers, and the cell runs on the batch in vector lanes.
template <class V, typename T = typename V::scalar>
struct OneStep {
  static constexpr int NR = 2 * V::width;
  const LayerDims& d;
  const ForwardArgs<T>& a;
  int64_t B, I, H, P, G, nb;
  bool proj;
  T *xp, *hp, *hpre_t;  // panels of x^T, h0^T and (projection) h'^T

  static int64_t size(const LayerDims& d, bool proj) {
    const int64_t nb = cdiv(d.batch, NR);
    return nb * NR * (d.input + d.proj + (proj ? d.hidden : 0));
  }
  OneStep(const LayerDims& d_, const ForwardArgs<T>& a_, T* work) : d(d_), a(a_) {
    B = d.batch, I = d.input, H = d.hidden, P = d.proj, G = 4 * H;
    nb = cdiv(B, NR);
    proj = a.w_hr != nullptr;
    xp = work;
    hp = xp + nb * NR * I;
    hpre_t = hp + nb * NR * P;
  }

  // Panel j of m^T for m [B, K]: out[k*NR + l] = m[(j*NR + l)*K + k], 0 past B.
  void transpose_panel(const T* m, int64_t K, int64_t j, T* out) const {
    const int64_t b0 = j * NR, nv = imin(NR, B - b0);
    for (int64_t k = 0; k < K; ++k) {
      T* o = out + k * NR;
      for (int64_t l = 0; l < nv; ++l) o[l] = m[(b0 + l) * K + k];
      for (int64_t l = nv; l < NR; ++l) o[l] = T(0);
    }
  }

  void units(int64_t u0, int64_t u1) {
    constexpr int W = V::width;
    alignas(64) T acc[4 * NR];
    alignas(64) T lane[NR];
    for (int64_t u = u0; u < u1; ++u) {
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t b0 = j * NR, nv = imin(NR, B - b0);
        tile<V, 4, false, false, T>(I, a.w_ih + u * I, H * I, xp + j * NR * I, NR, acc, NR, NR,
                                 kStore, nullptr);
        tile<V, 4, false, false, T>(P, a.w_hh + u * P, H * P, hp + j * NR * P, NR, acc, NR, NR,
                                 kAdd, nullptr);
        for (int half = 0; half < 2; ++half) {
          const int64_t l0 = half * W, n = nv - l0;
          if (n <= 0) {  // no rows here: keep the panel's spare lanes zero
            if (proj) V::zero().store(hpre_t + j * NR * H + u * NR + l0);
            break;
          }
          V g[4];
          for (int q = 0; q < 4; ++q) {
            const T bias = (a.b_ih ? a.b_ih[q * H + u] : T(0)) + (a.b_hh ? a.b_hh[q * H + u] : T(0));
            g[q] = V::load(acc + q * NR + l0) + V(bias);
          }
          for (int64_t l = 0; l < imin(n, W); ++l) lane[l] = a.c0[(b0 + l0 + l) * H + u];
          V c, h;
          cell_forward(g[0], g[1], g[2], g[3], V::load(lane, n), c, h);
          const int64_t m = imin(n, W);
          c.store(lane);
          for (int64_t l = 0; l < m; ++l) a.c_n[(b0 + l0 + l) * H + u] = lane[l];
          if (a.cells != nullptr) {
            for (int64_t l = 0; l < m; ++l) a.cells[(b0 + l0 + l) * H + u] = lane[l];
            for (int q = 0; q < 4; ++q) {
              g[q].store(lane);
              for (int64_t l = 0; l < m; ++l) a.gates[(b0 + l0 + l) * G + q * H + u] = lane[l];
            }
          }
          if (proj) {
            h.store(hpre_t + j * NR * H + u * NR + l0);
          } else {
            h.store(lane);
            for (int64_t l = 0; l < m; ++l) a.y[(b0 + l0 + l) * P + u] = lane[l];
          }
        }
      }
    }
  }

  // y = h' W_hr^T for rows p0..p1 of W_hr: 6 rows of W_hr by a batch panel.
  void project(int64_t p0, int64_t p1) {
    alignas(64) T acc[6 * NR];
    for (int64_t p = p0; p < p1;) {
      const int mr = tile_rows(p1 - p);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t b0 = j * NR, nv = imin(NR, B - b0);
        tile_mr<V>(mr, H, a.w_hr + p * H, H, hpre_t + j * NR * H, NR, acc, NR, NR, kStore);
        for (int r = 0; r < mr; ++r)
          for (int64_t l = 0; l < nv; ++l) a.y[(b0 + l) * P + p + r] = acc[r * NR + l];
      }
      p += mr;
    }
  }

  void run(int nt, int tid) {
    for (int64_t j = tid; j < 2 * nb; j += nt) {
      if (j < nb) transpose_panel(a.x, I, j, xp + j * NR * I);
      else transpose_panel(a.h0, P, j - nb, hp + (j - nb) * NR * P);
    }
#pragma omp barrier
    const Range mine = split(H, nt, tid);
    units(mine.begin, mine.end);
    if (proj) {
#pragma omp barrier
      const Range pm = split(P, nt, tid);
      project(pm.begin, pm.end);
    }
  }
};

// -------------------------------------------------------------- backward

template <class V, typename T = typename V::scalar>
struct Backward {
  static constexpr int NR = 2 * V::width;
  const LayerDims& d;
  const int64_t* off;
  const BackwardArgs<T>& a;
  T *dh_all, *dhp, *phh, *pwih, *dgs, *pxh, *apack;
  // The next row block of the weight gradients and of dx (gemm_blocks).
  int64_t claim = 0, claim_dx = 0;
  int64_t N, B, I, H, P, G, chunks, pchunks, ichunks, span, rows;
  bool proj, packed;

  // Whether W_hh and W_ih are packed into panels: only when enough rows reuse
  // them (a short call reads them in place, once).
  static bool pack_w(const LayerDims& d) { return d.rows >= 2 * kMC; }
  // The steps run in spans of up to 8 MB of gate gradients (a bounded
  // workspace, in the last-level cache): after each, the span's
  // [dW_ih | dW_hh] += dgates^T [x | h_{t-1}]. Its steps and rows at most.
  static int64_t span_steps(const LayerDims& d) {
    const int64_t bytes = d.batch * 4 * d.hidden * int64_t(sizeof(T));
    return imax(1, imin(d.steps, (int64_t(8) << 20) / imax(1, bytes)));
  }
  static int64_t span_rows(const LayerDims& d) { return imin(d.rows, span_steps(d) * d.batch); }

  // Workspace: dh before the projection [B, H]; panels of W_hh's columns
  // (for dh) and of W_ih's (for dx), if packed; a span's gate gradients and
  // panels of its x and h_{t-1}; a block of A per thread.
  static int64_t size(const LayerDims& d, bool proj, int threads) {
    const int64_t G = 4 * d.hidden, pc = cdiv(d.proj, NR), ic = cdiv(d.input, NR);
    return (proj ? d.batch * d.hidden : 0) + (pack_w(d) ? (pc + ic) * G * NR : 0) +
           span_rows(d) * (G + (ic + pc) * NR) + threads * kMC * kKC;
  }
  Backward(const LayerDims& d_, const int64_t* off_, const BackwardArgs<T>& a_, T* dha,
           T* work)
      : d(d_), off(off_), a(a_), dh_all(dha) {
    N = d.rows, B = d.batch, I = d.input, H = d.hidden, P = d.proj, G = 4 * H;
    chunks = cdiv(H, NR);
    pchunks = cdiv(P, NR);
    ichunks = cdiv(I, NR);
    span = span_steps(d);
    rows = span_rows(d);
    proj = a.w_hr != nullptr;
    packed = pack_w(d);
    dhp = work;
    phh = dhp + (proj ? B * H : 0);
    pwih = phh + (packed ? pchunks * G * NR : 0);
    dgs = pwih + (packed ? ichunks * G * NR : 0);
    pxh = dgs + rows * G;
    apack = pxh + (ichunks + pchunks) * rows * NR;
  }

  // Panel c of W_hh's columns (K = 4H rows), packed or in place.
  const T* w_hh_panel(int64_t c, int64_t* ldb) const {
    *ldb = packed ? NR : P;
    return packed ? phh + c * G * NR : a.w_hh + c * NR;
  }

  // Columns [c*NR, +NR) of h_{t-1} for the rows of steps k0..k1 (in
  // processing order; y of the step before, or h0 where a row starts) as a
  // panel, the span's first row r_lo at out.
  void pack_h_prev_panel(int64_t k0, int64_t k1, int64_t r_lo, int64_t c, T* out) const {
    const int64_t j0 = c * NR, count = imin(NR, P - j0);
    for (int64_t k = k0; k <= k1; ++k) {
      const int64_t t = step_at(k), n = d.batch_sizes[t], r0 = off[t] - r_lo;
      const int64_t tp = k > 0 ? step_at(k - 1) : -1;
      const int64_t n_prev = tp >= 0 ? imin(n, d.batch_sizes[tp]) : 0;
      for (int64_t b = 0; b < n; ++b) {
        const T* src = (b < n_prev ? a.y + (off[tp] + b) * P : a.h0 + b * P) + j0;
        T* o = out + (r0 + b) * NR;
        for (int64_t j = 0; j < count; ++j) o[j] = src[j];
        for (int64_t j = count; j < NR; ++j) o[j] = T(0);
      }
    }
  }

  // The span's rows [r_lo, r_lo + n) of x and h_{t-1} as panels of NR columns
  // (this thread's share).
  void pack_span(int nt, int tid, int64_t k0, int64_t k1, int64_t r_lo, int64_t n) {
    const int64_t ic = ichunks;
    for (int64_t p = tid; p < ic + pchunks; p += nt) {
      if (p < ic) pack_cols_panel<T, NR>(a.x + r_lo * I, n, I, p, pxh + p * rows * NR);
      else pack_h_prev_panel(k0, k1, r_lo, p - ic, pxh + p * rows * NR);
    }
  }

  // [dW_ih | dW_hh] (+)= dgates^T [x | h_{t-1}] over the span's n rows.
  void weight_gradients(int nt, int tid, int64_t n, bool add) {
    const int64_t ic = ichunks;
    T* ablk = apack + tid * kMC * kKC;
    const auto cols = [&](int64_t m0, int64_t m1, int64_t k0, int64_t kc, T* buf) {
      pack_at<V>(m0, m1, dgs, G, k0, kc, buf);
    };
    const auto dw = [&](int64_t p) {
      const T* b = pxh + p * rows * NR;
      if (p < ic) return Panel<T>{b, NR, a.dw_ih + p * NR, I, imin(NR, I - p * NR), nullptr};
      const int64_t c = p - ic;
      return Panel<T>{b, NR, a.dw_hh + c * NR, P, imin(NR, P - c * NR), nullptr};
    };
    gemm_blocks<V>(nt, tid, G, n, cols, ic + pchunks, dw, ablk, add, &claim);
  }

  // dx = dgates W_ih for the span's n rows from r_lo, as one GEMM: W_ih's
  // panels are read once per row block of the span instead of once per step
  // (than with dx in each step's GEMM, training 2-4% faster with AVX2 at H =
  // 256-1024 and at batch 8, 0-2% with AVX-512 at H >= 512). With at most
  // four panels (I <= 4 NR) the gate gradients are read in place: packing
  // them cost a quarter of this GEMM at I = H = 64; with more panels to
  // share it, the packing is as fast or faster.
  void input_gradients(int nt, int tid, int64_t r_lo, int64_t n) {
    const auto pack = [&](int64_t m0, int64_t m1, int64_t k0, int64_t kc, T* buf) {
      pack_a(m0, m1, dgs, G, 1, k0, kc, buf);
    };
    const auto panel = [&](int64_t p) {
      return Panel<T>{packed ? pwih + p * G * NR : a.w_ih + p * NR, packed ? NR : I,
                      a.dx + r_lo * I + p * NR, I, imin(NR, I - p * NR), nullptr};
    };
    gemm_blocks<V>(nt, tid, n, G, pack, ichunks, panel, apack + tid * kMC * kKC, false,
                   &claim_dx, NoHook(), ichunks <= 4 ? dgs : nullptr, G);
  }

  int64_t step_at(int64_t k) const { return d.reverse ? d.steps - 1 - k : k; }

  // What the cell of step k reads of the saved forward for chunks [c0, c1)
  // (its gates, c and c_prev: rows G or H apart, short runs the prefetchers
  // would not follow, from DRAM) into L2, while the step before's GEMM runs:
  // part `part` of `parts`, each a share of the runs.
  void prefetch_cell(int64_t k, int64_t c0, int64_t c1, int64_t part, int64_t parts) const {
    if (k < 0 || c0 >= c1) return;
    const int64_t t = step_at(k), n = d.batch_sizes[t], r0 = off[t];
    const int64_t tp = k > 0 ? step_at(k - 1) : -1;
    const int64_t n_prev = tp >= 0 ? imin(n, d.batch_sizes[tp]) : 0;
    const int64_t u0 = c0 * NR, bytes = (imin(H, c1 * NR) - u0) * int64_t(sizeof(T));
    const int64_t runs = n * 6;
    for (int64_t j = runs * part / parts, j1 = runs * (part + 1) / parts; j < j1; ++j) {
      const int64_t b = j / 6, kind = j % 6;
      const T* p = kind < 4   ? a.gates + (r0 + b) * G + kind * H + u0
                   : kind == 4 ? a.cells + (r0 + b) * H + u0
                   : b < n_prev ? a.cells + (off[tp] + b) * H + u0
                                : a.c0 + b * H + u0;
      const char* q = reinterpret_cast<const char*>(p);
      for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(q + i, 0, 2);
      __builtin_prefetch(q + bytes - 1, 0, 2);
    }
  }

  // Cell backward on rows [b0, b1) (of the step at row r0) for chunks [c0,
  // c1), row by row (each row's units are contiguous: the hardware
  // prefetchers follow); c_prev row b at cp + b*H, the gate gradients of row
  // b to dgates + b*G.
  void cell_rows(int64_t b0, int64_t b1, int64_t c0, int64_t c1, int64_t r0, const T* cp,
                 const T* dhv, int64_t lddh, T* dgates) {
    using C = X2<V>;  // a chunk's units
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t u = c * NR, n = imin(NR, H - u);
        const T* g = a.gates + (r0 + b) * G + u;
        T* dg = dgates + b * G + u;
        T* dc = a.dc0 + b * H + u;
        C di, df, dgg, dout, dcp;
        cell_backward(C::load(g, n), C::load(g + H, n), C::load(g + 2 * H, n),
                      C::load(g + 3 * H, n), C::load(a.cells + (r0 + b) * H + u, n),
                      C::load(cp + b * H + u, n), C::load(dhv + b * lddh + u, n), C::load(dc, n),
                      di, df, dgg, dout, dcp);
        di.store(dg, n);
        df.store(dg + H, n);
        dgg.store(dg + 2 * H, n);
        dout.store(dg + 3 * H, n);
        dcp.store(dc, n);
        if (a.db != nullptr) {
          T* db = a.db + u;
          (C::load(db, n) + di).store(db, n);
          (C::load(db + H, n) + df).store(db + H, n);
          (C::load(db + 2 * H, n) + dgg).store(db + 2 * H, n);
          (C::load(db + 3 * H, n) + dout).store(db + 3 * H, n);
        }
      }
  }

  void run(int nt, int tid) {
    const Range mine = split(chunks, nt, tid), pmine = split(pchunks, nt, tid);
    const Range imine = split(ichunks, nt, tid);
    // Each thread packs the panels of the dh columns it computes and a share
    // of W_ih's (read by all after the span's steps, whose barriers order
    // them).
    if (packed) {
      for (int64_t c = pmine.begin; c < pmine.end; ++c)
        pack_cols_panel<T, NR>(a.w_hh, G, P, c, phh + c * G * NR);
      for (int64_t c = imine.begin; c < imine.end && a.dx != nullptr; ++c)
        pack_cols_panel<T, NR>(a.w_ih, G, I, c, pwih + c * G * NR);
    }
    // Running gradients: dh0 holds dh, dc0 holds dc; each thread its columns.
    T* dh = a.dh0;
    for (int64_t c = pmine.begin; c < pmine.end; ++c) {
      const int64_t p0 = c * NR, np = imin(NR, P - p0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < np; ++j) dh[b * P + p0 + j] = a.dh_n ? a.dh_n[b * P + p0 + j] : T(0);
    }
    for (int64_t c = mine.begin; c < mine.end; ++c) {
      const int64_t u0 = c * NR, nu = imin(NR, H - u0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < nu; ++j) a.dc0[b * H + u0 + j] = a.dc_n ? a.dc_n[b * H + u0 + j] : T(0);
      if (a.db != nullptr)
        for (int q = 0; q < 4; ++q)
          for (int64_t j = 0; j < nu; ++j) a.db[q * H + u0 + j] = T(0);
    }
    for (int64_t s0 = d.steps - 1, si = 0; s0 >= 0; s0 -= span, ++si) {
      // The span's steps s0 down to s1, rows [r_lo, r_hi) in either direction.
      const int64_t s1 = imax(0, s0 - span + 1);
      const int64_t t_lo = imin(step_at(s0), step_at(s1)), t_hi = imax(step_at(s0), step_at(s1));
      const int64_t r_lo = off[t_lo], r_hi = off[t_hi] + d.batch_sizes[t_hi];
      // The previous span's claims are over (the barrier after them), the
      // next start after the barrier of this span's first step.
      if (tid == 0) {
        __atomic_store_n(&claim, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&claim_dx, 0, __ATOMIC_RELAXED);
      }
      pack_span(nt, tid, s1, s0, r_lo, r_hi - r_lo);
      for (int64_t k = s0; k >= s1; --k) {
        const int64_t t = step_at(k), n = d.batch_sizes[t], r0 = off[t];
        const int64_t tp = k > 0 ? step_at(k - 1) : -1;
        const int64_t n_prev = tp >= 0 ? imin(n, d.batch_sizes[tp]) : 0;
        // dh of this step = the running dh + dy, for the columns this thread owns.
        for (int64_t c = pmine.begin; c < pmine.end; ++c) {
          const int64_t p0 = c * NR, np = imin(NR, P - p0);
          for (int64_t b = 0; b < n; ++b) {
            T* row = dh + b * P + p0;
            if (a.dy != nullptr) {
              const T* dy = a.dy + (r0 + b) * P + p0;
              for (int64_t j = 0; j < np; ++j) row[j] += dy[j];
            }
            if (proj) std::memcpy(dh_all + (r0 + b) * P + p0, row, sizeof(T) * np);
          }
        }
        const T* dhv = dh;
        int64_t lddh = P;
        if (proj) {
#pragma omp barrier
          // dh before the projection: dh W_hr, for this thread's units.
          for (int64_t c = mine.begin; c < mine.end; ++c)
            gemm_rows<V>(0, n, P, dh, P, a.w_hr + c * NR, H, dhp + c * NR, H,
                         imin(NR, H - c * NR), kStore);
          dhv = dhp;
          lddh = H;
        }
        T* dg = dgs + (r0 - r_lo) * G;
        if (n_prev > 0)
          cell_rows(0, n_prev, mine.begin, mine.end, r0, a.cells + off[tp] * H, dhv, lddh, dg);
        if (n_prev < n) cell_rows(n_prev, n, mine.begin, mine.end, r0, a.c0, dhv, lddh, dg);
#pragma omp barrier
        // dh_{t-1} = dgates_t W_hh for the active rows, on this thread's
        // column panels, while the step's gate gradients are in cache. With
        // AVX2 and K = 4H > 1024, in K blocks of the gate gradients, packed:
        // each panel's block (16 KB) is read by all the tiles from L1 (7%
        // faster at H = 1024, 2% slower at 256; with AVX-512 slower: its
        // blocks are 32 KB, L1's size).
        const int64_t np = pmine.end - pmine.begin;
        const auto panel = [&](int64_t p) {
          const int64_t c = pmine.begin + p;
          int64_t ldb;
          const T* w = w_hh_panel(c, &ldb);
          return Panel<T>{w, ldb, dh + c * NR, P, imin(NR, P - c * NR), nullptr};
        };
        // Meanwhile the next step's cell inputs are fetched, a share after
        // each panel.
        if (simd::kRegisters < 32 && G > 4 * kKC) {
          const auto pack = [&](int64_t m0, int64_t m1, int64_t k0, int64_t kc, T* buf) {
            pack_a(m0, m1, dg, G, 1, k0, kc, buf);
          };
          const int64_t parts = cdiv(n, kMC) * cdiv(G, kKC) * np;
          int64_t part = 0;
          const auto fetch = [&] { prefetch_cell(k - 1, mine.begin, mine.end, part++, parts); };
          gemm_blocks<V>(1, 0, n, G, pack, np, panel, apack + tid * kMC * kKC, false, nullptr,
                         fetch);
        } else {
          for (int64_t p = 0; p < np; ++p) {
            const Panel<T> o = panel(p);
            gemm_rows<V>(0, n, G, dg, G, o.b, o.ldb, o.c, o.ldc, o.ncols, kStore);
            prefetch_cell(k - 1, mine.begin, mine.end, p, np);
          }
        }
      }
      // The span's gate gradients are complete (every thread has passed the
      // barrier of its last step); the next span overwrites them.
      if (a.dx != nullptr) input_gradients(nt, tid, r_lo, r_hi - r_lo);
      weight_gradients(nt, tid, r_hi - r_lo, si > 0);
#pragma omp barrier
    }
  }
};

}  // namespace

namespace {

// work.run(nt, tid) on a team of `threads` (one thread: no parallel region,
// whose start costs about a microsecond).
template <class Work>
void in_team(int threads, Work& work) {
  if (threads <= 1) {
    work.run(1, 0);
    return;
  }
#pragma omp parallel num_threads(threads)
  work.run(omp_get_num_threads(), omp_get_thread_num());
}

// A call of one step with a batch: OneStep.
bool one_step(const LayerDims& d) { return d.steps == 1 && d.batch > 1; }

}  // namespace

template <typename T>
FusedSizes sizes(const LayerDims& d, bool proj, bool save, int threads) {
  using V = typename Vec<T>::type;
  const int64_t fwd = one_step(d) ? OneStep<V>::size(d, proj)
                                  : forward_layout<V>(d, proj, save, threads).size;
  return {fwd, Backward<V>::size(d, proj, threads)};
}

template <typename T>
void forward(const LayerDims& d, const int64_t* off, const ForwardArgs<T>& a, T* work,
             int threads) {
  using V = typename Vec<T>::type;
  if (one_step(d)) {
    OneStep<V> f(d, a, work);
    in_team(threads, f);
    return;
  }
  Forward<V> f(d, off, a, work, threads);
  in_team(threads, f);
}

template <typename T>
void backward(const LayerDims& d, const int64_t* off, const BackwardArgs<T>& a, T* dh_all,
              T* work, int threads) {
  using V = typename Vec<T>::type;
  Backward<V> b(d, off, a, dh_all, work);
  in_team(threads, b);
}

template <typename T>
void hidden(const T* gates, const T* cells, int64_t N, int64_t H, T* out) {
  using V = typename Vec<T>::type;
  for (int64_t r = 0; r < N; ++r)
    for (int64_t j = 0; j < H; j += V::width) {
      const int64_t n = H - j;
      cell_hidden(V::load(gates + r * 4 * H + 3 * H + j, n), V::load(cells + r * H + j, n))
          .store(out + r * H + j, n);
    }
}

bool double_math() { return simd::have_double_math(); }

template <typename T>
FusedKernels<T> kernels() {
  return {&sizes<T>, &forward<T>, &backward<T>, &hidden<T>};
}
template FusedKernels<float> kernels<float>();
template FusedKernels<double> kernels<double>();
