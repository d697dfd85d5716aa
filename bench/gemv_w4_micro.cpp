// Standalone micro-benchmark behind the W4A16 (fp32 x) decode numbers in weight_only.cpp and the
// README: how many int4 weights per second one core can turn into fp32 products, whatever the
// formulation. Four weight rows x K unsigned nibbles (2 per byte, low = even k) against one fp32
// x row, data in L1/L2 (no DRAM), single thread, thread CPU time. Every variant is checked
// against a double-precision sum of the same products in the variant's own K order.
//   g++ -O3 -o /tmp/gm bench/gemv_w4_micro.cpp && /tmp/gm 4096 20000
// Variants (per 64 weights of one row):
//   cvt     : what weight_only.cpp runs: vpmovzxbd of 8 bytes, and / shift, cvtdq2ps, FMA
//   pshufb  : one 32-byte load, nibbles split with and / shift, vpshufb to dwords, cvtdq2ps, FMA
//   magic   : vpshufb puts (q << 3) | 0x80 into byte 2 of each dword, i.e. the float
//             2^-126 * (1 + q / 16), no conversion at all (the scale and offset would be undone
//             per row): fewest instructions, 22 per 64 weights
//   int16x2 : x as two int16 digits (a block fixed point), vpmaddwd
//   int8x3  : x as three int8 digits, u8 nibble x s8 digit vpmaddubsw, int16 sums
// Measured here (2026-11-23, shared 2-core Zen3 VM at ~3.1 GHz; noisy, +-15%), one run:
// cvt 18.3, pshufb 18.5, magic 20.3, int16x2 19.4, int8x3 19.1 G weights/s per core. So fp32
// W4A16 at M = 1 on 4096 x 4096 (16.8 M weights) needs ~0.42-0.46 ms of instructions on 2 cores
// before any DRAM stall, while the bound (1.7x faster than fbgemm's 0.65 ms) is 0.38 ms.
// The integer-digit forms are not faster: they trade the conversion for more multiplies; the
// magic-float form saves ~10% but needs a per-row rescaling of x and loses ~3x in cancellation.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <vector>

#define QK_T __attribute__((target("avx2,fma")))

static double cpu_now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

QK_T static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Position of the nibble (byte i of a 64-chunk, high nibble h) in each variant's x order.
static int pos_cvt(int i, int h) { return (i / 8) * 16 + h * 8 + i % 8; }                      // 16-chunks
static int pos_shuf(int i, int h) { return 32 * h + 8 * ((i % 16) / 4) + 4 * (i / 16) + i % 4; }  // pshufb j, lane, d
static int pos_w16(int i, int h) {  // unpacklo/hi_epi8 with zero: 16 words per register, lane-major
  const int l = i / 16, b = i % 16;
  return 32 * h + 16 * (b / 8) + 8 * l + b % 8;
}

QK_T static void v_cvt(const uint8_t* const* q, const float* x, int K, float* out) {
  const __m256i m15 = _mm256_set1_epi32(15);
  __m256 a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int k = 0; k < K; k += 16) {
    const __m256 xe = _mm256_loadu_ps(x + k), xo = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < 4; r++) {
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[r] + k / 2)));
      a[r][0] = _mm256_fmadd_ps(xe, _mm256_cvtepi32_ps(_mm256_and_si256(b, m15)), a[r][0]);
      a[r][1] = _mm256_fmadd_ps(xo, _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), a[r][1]);
    }
  }
  for (int r = 0; r < 4; r++) out[r] = hsum(_mm256_add_ps(a[r][0], a[r][1]));
}

// byte masks: dword d of lane l takes byte 4j + d of its lane, at byte position `at`
QK_T static __m256i spread_mask(int j, int at) {
  alignas(32) int8_t m[32];
  for (int l = 0; l < 2; l++)
    for (int d = 0; d < 4; d++)
      for (int b = 0; b < 4; b++) m[l * 16 + d * 4 + b] = b == at ? int8_t(4 * j + d) : int8_t(-128);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}

template <bool kMagic>
QK_T static void v_shuf(const uint8_t* const* q, const float* x, int K, float* out) {
  const __m256i m15 = _mm256_set1_epi8(15), m78 = _mm256_set1_epi8(0x78), m80 = _mm256_set1_epi8(char(0x80));
  __m256i sh[4];
  for (int j = 0; j < 4; j++) sh[j] = spread_mask(j, kMagic ? 2 : 0);
  __m256 a[4][2];
  for (int r = 0; r < 4; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int k = 0; k < K; k += 64) {
    for (int r = 0; r < 4; r++) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + k / 2));
      __m256i lo, hi;
      if (kMagic) {
        lo = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(v, 3), m78), m80);
        hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 1), m78), m80);
      } else {
        lo = _mm256_and_si256(v, m15);
        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
      }
      for (int j = 0; j < 4; j++) {
        __m256 wl, wh;
        if (kMagic) {
          wl = _mm256_castsi256_ps(_mm256_shuffle_epi8(lo, sh[j]));
          wh = _mm256_castsi256_ps(_mm256_shuffle_epi8(hi, sh[j]));
        } else {
          wl = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(lo, sh[j]));
          wh = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(hi, sh[j]));
        }
        a[r][j & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * j), wl, a[r][j & 1]);
        a[r][j & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 32 + 8 * j), wh, a[r][j & 1]);
      }
    }
  }
  for (int r = 0; r < 4; r++) out[r] = hsum(_mm256_add_ps(a[r][0], a[r][1]));
}

// x as X = dh * 65536 + dl (int16 digits), unpack order; int32 sums flushed to fp32 every 256.
QK_T static void v_int16x2(const uint8_t* const* q, const int16_t* dh, const int16_t* dl, int K, float* out) {
  const __m256i m15 = _mm256_set1_epi8(15), z = _mm256_setzero_si256();
  __m256 f[4];
  for (int r = 0; r < 4; r++) f[r] = _mm256_setzero_ps();
  for (int kb = 0; kb < K; kb += 256) {
    __m256i ah[4], al[4];
    for (int r = 0; r < 4; r++) ah[r] = al[r] = z;
    for (int k = kb; k < kb + 256; k += 64)
      for (int r = 0; r < 4; r++) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + k / 2));
        const __m256i nb[2] = {_mm256_and_si256(v, m15), _mm256_and_si256(_mm256_srli_epi16(v, 4), m15)};
        for (int h = 0; h < 2; h++) {
          const __m256i w0 = _mm256_unpacklo_epi8(nb[h], z), w1 = _mm256_unpackhi_epi8(nb[h], z);
          const int o = k + 32 * h;
          ah[r] = _mm256_add_epi32(ah[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dh + o))));
          al[r] = _mm256_add_epi32(al[r], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dl + o))));
          ah[r] = _mm256_add_epi32(ah[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dh + o + 16))));
          al[r] = _mm256_add_epi32(al[r], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(dl + o + 16))));
        }
      }
    for (int r = 0; r < 4; r++)
      f[r] = _mm256_add_ps(f[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah[r]), _mm256_set1_ps(65536.f), _mm256_cvtepi32_ps(al[r])));
  }
  for (int r = 0; r < 4; r++) out[r] = hsum(f[r]);
}

// x as X = d2 * 65536 + d1 * 256 + d0 (int8 digits), per 64-chunk: 32 even k then 32 odd k.
QK_T static void v_int8x3(const uint8_t* const* q, const int8_t* const* d, int K, float* out) {
  const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  __m256 f[4];
  for (int r = 0; r < 4; r++) f[r] = _mm256_setzero_ps();
  for (int kb = 0; kb < K; kb += 128)
    for (int rp = 0; rp < 4; rp += 2) {
      __m256i c[2][3];
      for (int r = 0; r < 2; r++)
        for (int j = 0; j < 3; j++) c[r][j] = _mm256_setzero_si256();
      for (int k = kb; k < kb + 128; k += 64)
        for (int r = 0; r < 2; r++) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[rp + r] + k / 2));
          const __m256i lo = _mm256_and_si256(v, m15), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
          for (int j = 0; j < 3; j++) {
            const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d[j] + k)));
            const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(d[j] + k + 32)));
            c[r][j] = _mm256_add_epi16(c[r][j], _mm256_add_epi16(p0, p1));
          }
        }
      const __m256 s8 = _mm256_set1_ps(256.f);
      for (int r = 0; r < 2; r++) {
        __m256 t = _mm256_cvtepi32_ps(_mm256_madd_epi16(c[r][2], ones));
        t = _mm256_fmadd_ps(t, s8, _mm256_cvtepi32_ps(_mm256_madd_epi16(c[r][1], ones)));
        t = _mm256_fmadd_ps(t, s8, _mm256_cvtepi32_ps(_mm256_madd_epi16(c[r][0], ones)));
        f[rp + r] = _mm256_add_ps(f[rp + r], t);
      }
    }
  for (int r = 0; r < 4; r++) out[r] = hsum(f[r]);
}

int main(int argc, char** argv) {
  const int K = argc > 1 ? atoi(argv[1]) : 4096, reps = argc > 2 ? atoi(argv[2]) : 20000;
  if (K <= 0 || K % 256 != 0 || reps <= 0) {
    fprintf(stderr, "usage: %s K reps  (K a positive multiple of 256)\n", argv[0]);
    return 2;
  }
  std::vector<uint8_t> W(4 * K / 2);
  srand(1);
  for (auto& b : W) b = uint8_t(rand() & 255);
  const uint8_t* q[4] = {&W[0], &W[K / 2], &W[K], &W[3 * K / 2]};
  // integer x values (exact in every variant): |x| < 2^14 fits one int16 / three int8 digits
  std::vector<int> xi(K);
  for (auto& v : xi) v = rand() % 16001 - 8000;
  auto nib = [&](int r, int k) { const uint8_t b = q[r][k / 2]; return (k & 1) ? b >> 4 : b & 15; };
  auto in_order = [&](int (*pos)(int, int), std::vector<float>& xf) {
    xf.assign(K, 0.f);
    for (int c = 0; c < K; c += (pos == pos_cvt ? 16 : 64))
      for (int i = 0; i < (pos == pos_cvt ? 8 : 32); i++)
        for (int h = 0; h < 2; h++) xf[c + pos(i, h)] = float(xi[c + 2 * i + h]);
  };
  double ref[4] = {0, 0, 0, 0};
  for (int r = 0; r < 4; r++)
    for (int k = 0; k < K; k++) ref[r] += double(xi[k]) * nib(r, k);
  std::vector<float> xc, xs, xu;  // x in the cvt, pshufb and int16 orders
  in_order(pos_cvt, xc);
  in_order(pos_shuf, xs);
  in_order(pos_w16, xu);
  std::vector<int16_t> dh(K), dl(K);
  for (int k = 0; k < K; k++) {
    dh[k] = 0;
    dl[k] = int16_t(xu[k]);
  }
  std::vector<int8_t> d0(K), d1(K), d2(K);
  for (int c = 0; c < K; c += 64)  // 32 even k, then 32 odd k; balanced base-256 digits
    for (int i = 0; i < 64; i++) {
      const int v = xi[c + (i < 32 ? 2 * i : 2 * (i - 32) + 1)];
      const int e0 = ((v % 256) + 384) % 256 - 128, r1 = (v - e0) / 256;
      const int e1 = ((r1 % 256) + 384) % 256 - 128, r2 = (r1 - e1) / 256;
      d0[c + i] = int8_t(e0);
      d1[c + i] = int8_t(e1);
      d2[c + i] = int8_t(r2);
    }
  const int8_t* dd[3] = {d0.data(), d1.data(), d2.data()};
  double xsum = 0;
  for (int k = 0; k < K; k++) xsum += xi[k];
  struct Case {
    const char* name;
    int kind;
  } cases[] = {{"cvt", 0}, {"pshufb", 1}, {"magic", 2}, {"int16x2", 3}, {"int8x3", 4}};
  for (const Case& cs : cases) {
    float o[4];
    auto run = [&]() {
      switch (cs.kind) {
        case 0: v_cvt(q, xc.data(), K, o); break;
        case 1: v_shuf<false>(q, xs.data(), K, o); break;
        case 2: v_shuf<true>(q, xs.data(), K, o); break;
        case 3: v_int16x2(q, dh.data(), dl.data(), K, o); break;
        default: v_int8x3(q, dd, K, o); break;
      }
    };
    run();
    double err = 0;
    for (int r = 0; r < 4; r++) {
      // magic: sum x * 2^-126 * (1 + q / 16)  ->  sum x * q = 16 * (2^126 * s - sum x)
      const double got = cs.kind == 2 ? 16.0 * (std::ldexp(double(o[r]), 126) - xsum) : double(o[r]);
      err = std::fmax(err, std::fabs(got - ref[r]) / (1.0 + std::fabs(ref[r])));
    }
    const double t0 = cpu_now();
    for (int i = 0; i < reps; i++) {
      run();
      asm volatile("" : : "r"(o) : "memory");
    }
    const double t = cpu_now() - t0;
    printf("%-8s rel err %.1e   %6.2f G weights/s\n", cs.name, err, 4.0 * K * reps / t / 1e9);
    if (err > 1e-4) return 1;
  }
  return 0;
}
