# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""HMAC-SHA256 signing of tracking DATA in C, for the many links of a SimpleMH message.

A message with 40 links needs 40 signatures per recipient. Through
Python's `hmac.digest` each costs a call, a fresh HMAC context (two extra
SHA-256 blocks for the key) and a base64 step in Python; here the key's
inner and outer states are computed once per Signer, the state after the
part of the payload common to a message's links (version, kind, flags,
recipient, identifiers) is kept, and each link costs only the SHA-256
blocks of its URL, the outer block and a base64url encoding, all in C.

The result is byte for byte what greenarrow.lib.simplemh.tracking_url.encode() makes
with `hmac` and `binascii` (tests/test_tracking_url.py checks it), so the
tracker verifies it with the standard library.

Python-level API:

- Signer(key: bytes)                       an HMAC-SHA256 key
- Signer.digest(msg: bytes) -> bytes       the full 32-byte HMAC of msg
- Signer.data(prefix: bytes, url: bytes, tag_bytes: int = 10) -> bytes
      base64url without padding of prefix + url + HMAC(prefix + url)[:tag_bytes];
      the state after `prefix` is cached (a few prefixes at a time)
- Signer.url(base, prefix, url, tag_bytes=10) -> bytes   base + data(...)
- Signer.replacements(kinds, targets, prefixes, bases, pixel_open, pixel_close)
      the tracking URLs (or open pixel) of a part's slots, in one loop
- Signer.link(base, kind, flags, fields, url=b"") -> bytes
      base + DATA for the payload bytes((1, kind, flags)) + fields + url
      (tracking DATA's layout: greenarrow.lib.simplemh.tracking_url)
- Signer.links(kinds, targets, fields, flags, bases, pixel_open, pixel_close)
      Signer.replacements for one recipient's `fields`, without prefix
      objects: the state after each kind's prefix is computed once per call
- Signer.links_packed(...) -> (data, offsets)   links() in one buffer
- b64url(data: bytes) -> bytes             base64url without padding
- sha_extensions(enabled=None) -> bool     whether the x86 SHA extensions are in use
      (detected at import; tests turn them off to check the portable code)
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint32_t, uint64_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcpy, memset

cdef extern from "Python.h":
    char* PyBytes_AS_STRING_RW "PyBytes_AS_STRING"(object)


cdef const char* B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


ctypedef struct Sha:
    uint32_t h[8]
    uint64_t length
    unsigned char buf[64]
    Py_ssize_t buflen


cdef extern from *:
    """
    #include <stdint.h>

    /* SHA-256's round constants, for both the portable rounds and SHA-NI. */
    static const uint32_t GA_K256[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    #include <cpuid.h>
    #include <immintrin.h>

    /* One 64-byte block with the x86 SHA extensions (the Intel SHA-NI round pattern). */
    __attribute__((target("sha,sse4.1,ssse3")))
    static void ga_sha256_shani(uint32_t *state, const unsigned char *data) {
        __m128i STATE0, STATE1, MSG, TMP, W[4], ABEF_SAVE, CDGH_SAVE;
        const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
        int g;
        TMP = _mm_loadu_si128((const __m128i *)&state[0]);
        STATE1 = _mm_loadu_si128((const __m128i *)&state[4]);
        TMP = _mm_shuffle_epi32(TMP, 0xB1);
        STATE1 = _mm_shuffle_epi32(STATE1, 0x1B);
        STATE0 = _mm_alignr_epi8(TMP, STATE1, 8);
        STATE1 = _mm_blend_epi16(STATE1, TMP, 0xF0);
        ABEF_SAVE = STATE0;
        CDGH_SAVE = STATE1;
        /* fully unrolled: g is then a constant and W[] lives in registers */
        #pragma GCC unroll 16
        for (g = 0; g < 16; g++) {
            if (g < 4)
                W[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(data + 16 * g)), MASK);
            MSG = _mm_add_epi32(W[g & 3], _mm_loadu_si128((const __m128i *)&GA_K256[4 * g]));
            STATE1 = _mm_sha256rnds2_epu32(STATE1, STATE0, MSG);
            if (g >= 3 && g < 15) {
                TMP = _mm_alignr_epi8(W[g & 3], W[(g + 3) & 3], 4);
                W[(g + 1) & 3] = _mm_add_epi32(W[(g + 1) & 3], TMP);
                W[(g + 1) & 3] = _mm_sha256msg2_epu32(W[(g + 1) & 3], W[g & 3]);
            }
            MSG = _mm_shuffle_epi32(MSG, 0x0E);
            STATE0 = _mm_sha256rnds2_epu32(STATE0, STATE1, MSG);
            if (g >= 1 && g < 13)
                W[(g + 3) & 3] = _mm_sha256msg1_epu32(W[(g + 3) & 3], W[g & 3]);
        }
        STATE0 = _mm_add_epi32(STATE0, ABEF_SAVE);
        STATE1 = _mm_add_epi32(STATE1, CDGH_SAVE);
        TMP = _mm_shuffle_epi32(STATE0, 0x1B);
        STATE1 = _mm_shuffle_epi32(STATE1, 0xB1);
        STATE0 = _mm_blend_epi16(TMP, STATE1, 0xF0);
        STATE1 = _mm_alignr_epi8(STATE1, TMP, 8);
        _mm_storeu_si128((__m128i *)&state[0], STATE0);
        _mm_storeu_si128((__m128i *)&state[4], STATE1);
    }

    static int ga_cpu_has_shani(void) {
        unsigned int a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
        if (!(c & (1u << 19)) || !(c & (1u << 9))) return 0;  /* SSE4.1, SSSE3 */
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
        return (b >> 29) & 1;  /* SHA */
    }
    #else
    static void ga_sha256_shani(uint32_t *state, const unsigned char *data) { (void)state; (void)data; }
    static int ga_cpu_has_shani(void) { return 0; }
    #endif
    """
    const uint32_t GA_K256[64]
    void ga_sha256_shani(uint32_t* state, const unsigned char* data) noexcept nogil
    int ga_cpu_has_shani() noexcept nogil


cdef bint _use_shani = ga_cpu_has_shani()


def sha_extensions(enabled=None):
    """Whether the x86 SHA extensions (and SSSE3 for base64url) are used (for tests: False
    forces the portable C code).

    With an argument, turn them on (only if the CPU has them) or off; returns the setting.
    """
    global _use_shani, ga_use_ssse3
    if enabled is not None:
        _use_shani = bool(enabled) and bool(ga_cpu_has_shani())
        ga_use_ssse3 = bool(enabled) and bool(ga_cpu_has_ssse3())
    return bool(_use_shani)


cdef inline uint32_t _rotr(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


cdef void _compress(uint32_t* h, const unsigned char* p) noexcept nogil:
    if _use_shani:
        ga_sha256_shani(h, p)
        return
    _compress_portable(h, p)


cdef void _compress_portable(uint32_t* h, const unsigned char* p) noexcept nogil:
    cdef uint32_t w[64]
    cdef uint32_t a, b, c, d, e, f, g, hh, t1, t2, s0, s1
    cdef int i
    for i in range(16):
        w[i] = ((<uint32_t>p[4 * i] << 24) | (<uint32_t>p[4 * i + 1] << 16)
                | (<uint32_t>p[4 * i + 2] << 8) | <uint32_t>p[4 * i + 3])
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w[i] = w[i - 16] + s0 + w[i - 7] + s1
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7]
    for i in range(64):
        s1 = _rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)
        t1 = hh + s1 + ((e & f) ^ ((~e) & g)) + GA_K256[i] + w[i]
        s0 = _rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)
        t2 = s0 + ((a & b) ^ (a & c) ^ (b & c))
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh


cdef void _init(Sha* s) noexcept nogil:
    s.h[0] = 0x6a09e667; s.h[1] = 0xbb67ae85; s.h[2] = 0x3c6ef372; s.h[3] = 0xa54ff53a
    s.h[4] = 0x510e527f; s.h[5] = 0x9b05688c; s.h[6] = 0x1f83d9ab; s.h[7] = 0x5be0cd19
    s.length = 0
    s.buflen = 0


cdef void _update(Sha* s, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t take
    s.length += <uint64_t>n
    if s.buflen:
        take = 64 - s.buflen
        if take > n:
            take = n
        memcpy(s.buf + s.buflen, data, take)
        s.buflen += take
        data += take
        n -= take
        if s.buflen < 64:
            return
        _compress(s.h, s.buf)
        s.buflen = 0
    while n >= 64:
        _compress(s.h, data)
        data += 64
        n -= 64
    if n:
        memcpy(s.buf, data, n)
        s.buflen = n


cdef void _final(Sha* s, unsigned char* out) noexcept nogil:
    cdef uint64_t bits = s.length * 8
    cdef int i
    s.buf[s.buflen] = 0x80
    s.buflen += 1
    if s.buflen > 56:
        memset(s.buf + s.buflen, 0, 64 - s.buflen)
        _compress(s.h, s.buf)
        s.buflen = 0
    memset(s.buf + s.buflen, 0, 56 - s.buflen)
    for i in range(8):
        s.buf[56 + i] = <unsigned char>(bits >> (56 - 8 * i))
    _compress(s.h, s.buf)
    for i in range(8):
        out[4 * i] = <unsigned char>(s.h[i] >> 24)
        out[4 * i + 1] = <unsigned char>(s.h[i] >> 16)
        out[4 * i + 2] = <unsigned char>(s.h[i] >> 8)
        out[4 * i + 3] = <unsigned char>s.h[i]


cdef extern from *:
    """
    #include <string.h>
    /* base64url in pairs: the two characters of each 12-bit value, in memory order */
    static uint16_t ga_b64url_pairs[4096];

    static void ga_b64url_init(const char *alphabet) {
        int i;
        for (i = 0; i < 4096; i++) {
            unsigned char *p = (unsigned char *)&ga_b64url_pairs[i];
            p[0] = (unsigned char)alphabet[i >> 6];
            p[1] = (unsigned char)alphabet[i & 63];
        }
    }

    /* base64url of src[0:n] without padding at out; the number of characters written */
    static Py_ssize_t ga_b64url_scalar(const unsigned char *restrict src, Py_ssize_t n,
                                       unsigned char *restrict out, const char *alphabet) {
        Py_ssize_t i = 0, w = 0;
        uint32_t v;
        while (i + 3 <= n) {
            v = ((uint32_t)src[i] << 16) | ((uint32_t)src[i + 1] << 8) | src[i + 2];
            memcpy(out + w, &ga_b64url_pairs[v >> 12], 2);
            memcpy(out + w + 2, &ga_b64url_pairs[v & 0xFFF], 2);
            w += 4;
            i += 3;
        }
        if (n - i == 1) {
            v = (uint32_t)src[i] << 16;
            out[w] = alphabet[(v >> 18) & 63];
            out[w + 1] = alphabet[(v >> 12) & 63];
            w += 2;
        } else if (n - i == 2) {
            v = ((uint32_t)src[i] << 16) | ((uint32_t)src[i + 1] << 8);
            out[w] = alphabet[(v >> 18) & 63];
            out[w + 1] = alphabet[(v >> 12) & 63];
            out[w + 2] = alphabet[(v >> 6) & 63];
            w += 3;
        }
        return w;
    }

    static int ga_use_ssse3 = 0;

    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    /* 12 bytes to 16 characters at a time (W. Mula's method), for inputs of 16 bytes or more */
    __attribute__((target("ssse3")))
    static Py_ssize_t ga_b64url_ssse3(const unsigned char *src, Py_ssize_t n,
                                      unsigned char *out, const char *alphabet) {
        Py_ssize_t i = 0, w = 0;
        const __m128i shuf = _mm_set_epi8(10, 11, 9, 10, 7, 8, 6, 7, 4, 5, 3, 4, 1, 2, 0, 1);
        const __m128i m0 = _mm_set1_epi32(0x0fc0fc00), mul0 = _mm_set1_epi32(0x04000040);
        const __m128i m1 = _mm_set1_epi32(0x003f03f0), mul1 = _mm_set1_epi32(0x01000010);
        /* per range of 6-bit values, what turns it into its character: A-Z a-z 0-9 - _ */
        const __m128i lut = _mm_setr_epi8(65, 71, -4, -4, -4, -4, -4, -4, -4, -4, -4, -4,
                                          -17, 32, 0, 0);
        const __m128i c51 = _mm_set1_epi8(51), c25 = _mm_set1_epi8(25);
        while (i + 16 <= n) {
            __m128i in = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(src + i)), shuf);
            __m128i idx = _mm_or_si128(_mm_mulhi_epu16(_mm_and_si128(in, m0), mul0),
                                       _mm_mullo_epi16(_mm_and_si128(in, m1), mul1));
            __m128i r = _mm_sub_epi8(_mm_subs_epu8(idx, c51), _mm_cmpgt_epi8(idx, c25));
            _mm_storeu_si128((__m128i *)(out + w), _mm_add_epi8(idx, _mm_shuffle_epi8(lut, r)));
            i += 12;
            w += 16;
        }
        return w + ga_b64url_scalar(src + i, n - i, out + w, alphabet);
    }

    static int ga_cpu_has_ssse3(void) {
        unsigned int a, b, c, d;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
        return (c >> 9) & 1;
    }
    #else
    static Py_ssize_t ga_b64url_ssse3(const unsigned char *src, Py_ssize_t n,
                                      unsigned char *out, const char *alphabet) {
        return ga_b64url_scalar(src, n, out, alphabet);
    }
    static int ga_cpu_has_ssse3(void) { return 0; }
    #endif

    static Py_ssize_t ga_b64url(const unsigned char *src, Py_ssize_t n, unsigned char *out,
                                const char *alphabet) {
        if (ga_use_ssse3 && n >= 16)
            return ga_b64url_ssse3(src, n, out, alphabet);
        return ga_b64url_scalar(src, n, out, alphabet);
    }
    """
    int ga_use_ssse3
    int ga_cpu_has_ssse3() noexcept nogil
    void ga_b64url_init(const char* alphabet) noexcept nogil
    Py_ssize_t ga_b64url(const unsigned char* src, Py_ssize_t n, unsigned char* out,
                         const char* alphabet) noexcept nogil


ga_b64url_init(B64URL)
ga_use_ssse3 = ga_cpu_has_ssse3()


cdef inline Py_ssize_t _b64url(const unsigned char* src, Py_ssize_t n, unsigned char* out) noexcept nogil:
    """base64url of src[0:n] without padding at out (src and out do not overlap)."""
    return ga_b64url(src, n, out, B64URL)


def b64url(bytes data):
    """base64url (RFC 4648 section 5) without padding."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    out = PyBytes_FromStringAndSize(NULL, (n + 2) // 3 * 4)
    cdef Py_ssize_t w = _b64url(<const unsigned char*>PyBytes_AS_STRING(data), n,
                                <unsigned char*>PyBytes_AS_STRING_RW(out))
    return out[:w]


DEF CACHE = 8


cdef class Signer:
    """An HMAC-SHA256 key with its inner and outer states precomputed."""

    cdef Sha inner
    cdef Sha outer
    cdef Sha cached[CACHE]
    cdef list cached_prefixes
    cdef int next_slot

    def __init__(self, bytes key):
        cdef unsigned char block[64]
        cdef unsigned char digest[32]
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key), i
        cdef Sha tmp
        memset(block, 0, 64)
        if n > 64:
            _init(&tmp)
            _update(&tmp, <const unsigned char*>PyBytes_AS_STRING(key), n)
            _final(&tmp, digest)
            memcpy(block, digest, 32)
        else:
            memcpy(block, PyBytes_AS_STRING(key), n)
        for i in range(64):
            block[i] ^= 0x36
        _init(&self.inner)
        _update(&self.inner, block, 64)
        for i in range(64):
            block[i] ^= 0x36 ^ 0x5C
        _init(&self.outer)
        _update(&self.outer, block, 64)
        self.cached_prefixes = [None] * CACHE
        self.next_slot = 0

    cdef void _tag(self, Sha* s, unsigned char* out) noexcept:
        cdef unsigned char inner_digest[32]
        cdef Sha o = self.outer
        _final(s, inner_digest)
        _update(&o, inner_digest, 32)
        _final(&o, out)

    def digest(self, bytes msg):
        """HMAC-SHA256(key, msg), as hmac.digest(key, msg, "sha256")."""
        cdef Sha s = self.inner
        cdef unsigned char out[32]
        _update(&s, <const unsigned char*>PyBytes_AS_STRING(msg), PyBytes_GET_SIZE(msg))
        self._tag(&s, out)
        return PyBytes_FromStringAndSize(<char*>out, 32)

    cdef int _slot(self, bytes prefix):
        """The cache slot holding the state after `prefix` (computed when missing)."""
        cdef int i, slot
        for i in range(CACHE):
            if self.cached_prefixes[i] is prefix:
                return i
        for i in range(CACHE):
            if self.cached_prefixes[i] == prefix:
                return i
        slot = self.next_slot
        self.next_slot = (self.next_slot + 1) % CACHE
        self.cached[slot] = self.inner
        _update(&self.cached[slot], <const unsigned char*>PyBytes_AS_STRING(prefix),
                PyBytes_GET_SIZE(prefix))
        self.cached_prefixes[slot] = prefix
        return slot

    cdef bytes _data(self, bytes base, bytes prefix, bytes url, int tag_bytes):
        """base + base64url(prefix + url + tag), built in one allocation."""
        cdef Sha s = self.cached[self._slot(prefix)]
        return self._sign(&s, NULL, 0, <const unsigned char*>PyBytes_AS_STRING(prefix),
                          PyBytes_GET_SIZE(prefix), NULL, 0, url, base, None, tag_bytes)

    cdef bytes _sign(self, Sha* s, const unsigned char* head, Py_ssize_t nh,
                     const unsigned char* fields, Py_ssize_t nf, const unsigned char* pre,
                     Py_ssize_t npre, bytes url, bytes base, bytes post, int tag_bytes):
        """pre + base + base64url(head + fields + url + tag) + post, in one allocation.

        `s` is the HMAC inner state after head + fields (it is updated with url).
        """
        cdef Py_ssize_t nb = PyBytes_GET_SIZE(base), nu = PyBytes_GET_SIZE(url), npost = 0
        cdef const unsigned char* p = NULL
        if post is not None:
            p = <const unsigned char*>PyBytes_AS_STRING(post)
            npost = PyBytes_GET_SIZE(post)
        out = PyBytes_FromStringAndSize(
            NULL, npre + nb + (((nh + nf + nu + tag_bytes) * 4 + 2) // 3) + npost)
        self._sign_into(s, head, nh, fields, nf, pre, npre,
                        <const unsigned char*>PyBytes_AS_STRING(url), nu,
                        <const unsigned char*>PyBytes_AS_STRING(base), nb, p, npost, tag_bytes,
                        <unsigned char*>PyBytes_AS_STRING_RW(out))
        return out

    cdef Py_ssize_t _sign_into(self, Sha* s, const unsigned char* head, Py_ssize_t nh,
                               const unsigned char* fields, Py_ssize_t nf,
                               const unsigned char* pre, Py_ssize_t npre,
                               const unsigned char* url, Py_ssize_t nu,
                               const unsigned char* base, Py_ssize_t nb,
                               const unsigned char* post, Py_ssize_t npost, int tag_bytes,
                               unsigned char* o) except -1:
        """Write pre + base + base64url(head + fields + url + tag) + post at o; its length.

        `s` is the HMAC inner state after head + fields (it is updated with url).
        """
        cdef unsigned char tag[32]
        cdef unsigned char stack[2048]
        cdef unsigned char* b = stack
        cdef Py_ssize_t total = nh + nf + nu + tag_bytes, enc = (total * 4 + 2) // 3
        _update(s, url, nu)
        self._tag(s, tag)
        if total > 2048:
            b = <unsigned char*>PyMem_Malloc(total)
            if b == NULL:
                raise MemoryError()
        if nh:
            memcpy(b, head, nh)
        memcpy(b + nh, fields, nf)
        memcpy(b + nh + nf, url, nu)
        memcpy(b + nh + nf + nu, tag, tag_bytes)
        if npre:
            memcpy(o, pre, npre)
        memcpy(o + npre, base, nb)
        _b64url(b, total, o + npre + nb)
        if npost:
            memcpy(o + npre + nb + enc, post, npost)
        if b != stack:
            PyMem_Free(b)
        return npre + nb + enc + npost

    cdef void _prefix_state(self, Sha* s, unsigned char* head, int kind, int flags,
                            bytes fields, unsigned char version=1) noexcept:
        """s = the inner state after bytes((version, kind, flags)) + fields; head = those
        3 bytes (version 2: the target is the URL, NUL, the link's user-defined id)."""
        head[0] = version
        head[1] = <unsigned char>kind
        head[2] = <unsigned char>flags
        s[0] = self.inner
        _update(s, head, 3)
        _update(s, <const unsigned char*>PyBytes_AS_STRING(fields), PyBytes_GET_SIZE(fields))

    def link(self, bytes base, int kind, int flags, bytes fields, bytes url=b""):
        """base + DATA, DATA being base64url(payload + HMAC(payload)[:10]) for the payload
        bytes((1, kind, flags)) + fields + url: a tracking URL (or, with base b"", the DATA
        of X-Mailer-Info) as greenarrow.lib.simplemh.tracking_url.encode() makes it."""
        cdef Sha s
        cdef unsigned char head[3]
        if not 0 <= kind <= 255 or not 0 <= flags <= 255:
            raise ValueError("kind and flags are bytes")
        self._prefix_state(&s, head, kind, flags, fields)
        return self._sign(&s, head, 3, <const unsigned char*>PyBytes_AS_STRING(fields),
                          PyBytes_GET_SIZE(fields), NULL, 0, url, base, None, 10)

    def links(self, bytes kinds, list targets, bytes fields, int flags, tuple bases,
              bytes pixel_open, bytes pixel_close):
        """The bytes that replace each slot of a part, for one recipient: replacements()
        with the payload prefix of kind k being bytes((1, k, flags)) + fields.

        kinds[i] (one byte per slot): b"c" -> bases[0] + DATA(c, targets[i]);
        b"i" -> bases[0] + version-2 DATA(c, targets[i]) (a click whose target is
        the URL, NUL, its link id); b"u" -> bases[1] + DATA(u, targets[i]); b"p" -> pixel_open + bases[2] +
        DATA(o, b"") + pixel_close; b"s" -> targets[i] as it is; anything else
        -> b"" (a slot removed). The state after each kind's prefix is computed
        once per call.
        """
        data, offsets = self.links_packed(kinds, targets, fields, flags, bases,
                                          pixel_open, pixel_close)
        cdef const Py_ssize_t* off = <const Py_ssize_t*>PyBytes_AS_STRING(offsets)
        return [data[off[i]:off[i + 1]] for i in range(PyBytes_GET_SIZE(kinds))]

    def links_packed(self, bytes kinds, list targets, bytes fields, int flags, tuple bases,
                     bytes pixel_open, bytes pixel_close):
        """links() in one buffer: (data, offsets), slot i's replacement being
        data[off[i]:off[i + 1]], `off` the n + 1 native Py_ssize_t packed in `offsets`.

        One allocation for every slot of a part, for callers in C
        (greenarrow.pyx.simplemh) that copy the replacements on at once.
        """
        cdef Py_ssize_t i, n = PyBytes_GET_SIZE(kinds), total = 0, w = 0, nt
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(kinds)
        cdef const unsigned char* f = <const unsigned char*>PyBytes_AS_STRING(fields)
        cdef Py_ssize_t nf = PyBytes_GET_SIZE(fields)
        cdef Sha states[4]
        cdef Sha s
        cdef unsigned char heads[12]
        cdef bint have[4]
        cdef int which
        cdef bytes target, base
        cdef Py_ssize_t* off
        cdef unsigned char* o
        if len(targets) != n or len(bases) != 3:
            raise ValueError("one target per kind, and three bases")
        if not 0 <= flags <= 255:
            raise ValueError("flags is a byte")
        for i in range(3):
            if type(bases[i]) is not bytes:
                raise TypeError("bases are bytes")
        for i in range(n):  # the sizes first: one allocation
            target = <bytes?>targets[i]
            nt = PyBytes_GET_SIZE(target)
            if k[i] == 99 or k[i] == 117 or k[i] == 105:  # c u i
                total += (PyBytes_GET_SIZE(<bytes>bases[1 if k[i] == 117 else 0])
                          + ((3 + nf + nt + 10) * 4 + 2) // 3)
            elif k[i] == 112:  # p
                total += (PyBytes_GET_SIZE(pixel_open) + PyBytes_GET_SIZE(<bytes>bases[2])
                          + ((3 + nf + 10) * 4 + 2) // 3 + PyBytes_GET_SIZE(pixel_close))
            elif k[i] == 115:  # s
                total += nt
        data = PyBytes_FromStringAndSize(NULL, total)
        offsets = PyBytes_FromStringAndSize(NULL, (n + 1) * sizeof(Py_ssize_t))
        o = <unsigned char*>PyBytes_AS_STRING_RW(data)
        off = <Py_ssize_t*>PyBytes_AS_STRING_RW(offsets)
        have[0] = have[1] = have[2] = have[3] = False
        for i in range(n):
            off[i] = w
            target = <bytes>targets[i]
            if k[i] == 99 or k[i] == 117 or k[i] == 112 or k[i] == 105:  # c u p i
                which = 0 if k[i] == 99 else (1 if k[i] == 117 else (2 if k[i] == 112 else 3))
                if not have[which]:
                    if which == 3:
                        self._prefix_state(&states[3], heads + 9, 99, flags, fields, 2)
                    else:
                        self._prefix_state(&states[which], heads + 3 * which,
                                           111 if which == 2 else k[i], flags, fields)
                    have[which] = True
                s = states[which]
                base = <bytes>bases[0 if which == 3 else which]
                if which == 2:
                    w += self._sign_into(
                        &s, heads + 6, 3, f, nf,
                        <const unsigned char*>PyBytes_AS_STRING(pixel_open),
                        PyBytes_GET_SIZE(pixel_open), NULL, 0,
                        <const unsigned char*>PyBytes_AS_STRING(base), PyBytes_GET_SIZE(base),
                        <const unsigned char*>PyBytes_AS_STRING(pixel_close),
                        PyBytes_GET_SIZE(pixel_close), 10, o + w)
                else:
                    w += self._sign_into(
                        &s, heads + 3 * which, 3, f, nf, NULL, 0,
                        <const unsigned char*>PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target),
                        <const unsigned char*>PyBytes_AS_STRING(base), PyBytes_GET_SIZE(base),
                        NULL, 0, 10, o + w)
            elif k[i] == 115:  # s
                memcpy(o + w, PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target))
                w += PyBytes_GET_SIZE(target)
        off[n] = w
        return data, offsets

    def data(self, bytes prefix, bytes url, int tag_bytes=10):
        """base64url(prefix + url + HMAC(prefix + url)[:tag_bytes]), without padding."""
        if tag_bytes < 0 or tag_bytes > 32:
            raise ValueError("tag_bytes must be 0 to 32")
        return self._data(b"", prefix, url, tag_bytes)

    def url(self, bytes base, bytes prefix, bytes url, int tag_bytes=10):
        """base + data(prefix, url, tag_bytes)."""
        if tag_bytes < 0 or tag_bytes > 32:
            raise ValueError("tag_bytes must be 0 to 32")
        return self._data(base, prefix, url, tag_bytes)

    def replacements(self, list kinds, list targets, dict prefixes, dict bases,
                     bytes pixel_open, bytes pixel_close):
        """The bytes that replace each slot of a part, for one recipient.

        kinds[i]: "c" or "u" -> bases[kind] + data(prefixes[kind], targets[i]);
        "i" -> bases["c"] + data(prefixes["i"], targets[i]) (a click with a link id);
        "p" -> pixel_open + bases["o"] + data(prefixes["o"], b"") + pixel_close;
        "s" -> targets[i] as it is; anything else -> b"" (a slot removed).
        """
        cdef list out = []
        cdef Py_ssize_t i, n = len(kinds)
        cdef object k
        for i in range(n):
            k = kinds[i]
            if k == "c" or k == "u":
                out.append(self._data(bases[k], prefixes[k], targets[i], 10))
            elif k == "i":
                out.append(self._data(bases["c"], prefixes["i"], targets[i], 10))
            elif k == "p":
                out.append(pixel_open + self._data(bases["o"], prefixes["o"], b"", 10)
                           + pixel_close)
            elif k == "s":
                out.append(targets[i])
            else:
                out.append(b"")
        return out
