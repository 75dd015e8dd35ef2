# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""SimpleMH byte-level hot paths: header scanning, MIME transfer encodings, link finding.

Everything here works on `bytes` and returns offsets into them, so the
caller (greenarrow.lib.simplemh.processing) can rebuild a message from slices of the
original: every byte it does not rewrite stays exactly as it was. Nothing
here builds an `email.message` tree, decodes text to `str` or imports a
Python module at call time; that is what makes SimpleMH processing cheap
enough to run once per injected message (docs/ARCHITECTURE.md section 8).

Python-level API (all offsets are absolute indexes into the bytes given):

- split_headers(msg, start=0, end=-1) -> (fields, body_start)
      fields: list of (lower-cased name, start, end, colon offset); the same
      rules as greenarrow.lib.core.message.split_headers, bounded to [start, end).
- header_value(msg, colon, end) -> bytes      unfolded, stripped value
- content_type(value) -> (mime type lower-cased, {param name lower: value})
- find_delimiters(msg, start, end, boundary) -> list of (line start,
      offset after the line's CRLF, is closing delimiter)
- qp_decode(data) -> (decoded, line table)   exactly binascii.a2b_qp's
      result, plus the physical lines (packed; line_table() unpacks them
      into (enc_start, enc_end, dec_start, dec_end, how it ends) tuples)
- qp_encode(data) -> bytes                   RFC 2045 quoted-printable,
      CRLF line breaks, soft breaks so no line exceeds 76 octets
- qp_encode_line(line, hard_break=False) -> bytes   one hard line: its
      bytes are data (CR and LF encoded), then CRLF if hard_break
- qp_render(raw, decoded, lines, slots, reps) -> bytes
      re-encodes only the physical lines that hold a slot; the other lines
      are copied from `raw` byte for byte
- splice(data, slots, reps) -> bytes          replace slot spans
- max_line_length(data) -> int                longest line, without its CRLF
- find_html_links(html) -> (hrefs, body_close, opentags)
      hrefs: (value start, value end) of each href attribute of <a>/<area>;
      body_close: offset of the last "</body" (or -1); opentags: (start,
      end) spans of <opentag/> elements
- find_text_links(text) -> list of (start, end, url start)
      http(s) URLs in plain text, with a `##unsubscribetag##` prefix
      included in the span when present (then url start > start)
- unescape_entities(value) -> bytes           the character references
      that stand for ASCII (&amp; &#38; &#x26; &quot; ...) decoded
- html_link_slots(html, track, has_base, own), text_link_slots(...)
      -> (spans, kinds, targets): what a part's copies rewrite
- base64_lines(data) -> bytes                 base64 in 76-character lines
- plan_body(msg, fields, body_start, track, track_text, base, pixel_open,
      pixel_close) -> BodyPlan: the MIME walk, decoding and link finding of
      a message, once; BodyPlan.render(signer, fields, flags, bases, head,
      head_qp, added, sep) -> bytes makes one recipient's copy in one call
      (the tracking URLs signed by greenarrow.pyx.tracksign, re-encoding,
      and the copy assembled in one allocation). BodyPlan.parts and .top
      are the Parts it rewrites (read-only attributes, for tests).
- file_key(path) -> bytes, files_key(paths) -> bytes
      "mtime_ns size inode" of control files, from stat(2) without an
      os.stat_result (what the per-message configuration checks compare)

Where a search usually ends within a few dozen bytes (HTML tags, header
lines) it is inlined SSE2 rather than a libc call; quoted-printable copies
runs of plain bytes 16 at a time. Each has a portable fallback.
"""

import binascii
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport int64_t
from libc.errno cimport errno
from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy, strerror
from posix.stat cimport stat, struct_stat

cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* memchr() inlined: most searches here end within a few dozen bytes, where a
       call to the library's memchr costs more than the search. */
    static inline const void *ga_memchr(const void *p, int c, size_t n) {
        const unsigned char *s = (const unsigned char *)p;
        size_t i = 0;
    #if defined(__SSE2__)
        const __m128i needle = _mm_set1_epi8((char)c);
        while (i + 16 <= n) {
            int m = _mm_movemask_epi8(_mm_cmpeq_epi8(
                _mm_loadu_si128((const __m128i *)(s + i)), needle));
            if (m)
                return s + i + __builtin_ctz((unsigned)m);
            i += 16;
        }
    #endif
        for (; i < n; i++)
            if (s[i] == (unsigned char)c)
                return s + i;
        return NULL;
    }
    """
    const void* memchr "ga_memchr"(const void* p, int c, size_t n) noexcept nogil


cdef extern from "Python.h":
    char* PyBytes_AS_STRING_RW "PyBytes_AS_STRING"(object)
    PyObject* _bytes_alloc "PyBytes_FromStringAndSize"(const char* v, Py_ssize_t n) except NULL
    int _PyBytes_Resize(PyObject** b, Py_ssize_t n) except -1
    char* _bytes_ptr "PyBytes_AS_STRING"(PyObject* b)
    void _bytes_release "Py_DECREF"(PyObject* b)


cdef object _finish(PyObject* buf, Py_ssize_t w):
    """The new bytes object `buf` (from _bytes_alloc, not shared) cut to w bytes in place:
    no copy, unlike a slice."""
    _PyBytes_Resize(&buf, w)
    out = <object>buf
    _bytes_release(buf)  # `out` holds the reference _bytes_alloc made
    return out


cdef inline unsigned char _low(unsigned char c) noexcept nogil:
    if 65 <= c <= 90:
        return c + 32
    return c


cdef inline bint _is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 12 or c == 11


cdef inline int _hexval(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


cdef signed char _HEXV[256]  # the value of a hex digit (either case), else -1
for _c in range(256):
    _HEXV[_c] = (_c - 48 if 48 <= _c <= 57 else _c - 55 if 65 <= _c <= 70
                 else _c - 87 if 97 <= _c <= 102 else -1)


cdef inline bint _alnum(unsigned char c) noexcept nogil:
    return (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)


cdef inline Py_ssize_t _find_crlf(const unsigned char* s, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Offset of the next CRLF in [pos, end) or -1."""
    cdef const unsigned char* p
    while pos < end - 1:
        p = <const unsigned char*>memchr(s + pos, 13, end - 1 - pos)
        if p == NULL:
            return -1
        pos = p - s
        if s[pos + 1] == 10:
            return pos
        pos += 1
    return -1


cdef inline bint _ci_match(const unsigned char* s, Py_ssize_t n, Py_ssize_t pos, const char* lit, Py_ssize_t m) noexcept nogil:
    """Whether s[pos:pos+m] equals the lower-case literal `lit`, ignoring ASCII case."""
    cdef Py_ssize_t k
    if pos + m > n:
        return False
    for k in range(m):
        if _low(s[pos + k]) != <unsigned char>lit[k]:
            return False
    return True


cdef Py_ssize_t _ci_find(const unsigned char* s, Py_ssize_t n, Py_ssize_t pos, const char* lit, Py_ssize_t m) noexcept nogil:
    """Offset of the lower-case literal `lit` in s[pos:n] ignoring case, or -1."""
    cdef unsigned char first = <unsigned char>lit[0]
    cdef unsigned char upper = first - 32 if 97 <= first <= 122 else first
    cdef Py_ssize_t i = pos
    cdef unsigned char c
    while i + m <= n:
        c = s[i]
        if (c == first or c == upper) and _ci_match(s, n, i, lit, m):
            return i
        i += 1
    return -1


# --------------------------------------------------------------------------- headers


def split_headers(bytes msg, Py_ssize_t start=0, Py_ssize_t end=-1):
    """The header fields of msg[start:end] (CRLF lines) and where its body starts.

    Same rules as greenarrow.lib.core.message.split_headers: the block ends at the
    first empty line (the body starts after it) or at the first line that is
    neither a field nor a continuation (the body starts at that line).
    Returns ([(lower-cased name, start, end, colon), ...], body start).
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(msg)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(msg) if end < 0 else min(end, PyBytes_GET_SIZE(msg))
    cdef Py_ssize_t pos = start, eol, colon, k, name_end, line_end
    cdef const unsigned char* p
    cdef list headers = []
    cdef unsigned char first
    cdef bint bad
    cdef unsigned char* low
    while pos < n:
        eol = _find_crlf(s, pos, n)
        if eol < 0:
            eol = n
        if eol == pos:
            return headers, eol + 2
        line_end = eol + 2 if eol + 2 < n else n
        first = s[pos]
        if (first == 32 or first == 9) and headers:
            k = len(headers) - 1
            h = headers[k]
            headers[k] = (h[0], h[1], line_end, h[3])
            pos = eol + 2
            continue
        p = <const unsigned char*>memchr(s + pos, 58, eol - pos)
        if p == NULL:
            return headers, pos
        colon = p - s
        if colon <= pos:
            return headers, pos
        name_end = colon
        while name_end > pos and (s[name_end - 1] == 32 or s[name_end - 1] == 9):
            name_end -= 1
        bad = False
        for k in range(pos, name_end):
            if s[k] == 32 or s[k] == 9:
                bad = True
                break
        if bad:
            return headers, pos
        name = PyBytes_FromStringAndSize(NULL, name_end - pos)
        low = <unsigned char*>PyBytes_AS_STRING_RW(name)
        for k in range(pos, name_end):
            low[k - pos] = _low(s[k])
        headers.append((name, pos, line_end, colon))
        pos = eol + 2
    return headers, n


def header_value(bytes msg, Py_ssize_t colon, Py_ssize_t end):
    """The value of a field: after its colon, CRLFs of folding removed, stripped."""
    return msg[colon + 1:end].replace(b"\r\n", b"").strip()


cdef Py_ssize_t _part_headers(const unsigned char* s, Py_ssize_t pos, Py_ssize_t n,
                              Py_ssize_t* f) noexcept nogil:
    """split_headers(msg, pos, n) without building it: returns its body start, and puts in
    f the first Content-Type, Content-Disposition and Content-Transfer-Encoding fields
    (f[2k] the colon, f[2k + 1] the end, -1 when there is none)."""
    cdef Py_ssize_t eol, colon, name_end, k, line_end, m
    cdef int cur = -1  # the field continuation lines extend (0 to 2), or -1
    cdef bint fields = False
    cdef const unsigned char* p
    for k in range(6):
        f[k] = -1
    while pos < n:
        eol = _find_crlf(s, pos, n)
        if eol < 0:
            eol = n
        if eol == pos:
            return eol + 2
        line_end = eol + 2 if eol + 2 < n else n
        if (s[pos] == 32 or s[pos] == 9) and fields:
            if cur >= 0:
                f[2 * cur + 1] = line_end
            pos = eol + 2
            continue
        p = <const unsigned char*>memchr(s + pos, 58, eol - pos)
        if p == NULL:
            return pos
        colon = p - s
        if colon <= pos:
            return pos
        name_end = colon
        while name_end > pos and (s[name_end - 1] == 32 or s[name_end - 1] == 9):
            name_end -= 1
        for k in range(pos, name_end):
            if s[k] == 32 or s[k] == 9:
                return pos
        fields = True
        cur = -1
        m = name_end - pos
        if m == 12 and _ci_match(s, n, pos, b"content-type", 12):
            k = 0
        elif m == 19 and _ci_match(s, n, pos, b"content-disposition", 19):
            k = 1
        elif m == 25 and _ci_match(s, n, pos, b"content-transfer-encoding", 25):
            k = 2
        else:
            k = -1
        if k >= 0 and f[2 * k] < 0:
            f[2 * k] = colon
            f[2 * k + 1] = line_end
            cur = <int>k
        pos = eol + 2
    return n


cdef bytes _field_value(bytes msg, Py_ssize_t colon, Py_ssize_t end):
    """header_value(), or None for a field that is not there (colon -1)."""
    if colon < 0:
        return None
    return msg[colon + 1:end].replace(b"\r\n", b"").strip()


def content_type(bytes value):
    """Parse a Content-Type (or Content-Disposition) value.

    Returns (the type lower-cased, e.g. b"text/html", with no parameters;
    {parameter name lower-cased: value with quotes and backslash escapes
    removed}). Forgiving of broken mail: a parameter without `=` is skipped,
    an unterminated quoted string runs to the end.
    """
    cdef dict params = {}
    return _content_type(value, params), params


cdef bytes _content_type(bytes value, dict params):
    """content_type(): the type, and the parameters put in `params` (None: the type only)."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t i = 0, j, k
    cdef bytearray buf
    # the type
    while i < n and s[i] != 59:  # ';'
        i += 1
    mtype = value[:i].strip().lower()
    if params is None:
        return mtype
    while i < n:
        i += 1  # past ';'
        while i < n and _is_ws(s[i]):
            i += 1
        j = i
        while i < n and s[i] != 61 and s[i] != 59:  # '=' ';'
            i += 1
        if i >= n or s[i] == 59:
            continue
        pname = value[j:i].strip().lower()
        i += 1
        while i < n and _is_ws(s[i]):
            i += 1
        if i < n and s[i] == 34:  # '"'
            buf = bytearray()
            i += 1
            while i < n and s[i] != 34:
                if s[i] == 92 and i + 1 < n:  # backslash
                    i += 1
                buf.append(s[i])
                i += 1
            pvalue = bytes(buf)
            while i < n and s[i] != 59:
                i += 1
        else:
            j = i
            while i < n and s[i] != 59:
                i += 1
            pvalue = value[j:i].strip()
        if pname and pname not in params:
            params[pname] = pvalue
    return mtype


def find_delimiters(bytes msg, Py_ssize_t start, Py_ssize_t end, bytes boundary):
    """The delimiter lines of a multipart body msg[start:end].

    A delimiter line starts a line (at `start` or after a CRLF) with
    `--boundary`, optionally followed by `--` (the closing delimiter), then
    only spaces or tabs up to its CRLF. Returns [(line start, offset after
    its CRLF (or end), closing?)]; scanning stops at the closing delimiter.
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(msg)
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(boundary)
    cdef Py_ssize_t n = min(end, PyBytes_GET_SIZE(msg))
    cdef Py_ssize_t m = PyBytes_GET_SIZE(boundary)
    cdef Py_ssize_t pos = start, k, q, eol, stop, x
    cdef bint closing, ok
    cdef list out = []
    if m == 0:
        return out
    # A line starts at `start` or after a CRLF at or after it; a delimiter line starts with
    # "-", so only the lines found by ga_find_lf_dash need a look.
    while pos < n:
        # pos is the start of a line
        ok = pos + 2 + m <= n and s[pos] == 45 and s[pos + 1] == 45
        if ok:
            for k in range(m):
                if s[pos + 2 + k] != b[k]:
                    ok = False
                    break
        if ok:
            eol = _find_crlf(s, pos, n)
            q = pos + 2 + m
            closing = q + 1 < n and s[q] == 45 and s[q + 1] == 45
            if closing:
                q += 2
            stop = eol if eol >= 0 else n
            while q < stop and (s[q] == 32 or s[q] == 9):
                q += 1
            if q == stop:
                out.append((pos, eol + 2 if eol >= 0 else n, closing))
                if closing:
                    return out
        # the next line that starts with "-"
        x = pos if pos > start else start + 1
        while True:
            x = ga_find_lf_dash(s, x, n)
            if x < 0 or s[x - 1] == 13:
                break
            x += 1
        if x < 0:
            break
        pos = x + 1
    return out


cdef extern from *:
    """
    /* The first x >= from with s[x] == LF and s[x + 1] == '-' (x + 1 < n), or -1. */
    static Py_ssize_t ga_find_lf_dash(const unsigned char *s, Py_ssize_t from, Py_ssize_t n) {
        Py_ssize_t i = from;
    #if defined(__SSE2__)
        const __m128i lf = _mm_set1_epi8(10), dash = _mm_set1_epi8(45);
        while (i + 17 <= n) {
            __m128i a = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i)), lf);
            __m128i b = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(s + i + 1)), dash);
            int m = _mm_movemask_epi8(_mm_and_si128(a, b));
            if (m)
                return i + __builtin_ctz((unsigned)m);
            i += 16;
        }
    #endif
        for (; i + 1 < n; i++)
            if (s[i] == 10 && s[i + 1] == 45)
                return i;
        return -1;
    }
    """
    Py_ssize_t ga_find_lf_dash(const unsigned char* s, Py_ssize_t start, Py_ssize_t n) noexcept nogil


# --------------------------------------------------------------------------- quoted-printable


ctypedef struct _Table:
    int64_t* v
    Py_ssize_t n
    Py_ssize_t cap


cdef inline void _table_add(_Table* t, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) noexcept:
    """Append one line (five integers); on failure to grow, n becomes -1."""
    cdef int64_t* grown
    if t.n < 0:
        return
    if t.n + 5 > t.cap:
        t.cap = t.cap * 2 + 80
        grown = <int64_t*>PyMem_Realloc(t.v, t.cap * sizeof(int64_t))
        if grown == NULL:
            t.n = -1
            return
        t.v = grown
    t.v[t.n] = a
    t.v[t.n + 1] = b
    t.v[t.n + 2] = c
    t.v[t.n + 3] = d
    t.v[t.n + 4] = e
    t.n += 5


ctypedef struct _Vec:
    Py_ssize_t* v  # records of three values
    Py_ssize_t n  # values used
    Py_ssize_t cap


cdef int _push(_Vec* t, Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) except -1:
    """Append the record (a, b, c)."""
    cdef Py_ssize_t* grown
    if t.n + 3 > t.cap:
        grown = <Py_ssize_t*>PyMem_Realloc(t.v, (t.cap * 2 + 48) * sizeof(Py_ssize_t))
        if grown == NULL:
            raise MemoryError()
        t.v = grown
        t.cap = t.cap * 2 + 48
    t.v[t.n] = a
    t.v[t.n + 1] = b
    t.v[t.n + 2] = c
    t.n += 3
    return 0


cdef extern from *:
    """
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* How many of the first `limit` bytes of s are printable ASCII (32 to 126) other than
       '=': bytes quoted-printable writes as themselves. May read s[0:n] (n >= limit). */
    static Py_ssize_t ga_qp_literal_run(const unsigned char *s, Py_ssize_t limit, Py_ssize_t n) {
        Py_ssize_t i = 0;
    #if defined(__SSE2__)
        const __m128i lo = _mm_set1_epi8(31), hi = _mm_set1_epi8(127), eq = _mm_set1_epi8(61);
        while (i < limit && i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i ok = _mm_and_si128(_mm_cmpgt_epi8(v, lo), _mm_cmplt_epi8(v, hi));
            int m = _mm_movemask_epi8(_mm_andnot_si128(_mm_cmpeq_epi8(v, eq), ok));
            if (m != 0xFFFF) {
                i += __builtin_ctz(~(unsigned)m);
                return i < limit ? i : limit;
            }
            i += 16;
        }
        if (i >= limit)
            return limit;
    #endif
        while (i < limit && s[i] >= 32 && s[i] <= 126 && s[i] != 61)
            i++;
        return i;
    }
    """
    Py_ssize_t ga_qp_literal_run(const unsigned char* s, Py_ssize_t limit, Py_ssize_t n) noexcept nogil


cdef extern from *:
    """
    /* Copy s[0:n] to o up to the first '=' or LF; how many bytes were copied. o has room
       for n bytes (it may be written past the count, within those n). */
    static Py_ssize_t ga_qp_plain_run(const unsigned char *s, Py_ssize_t n, unsigned char *o) {
        Py_ssize_t i = 0;
    #if defined(__SSE2__)
        const __m128i eq = _mm_set1_epi8(61), lf = _mm_set1_epi8(10);
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
            int m = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, eq), _mm_cmpeq_epi8(v, lf)));
            _mm_storeu_si128((__m128i *)(o + i), v);
            if (m)
                return i + __builtin_ctz((unsigned)m);
            i += 16;
        }
    #endif
        while (i < n && s[i] != 61 && s[i] != 10) {
            o[i] = s[i];
            i++;
        }
        return i;
    }
    """
    Py_ssize_t ga_qp_plain_run(const unsigned char* s, Py_ssize_t n, unsigned char* o) noexcept nogil



def qp_decode(bytes data):
    """Decode quoted-printable exactly as binascii.a2b_qp (the email package's decoder) does.

    Returns (decoded bytes, line table). The line table (bytes: packed
    64-bit integers; line_table() unpacks it) holds five integers per
    physical line of `data` (each line ends after an LF,
    or at the end): its span in `data`, its span in the decoded bytes, and
    how it ends: 1 or 2 for a hard line break (that many octets, LF or
    CRLF, decoded as themselves), 0 for a soft line break, -1 for the end
    of the data. Lines decode independently, so a caller can re-encode
    only the lines it changes and copy the others.
    """
    return _qp_decode(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


cdef tuple _qp_decode(const unsigned char* s, Py_ssize_t n):
    """qp_decode() of s[0:n]."""
    cdef PyObject* buf = _bytes_alloc(NULL, n)
    cdef unsigned char* o = <unsigned char*>_bytes_ptr(buf)
    cdef Py_ssize_t i = 0, w = 0, enc_start = 0, dec_start = 0
    cdef unsigned char c
    cdef signed char hi, lo
    cdef _Table lines
    lines.n = 0
    lines.cap = 0
    lines.v = NULL
    cdef Py_ssize_t run
    while i < n:
        run = ga_qp_plain_run(s + i, n - i, o + w)  # the bytes up to the next '=' or LF
        w += run
        i += run
        if i >= n:
            break
        c = s[i]
        if c == 61:  # '='
            if i + 2 < n:  # =XX, the common case, first (a hex digit is none of the others)
                hi = _HEXV[s[i + 1]]
                lo = _HEXV[s[i + 2]]
                if (hi | lo) >= 0:
                    o[w] = <unsigned char>((hi << 4) | lo)
                    w += 1
                    i += 3
                    continue
            i += 1
            if i >= n:
                break
            c = s[i]
            if c == 10 or c == 13:  # soft line break
                if c != 10:
                    while i < n and s[i] != 10:
                        i += 1
                if i < n:
                    i += 1
                    _table_add(&lines, enc_start, i, dec_start, w, 0)
                    enc_start = i
                    dec_start = w
            elif c == 61:
                o[w] = 61
                w += 1
                i += 1
            else:
                o[w] = 61
                w += 1
        else:  # LF: a hard line break
            o[w] = c
            w += 1
            i += 1
            _table_add(&lines, enc_start, i, dec_start, w,
                       2 if i >= 2 and s[i - 2] == 13 and w >= 2 and o[w - 2] == 13 else 1)
            enc_start = i
            dec_start = w
    if enc_start < n or dec_start < w:
        _table_add(&lines, enc_start, n, dec_start, w, -1)
    if lines.n < 0:
        PyMem_Free(lines.v)
        _bytes_release(buf)
        raise MemoryError()
    try:
        decoded = _finish(buf, w)
        table = PyBytes_FromStringAndSize(<char*>lines.v, lines.n * sizeof(int64_t))
    finally:
        PyMem_Free(lines.v)
    return decoded, table


def line_table(bytes table):
    """qp_decode's line table as a list of (enc_start, enc_end, dec_start, dec_end, end) tuples."""
    cdef const int64_t* v = <const int64_t*>PyBytes_AS_STRING(table)
    cdef Py_ssize_t k, n = PyBytes_GET_SIZE(table) // sizeof(int64_t)
    return [(v[k], v[k + 1], v[k + 2], v[k + 3], v[k + 4]) for k in range(0, n - 4, 5)]


cdef inline Py_ssize_t _soft_break(unsigned char* o, Py_ssize_t w) noexcept nogil:
    """Write a quoted-printable soft line break ("=" CRLF) at o[w]; the new write position."""
    o[w] = 61
    o[w + 1] = 13
    o[w + 2] = 10
    return w + 3


cdef inline void _put_hex(unsigned char* o, Py_ssize_t* w, unsigned char c) noexcept nogil:
    cdef const char* digits = b"0123456789ABCDEF"
    o[w[0]] = 61
    o[w[0] + 1] = digits[c >> 4]
    o[w[0] + 2] = digits[c & 15]
    w[0] += 3


cdef inline Py_ssize_t _qp_bound(Py_ssize_t n) noexcept nogil:
    # worst case: every byte =XX plus a soft break every 25 bytes, plus a CRLF
    return n * 3 + (n // 24 + 2) * 3 + 2


def qp_encode(bytes data):
    """Quoted-printable per RFC 2045 section 6.7, for text.

    A line ending in `data` (CRLF or LF) is a hard line break, written as
    CRLF; a CR not followed by LF is encoded. Printable ASCII other than `=`
    is literal, and so are spaces and tabs except at the end of a line.
    Soft line breaks keep every encoded line within 76 octets, never
    splitting an =XX escape.
    """
    return _qp_encode(data)


cdef bytes _qp_encode(bytes data):
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef PyObject* buf = _bytes_alloc(NULL, _qp_bound(n))
    cdef unsigned char* o = <unsigned char*>_bytes_ptr(buf)
    cdef Py_ssize_t i = 0, w = 0, line_end, col
    cdef const unsigned char* p
    while i < n:
        p = <const unsigned char*>memchr(s + i, 10, n - i)
        if p == NULL:
            line_end = n
        else:
            line_end = p - s
            if line_end > i and s[line_end - 1] == 13:
                line_end -= 1
        col = 0
        w = _qp_piece(o, w, &col, s + i, line_end - i, True)
        if line_end < n:  # a line ending: CRLF or LF
            o[w] = 13
            o[w + 1] = 10
            w += 2
            i = line_end + (2 if s[line_end] == 13 else 1)
        else:
            i = n
    return _finish(buf, w)


def qp_encode_line(bytes line, bint hard_break=False):
    """One hard line as quoted-printable: every byte of `line` is data (a CR or
    LF in it is encoded), then CRLF when `hard_break`; soft breaks as needed."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef Py_ssize_t w
    cdef PyObject* buf = _bytes_alloc(NULL, _qp_bound(n))
    cdef unsigned char* o = <unsigned char*>_bytes_ptr(buf)
    cdef Py_ssize_t col = 0
    w = _qp_piece(o, 0, &col, s, n, True)
    if hard_break:
        o[w] = 13
        o[w + 1] = 10
        w += 2
    return _finish(buf, w)


# bytes written as themselves in quoted-printable (space and tab: except at a line's end)
cdef unsigned char _QP_LITERAL[256]
for _c in range(256):
    _QP_LITERAL[_c] = 1 if (33 <= _c <= 126 and _c != 61) or _c in (32, 9) else 0


cdef Py_ssize_t _qp_piece(unsigned char* o, Py_ssize_t w, Py_ssize_t* col,
                          const unsigned char* s, Py_ssize_t n, bint final) noexcept nogil:
    """Encode s[0:n] at o[w], continuing a line at column col[0]; `final`: it ends the line."""
    cdef Py_ssize_t i = 0, j, lim, c_col = col[0], stop = n - 1 if final else n
    cdef unsigned char c
    # every byte but a final one: room must be left for a soft break's "="
    while i < stop:
        c = s[i]
        if _QP_LITERAL[c]:
            if c_col >= 75:
                w = _soft_break(o, w)
                c_col = 0
            # the run of literal bytes that fits before column 75, copied at once
            lim = i + 75 - c_col
            if lim > stop:
                lim = stop
            j = i + 1 + ga_qp_literal_run(s + i + 1, lim - i - 1, stop - i - 1)
            while j < lim and _QP_LITERAL[s[j]]:  # a tab, say
                j += 1
            memcpy(o + w, s + i, j - i)
            w += j - i
            c_col += j - i
            i = j
        else:
            i += 1
            if c_col > 72:
                w = _soft_break(o, w)
                c_col = 0
            _put_hex(o, &w, c)
            c_col += 3
    if final and n:
        # the last byte of the line: may reach column 76; trailing space or tab encoded
        c = s[n - 1]
        if _QP_LITERAL[c] and c != 32 and c != 9:
            if c_col >= 76:
                w = _soft_break(o, w)
                c_col = 0
            o[w] = c
            w += 1
            c_col += 1
        else:
            if c_col > 73:
                w = _soft_break(o, w)
                c_col = 0
            _put_hex(o, &w, c)
            c_col += 3
    col[0] = c_col
    return w


cdef inline Py_ssize_t _content_end(const int64_t* lines, Py_ssize_t li) noexcept nogil:
    """Where a line's text ends in the decoded bytes (before a hard line break)."""
    cdef int64_t term = lines[5 * li + 4]
    return <Py_ssize_t>(lines[5 * li + 3] - (term if term > 0 else 0))


def qp_render(bytes raw, bytes decoded, bytes table, list slots, list reps):
    """Re-encode as quoted-printable only the physical lines that hold a slot; copy the others.

    `lines` is qp_decode's line table for `raw`; `slots` are sorted,
    non-overlapping (start, end) spans of `decoded` with no line break in
    them (they may cross soft line breaks); insertions at the very end of
    `decoded` are allowed. `reps` are their replacements, data to encode.
    The lines from the one where a slot starts to the one where it ends
    are encoded again (ending with the soft or hard break they had), so
    every other physical line of `raw` is kept byte for byte.
    """
    cdef Py_ssize_t i, n = len(slots)
    cdef _Reps rs
    if len(reps) != n:
        raise ValueError("one replacement per slot")
    _reps_of_list(&rs, reps)
    try:
        for i in range(n):
            rs.spans[2 * i] = slots[i][0]
            rs.spans[2 * i + 1] = slots[i][1]
        return _qp_render(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw),
                          decoded, table, rs.spans, n, rs.p, rs.n)
    finally:
        _reps_free(&rs)


ctypedef struct _Reps:
    const unsigned char** p  # replacement i is p[i][0:n[i]]
    Py_ssize_t* n
    Py_ssize_t* spans  # room for (start, end) pairs, for callers that need it


cdef int _reps_alloc(_Reps* rs, Py_ssize_t count) except -1:
    rs.p = <const unsigned char**>PyMem_Malloc((count + 1) * sizeof(char*))
    rs.n = <Py_ssize_t*>PyMem_Malloc((3 * count + 3) * sizeof(Py_ssize_t))
    rs.spans = rs.n + count + 1
    if rs.p == NULL or rs.n == NULL:
        _reps_free(rs)
        raise MemoryError()
    return 0


cdef void _reps_free(_Reps* rs) noexcept:
    PyMem_Free(rs.p)
    PyMem_Free(rs.n)
    rs.p = NULL
    rs.n = NULL


cdef int _reps_of_list(_Reps* rs, list reps) except -1:
    """Point at each bytes of `reps` (they must stay alive while rs is used)."""
    cdef Py_ssize_t i, count = len(reps)
    rs.p = NULL
    rs.n = NULL
    for i in range(count):
        if type(reps[i]) is not bytes:
            raise TypeError("replacements must be bytes")
    _reps_alloc(rs, count)
    for i in range(count):
        rs.p[i] = <const unsigned char*>PyBytes_AS_STRING(<bytes>reps[i])
        rs.n[i] = PyBytes_GET_SIZE(<bytes>reps[i])
    return 0


cdef int _reps_of_packed(_Reps* rs, bytes data, bytes offsets, Py_ssize_t count) except -1:
    """Point at the replacements Signer.links_packed made: data[offsets[i]:offsets[i + 1]]."""
    cdef const Py_ssize_t* off = <const Py_ssize_t*>PyBytes_AS_STRING(offsets)
    cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t i
    if PyBytes_GET_SIZE(offsets) != (count + 1) * <Py_ssize_t>sizeof(Py_ssize_t):
        raise ValueError("one offset per replacement, and the end")
    _reps_alloc(rs, count)
    for i in range(count):
        rs.p[i] = d + off[i]
        rs.n[i] = off[i + 1] - off[i]
    return 0


cdef bytes _qp_render(const unsigned char* r, Py_ssize_t nraw, bytes decoded, bytes table,
                      const Py_ssize_t* sp, Py_ssize_t nslots, const unsigned char** rp,
                      const Py_ssize_t* rn):
    """qp_render() of the encoded r[0:nraw], with the slots as a C array of (start, end)
    pairs and the replacements as rp[i][0:rn[i]]."""
    cdef const int64_t* lines = <const int64_t*>PyBytes_AS_STRING(table)
    cdef Py_ssize_t nlines = PyBytes_GET_SIZE(table) // (5 * sizeof(int64_t))
    cdef Py_ssize_t li = 0, lj, si = 0, sj, k, i, npieces, lastp, term
    cdef Py_ssize_t copied = 0, pos, a, b, range_end, ce
    cdef Py_ssize_t size = PyBytes_GET_SIZE(decoded)
    cdef Py_ssize_t reps_len = 0, w = 0, col
    cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(decoded)
    cdef const unsigned char** pp
    cdef Py_ssize_t* pn
    cdef PyObject* buf
    for i in range(nslots):
        reps_len += rn[i]
    pp = <const unsigned char**>PyMem_Malloc((2 * nslots + 2) * sizeof(char*))
    pn = <Py_ssize_t*>PyMem_Malloc((2 * nslots + 2) * sizeof(Py_ssize_t))
    if pp == NULL or pn == NULL:
        PyMem_Free(pp)
        PyMem_Free(pn)
        raise MemoryError()
    try:
        for i in range(nslots):
            if (sp[2 * i] < 0 or sp[2 * i + 1] < sp[2 * i] or sp[2 * i + 1] > size
                    or (i and sp[2 * i] < sp[2 * i - 1])):
                raise ValueError("slots must be sorted, non-overlapping spans of decoded")
        buf = _bytes_alloc(NULL, nraw + _qp_bound(size + reps_len) + 3 * nslots + 8)
        o = <unsigned char*>_bytes_ptr(buf)
        while si < nslots:
            a = sp[2 * si]
            if a >= size and (nlines == 0 or lines[5 * nlines - 1] > 0):
                # insertions after a final hard line break (or into nothing): a line of their own
                if nraw > copied:
                    memcpy(o + w, r + copied, nraw - copied)
                    w += nraw - copied
                copied = nraw
                col = 0
                lastp = -1
                for k in range(si, nslots):
                    if rn[k]:
                        lastp = k
                for k in range(si, nslots):
                    w = _qp_piece(o, w, &col, rp[k], rn[k], k == lastp)
                break
            # the line where this slot starts
            while li < nlines - 1 and _content_end(lines, li) < a:
                li += 1
            # the lines its slots cover, merging slots that share a line
            lj = li
            sj = si
            while sj < nslots:
                if sj > si and _content_end(lines, lj) < sp[2 * sj]:
                    break  # the next slot starts on a later line (or after the end)
                b = sp[2 * sj + 1] - 1 if sp[2 * sj + 1] > sp[2 * sj] else sp[2 * sj]
                while lj < nlines - 1 and _content_end(lines, lj) <= b and \
                        not (sp[2 * sj + 1] == sp[2 * sj] and _content_end(lines, lj) == b):
                    lj += 1
                sj += 1
            range_end = _content_end(lines, lj)
            term = lines[5 * lj + 4]
            # the pieces: decoded text from the start of line li to the end of line lj's text
            npieces = 0
            pos = lines[5 * li + 2]
            for k in range(si, sj):
                pp[npieces] = d + pos
                pn[npieces] = sp[2 * k] - pos
                pp[npieces + 1] = rp[k]
                pn[npieces + 1] = rn[k]
                npieces += 2
                pos = sp[2 * k + 1]
            pp[npieces] = d + pos
            pn[npieces] = range_end - pos if range_end > pos else 0
            npieces += 1
            lastp = -1
            if term != 0:  # a hard break or the end follows: trailing white space is encoded
                for k in range(npieces):
                    if pn[k]:
                        lastp = k
            ce = lines[5 * li]
            if ce > copied:
                memcpy(o + w, r + copied, ce - copied)
                w += ce - copied
            col = 0
            for k in range(npieces):
                w = _qp_piece(o, w, &col, pp[k], pn[k], k == lastp)
            if term > 0:  # the hard line break, as it was
                ce = lines[5 * lj + 1]
                memcpy(o + w, r + ce - term, term)
                w += term
            elif term == 0:  # the soft line break, as a new one
                o[w] = 61
                o[w + 1] = 13
                o[w + 2] = 10
                w += 3
            copied = lines[5 * lj + 1]
            si = sj
            li = lj + 1 if lj < nlines - 1 else lj
        if nraw > copied:
            memcpy(o + w, r + copied, nraw - copied)
            w += nraw - copied
        return _finish(buf, w)
    finally:
        PyMem_Free(pp)
        PyMem_Free(pn)


def splice(bytes data, list slots, list reps):
    """`data` with each (start, end) span of the sorted `slots` replaced by its rep."""
    cdef list out = []
    cdef Py_ssize_t pos = 0, i
    for i in range(len(slots)):
        span = slots[i]
        out.append(data[pos:span[0]])
        out.append(reps[i])
        pos = span[1]
    out.append(data[pos:])
    return b"".join(out)


cdef bytes _splice(bytes data, const Py_ssize_t* sp, Py_ssize_t n, const unsigned char** rp,
                   const Py_ssize_t* rn):
    """splice() for sorted, non-overlapping spans sp[2i]:sp[2i+1] of data (one allocation)."""
    cdef Py_ssize_t i, total = PyBytes_GET_SIZE(data), pos = 0, w = 0
    cdef const char* d = PyBytes_AS_STRING(data)
    for i in range(n):
        total += rn[i] - (sp[2 * i + 1] - sp[2 * i])
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* o = PyBytes_AS_STRING_RW(out)
    for i in range(n):
        memcpy(o + w, d + pos, sp[2 * i] - pos)
        w += sp[2 * i] - pos
        memcpy(o + w, rp[i], rn[i])
        w += rn[i]
        pos = sp[2 * i + 1]
    memcpy(o + w, d + pos, PyBytes_GET_SIZE(data) - pos)
    return out


cdef Py_ssize_t _b64_size(Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t enc = (n + 2) // 3 * 4
    return enc + (2 * ((enc - 1) // 76) if enc else 0)


cdef const char* _B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef bytes _b64_lines(bytes data):
    """base64 (padded) in lines of 76 characters joined by CRLF, with no CRLF at the end."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i = 0, w = 0, groups = 0
    cdef unsigned int v
    out = PyBytes_FromStringAndSize(NULL, _b64_size(n))
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING_RW(out)
    while i < n:
        if groups == 19:  # 76 characters: a line break before the next group
            o[w] = 13
            o[w + 1] = 10
            w += 2
            groups = 0
        v = <unsigned int>s[i] << 16
        if i + 1 < n:
            v |= <unsigned int>s[i + 1] << 8
        if i + 2 < n:
            v |= s[i + 2]
        o[w] = _B64[(v >> 18) & 63]
        o[w + 1] = _B64[(v >> 12) & 63]
        o[w + 2] = _B64[(v >> 6) & 63] if i + 1 < n else 61
        o[w + 3] = _B64[v & 63] if i + 2 < n else 61
        w += 4
        i += 3
        groups += 1
    return out


def base64_lines(bytes data):
    """base64 (standard alphabet, padded) in lines of 76 characters joined by CRLF, no
    final CRLF: how plan_body's BodyPlan writes a rewritten base64 part."""
    return _b64_lines(data)


cdef Py_ssize_t _max_line(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t pos = 0, eol, length, best = 0
    cdef const unsigned char* p
    while pos < n:
        p = <const unsigned char*>memchr(s + pos, 10, n - pos)
        eol = n if p == NULL else p - s
        length = eol - pos
        if eol > pos and p != NULL and s[eol - 1] == 13:
            length -= 1
        if length > best:
            best = length
        pos = eol + 1
    return best


def max_line_length(bytes data):
    """The length of the longest line of `data`, without its CRLF or LF."""
    return _max_line(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


# --------------------------------------------------------------------------- links


cdef Py_ssize_t _skip_to(const unsigned char* s, Py_ssize_t n, Py_ssize_t pos, unsigned char c) noexcept nogil:
    """Offset just after the next `c` at or after pos, or n."""
    cdef const unsigned char* p
    if pos >= n:
        return n
    p = <const unsigned char*>memchr(s + pos, c, n - pos)
    return n if p == NULL else (p - s) + 1


def find_html_links(bytes html):
    """The href values of <a> and <area> tags, the last </body> and any <opentag/>.

    A small HTML tokenizer: comments, doctypes and processing instructions
    are skipped, <script> and <style> contents are skipped, attribute values
    may be double-quoted, single-quoted or bare. Only the first href of a
    tag counts (as in browsers). Returns (hrefs, body_close, opentags):
    hrefs as (value start, value end) spans, body_close as the offset of
    the last `</body` (-1 if none), opentags as (start, end) spans.
    """
    cdef _Vec hrefs, opentags
    cdef Py_ssize_t body_close, k
    hrefs.v = opentags.v = NULL
    hrefs.n = hrefs.cap = opentags.n = opentags.cap = 0
    try:
        body_close = _html_scan(<const unsigned char*>PyBytes_AS_STRING(html),
                                PyBytes_GET_SIZE(html), &hrefs, &opentags)
        return ([(hrefs.v[k], hrefs.v[k + 1]) for k in range(0, hrefs.n, 3)], body_close,
                [(opentags.v[k], opentags.v[k + 1]) for k in range(0, opentags.n, 3)])
    finally:
        PyMem_Free(hrefs.v)
        PyMem_Free(opentags.v)


# character classes for the HTML tokenizer, one bit each
cdef enum:
    CC_WS = 1  # space, tab, LF, VT, FF, CR (as _is_ws)
    CC_SLASH = 2
    CC_EQ = 4
    CC_GT = 8
    CC_NAME = 16  # a tag name: letters, digits, - : _

cdef unsigned char _CC[256]
for _c in range(256):
    _CC[_c] = ((CC_WS if _c in (32, 9, 10, 11, 12, 13) else 0) | (CC_SLASH if _c == 47 else 0)
               | (CC_EQ if _c == 61 else 0) | (CC_GT if _c == 62 else 0)
               | (CC_NAME if (48 <= _c <= 57 or 65 <= _c <= 90 or 97 <= _c <= 122
                              or _c in (45, 58, 95)) else 0))


cdef Py_ssize_t _html_scan(const unsigned char* s, Py_ssize_t n, _Vec* hrefs,
                           _Vec* opentags) except -2:
    """find_html_links() into C records (start, end, 0); returns body_close."""
    cdef Py_ssize_t i = 0, j, name_start, name_end, an_start, an_end, vs, ve, tag_start
    cdef Py_ssize_t body_close = -1, href_s, href_e, k
    cdef const unsigned char* p
    cdef unsigned char c, q
    cdef int tag  # 0 other, 1 a/area, 2 opentag, 3 script, 4 style
    while i < n:
        p = <const unsigned char*>memchr(s + i, 60, n - i)  # '<'
        if p == NULL:
            break
        i = p - s
        tag_start = i
        if i + 1 >= n:
            break
        c = s[i + 1]
        if c == 33:  # '!'
            if i + 3 < n and s[i + 2] == 45 and s[i + 3] == 45:
                j = i + 4
                while True:
                    p = <const unsigned char*>memchr(s + j, 45, n - j) if j < n else NULL
                    if p == NULL:
                        j = n
                        break
                    j = p - s
                    if j + 2 < n and s[j + 1] == 45 and s[j + 2] == 62:
                        j += 3
                        break
                    j += 1
                i = j
            else:
                i = _skip_to(s, n, i + 2, 62)
            continue
        if c == 63:  # '?'
            i = _skip_to(s, n, i + 2, 62)
            continue
        if c == 47:  # '/': an end tag
            if _ci_match(s, n, i + 2, b"body", 4) and (i + 6 >= n or not _alnum(s[i + 6])):
                body_close = i
            i = _skip_to(s, n, i + 2, 62)
            continue
        if not ((65 <= c <= 90) or (97 <= c <= 122)):
            i += 1
            continue
        name_start = i + 1
        j = name_start
        while j < n and _CC[s[j]] & CC_NAME:
            j += 1
        name_end = j
        tag = 0
        if name_end - name_start == 1 and _low(s[name_start]) == 97:
            tag = 1
        elif name_end - name_start == 4 and _ci_match(s, n, name_start, b"area", 4):
            tag = 1
        elif name_end - name_start == 7 and _ci_match(s, n, name_start, b"opentag", 7):
            tag = 2
        elif name_end - name_start == 6 and _ci_match(s, n, name_start, b"script", 6):
            tag = 3
        elif name_end - name_start == 5 and _ci_match(s, n, name_start, b"style", 5):
            tag = 4
        href_s = -1
        href_e = -1
        # attributes
        while j < n:
            while j < n and _CC[s[j]] & (CC_WS | CC_SLASH):
                j += 1
            if j >= n or s[j] == 62:
                break
            an_start = j
            while j < n and not _CC[s[j]] & (CC_WS | CC_EQ | CC_GT | CC_SLASH):
                j += 1
            if j == an_start:  # a stray '=' or similar: skip it
                j += 1
                continue
            an_end = j
            while j < n and _CC[s[j]] & CC_WS:
                j += 1
            vs = -1
            ve = -1
            if j < n and s[j] == 61:
                j += 1
                while j < n and _CC[s[j]] & CC_WS:
                    j += 1
                if j < n and (s[j] == 34 or s[j] == 39):
                    q = s[j]
                    vs = j + 1
                    p = <const unsigned char*>memchr(s + vs, q, n - vs) if vs < n else NULL
                    if p == NULL:
                        ve = n
                        j = n
                    else:
                        ve = p - s
                        j = ve + 1
                else:
                    vs = j
                    while j < n and not _CC[s[j]] & (CC_WS | CC_GT):
                        j += 1
                    ve = j
            if (tag == 1 and href_s < 0 and vs >= 0 and an_end - an_start == 4
                    and _ci_match(s, n, an_start, b"href", 4)):
                href_s = vs
                href_e = ve
        if j < n:
            j += 1  # past '>'
        else:
            # an unterminated tag: not a tag a browser would act on
            break
        if href_s >= 0:
            _push(hrefs, href_s, href_e, 0)
        if tag == 2:
            _push(opentags, tag_start, j, 0)
        elif tag == 3 or tag == 4:
            k = _ci_find(s, n, j, b"</script" if tag == 3 else b"</style", 8 if tag == 3 else 7)
            j = n if k < 0 else k
        i = j
    return body_close


cdef inline bint _url_byte(unsigned char c) noexcept nogil:
    # a URL in plain text ends at whitespace, controls, DEL and <>"
    return c > 32 and c != 127 and c != 60 and c != 62 and c != 34


def find_text_links(bytes text):
    """http(s) URLs in plain text: [(span start, span end, URL start)].

    A URL starts with http:// or https:// (any case) not preceded by a
    letter or digit, and runs to whitespace, a control character or one of
    <>" ; trailing . , ; : ! ? ' * and unbalanced ) ] are left out, as
    readers expect. A `##unsubscribetag##` right before the URL is part of
    the span (span start < URL start).
    """
    cdef _Vec found
    cdef Py_ssize_t k
    found.v = NULL
    found.n = found.cap = 0
    try:
        _text_scan(<const unsigned char*>PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), &found)
        return [(found.v[k], found.v[k + 1], found.v[k + 2]) for k in range(0, found.n, 3)]
    finally:
        PyMem_Free(found.v)


cdef int _text_scan(const unsigned char* s, Py_ssize_t n, _Vec* out) except -1:
    """find_text_links() into C records (span start, span end, URL start)."""
    cdef Py_ssize_t i = 0, j, end, start, k, opens, closes
    cdef Py_ssize_t next_low = -1, next_up = -1  # the next 'h' and 'H' at or after i (n: none)
    cdef const unsigned char* p
    cdef unsigned char c
    while i + 7 < n:
        if next_low < i:
            p = <const unsigned char*>memchr(s + i, 104, n - i)  # 'h'
            next_low = n if p == NULL else p - s
        if next_up < i:
            p = <const unsigned char*>memchr(s + i, 72, n - i)  # 'H'
            next_up = n if p == NULL else p - s
        i = next_low if next_low < next_up else next_up
        if i >= n:
            break
        if i > 0 and _alnum(s[i - 1]):
            i += 1
            continue
        if _ci_match(s, n, i, b"http://", 7):
            j = i + 7
        elif _ci_match(s, n, i, b"https://", 8):
            j = i + 8
        else:
            i += 1
            continue
        end = j
        while end < n and _url_byte(s[end]):
            end += 1
        # leave out trailing punctuation and unbalanced closing brackets
        while end > j:
            c = s[end - 1]
            if c == 46 or c == 44 or c == 59 or c == 58 or c == 33 or c == 63 or c == 39 or c == 42:
                end -= 1
                continue
            if c == 41 or c == 93:  # ')' ']'
                opens = 0
                closes = 0
                for k in range(i, end):
                    if s[k] == (40 if c == 41 else 91):
                        opens += 1
                    elif s[k] == c:
                        closes += 1
                if closes > opens:
                    end -= 1
                    continue
            break
        if end == j:  # nothing after the scheme
            i = j
            continue
        start = i
        if i >= 18 and _ci_match(s, n, i - 18, b"##unsubscribetag##", 18):
            start = i - 18
        _push(out, start, end, i)
        i = end
    return 0


def unescape_entities(bytes value):
    """Decode the HTML character references of an attribute value that stand for ASCII.

    &amp; &lt; &gt; &quot; &apos; and numeric references (&#38; &#x26;) to
    code points below 128 are decoded (a missing `;` is tolerated for
    &amp;, as browsers do); anything else is left as it is, so non-ASCII
    text keeps its bytes and its charset.
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    if memchr(s, 38, n) == NULL:
        return value
    return _unescape(s, n)


cdef bytes _unescape(const unsigned char* s, Py_ssize_t n):
    """unescape_entities() of s[0:n], as a new bytes object."""
    cdef Py_ssize_t i = 0, j, code, k0, w = 0
    cdef const unsigned char* p
    cdef unsigned char* o
    cdef bint plain = memchr(s, 38, n) == NULL
    out = PyBytes_FromStringAndSize(<const char*>s if plain else NULL, n)
    if plain:
        return out
    o = <unsigned char*>PyBytes_AS_STRING_RW(out)
    while i < n:
        p = <const unsigned char*>memchr(s + i, 38, n - i)
        j = n if p == NULL else p - s
        if j > i:
            memcpy(o + w, s + i, j - i)
            w += j - i
            i = j
        if i >= n:
            break
        # s[i] is '&'
        if i + 1 < n and s[i + 1] == 35:  # '&#'
            j = i + 2
            code = 0
            if j < n and (s[j] == 120 or s[j] == 88):  # x
                j += 1
                k0 = j
                while j < n and _hexval(s[j]) >= 0 and code < 0x110000:
                    code = code * 16 + _hexval(s[j])
                    j += 1
            else:
                k0 = j
                while j < n and 48 <= s[j] <= 57 and code < 0x110000:
                    code = code * 10 + (s[j] - 48)
                    j += 1
            if j > k0 and 0 < code < 128:
                o[w] = <unsigned char>code
                w += 1
                if j < n and s[j] == 59:
                    j += 1
                i = j
                continue
        elif _ci_match(s, n, i, b"&amp", 4):
            o[w] = 38
            w += 1
            i += 4 + (1 if i + 4 < n and s[i + 4] == 59 else 0)
            continue
        elif _ci_match(s, n, i, b"&lt;", 4):
            o[w] = 60
            w += 1
            i += 4
            continue
        elif _ci_match(s, n, i, b"&gt;", 4):
            o[w] = 62
            w += 1
            i += 4
            continue
        elif _ci_match(s, n, i, b"&quot;", 6):
            o[w] = 34
            w += 1
            i += 6
            continue
        elif _ci_match(s, n, i, b"&apos;", 6):
            o[w] = 39
            w += 1
            i += 6
            continue
        o[w] = 38
        w += 1
        i += 1
    return out[:w]


# --------------------------------------------------------------------------- slots

# Slot kinds, one byte per slot: c a tracked click, i a tracked click with a link id
# (##linkid:ID##URL; target URL NUL ID), u a tracked ##unsubscribetag## link,
# s a ##unsubscribetag## or ##linkid:ID## prefix stripped (no URL domain, or click
# tracking off; the target is what follows it), p the open pixel, d a further
# <opentag/> removed.
cdef enum:
    K_CLICK = 99
    K_REMOVE = 100
    K_LINKID = 105
    K_PIXEL = 112
    K_STRIP = 115
    K_UNSUB = 117


cdef bint _starts_ci(bytes value, const char* lit, Py_ssize_t m):
    return _ci_match(<const unsigned char*>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                     0, lit, m)


cdef bint _is_own(bytes url, tuple own):
    """Whether url starts with one of `own` (the tracker's own URLs)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(url), m
    for prefix in own:
        m = PyBytes_GET_SIZE(<bytes?>prefix)
        if m <= n and memcmp(PyBytes_AS_STRING(url), PyBytes_AS_STRING(<bytes>prefix), m) == 0:
            return True
    return False


cdef inline bint _tag_before(const Py_ssize_t* x, Py_ssize_t a, Py_ssize_t b, Py_ssize_t k) noexcept:
    """(x[0], x[1], x[2]) < (a, b, k): the order of sorted (start, end, kind) slots."""
    if x[0] != a:
        return x[0] < a
    if x[1] != b:
        return x[1] < b
    return x[2] < k


cdef int _html_slots(bytes html, bint track, bint has_base, tuple own, _Vec* slots,
                     list targets) except -1:
    """The slots of an HTML text as records (start, end, kind) in text order, and their targets.

    See html_link_slots().
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(html)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(html)
    cdef Py_ssize_t k, a, b, at, ei = 0, kind, body_close
    cdef bint placed = False
    cdef _Vec hrefs, opentags, extra
    cdef bytes url, target
    cdef tuple found
    hrefs.v = opentags.v = extra.v = NULL
    hrefs.n = hrefs.cap = opentags.n = opentags.cap = extra.n = extra.cap = 0
    try:
        body_close = _html_scan(s, n, &hrefs, &opentags)
        if track:
            for k in range(0, opentags.n, 3):
                a = opentags.v[k]
                b = opentags.v[k + 1]
                if memchr(s + a, 10, b - a) != NULL:
                    continue
                _push(&extra, a, b, K_REMOVE if placed else K_PIXEL)
                placed = True
            if not placed:
                at = body_close
                if at < 0:
                    at = n
                    while at > 0 and (s[at - 1] == 10 or s[at - 1] == 13):
                        at -= 1
                _push(&extra, at, at, K_PIXEL)
        for k in range(0, hrefs.n, 3):
            a = hrefs.v[k]
            b = hrefs.v[k + 1]
            while a < b and _is_ws(s[a]):
                a += 1
            while b > a and _is_ws(s[b - 1]):
                b -= 1
            if a == b or memchr(s + a, 10, b - a) != NULL or memchr(s + a, 13, b - a) != NULL:
                continue
            url = _unescape(s + a, b - a)
            if _starts_ci(url, b"##linkid:", 9):
                found = _linkid_slot(html, a, b, url, track, has_base, own)
                if found is None:
                    continue
                kind, target = found
            elif _starts_ci(url, b"##unsubscribetag##", 18):
                if has_base:
                    kind = K_UNSUB
                    target = url[18:]
                else:
                    kind = K_STRIP
                    target = html[a + 18:b]
            elif track and (_starts_ci(url, b"http://", 7) or _starts_ci(url, b"https://", 8)):
                if own and _is_own(url, own):
                    continue
                kind = K_CLICK
                target = url
            else:
                continue
            while ei < extra.n and _tag_before(extra.v + ei, a, b, kind):
                _push(slots, extra.v[ei], extra.v[ei + 1], extra.v[ei + 2])
                targets.append(b"")
                ei += 3
            _push(slots, a, b, kind)
            targets.append(target)
        while ei < extra.n:
            _push(slots, extra.v[ei], extra.v[ei + 1], extra.v[ei + 2])
            targets.append(b"")
            ei += 3
    finally:
        PyMem_Free(hrefs.v)
        PyMem_Free(opentags.v)
        PyMem_Free(extra.v)
    return 0


MAX_LINKID = 100  # bytes of a link's user-defined id (##linkid:ID##)


cdef tuple _linkid_slot(bytes html, Py_ssize_t a, Py_ssize_t b, bytes url, bint track,
                        bint has_base, tuple own):
    """The (kind, target) of an href `##linkid:ID##URL`: K_LINKID (target URL NUL ID)
    when the http(s) URL is tracked; K_STRIP (target the raw value after the tag)
    when it is not; None (left alone) when the tag is not closed, or ID is empty,
    too long or holds NUL or `#`."""
    cdef Py_ssize_t close = url.find(b"##", 9), raw_close
    cdef bytes linkid, rest
    if close < 0:
        return None
    linkid = url[9:close]
    if not 0 < len(linkid) <= MAX_LINKID or b"\0" in linkid or b"#" in linkid:
        return None
    rest = url[close + 2:]
    if (track and has_base and (_starts_ci(rest, b"http://", 7) or _starts_ci(rest, b"https://", 8))
            and not (own and _is_own(rest, own))):
        return (K_LINKID, rest + b"\0" + linkid)
    raw_close = html.find(b"##", a + 9, b)
    if raw_close < 0:
        return None
    return (K_STRIP, html[raw_close + 2:b])


cdef int _text_slots(bytes text, bint track, bint has_base, tuple own, _Vec* slots,
                     list targets) except -1:
    """The slots of a plain text, as _html_slots() (no pixel). See text_link_slots()."""
    cdef _Vec found
    cdef Py_ssize_t k, a, b, u
    cdef bytes url
    found.v = NULL
    found.n = found.cap = 0
    try:
        _text_scan(<const unsigned char*>PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text), &found)
        for k in range(0, found.n, 3):
            a = found.v[k]
            b = found.v[k + 1]
            u = found.v[k + 2]
            if u > a:
                _push(slots, a, b, K_UNSUB if has_base else K_STRIP)
                targets.append(text[u:b])
            elif track:
                url = text[a:b]
                if own and _is_own(url, own):
                    continue
                _push(slots, a, b, K_CLICK)
                targets.append(url)
    finally:
        PyMem_Free(found.v)
    return 0


cdef tuple _slots_as_lists(_Vec* slots, list targets):
    cdef Py_ssize_t k
    return ([(slots.v[k], slots.v[k + 1]) for k in range(0, slots.n, 3)],
            [chr(slots.v[k + 2]) for k in range(0, slots.n, 3)], targets)


def html_link_slots(bytes html, bint track, bint has_base, tuple own):
    """What to rewrite in an HTML text: (spans, kinds, targets), in text order.

    Per href to change, kind is "c" (a tracked click; target the URL,
    character references decoded), "i" (a tracked click of an href
    `##linkid:ID##URL`; target URL NUL ID), "u" (a ##unsubscribetag## link to
    track; target the URL after the tag) or "s" (a ##unsubscribetag## link
    with no URL domain, or a ##linkid:ID## link not tracked: the tag is
    stripped; target the raw value without it). Only http(s) links are tracked, never ones starting with one of
    `own` (already tracking URLs); values holding a line break are left
    alone. With `track`, the open pixel is a "p" slot: at the first
    <opentag/> (any others become "d", removed), else an insertion before
    the last </body>, else at the end of the text (before its final line
    breaks).
    """
    return _link_slots(html, True, track, has_base, own)


def text_link_slots(bytes text, bint track, bint has_base, tuple own):
    """What to rewrite in a plain text: (spans, kinds, targets) as html_link_slots (no pixel)."""
    return _link_slots(text, False, track, has_base, own)


cdef tuple _link_slots(bytes data, bint html, bint track, bint has_base, tuple own):
    cdef _Vec slots
    cdef list targets = []
    slots.v = NULL
    slots.n = slots.cap = 0
    try:
        if html:
            _html_slots(data, track, has_base, own, &slots, targets)
        else:
            _text_slots(data, track, has_base, own, &slots, targets)
        return _slots_as_lists(&slots, targets)
    finally:
        PyMem_Free(slots.v)


# --------------------------------------------------------------------------- the body plan


MAX_LINE = 998  # octets per line (RFC 5322), without the CRLF
MAX_DEPTH = 30  # multipart nesting followed; deeper entities are copied as they are
SKIP_CHARSETS = (b"utf-16", b"utf-32", b"utf16", b"utf32", b"ucs-", b"ucs2", b"ucs4",
                 b"utf-7", b"utf7", b"iso-2022", b"iso2022", b"csiso2022", b"hz")
QP_HEADER = b"Content-Transfer-Encoding: quoted-printable\r\n"
ENC_IDENTITY, ENC_QP, ENC_BASE64 = 0, 1, 2
cdef frozenset _IDENTITY = frozenset((b"", b"7bit", b"8bit", b"binary"))
cdef object _a2b_base64 = binascii.a2b_base64
cdef object _b64_error = binascii.Error


cdef bytes _first(bytes msg, list hdrs, bytes name):
    """The value of the first field called `name` (lower-case) in split_headers' list, or None."""
    for h in hdrs:
        if h[0] == name:
            return msg[<Py_ssize_t>h[3] + 1:<Py_ssize_t>h[2]].replace(b"\r\n", b"").strip()
    return None


cdef bytes _with_qp_header(bytes msg, Py_ssize_t start, list hdrs, Py_ssize_t body_start):
    """The header region msg[start:body_start] saying Content-Transfer-Encoding: quoted-printable."""
    cdef list out
    cdef Py_ssize_t pos, end
    if not hdrs:
        sep = msg[start:body_start]
        return QP_HEADER + (sep if sep else b"\r\n")
    out = []
    pos = start
    for h in hdrs:
        if h[0] == b"content-transfer-encoding":
            out.append(msg[pos:h[1]])
            pos = h[2]
    end = hdrs[len(hdrs) - 1][2]
    out.append(msg[pos:end])
    if not (end >= 2 and msg[end - 2] == 13 and msg[end - 1] == 10):
        out.append(b"\r\n")
    out.append(QP_HEADER)
    out.append(msg[end:body_start])
    return b"".join(out)


cdef bint _has_body(bytes msg, Py_ssize_t start, Py_ssize_t body_start, Py_ssize_t end):
    """Whether an entity has a body to write into: body bytes, or an empty line ending its
    header block. A malformed part that is all header (no empty line, no body) has none:
    what is appended to its body would land on its last header line, so it is left alone."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(msg)
    if body_start < end or body_start == start:  # start == body_start: the message itself,
        return True  # whose header block the caller writes, with its empty line
    if body_start - start < 2 or s[body_start - 2] != 13 or s[body_start - 1] != 10:
        return False
    return body_start - 2 == start or (
        body_start - start >= 4 and s[body_start - 4] == 13 and s[body_start - 3] == 10)


cdef class Part:
    """A text part to rewrite: its encoding, its decoded text and the slots in it (plan_body).

    Read-only attributes: hdr (the part's header region, empty for the
    message itself), enc (ENC_IDENTITY, ENC_QP or ENC_BASE64), text (a
    text/plain part), raw (the encoded body), decoded, lines (qp_decode's
    line table, or None), suffix (line breaks after base64), kinds (one
    byte per slot: c u s p d, as html_link_slots), targets, slots
    ((start, end) spans of decoded).
    """

    cdef readonly bytes hdr, decoded, lines, suffix, kinds
    cdef readonly int enc
    cdef readonly bint text, top
    cdef readonly list targets
    cdef Py_ssize_t* spans
    cdef Py_ssize_t nslots
    cdef bytes msg
    cdef Py_ssize_t start, body_start, end
    cdef bytes qp_hdr

    def __dealloc__(self):
        PyMem_Free(self.spans)

    @property
    def raw(self) -> bytes:
        """The part's body as it is in the message (encoded)."""
        return self.msg[self.body_start:self.end]

    @property
    def slots(self) -> list:
        cdef Py_ssize_t i
        return [(self.spans[2 * i], self.spans[2 * i + 1]) for i in range(self.nslots)]

    cdef bytes _hdr_qp(self):
        """The header region saying quoted-printable (a 7bit/8bit part whose lines grew)."""
        if self.qp_hdr is None:
            self.qp_hdr = (b"" if self.top else _with_qp_header(
                self.msg, self.start, split_headers(self.msg, self.start, self.end)[0],
                self.body_start))
        return self.qp_hdr

    cdef tuple _render(self, object signer, bytes fields, int flags, tuple bases,
                       bytes pixel_open, bytes pixel_close, bint* switched):
        """The part for one recipient: (header region, body, what follows the body);
        `switched`: it became quoted-printable."""
        cdef Py_ssize_t i
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(self.kinds)
        cdef bytes out, packed = None, offsets
        cdef _Reps rs
        rs.p = NULL
        rs.n = NULL
        switched[0] = False
        try:
            if signer is None:  # no URL domain: only stripped ##unsubscribetag## prefixes
                _reps_alloc(&rs, self.nslots)
                for i in range(self.nslots):
                    if k[i] == K_STRIP:
                        rs.p[i] = <const unsigned char*>PyBytes_AS_STRING(<bytes>self.targets[i])
                        rs.n[i] = PyBytes_GET_SIZE(<bytes>self.targets[i])
                    else:
                        rs.p[i] = k  # any address: nothing is read
                        rs.n[i] = 0
            else:
                packed, offsets = signer.links_packed(
                    self.kinds, self.targets, fields, flags | (2 if self.text else 0), bases,
                    pixel_open, pixel_close)
                _reps_of_packed(&rs, packed, offsets, self.nslots)
            if self.enc == 1:
                return self.hdr, _qp_render(
                    <const unsigned char*>PyBytes_AS_STRING(self.msg) + self.body_start,
                    self.end - self.body_start, self.decoded, self.lines, self.spans,
                    self.nslots, rs.p, rs.n), b""
            out = _splice(self.decoded, self.spans, self.nslots, rs.p, rs.n)
        finally:
            _reps_free(&rs)
        if self.enc == 2:
            return self.hdr, _b64_lines(out), self.suffix
        if _max_line(<const unsigned char*>PyBytes_AS_STRING(out), PyBytes_GET_SIZE(out)) > MAX_LINE:
            switched[0] = True
            return self._hdr_qp(), _qp_encode(out), b""
        return self.hdr, out, b""


cdef class _Walker:
    """Walks the MIME tree once: the segments of the message and the parts to rewrite."""

    cdef bytes msg
    cdef bint track, track_text, has_base
    cdef tuple own
    cdef _Vec segs  # records (start, end, -1) for bytes of msg, (0, 0, i) for parts[i]
    cdef list parts
    cdef Part top

    def __dealloc__(self):
        PyMem_Free(self.segs.v)

    cdef int _span(self, Py_ssize_t a, Py_ssize_t b) except -1:
        """msg[a:b] as it is, merged with the segment before when they touch."""
        cdef Py_ssize_t n = self.segs.n
        if b <= a:
            return 0
        if n and self.segs.v[n - 1] == -1 and self.segs.v[n - 2] == a:
            self.segs.v[n - 2] = b
            return 0
        return _push(&self.segs, a, b, -1)

    cdef int _walk(self, bytes value, bytes disposition, bytes cte, Py_ssize_t start,
                   Py_ssize_t body_start, Py_ssize_t end, bytes default_type, int depth,
                   bint top) except -1:
        """The segments of the entity msg[start:end] (headers from `start`); `value`,
        `disposition` and `cte` are its first Content-Type, Content-Disposition and
        Content-Transfer-Encoding values (None when missing)."""
        cdef bytes msg = self.msg, mtype, boundary
        cdef dict params = {}
        cdef list delims
        cdef Py_ssize_t i, nd, after, part_end, nxt, next_after, pbody
        cdef Py_ssize_t f[6]
        cdef Part part = None
        if value is None:
            mtype = default_type
        else:
            mtype = _content_type(value, params)
            if mtype.count(b"/") != 1:
                mtype = b"text/plain"
        if mtype.startswith(b"multipart/"):
            boundary = params.get(b"boundary")
            delims = (find_delimiters(msg, body_start, end, boundary)
                      if boundary and depth < MAX_DEPTH else [])
            if not delims:
                return self._span(start, end)
            sub_default = b"message/rfc822" if mtype == b"multipart/digest" else b"text/plain"
            self._span(start, delims[0][1])
            nd = len(delims)
            for i in range(nd):
                after = delims[i][1]
                if delims[i][2]:  # the closing delimiter
                    return self._span(after, end)
                if i + 1 < nd:
                    nxt = delims[i + 1][0]
                    part_end = (nxt - 2 if nxt - 2 >= after and msg[nxt - 1] == 10
                                and msg[nxt - 2] == 13 else nxt)
                    next_after = delims[i + 1][1]
                else:
                    part_end = nxt = next_after = end
                pbody = _part_headers(<const unsigned char*>PyBytes_AS_STRING(msg), after,
                                      min(part_end, PyBytes_GET_SIZE(msg)), f)
                self._walk(_field_value(msg, f[0], f[1]), _field_value(msg, f[2], f[3]),
                           _field_value(msg, f[4], f[5]), after, min(pbody, part_end), part_end,
                           sub_default, depth + 1, False)
                self._span(part_end, next_after)
            return 0
        if (mtype == b"text/html" or mtype == b"text/plain") and not (
                disposition is not None
                and _content_type(disposition, None) == b"attachment") and _has_body(
                msg, start, body_start, end):
            part = self._plan(start, body_start, end, mtype == b"text/html",
                              (cte or b"").strip().lower(), params.get(b"charset", b"").lower(),
                              top)
        if part is None:
            return self._span(start, end)
        if top:
            self.top = part
        _push(&self.segs, 0, 0, len(self.parts))
        self.parts.append(part)
        return 0

    cdef Part _plan(self, Py_ssize_t start, Py_ssize_t body_start, Py_ssize_t end,
                    bint html, bytes cte, bytes charset, bint top):
        """The Part for a text entity, or None when it has nothing to rewrite."""
        cdef bytes msg = self.msg, raw, decoded, stripped
        cdef bytes lines = None, suffix = b""
        cdef int enc
        cdef Part part
        cdef _Vec slots
        cdef list targets
        cdef Py_ssize_t i
        if charset.startswith(SKIP_CHARSETS):
            return None
        if cte in _IDENTITY:
            enc = 0
            decoded = msg[body_start:end]
        elif cte == b"quoted-printable":
            enc = 1
            decoded, lines = _qp_decode(<const unsigned char*>PyBytes_AS_STRING(msg) + body_start,
                                        end - body_start)
        elif cte == b"base64":
            enc = 2
            raw = msg[body_start:end]
            stripped = raw.rstrip(b"\r\n \t")
            suffix = raw[len(stripped):]
            try:
                decoded = _a2b_base64(stripped)
            except _b64_error:
                return None
        else:
            return None
        if not self.track and _ci_find(<const unsigned char*>PyBytes_AS_STRING(decoded),
                                       PyBytes_GET_SIZE(decoded), 0,
                                       b"##unsubscribetag##", 18) < 0:
            return None
        slots.v = NULL
        slots.n = slots.cap = 0
        targets = []
        try:
            if html:
                _html_slots(decoded, self.track, self.has_base, self.own, &slots, targets)
            else:
                _text_slots(decoded, self.track and self.track_text, self.has_base, self.own,
                            &slots, targets)
            if slots.n == 0:
                return None
            part = Part.__new__(Part)
            part.nslots = slots.n // 3
            part.spans = <Py_ssize_t*>PyMem_Malloc(2 * part.nslots * sizeof(Py_ssize_t))
            if part.spans == NULL:
                raise MemoryError()
            kinds = PyBytes_FromStringAndSize(NULL, part.nslots)
            for i in range(part.nslots):
                part.spans[2 * i] = slots.v[3 * i]
                part.spans[2 * i + 1] = slots.v[3 * i + 1]
                (<unsigned char*>PyBytes_AS_STRING_RW(kinds))[i] = <unsigned char>slots.v[3 * i + 2]
        finally:
            PyMem_Free(slots.v)
        part.kinds = kinds
        part.targets = targets
        part.hdr = msg[start:body_start]
        part.enc = enc
        part.text = not html
        part.top = top
        part.decoded = decoded
        part.lines = lines
        part.suffix = suffix
        part.msg = msg
        part.start = start
        part.body_start = body_start
        part.end = end
        return part


cdef class BodyPlan:
    """A message's body, planned once (plan_body) and rendered for each recipient.

    parts: the Parts to rewrite, in order; top: the Part that is the
    message's own body (a message that is one text part), or None.
    """

    cdef bytes msg
    cdef Py_ssize_t* segs
    cdef Py_ssize_t nsegs
    cdef readonly list parts
    cdef readonly Part top
    cdef bytes pixel_open, pixel_close

    def __dealloc__(self):
        PyMem_Free(self.segs)

    def render(self, object signer, bytes fields, int flags, tuple bases, bytes head,
               bytes head_qp, bytes added, bytes sep):
        """head + added + sep + the body, for one recipient.

        `signer` (greenarrow.pyx.tracksign.Signer, or None without a URL
        domain) makes the tracking URLs: Signer.links(kinds, targets,
        fields, flags, bases, pixel_open, pixel_close) per part, with flag 2
        added for text/plain parts. `head_qp` replaces `head` when the
        message is one 7bit/8bit text part that had to become
        quoted-printable.
        """
        cdef Py_ssize_t i, np, total, w, k
        cdef list outs = []
        cdef bint switched = False, qp
        cdef bytes data
        cdef tuple pieces
        cdef Part part
        cdef unsigned char* o
        cdef const char* m
        if self.msg is None:
            raise ValueError("a BodyPlan is made by plan_body()")
        m = PyBytes_AS_STRING(self.msg)
        np = len(self.parts)
        for i in range(np):
            part = <Part>self.parts[i]
            pieces = part._render(signer, fields, flags, bases, self.pixel_open,
                                  self.pixel_close, &qp)
            if qp and part is self.top:
                switched = True
            outs.append(pieces)
        if switched:
            head = head_qp
        total = PyBytes_GET_SIZE(head) + PyBytes_GET_SIZE(added) + PyBytes_GET_SIZE(sep)
        for i in range(0, self.nsegs, 3):
            k = self.segs[i + 2]
            if k < 0:
                total += self.segs[i + 1] - self.segs[i]
            else:
                for data in <tuple>outs[k]:
                    total += PyBytes_GET_SIZE(data)
        out = PyBytes_FromStringAndSize(NULL, total)
        o = <unsigned char*>PyBytes_AS_STRING_RW(out)
        w = 0
        for data in (head, added, sep):
            memcpy(o + w, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
            w += PyBytes_GET_SIZE(data)
        for i in range(0, self.nsegs, 3):
            k = self.segs[i + 2]
            if k < 0:
                memcpy(o + w, m + self.segs[i], self.segs[i + 1] - self.segs[i])
                w += self.segs[i + 1] - self.segs[i]
            else:
                for data in <tuple>outs[k]:
                    memcpy(o + w, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                    w += PyBytes_GET_SIZE(data)
        return out


def plan_body(bytes msg, list fields, Py_ssize_t body_start, bint track, bint track_text,
              bytes base, bytes pixel_open, bytes pixel_close):
    """Walk the MIME tree of a CRLF message once and plan what each recipient's copy rewrites.

    `fields` and `body_start` are split_headers(msg)'s. Rewritten: text/html
    and text/plain parts that are not attachments nor inside message/*, in
    7bit, 8bit, binary, quoted-printable or base64, in an ASCII-compatible
    charset (not SKIP_CHARSETS), holding a slot: http(s) links when `track`
    (in text/plain parts only with `track_text`), ##unsubscribetag## links
    always (tracked with a URL domain `base`, else the tag is stripped), the
    open pixel (pixel_open + URL + pixel_close) in HTML parts when `track`.
    Links already pointing at BASE/click, /open or /unsub stay. Every other
    byte (boundaries, preambles, other parts) is kept. Returns a BodyPlan.
    """
    cdef _Walker walker = _Walker.__new__(_Walker)
    cdef BodyPlan plan = BodyPlan.__new__(BodyPlan)
    walker.msg = msg
    walker.track = track
    walker.track_text = track_text
    walker.has_base = bool(base)
    walker.own = (base + b"/click", base + b"/open", base + b"/unsub") if base else ()
    walker.parts = []
    walker.segs.v = NULL
    walker.segs.n = walker.segs.cap = 0
    walker._walk(_first(msg, fields, b"content-type"), _first(msg, fields, b"content-disposition"),
                 _first(msg, fields, b"content-transfer-encoding"), body_start, body_start,
                 PyBytes_GET_SIZE(msg), b"text/plain", 0, True)
    plan.msg = msg
    plan.segs = walker.segs.v
    plan.nsegs = walker.segs.n
    walker.segs.v = NULL
    plan.parts = walker.parts
    plan.top = walker.top
    plan.pixel_open = pixel_open
    plan.pixel_close = pixel_close
    return plan


# --------------------------------------------------------------------------- control files


cdef Py_ssize_t _stat_key(const char* path, char* buf, Py_ssize_t size) noexcept nogil:
    """Write "mtime_ns size inode" of path into buf; its length, or -1 (errno set)."""
    cdef struct_stat st
    if stat(path, &st) != 0:
        return -1
    return snprintf(buf, size, "%lld %lld %llu",
                    <long long>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec,
                    <long long>st.st_size, <unsigned long long>st.st_ino)


def file_key(bytes path):
    """b"<st_mtime_ns> <st_size> <st_ino>" of a file (following links), what
    greenarrow.lib.simplemh.mail_class keys its cache with, without building an
    os.stat_result; OSError (FileNotFoundError...) as os.stat raises it.
    """
    cdef char buf[96]
    cdef Py_ssize_t n = _stat_key(path, buf, 96)
    if n < 0:
        e = errno
        raise OSError(e, strerror(e).decode("utf-8", "replace"), os.fsdecode(path))
    return buf[:n]


def files_key(tuple paths):
    """The file_key() of each path (b"-" for one that cannot be stat'ed), joined by ";"."""
    cdef char buf[96]
    cdef Py_ssize_t n
    cdef list out = []
    for path in paths:
        n = _stat_key(<bytes?>path, buf, 96)
        out.append(buf[:n] if n >= 0 else b"-")
    return b";".join(out)
