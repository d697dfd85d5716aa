// Standalone micro-benchmark of the int8 panel micro-kernel in csrc/cpu/gemm_int8.cpp (4 weight
// rows x 16 tokens, u8 |w| x s8 sign(a, w) maddubs), single thread, thread CPU time, data in L1/L2;
// checks exactness against a scalar sum. The numbers quoted in gemm_int8.cpp come from:
//   g++ -O3 -o /tmp/pm bench/panel_micro.cpp && /tmp/pm 1024 64 2000               (exact kernel)
//   g++ -O3 -DQK_NO_ABS -o /tmp/pm1 bench/panel_micro.cpp && /tmp/pm1 1024 64 2000   (no abs: WRONG results, cost only)
//   g++ -O3 -DQK_NO_SIGN -o /tmp/pm2 bench/panel_micro.cpp && /tmp/pm2 1024 64 2000  (no sign/abs: fbgemm's op count, WRONG results)
// Arguments: K, weight rows, repetitions. Prints G multiply-adds per second.
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <ctime>
#if defined(QK_NO_SIGN)
#define QK_ABS(w) (w)
#define QK_SIGN(a, w) (a)
#elif defined(QK_NO_ABS)
#define QK_ABS(w) (w)
#define QK_SIGN(a, w) _mm256_sign_epi8(a, w)
#else
#define QK_ABS(w) _mm256_abs_epi8(w)
#define QK_SIGN(a, w) _mm256_sign_epi8(a, w)
#endif
#define ROW(r, acc0, acc1) { \
  const __m256i wb = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(W + r * ldw + q * 4)); \
  const __m256i wa = QK_ABS(wb); \
  __m256i s0 = QK_SIGN(a0, wb); __m256i s1 = QK_SIGN(a1, wb); \
  s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s0), ones); \
  s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s1), ones); \
  acc0 = _mm256_add_epi32(acc0, s0); acc1 = _mm256_add_epi32(acc1, s1); }
__attribute__((target("avx2,fma"))) void micro42(const int8_t* W, int64_t ldw, const int8_t* P, int64_t nq, int32_t* C, int64_t ldc) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < nq; ++q) {
    const __m256i a0 = _mm256_loadu_si256((const __m256i*)(P + q * 64));
    const __m256i a1 = _mm256_loadu_si256((const __m256i*)(P + q * 64 + 32));
    ROW(0, c00, c01) ROW(1, c10, c11) ROW(2, c20, c21) ROW(3, c30, c31)
  }
  __m256i acc[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
  for (int r = 0; r < 4; ++r) for (int v = 0; v < 2; ++v) {
    __m256i* c = (__m256i*)(C + r * ldc + v * 8);
    _mm256_storeu_si256(c, _mm256_add_epi32(_mm256_loadu_si256(c), acc[r*2+v]));
  }
}
int main(int argc, char** argv) {
  const int64_t K = atoi(argv[1]), NR = atoi(argv[2]);
  const int T = 16;
  std::vector<int8_t> W(NR * K), A(T * K), P(T * K);
  for (auto& x : W) x = (rand() % 256) - 128;
  for (auto& x : A) x = (rand() % 255) - 127;
  for (int64_t q = 0; q < K / 4; ++q) for (int t = 0; t < T; ++t) for (int j = 0; j < 4; ++j) P[q * 64 + t * 4 + j] = A[t * K + q * 4 + j];
  std::vector<int32_t> C(NR * T, 0);
  int reps = atoi(argv[3]);
  timespec a0,a1; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&a0);
  for (int r = 0; r < reps; ++r)
    for (int64_t n = 0; n < NR; n += 4) micro42(W.data() + n * K, K, P.data(), K / 4, C.data() + n * T, T);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID,&a1); double s=(a1.tv_sec-a0.tv_sec)+1e-9*(a1.tv_nsec-a0.tv_nsec);
  printf("GMAC/s %.1f\n", double(reps) * NR * T * K / s / 1e9);
  std::fill(C.begin(), C.end(), 0);
  for (int64_t n = 0; n < NR; n += 4) micro42(W.data() + n * K, K, P.data(), K / 4, C.data() + n * T, T);
  for (int64_t n = 0; n < NR; ++n) for (int t = 0; t < T; ++t) { int64_t s = 0; for (int64_t k = 0; k < K; ++k) s += W[n*K+k]*A[t*K+k]; if (s != C[n*T+t]) { printf("MISMATCH (expected with QK_NO_ABS / QK_NO_SIGN)\n"); return 1; } }
  printf("exact\n");
}
