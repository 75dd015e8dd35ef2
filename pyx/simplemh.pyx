# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""SimpleMH byte-level hot paths: header scanning, MIME transfer encodings, link finding.

Everything here works on `bytes` and returns offsets into them, so the
caller (greenarrow.lib.simplemh) can rebuild a message from slices of the
original: every byte it does not rewrite stays exactly as it was. Nothing
here builds an `email.message` tree, decodes text to `str` or imports a
Python module at call time; that is what makes SimpleMH processing cheap
enough to run once per injected message (ARCHITECTURE section 6).

Python-level API (all offsets are absolute indexes into the bytes given):

- split_headers(msg, start=0, end=-1) -> (fields, body_start)
      fields: list of (lower-cased name, start, end, colon offset); the same
      rules as greenarrow.lib.message.split_headers, bounded to [start, end).
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
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t
from libc.string cimport memchr, memcpy

cdef extern from "Python.h":
    char* PyBytes_AS_STRING_RW "PyBytes_AS_STRING"(object)


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

    Same rules as greenarrow.lib.message.split_headers: the block ends at the
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
    cdef bytearray name
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
        name = bytearray(name_end - pos)
        for k in range(pos, name_end):
            name[k - pos] = _low(s[k])
        headers.append((bytes(name), pos, line_end, colon))
        pos = eol + 2
    return headers, n


def header_value(bytes msg, Py_ssize_t colon, Py_ssize_t end):
    """The value of a field: after its colon, CRLFs of folding removed, stripped."""
    return msg[colon + 1:end].replace(b"\r\n", b"").strip()


def content_type(bytes value):
    """Parse a Content-Type (or Content-Disposition) value.

    Returns (the type lower-cased, e.g. b"text/html", with no parameters;
    {parameter name lower-cased: value with quotes and backslash escapes
    removed}). Forgiving of broken mail: a parameter without `=` is skipped,
    an unterminated quoted string runs to the end.
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t i = 0, j, k
    cdef dict params = {}
    cdef bytearray buf
    # the type
    while i < n and s[i] != 59:  # ';'
        i += 1
    mtype = value[:i].strip().lower()
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
    return mtype, params


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
    cdef Py_ssize_t pos = start, k, q, eol, stop
    cdef bint closing, ok
    cdef list out = []
    if m == 0:
        return out
    while pos < n:
        # pos is the start of a line
        ok = pos + 2 + m <= n and s[pos] == 45 and s[pos + 1] == 45
        if ok:
            for k in range(m):
                if s[pos + 2 + k] != b[k]:
                    ok = False
                    break
        eol = _find_crlf(s, pos, n)
        if ok:
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
        if eol < 0:
            break
        pos = eol + 2
    return out


# --------------------------------------------------------------------------- quoted-printable


ctypedef struct _Table:
    int64_t* v
    Py_ssize_t n
    Py_ssize_t cap


cdef void _table_add(_Table* t, int64_t a, int64_t b, int64_t c, int64_t d, int64_t e) noexcept:
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
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING_RW(out)
    cdef Py_ssize_t i = 0, w = 0, enc_start = 0, dec_start = 0
    cdef unsigned char c
    cdef int hi, lo
    cdef _Table lines
    lines.n = 0
    lines.cap = 0
    lines.v = NULL
    cdef const unsigned char* pe
    cdef const unsigned char* pl
    cdef Py_ssize_t run, next_lf = -1
    while i < n:
        c = s[i]
        if c != 61 and c != 10:  # a run of plain bytes: copy it at once
            pe = <const unsigned char*>memchr(s + i, 61, n - i)
            if next_lf < i:
                pl = <const unsigned char*>memchr(s + i, 10, n - i)
                next_lf = n if pl == NULL else pl - s
            pl = s + next_lf if next_lf < n else NULL
            run = n - i
            if pe != NULL and pe - (s + i) < run:
                run = pe - (s + i)
            if pl != NULL and pl - (s + i) < run:
                run = pl - (s + i)
            memcpy(o + w, s + i, run)
            w += run
            i += run
            continue
        if c == 61:  # '='
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
            elif i + 1 < n and _hexval(c) >= 0 and _hexval(s[i + 1]) >= 0:
                hi = _hexval(c)
                lo = _hexval(s[i + 1])
                o[w] = <unsigned char>((hi << 4) | lo)
                w += 1
                i += 2
            else:
                o[w] = 61
                w += 1
        else:
            o[w] = c
            w += 1
            i += 1
            if c == 10:
                _table_add(&lines, enc_start, i, dec_start, w,
                           2 if i >= 2 and s[i - 2] == 13 and w >= 2 and o[w - 2] == 13 else 1)
                enc_start = i
                dec_start = w
    if enc_start < n or dec_start < w:
        _table_add(&lines, enc_start, n, dec_start, w, -1)
    if lines.n < 0:
        PyMem_Free(lines.v)
        raise MemoryError()
    table = PyBytes_FromStringAndSize(<char*>lines.v, lines.n * sizeof(int64_t))
    PyMem_Free(lines.v)
    return out[:w], table


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
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    out = PyBytes_FromStringAndSize(NULL, _qp_bound(n))
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING_RW(out)
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
    return out[:w]


def qp_encode_line(bytes line, bint hard_break=False):
    """One hard line as quoted-printable: every byte of `line` is data (a CR or
    LF in it is encoded), then CRLF when `hard_break`; soft breaks as needed."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(line)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(line)
    cdef Py_ssize_t w
    out = PyBytes_FromStringAndSize(NULL, _qp_bound(n))
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING_RW(out)
    cdef Py_ssize_t col = 0
    w = _qp_piece(o, 0, &col, s, n, True)
    if hard_break:
        o[w] = 13
        o[w + 1] = 10
        w += 2
    return out[:w]


# bytes written as themselves in quoted-printable (space and tab: except at a line's end)
cdef unsigned char _QP_LITERAL[256]
for _c in range(256):
    _QP_LITERAL[_c] = 1 if (33 <= _c <= 126 and _c != 61) or _c in (32, 9) else 0


cdef Py_ssize_t _qp_piece(unsigned char* o, Py_ssize_t w, Py_ssize_t* col,
                          const unsigned char* s, Py_ssize_t n, bint final) noexcept nogil:
    """Encode s[0:n] at o[w], continuing a line at column col[0]; `final`: it ends the line."""
    cdef Py_ssize_t i, c_col = col[0], stop = n - 1 if final else n
    cdef unsigned char c
    # every byte but a final one: room must be left for a soft break's "="
    for i in range(stop):
        c = s[i]
        if _QP_LITERAL[c]:
            if c_col >= 75:
                w = _soft_break(o, w)
                c_col = 0
            o[w] = c
            w += 1
            c_col += 1
        else:
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
    cdef const int64_t* lines = <const int64_t*>PyBytes_AS_STRING(table)
    cdef Py_ssize_t nlines = PyBytes_GET_SIZE(table) // (5 * sizeof(int64_t))
    cdef Py_ssize_t nslots = len(slots)
    cdef Py_ssize_t li = 0, lj, si = 0, sj, k, i, npieces, lastp, term
    cdef Py_ssize_t copied = 0, pos, a, b, range_end, ce
    cdef Py_ssize_t size = PyBytes_GET_SIZE(decoded), nraw = PyBytes_GET_SIZE(raw)
    cdef Py_ssize_t reps_len = 0, w = 0, col
    cdef const unsigned char* d = <const unsigned char*>PyBytes_AS_STRING(decoded)
    cdef const unsigned char* r = <const unsigned char*>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t* ss
    cdef Py_ssize_t* se
    cdef const unsigned char** pp
    cdef Py_ssize_t* pn
    cdef bytes rep
    if len(reps) != nslots:
        raise ValueError("one replacement per slot")
    for i in range(nslots):
        reps_len += PyBytes_GET_SIZE(<bytes>reps[i])
    ss = <Py_ssize_t*>PyMem_Malloc((2 * nslots + 1) * sizeof(Py_ssize_t))
    se = ss + nslots
    pp = <const unsigned char**>PyMem_Malloc((2 * nslots + 2) * sizeof(char*))
    pn = <Py_ssize_t*>PyMem_Malloc((2 * nslots + 2) * sizeof(Py_ssize_t))
    if ss == NULL or pp == NULL or pn == NULL:
        PyMem_Free(ss)
        PyMem_Free(pp)
        PyMem_Free(pn)
        raise MemoryError()
    try:
        for i in range(nslots):
            ss[i] = slots[i][0]
            se[i] = slots[i][1]
            if ss[i] < 0 or se[i] < ss[i] or se[i] > size or (i and ss[i] < se[i - 1]):
                raise ValueError("slots must be sorted, non-overlapping spans of decoded")
        out = PyBytes_FromStringAndSize(NULL, nraw + _qp_bound(size + reps_len) + 3 * nslots + 8)
        o = <unsigned char*>PyBytes_AS_STRING_RW(out)
        while si < nslots:
            a = ss[si]
            if a >= size and (nlines == 0 or lines[5 * nlines - 1] > 0):
                # insertions after a final hard line break (or into nothing): a line of their own
                if nraw > copied:
                    memcpy(o + w, r + copied, nraw - copied)
                    w += nraw - copied
                copied = nraw
                col = 0
                lastp = -1
                for k in range(si, nslots):
                    if PyBytes_GET_SIZE(<bytes>reps[k]):
                        lastp = k
                for k in range(si, nslots):
                    rep = <bytes>reps[k]
                    w = _qp_piece(o, w, &col, <const unsigned char*>PyBytes_AS_STRING(rep),
                                  PyBytes_GET_SIZE(rep), k == lastp)
                break
            # the line where this slot starts
            while li < nlines - 1 and _content_end(lines, li) < a:
                li += 1
            # the lines its slots cover, merging slots that share a line
            lj = li
            sj = si
            while sj < nslots:
                if sj > si and _content_end(lines, lj) < ss[sj]:
                    break  # the next slot starts on a later line (or after the end)
                b = se[sj] - 1 if se[sj] > ss[sj] else ss[sj]
                while lj < nlines - 1 and _content_end(lines, lj) <= b and \
                        not (se[sj] == ss[sj] and _content_end(lines, lj) == b):
                    lj += 1
                sj += 1
            range_end = _content_end(lines, lj)
            term = lines[5 * lj + 4]
            # the pieces: decoded text from the start of line li to the end of line lj's text
            npieces = 0
            pos = lines[5 * li + 2]
            for k in range(si, sj):
                pp[npieces] = d + pos
                pn[npieces] = ss[k] - pos
                rep = <bytes>reps[k]
                pp[npieces + 1] = <const unsigned char*>PyBytes_AS_STRING(rep)
                pn[npieces + 1] = PyBytes_GET_SIZE(rep)
                npieces += 2
                pos = se[k]
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
        return out[:w]
    finally:
        PyMem_Free(ss)
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


def max_line_length(bytes data):
    """The length of the longest line of `data`, without its CRLF or LF."""
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
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
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(html)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(html)
    cdef Py_ssize_t i = 0, j, name_start, name_end, an_start, an_end, vs, ve, tag_start
    cdef Py_ssize_t body_close = -1, href_s, href_e, k
    cdef const unsigned char* p
    cdef unsigned char c, q
    cdef int tag  # 0 other, 1 a/area, 2 opentag, 3 script, 4 style
    cdef list hrefs = []
    cdef list opentags = []
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
        while j < n and (_alnum(s[j]) or s[j] == 45 or s[j] == 58 or s[j] == 95):
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
            while j < n and (_is_ws(s[j]) or s[j] == 47):
                j += 1
            if j >= n or s[j] == 62:
                break
            an_start = j
            while j < n and not _is_ws(s[j]) and s[j] != 61 and s[j] != 62 and s[j] != 47:
                j += 1
            if j == an_start:  # a stray '=' or similar: skip it
                j += 1
                continue
            an_end = j
            while j < n and _is_ws(s[j]):
                j += 1
            vs = -1
            ve = -1
            if j < n and s[j] == 61:
                j += 1
                while j < n and _is_ws(s[j]):
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
                    while j < n and not _is_ws(s[j]) and s[j] != 62:
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
            hrefs.append((href_s, href_e))
        if tag == 2:
            opentags.append((tag_start, j))
        elif tag == 3 or tag == 4:
            k = _ci_find(s, n, j, b"</script" if tag == 3 else b"</style", 8 if tag == 3 else 7)
            j = n if k < 0 else k
        i = j
    return hrefs, body_close, opentags


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
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(text)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(text)
    cdef Py_ssize_t i = 0, j, end, start, k, opens, closes
    cdef const unsigned char* p
    cdef const unsigned char* q
    cdef unsigned char c
    cdef list out = []
    while i + 7 < n:
        p = <const unsigned char*>memchr(s + i, 104, n - i)  # 'h'
        q = <const unsigned char*>memchr(s + i, 72, n - i)   # 'H'
        if p == NULL and q == NULL:
            break
        if p == NULL or (q != NULL and q < p):
            p = q
        i = p - s
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
        out.append((start, end, i))
        i = end
    return out


def unescape_entities(bytes value):
    """Decode the HTML character references of an attribute value that stand for ASCII.

    &amp; &lt; &gt; &quot; &apos; and numeric references (&#38; &#x26;) to
    code points below 128 are decoded (a missing `;` is tolerated for
    &amp;, as browsers do); anything else is left as it is, so non-ASCII
    text keeps its bytes and its charset.
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t i = 0, j, code, k0, w = 0
    cdef const unsigned char* p
    cdef unsigned char* o
    if memchr(s, 38, n) == NULL:
        return value
    out = PyBytes_FromStringAndSize(NULL, n)
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


cdef bint _starts_ci(bytes value, const char* lit, Py_ssize_t m):
    return _ci_match(<const unsigned char*>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
                     0, lit, m)


def _split_sorted(list slots):
    """[(start, end, kind, target)] in order -> ([(start, end)], [kind], [target])."""
    cdef list spans = [], kinds = [], targets = []
    for slot in slots:
        spans.append((slot[0], slot[1]))
        kinds.append(slot[2])
        targets.append(slot[3])
    return spans, kinds, targets


def html_link_slots(bytes html, bint track, bint has_base, tuple own):
    """What to rewrite in an HTML text: (spans, kinds, targets), in text order.

    Per href to change, kind is "c" (a tracked click; target the URL,
    character references decoded), "u" (a ##unsubscribetag## link to
    track; target the URL after the tag) or "s" (a ##unsubscribetag## link
    with no URL domain: the tag is stripped; target the raw value without
    it). Only http(s) links are tracked, never ones starting with one of
    `own` (already tracking URLs); values holding a line break are left
    alone. With `track`, the open pixel is a "p" slot: at the first
    <opentag/> (any others become "d", removed), else an insertion before
    the last </body>, else at the end of the text (before its final line
    breaks).
    """
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(html)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(html)
    cdef Py_ssize_t vs, ve, a, b, at
    cdef list slots = []
    cdef list extra = []
    cdef bint placed = False
    hrefs, body_close, opentags = find_html_links(html)
    for span in hrefs:
        vs = span[0]
        ve = span[1]
        a = vs
        b = ve
        while a < b and _is_ws(s[a]):
            a += 1
        while b > a and _is_ws(s[b - 1]):
            b -= 1
        if a == b or memchr(s + a, 10, b - a) != NULL or memchr(s + a, 13, b - a) != NULL:
            continue
        inner = html[a:b]
        url = unescape_entities(inner)
        if _starts_ci(url, b"##unsubscribetag##", 18):
            if has_base:
                slots.append((a, b, "u", url[18:]))
            else:
                slots.append((a, b, "s", inner[18:]))
        elif track and (_starts_ci(url, b"http://", 7) or _starts_ci(url, b"https://", 8)):
            if own and url.startswith(own):
                continue
            slots.append((a, b, "c", url))
    if track:
        for span in opentags:
            a = span[0]
            b = span[1]
            if memchr(s + a, 10, b - a) != NULL:
                continue
            extra.append((a, b, "d" if placed else "p", b""))
            placed = True
        if not placed:
            at = body_close
            if at < 0:
                at = n
                while at > 0 and (s[at - 1] == 10 or s[at - 1] == 13):
                    at -= 1
            extra.append((at, at, "p", b""))
    if extra:  # the few tag slots go in by position; the href slots are in order already
        slots.extend(extra)
        slots.sort()
    return _split_sorted(slots)


def text_link_slots(bytes text, bint track, bint has_base, tuple own):
    """What to rewrite in a plain text: (spans, kinds, targets) as html_link_slots (no pixel)."""
    cdef list slots = []
    cdef Py_ssize_t a, b, u
    for span in find_text_links(text):
        a = span[0]
        b = span[1]
        u = span[2]
        if u > a:
            slots.append((a, b, "u" if has_base else "s", text[u:b]))
        elif track:
            url = text[a:b]
            if own and url.startswith(own):
                continue
            slots.append((a, b, "c", url))
    return _split_sorted(slots)
