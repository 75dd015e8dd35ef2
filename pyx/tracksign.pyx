# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""HMAC-SHA256 signing of tracking DATA in C, for the many links of a SimpleMH message.

A message with 40 links needs 40 signatures per recipient. Through
Python's `hmac.digest` each costs a call, a fresh HMAC context (two extra
SHA-256 blocks for the key) and a base64 step in Python; here the key's
inner and outer states are computed once per Signer, the state after the
part of the payload common to a message's links (version, kind, flags,
recipient, identifiers) is kept, and each link costs only the SHA-256
blocks of its URL, the outer block and a base64url encoding, all in C.

The result is byte for byte what greenarrow.lib.tracking_url.encode() makes
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

cdef uint32_t K[64]
_K = (
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
)
for _i in range(64):
    K[_i] = _K[_i]

cdef const char* B64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


ctypedef struct Sha:
    uint32_t h[8]
    uint64_t length
    unsigned char buf[64]
    Py_ssize_t buflen


cdef extern from *:
    """
    #include <stdint.h>
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    #include <cpuid.h>
    #include <immintrin.h>

    static const uint32_t GA_K256[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

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
    void ga_sha256_shani(uint32_t* state, const unsigned char* data) noexcept nogil
    int ga_cpu_has_shani() noexcept nogil


cdef bint _use_shani = ga_cpu_has_shani()


def sha_extensions(enabled=None):
    """Whether the x86 SHA extensions are used (for tests: False forces the portable C code).

    With an argument, turn them on (only if the CPU has them) or off; returns the setting.
    """
    global _use_shani
    if enabled is not None:
        _use_shani = bool(enabled) and bool(ga_cpu_has_shani())
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
        t1 = hh + s1 + ((e & f) ^ ((~e) & g)) + K[i] + w[i]
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


cdef Py_ssize_t _b64url(const unsigned char* src, Py_ssize_t n, unsigned char* out) noexcept nogil:
    cdef Py_ssize_t i = 0, w = 0
    cdef uint32_t v
    while i + 3 <= n:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8) | src[i + 2]
        out[w] = B64URL[(v >> 18) & 63]
        out[w + 1] = B64URL[(v >> 12) & 63]
        out[w + 2] = B64URL[(v >> 6) & 63]
        out[w + 3] = B64URL[v & 63]
        w += 4
        i += 3
    if n - i == 1:
        v = <uint32_t>src[i] << 16
        out[w] = B64URL[(v >> 18) & 63]
        out[w + 1] = B64URL[(v >> 12) & 63]
        w += 2
    elif n - i == 2:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8)
        out[w] = B64URL[(v >> 18) & 63]
        out[w + 1] = B64URL[(v >> 12) & 63]
        out[w + 2] = B64URL[(v >> 6) & 63]
        w += 3
    return w


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
        cdef unsigned char tag[32]
        cdef unsigned char stack[2048]
        cdef unsigned char* b = stack
        cdef Py_ssize_t nb = PyBytes_GET_SIZE(base), np = PyBytes_GET_SIZE(prefix)
        cdef Py_ssize_t nu = PyBytes_GET_SIZE(url), total, enc
        _update(&s, <const unsigned char*>PyBytes_AS_STRING(url), nu)
        self._tag(&s, tag)
        total = np + nu + tag_bytes
        if total > 2048:
            b = <unsigned char*>PyMem_Malloc(total)
            if b == NULL:
                raise MemoryError()
        memcpy(b, PyBytes_AS_STRING(prefix), np)
        memcpy(b + np, PyBytes_AS_STRING(url), nu)
        memcpy(b + np + nu, tag, tag_bytes)
        enc = (total * 4 + 2) // 3
        out = PyBytes_FromStringAndSize(NULL, nb + enc)
        cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING_RW(out)
        memcpy(o, PyBytes_AS_STRING(base), nb)
        _b64url(b, total, o + nb)
        if b != stack:
            PyMem_Free(b)
        return out

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
            elif k == "p":
                out.append(pixel_open + self._data(bases["o"], prefixes["o"], b"", 10)
                           + pixel_close)
            elif k == "s":
                out.append(targets[i])
            else:
                out.append(b"")
        return out
