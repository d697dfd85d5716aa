// Standalone micro-benchmark: two exact int8 x int8 formulations that avoid the sign trick of
// csrc/cpu/gemm_int8.cpp's panel kernel (bench/panel_micro.cpp), on the same 16-token panels,
// single thread, thread CPU time, data in L1/L2; each checks itself against a scalar int64 sum.
//   madd16: a and w widened to int16 (done once, outside the timed loop: a best case),
//           _mm256_madd_epi16 + add: 2 ops per 16 multiply-adds, no sign/abs work.
//   split:  u = w ^ 0x80 = 16 hi + lo (unsigned nibbles, split once outside the loop), so
//           sum w a = 16 sum hi a + sum lo a - 128 sum a; maddubs(nibble, a) pair sums
//           (<= 3840) are summed 8 deep in int16, then madd(ones) / madd(16) widen them.
// Both spend as many vector ops per multiply-add as the sign kernel (or more) and measured
// no faster than it on Zen3, so the sign kernel stays (README, bench/results/cpu_targets.md).
//   g++ -O3 -o /tmp/w8f bench/w8a8_forms_micro.cpp && /tmp/w8f madd16 1024 48 2000 && /tmp/w8f split 1024 48 2000
// Arguments: form, K (multiple of 32), weight rows (multiple of 4), repetitions. Prints G multiply-adds/s.
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

constexpr int T = 16;  // tokens per panel

// 4 weight rows x 16 tokens, int16 operands: P[q][16 tokens][2 k], W rows of int16.
__attribute__((target("avx2"))) void madd16(const int16_t* W, int64_t ldw, const int16_t* P, int64_t nk2, int32_t* C) {
  __m256i acc[4][2];
  for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < nk2; ++q) {
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 32));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 32 + 16));
    for (int r = 0; r < 4; ++r) {
      int32_t w2;
      std::memcpy(&w2, W + r * ldw + q * 2, 4);
      const __m256i wb = _mm256_set1_epi32(w2);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(wb, a0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(wb, a1));
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < 2; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + r * T + v * 8), acc[r][v]);
}

// 2 weight rows x 16 tokens (8 int16 sums + 4 int32 sums in registers), nibble planes UL / UH.
#define QK_ROW(UU, r, h0, h1)                                                  \
  {                                                                            \
    int32_t w4;                                                                \
    std::memcpy(&w4, UU + (r) * ldu + q * 4, 4);                               \
    const __m256i wb = _mm256_set1_epi32(w4);                                  \
    h0 = _mm256_add_epi16(_mm256_maddubs_epi16(wb, a0), h0);                   \
    h1 = _mm256_add_epi16(_mm256_maddubs_epi16(wb, a1), h1);                   \
  }
__attribute__((target("avx2"))) void split2(const uint8_t* UL, const uint8_t* UH, int64_t ldu, const int8_t* P,
                                            int64_t nq, int32_t* C) {
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t q8 = 0; q8 < nq; q8 += 8) {
    __m256i h00 = _mm256_setzero_si256(), h01 = h00, h10 = h00, h11 = h00, g00 = h00, g01 = h00, g10 = h00, g11 = h00;
    for (int64_t q = q8; q < q8 + 8; ++q) {
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64 + 32));
      QK_ROW(UL, 0, h00, h01) QK_ROW(UL, 1, h10, h11) QK_ROW(UH, 0, g00, g01) QK_ROW(UH, 1, g10, g11)
    }
    c0 = _mm256_add_epi32(c0, _mm256_add_epi32(_mm256_madd_epi16(h00, ones), _mm256_madd_epi16(g00, sixteen)));
    c1 = _mm256_add_epi32(c1, _mm256_add_epi32(_mm256_madd_epi16(h01, ones), _mm256_madd_epi16(g01, sixteen)));
    c2 = _mm256_add_epi32(c2, _mm256_add_epi32(_mm256_madd_epi16(h10, ones), _mm256_madd_epi16(g10, sixteen)));
    c3 = _mm256_add_epi32(c3, _mm256_add_epi32(_mm256_madd_epi16(h11, ones), _mm256_madd_epi16(g11, sixteen)));
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(C), c0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + 8), c1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + T), c2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(C + T + 8), c3);
}
#undef QK_ROW

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s madd16|split K rows reps\n", argv[0]);
    return 2;
  }
  const std::string form = argv[1];
  const int64_t K = std::atoll(argv[2]), NR = std::atoll(argv[3]);
  const int reps = std::atoi(argv[4]);
  if ((form != "madd16" && form != "split") || K <= 0 || K % 32 || NR <= 0 || NR % 4 || reps <= 0) {
    std::fprintf(stderr, "bad arguments: form=%s K=%lld (multiple of 32) rows=%lld (multiple of 4) reps=%d\n",
                 form.c_str(), (long long)K, (long long)NR, reps);
    return 2;
  }
  std::vector<int8_t> W(NR * K), A(T * K);
  for (auto& x : W) x = int8_t((std::rand() % 255) - 127);  // [-127, 127]: the weight range
  for (auto& x : A) x = int8_t((std::rand() % 256) - 128);  // any int8
  std::vector<int32_t> C(NR * T);
  // per-form operands
  std::vector<int16_t> W16(W.begin(), W.end()), P16(T * K);
  for (int64_t q = 0; q < K / 2; ++q)
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 2; ++j) P16[q * 32 + t * 2 + j] = A[t * K + q * 2 + j];
  std::vector<uint8_t> UL(NR * K), UH(NR * K);
  for (int64_t i = 0; i < NR * K; ++i) {
    const uint8_t u = uint8_t(W[i]) ^ 0x80;
    UL[i] = u & 15;
    UH[i] = u >> 4;
  }
  std::vector<int8_t> P8(T * K);
  for (int64_t q = 0; q < K / 4; ++q)
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < 4; ++j) P8[q * 64 + t * 4 + j] = A[t * K + q * 4 + j];
  auto pass = [&]() {
    if (form == "madd16") {
      for (int64_t n = 0; n < NR; n += 4) madd16(W16.data() + n * K, K, P16.data(), K / 2, C.data() + n * T);
    } else {
      for (int64_t n = 0; n < NR; n += 2) split2(UL.data() + n * K, UH.data() + n * K, K, P8.data(), K / 4, C.data() + n * T);
    }
  };
  timespec t0, t1;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  for (int r = 0; r < reps; ++r) pass();
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
  const double s = double(t1.tv_sec - t0.tv_sec) + 1e-9 * double(t1.tv_nsec - t0.tv_nsec);
  std::printf("%s: G multiply-adds/s %.1f\n", form.c_str(), double(reps) * double(NR * T * K) / s / 1e9);
  for (int64_t n = 0; n < NR; ++n)
    for (int t = 0; t < T; ++t) {
      int64_t dot = 0, asum = 0;
      for (int64_t k = 0; k < K; ++k) {
        dot += int64_t(W[n * K + k]) * A[t * K + k];
        asum += A[t * K + k];
      }
      const int64_t got = form == "madd16" ? C[n * T + t] : C[n * T + t] - 128 * asum;
      if (got != dot) {
        std::printf("MISMATCH at row %lld token %d: %lld != %lld\n", (long long)n, t, (long long)got, (long long)dot);
        return 1;
      }
    }
  std::printf("exact\n");
  return 0;
}
