// Issue 14: the VNNI inner-product tile shapes, alone on one core (thread CPU time; the machine is
// shared). tile<R, T, true>: the accumulators as an array (GCC 12 keeps it on the stack); tile2:
// named accumulators (gemm_int8_vnni.h's form), with -DASMDP vpdpbusd as inline asm (what ships).
//   g++ -O3 -DASMDP -mavx512f -mavx512bw -mavx512vnni -mavx512vl -o /tmp/vm bench/vnni_int8_micro.cpp && /tmp/vm
// "L2": 96 tokens x 256 weight rows x K = 2048 (tokens from L2, the 4-row weight strip in L1).
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <vector>
#include <algorithm>
static double tnow(){timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+t.tv_nsec*1e-9;}
static inline __m128i hsum4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
template <int R, int T, bool XOR>
__attribute__((noinline)) void tile(const int8_t* W, int64_t ldw, const int8_t* A, int64_t lda, int64_t kc, int32_t* C, int64_t ldc) {
  __m512i acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  for (int64_t k = 0; k + 64 <= kc; k += 64) {
    __m512i w[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) w[r] = XOR ? _mm512_xor_si512(_mm512_loadu_si512(W + r * ldw + k), x80) : _mm512_loadu_si512(W + r * ldw + k);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512i a = _mm512_loadu_si512(A + t * lda + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[r], a);
    }
  }
  for (int t = 0; t < T; ++t) for (int r=0;r<R;r+=4){
    __m128i s = hsum4(acc[r][t], acc[std::min(r+1,R-1)][t], acc[std::min(r+2,R-1)][t], acc[std::min(r+3,R-1)][t]);
    int32_t v[4]; _mm_storeu_si128((__m128i*)v, s);
    for (int q=0;q<4&&r+q<R;++q) C[t*ldc+r+q]+=v[q];
  }
}
static inline __m512i dp_asm(__m512i acc, __m512i u, __m512i v) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(v));
  return acc;
}
#ifdef ASMDP
#define DPB dp_asm
#else
#define DPB _mm512_dpbusd_epi32
#endif
// Named-accumulator tile: R <= 4 weight rows x T <= 6 tokens.
#define QK_V_DECL(r) __m512i c##r##0 = z, c##r##1 = z, c##r##2 = z, c##r##3 = z, c##r##4 = z, c##r##5 = z;
#define QK_V_TOK(t, LOAD)                                                   \
  if constexpr (T > t) {                                                    \
    const __m512i a = LOAD(A + t * lda + k);                                \
    if constexpr (R > 0) c0##t = DPB(c0##t, w0, a);         \
    if constexpr (R > 1) c1##t = DPB(c1##t, w1, a);         \
    if constexpr (R > 2) c2##t = DPB(c2##t, w2, a);         \
    if constexpr (R > 3) c3##t = DPB(c3##t, w3, a);         \
  }
#define QK_V_STEP(LOAD)                                                                     \
  {                                                                                         \
    const __m512i w0 = _mm512_xor_si512(LOAD(W + k), x80);                                  \
    const __m512i w1 = R > 1 ? _mm512_xor_si512(LOAD(W + (R > 1 ? 1 : 0) * ldw + k), x80) : z; \
    const __m512i w2 = R > 2 ? _mm512_xor_si512(LOAD(W + (R > 2 ? 2 : 0) * ldw + k), x80) : z; \
    const __m512i w3 = R > 3 ? _mm512_xor_si512(LOAD(W + (R > 3 ? 3 : 0) * ldw + k), x80) : z; \
    QK_V_TOK(0, LOAD) QK_V_TOK(1, LOAD) QK_V_TOK(2, LOAD) QK_V_TOK(3, LOAD) QK_V_TOK(4, LOAD) QK_V_TOK(5, LOAD) \
  }
#define QK_V_OUT(t)                                                                  \
  if constexpr (T > t) {                                                             \
    const __m128i s = hsum4(c0##t, c1##t, c2##t, c3##t);                             \
    int32_t* c = C + t * ldc;                                                        \
    if constexpr (R == 4) {                                                          \
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c),                                \
                       _mm_add_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), s)); \
    } else {                                                                         \
      alignas(16) int32_t v[4];                                                      \
      _mm_store_si128(reinterpret_cast<__m128i*>(v), s);                             \
      for (int r = 0; r < R; ++r) c[r] = int32_t(uint32_t(c[r]) + uint32_t(v[r]));   \
    }                                                                                \
  }
template <int R, int T>
__attribute__((noinline)) void tile2(const int8_t* W, int64_t ldw, const int8_t* A, int64_t lda, int64_t kc, int32_t* C, int64_t ldc) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  QK_V_DECL(0) QK_V_DECL(1) QK_V_DECL(2) QK_V_DECL(3)
  int64_t k = 0;
#define QK_LD(p) _mm512_loadu_si512(p)
  for (; k + 64 <= kc; k += 64) QK_V_STEP(QK_LD)
#ifndef NOTAIL
  if (k < kc) {
    const __mmask64 m = _cvtu64_mask64((~uint64_t(0)) >> (64 - (kc - k)));
#define QK_LDM(p) _mm512_maskz_loadu_epi8(m, p)
    QK_V_STEP(QK_LDM)
  }
#endif
  QK_V_OUT(0) QK_V_OUT(1) QK_V_OUT(2) QK_V_OUT(3) QK_V_OUT(4) QK_V_OUT(5)
}

template <int R, int T, bool XOR>
void run(const char* name, int64_t Mt, int64_t Nw, int64_t K, const int8_t* W, const int8_t* A, int32_t* C) {
  double best=1e9;
  for (int rep=0;rep<5;++rep){
    double t0=tnow();
    for (int64_t j=0;j+R<=Nw;j+=R) for (int64_t i=0;i+T<=Mt;i+=T) (XOR? tile<R,T,true> : tile2<R,T>)(W+j*K,K,A+i*K,K,K,C+i*Nw+j,Nw);
    best=std::min(best,tnow()-t0);
  }
  double macs=double(Mt/T*T)*(Nw/R*R)*K;
  printf("%-12s Mt=%ld Nw=%ld K=%ld: %.3f ms, %.1f GMAC/s\n",name,Mt,Nw,K,best*1e3,macs/best/1e9);
}
int main(){
  int64_t K=2048, Mt=96, Nw=256;
  std::vector<int8_t> W(300*4096,3), A(Mt*4096,5); std::vector<int32_t> C(Mt*300);
  for (int rep=0; rep<2; ++rep) {
  run<4,4,false>("T2 4x4 L2",Mt,Nw,K,W.data(),A.data(),C.data());
  run<4,5,false>("T2 4x5 L2",95,Nw,K,W.data(),A.data(),C.data());
  run<4,6,false>("T2 4x6 L2",Mt,Nw,K,W.data(),A.data(),C.data());
  run<3,6,false>("T2 3x6 L2",Mt,255,K,W.data(),A.data(),C.data());
  run<4,4,false>("T2 4x4 K4096",Mt,Nw,4096,W.data(),A.data(),C.data());
  run<4,4,false>("T2 4x4 K1024",Mt,Nw,1024,W.data(),A.data(),C.data());
  run<4,6,false>("T2 4x6 Mt16",18,1024,2048,W.data(),A.data(),C.data());
  run<4,4,false>("T2 4x4 Mt16",16,1024,2048,W.data(),A.data(),C.data());
  }
}
