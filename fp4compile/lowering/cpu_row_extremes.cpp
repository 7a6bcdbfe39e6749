// The order statistics behind the OCC row thresholds, for the CPU lowering.
//
// For each row of n values: the (k-1)-th and k-th largest and smallest (k = c + 1),
// counted with multiplicity, NaN ordered as torch.topk orders it (above every number
// at the top, below every number at the bottom). fp4compile/lowering/cpu_row_extremes.py
// builds this file and registers it as the op `fp4compile::row_extremes`.
//
// One vectorized pass keeps, for each of L interleaved lanes (L = 16 or 64 for float,
// 8 or 32 for double; lane j: the values at positions j, j + L, ...), that lane's M largest and M smallest numbers (a branch-free
// insertion per lane, GCC vector extensions) and its count of numbers. The union of the
// lanes' lists holds the row's top k unless a lane dropped one of them: a lane drops
// only values <= its M-th kept value, and the union's k-th largest t bounds the row's
// k-th largest from below, so a lane that dropped nothing, or whose M-th kept value is
// < t, dropped nothing of the top k. Any other lane is rescanned in full (n / L values),
// so the result is exact; rows without structure rescan rarely (L is chosen so that a
// lane holds about k / L <= 3/4 of the top k; with M = 4, about 4% of the rows of 704
// normal values at k = 9). Likewise for the bottom.
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Kept per lane and side. Timed on 1024 rows of 704 normal values, k = 9 (AVX-512):
// M = 3 rescans about a third of the rows and ran 1.4x as long, M = 5 ran 1.15x as long.
constexpr int M = 4;

// Insert the number v into buf[0..filled) (sorted so that first(a, b) puts a before b),
// keeping k entries. NaN is never inserted.
template <typename T, typename First>
inline void insert_sorted(T* buf, int64_t& filled, int64_t k, T v, First first) {
  if (v != v || (filled == k && !first(v, buf[k - 1]))) return;
  int64_t i = filled < k ? filled++ : k - 1;
  while (i > 0 && first(v, buf[i - 1])) { buf[i] = buf[i - 1]; --i; }
  buf[i] = v;
}

// One 64-byte vector: 16 floats or 8 doubles (one AVX-512 register, two AVX2 ones).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int width = 64 / sizeof(T);
};

// C vectors of lanes per row step: L = C * width lanes.
template <typename T, int C>
void one_row(const T* row, int64_t n, int64_t k, T* hi, T* lo, T* top, T* bottom) {
  typedef typename Vec<T>::type V;
  typedef decltype(V{} < V{}) Mask;  // integer lanes, -1 where true
  constexpr int W = Vec<T>::width, L = C * W;
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  auto greater = [](T a, T b) { return a > b; };
  auto less = [](T a, T b) { return a < b; };
  // Per lane: the M largest (vhi[0] >= vhi[1] ...) and M smallest numbers, by a
  // branch-free insertion; NaN fails every comparison, so it is never kept, and
  // each lane counts its numbers (a mask is -1 where true).
  V vhi[M][C], vlo[M][C];
  Mask vnumbers[C];
  for (int c = 0; c < C; ++c) {
    vnumbers[c] = Mask{};
    for (int s = 0; s < M; ++s) { vhi[s][c] = V{} - inf; vlo[s][c] = V{} + inf; }
  }
  const int64_t full = n - n % L;
  for (int64_t i = 0; i < full; i += L) {
    for (int c = 0; c < C; ++c) {
      V up;
      std::memcpy(&up, row + i + c * W, sizeof(V));
      V down = up;
      vnumbers[c] -= up == up;
      for (int s = 0; s < M; ++s) {
        const V h = vhi[s][c], l = vlo[s][c];
        const Mask into_hi = up > h, into_lo = down < l;
        vhi[s][c] = into_hi ? up : h;
        up = into_hi ? h : up;
        vlo[s][c] = into_lo ? down : l;
        down = into_lo ? l : down;
      }
    }
  }
  T lane_hi[M][L], lane_lo[M][L];
  int64_t lane_numbers[L];
  for (int c = 0; c < C; ++c) {
    for (int w = 0; w < W; ++w) {
      for (int s = 0; s < M; ++s) { lane_hi[s][c * W + w] = vhi[s][c][w]; lane_lo[s][c * W + w] = vlo[s][c][w]; }
      lane_numbers[c * W + w] = vnumbers[c][w];
    }
  }
  // The union of the lanes' lists, plus the tail that fills no lane's whole stride.
  // Each lane's largest first: once k of them are in, the k-th, t, bounds the union's
  // k-th largest from below (k kept values are >= t), so of the lanes' other values
  // only those >= t can enter; on rows without structure that is a few of the
  // (M - 1) * L. (1024 rows, 2 threads: the whole call 18% faster at width 256, k 4;
  // 34% at 1536, k 17; BENCHMARKS.md.) Same multiset as inserting every value; where
  // fewer than k lanes hold a number, t is the -inf placeholder and every value is
  // inserted as before.
  int64_t filled_hi = 0, filled_lo = 0, nans = 0;
  for (int j = 0; j < L; ++j) {
    nans += full / L - lane_numbers[j];
    insert_sorted(hi, filled_hi, k, lane_hi[0][j], greater);
    insert_sorted(lo, filled_lo, k, lane_lo[0][j], less);
  }
  const T first_hi = filled_hi == k ? hi[k - 1] : -inf;
  const T first_lo = filled_lo == k ? lo[k - 1] : inf;
  for (int s = 1; s < M; ++s) {
    for (int j = 0; j < L; ++j) {
      if (lane_hi[s][j] >= first_hi) insert_sorted(hi, filled_hi, k, lane_hi[s][j], greater);
      if (lane_lo[s][j] <= first_lo) insert_sorted(lo, filled_lo, k, lane_lo[s][j], less);
    }
  }
  for (int64_t i = full; i < n; ++i) {
    const T v = row[i];
    if (v != v) { ++nans; continue; }
    insert_sorted(hi, filled_hi, k, v, greater);
    insert_sorted(lo, filled_lo, k, v, less);
  }
  // Lanes that may have dropped one of the row's k extremes: rescan them in full.
  // A lane kept -inf/+inf placeholders only when it holds fewer than M + 1 numbers,
  // and then dropped nothing. The bounds are -inf/+inf until k values are in.
  const T hi_bound = filled_hi == k ? hi[k - 1] : -inf;
  const T lo_bound = filled_lo == k ? lo[k - 1] : inf;
  bool scan_hi[L], scan_lo[L], redo_hi = false, redo_lo = false;
  for (int j = 0; j < L; ++j) {
    const bool dropped = lane_numbers[j] > M;
    scan_hi[j] = dropped && lane_hi[M - 1][j] >= hi_bound;
    scan_lo[j] = dropped && lane_lo[M - 1][j] <= lo_bound;
    redo_hi |= scan_hi[j];
    redo_lo |= scan_lo[j];
  }
  if (redo_hi || redo_lo) {
    // Rebuild a side that needs it: the other lanes' lists, then every value of the scanned lanes.
    if (redo_hi) filled_hi = 0;
    if (redo_lo) filled_lo = 0;
    for (int j = 0; j < L; ++j) {
      if (redo_hi && !scan_hi[j]) for (int s = 0; s < M; ++s) insert_sorted(hi, filled_hi, k, lane_hi[s][j], greater);
      if (redo_lo && !scan_lo[j]) for (int s = 0; s < M; ++s) insert_sorted(lo, filled_lo, k, lane_lo[s][j], less);
      if (scan_hi[j] || scan_lo[j]) {
        for (int64_t i = j; i < full; i += L) {
          const T v = row[i];
          if (scan_hi[j]) insert_sorted(hi, filled_hi, k, v, greater);  // NaN: never inserted
          if (scan_lo[j]) insert_sorted(lo, filled_lo, k, v, less);
        }
      }
    }
    for (int64_t i = full; i < n; ++i) {
      const T v = row[i];
      if (redo_hi) insert_sorted(hi, filled_hi, k, v, greater);
      if (redo_lo) insert_sorted(lo, filled_lo, k, v, less);
    }
  }
  // Positions k - 1 and k (k and k when k = 1).
  const int64_t numbers = n - nans;
  const int64_t pos[2] = {k > 1 ? k - 1 : k, k};
  for (int j = 0; j < 2; ++j) {
    const int64_t p = pos[j];
    top[j] = p <= nans ? nan : hi[p - nans - 1];
    bottom[j] = p <= numbers ? lo[p - 1] : nan;
  }
}

template <typename T, int C>
void all_rows(const T* x, int64_t rows, int64_t n, int64_t k, T* top, T* bottom, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> hi(k), lo(k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) one_row<T, C>(x + r * n, n, k, hi.data(), lo.data(), top + 2 * r, bottom + 2 * r);
  }
}

template <typename T>
int row_extremes(const T* x, int64_t rows, int64_t n, int64_t k, T* top, T* bottom, int threads) {
  if (k < 1 || k > n) return 1;
  // About k / L of the top k fall in each lane; at most 3/4 keeps rescans (a lane
  // holding more than M of them) rare on rows without structure. Two variants only
  // (each one costs build time): one vector of lanes, or four.
  if (4 * k <= 3 * Vec<T>::width) all_rows<T, 1>(x, rows, n, k, top, bottom, threads);
  else all_rows<T, 4>(x, rows, n, k, top, bottom, threads);
  return 0;
}

}  // namespace

extern "C" int fp4c_row_extremes_f32(const float* x, int64_t rows, int64_t n, int64_t k, float* top, float* bottom, int threads) {
  return row_extremes<float>(x, rows, n, k, top, bottom, threads);
}
extern "C" int fp4c_row_extremes_f64(const double* x, int64_t rows, int64_t n, int64_t k, double* top, double* bottom, int threads) {
  return row_extremes<double>(x, rows, n, k, top, bottom, threads);
}
