// The memory floor of a stream mix on this CPU: the bandwidth a loop with no
// arithmetic to speak of gets when it reads RO arrays and updates RW arrays in
// place, with the CPU backend's schedule (64K-element chunks split statically
// over the OpenMP threads, BLOCK elements of one stream at a time).
//
// Full MADA (6 learned, all state) updates 13 fp32 streams in place (param, m,
// v, n, g_prev, l, vb, 6 tangent rows) and reads 1 (grad): 108 bytes/element.
// Adam's corner: 3 in place (param, m, v) and 1 read: 28 bytes/element.
//
// `python -m bench` builds this file as a shared library (bench/floor.py) and
// times stream_floor_sweep on the mix of every row, in the same rounds as the
// optimizer steps: its "x floor" column. Standalone:
//
//   g++ -O3 -mavx2 -fopenmp bench/stream_floor.cpp -o /tmp/stream_floor
//   /tmp/stream_floor 16000000 13 1 64 10    # numel rw ro block reps
//   /tmp/stream_floor 16000000 3 1 64 10
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

// One pass: arrays[0, rw) are updated in place, arrays[rw, rw + ro) only read.
extern "C" void stream_floor_sweep(float* const* arrays, int rw, int ro, long n, int block,
                                   int threads) {
  const long chunk = 1 << 16, nchunks = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long c = 0; c < nchunks; ++c) {
    std::vector<float> acc(block);
    const long hi = std::min(n, (c + 1) * chunk);
    for (long b = c * chunk; b < hi; b += block) {
      const int m = int(std::min<long>(block, hi - b));
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int k = rw; k < rw + ro; ++k) {
        const float* __restrict__ src = arrays[k] + b;
        for (int i = 0; i < m; ++i) acc[i] += src[i];
      }
      for (int k = 0; k < rw; ++k) {
        float* __restrict__ dst = arrays[k] + b;
        for (int i = 0; i < m; ++i) dst[i] = dst[i] * 0.999f + acc[i] * 1e-3f;
      }
    }
  }
}

#ifndef STREAM_FLOOR_NO_MAIN
int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s numel rw ro block reps\n", argv[0]);
    return 2;
  }
  const long n = std::atol(argv[1]);
  const int rw = std::atoi(argv[2]), ro = std::atoi(argv[3]);
  const int block = std::atoi(argv[4]), reps = std::atoi(argv[5]);
  std::vector<float*> a(rw + ro);
  for (size_t k = 0; k < a.size(); ++k) {
    // Each array starts in its own 256-byte slot of a page, as the optimizer
    // places its state (mada_fused/flat_state.py): page-aligned arrays walked
    // in step would compete for the same L1 sets.
    char* raw = static_cast<char*>(std::aligned_alloc(4096, ((n * 4 + 4095) / 4096 + 1) * 4096));
    a[k] = reinterpret_cast<float*>(raw + (k % 16) * 256);
    for (long i = 0; i < n; ++i) a[k][i] = 1.0f + float(i & 7);
  }
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    stream_floor_sweep(a.data(), rw, ro, n, block, omp_get_max_threads());
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  const double t = times[times.size() / 2];
  const double bytes = double(n) * 4 * (2 * rw + ro);
  std::printf("numel %ld, %d in place + %d read, block %d, %d threads: median %.2f ms (min %.2f), %.1f GB/s\n",
              n, rw, ro, block, omp_get_max_threads(), t * 1e3, times[0] * 1e3, bytes / t / 1e9);
  return 0;
}
#endif
