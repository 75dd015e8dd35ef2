# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""DKIM message parsing and canonicalization (RFC 6376 §3.4) in C.

What greenarrow.lib.dkim.signing signs with: the header split, the
canonical header lines and the canonical body, byte for byte what dkimpy's
`rfc822_parse` and `CanonicalizationPolicy` make for a CRLF message (the
signer brings every message to CRLF first, as it is transmitted), so its
signatures verify with dkimpy and OpenDKIM alike (tests/test_dkim_canon.py
checks both, across the shared MIME corpus). The body passes run without
the GIL, and hashlib hashes a body of more than 2 KB without it too, so the
signing threads of a remote worker run on every core.

Python-level API:

- parse(message: bytes) -> tuple[list[tuple[bytes, bytes]], int]
      the header fields as (name, value) with the value as written (after
      the colon, continuation lines and CRLFs included), and the offset
      of the body (after the blank line; len(message) if there is none).
      An mbox "From " line is skipped; ValueError for a line that is
      neither a field, a continuation nor the blank line.
- relaxed_header(name: bytes, value: bytes) -> bytes
      `name:value` in relaxed form (name lower-cased, value unfolded,
      runs of space/tab made one space, stripped), without CRLF.
- body(message: bytes, offset: int, relaxed: bool) -> bytes
      the canonical body of message[offset:] (simple or relaxed).
- is_crlf(message: bytes) -> bool
      every CR and LF is part of a CRLF and the message ends with one (or
      is empty): what message.to_crlf would return unchanged.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF

cdef extern from "Python.h":
    # Raw forms: the new bytes object is filled in place and shrunk to its
    # final size, which needs the only reference, so Cython must not hold one.
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char* data, Py_ssize_t size)
    int _PyBytes_Resize(PyObject** string, Py_ssize_t newsize) except -1
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* o)


cdef object _finish(PyObject* raw, Py_ssize_t size):
    """The filled bytes object `raw` cut to `size`, as a managed reference."""
    _PyBytes_Resize(&raw, size)  # on failure raw is freed and NULL
    result = <object>raw
    Py_DECREF(result)
    return result


cdef inline bint _is_ws(unsigned char c) nogil:
    return c == 32 or c == 9


cdef inline bint _is_strip(unsigned char c) nogil:
    # bytes.strip()'s set: space, \t, \n, \r, \x0b, \x0c
    return c == 32 or (9 <= c <= 13)


def parse(bytes message not None):
    """(headers, body offset) of a message; see the module doc."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
    cdef Py_ssize_t i = 0, eol, nxt, j, colon
    cdef list headers = []
    cdef list current = None
    while i < n:
        # one line: [i, eol), the next line starts at nxt
        eol = i
        while eol < n and p[eol] != 10:
            eol += 1
        if eol < n:
            nxt = eol + 1
            if eol > i and p[eol - 1] == 13:
                eol -= 1
        else:
            nxt = n
        if eol == i:
            return [(h[0], h[1]) for h in headers], nxt
        if p[i] == 32 or p[i] == 9:
            if current is None:
                raise ValueError("the message starts with a continuation line")
            current[1] += message[i:eol] + b"\r\n"
        else:
            colon = -1
            j = i
            while j < eol and 0x21 <= p[j] <= 0x7e:
                if p[j] == 58 and j > i:  # ':' ends a non-empty name
                    colon = j
                    break
                j += 1
            if colon != -1:
                current = [message[i:colon], message[colon + 1:eol] + b"\r\n"]
                headers.append(current)
            elif eol - i >= 5 and message[i:i + 5] == b"From ":
                pass
            else:
                line = message[i:min(eol, i + 60)]
                raise ValueError(f"not a header field line: {line!r}")
        i = nxt
    return [(h[0], h[1]) for h in headers], n


def relaxed_header(bytes name not None, bytes value not None):
    """`name:value` in relaxed canonical form, without the CRLF."""
    cdef bytes lname = name.lower().rstrip()
    cdef const unsigned char* v = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t ln = PyBytes_GET_SIZE(lname)
    cdef PyObject* raw = _new_bytes(NULL, ln + 1 + n)
    if raw == NULL:
        raise MemoryError()
    cdef unsigned char* o = <unsigned char*>_bytes_data(raw)
    cdef Py_ssize_t k = 0, i = 0, start, end
    cdef bint ws = False
    cdef unsigned char c
    memcpy_(o, <const unsigned char*>PyBytes_AS_STRING(lname), ln)
    k = ln
    o[k] = 58
    k += 1
    start = k
    while i < n:
        c = v[i]
        if c == 10:  # unfold: drop LF (and the CR before it, below)
            i += 1
            continue
        if c == 13 and i + 1 < n and v[i + 1] == 10:
            i += 2
            continue
        if _is_ws(c):
            ws = True
        else:
            if ws:
                o[k] = 32
                k += 1
                ws = False
            o[k] = c
            k += 1
        i += 1
    if ws:
        o[k] = 32
        k += 1
    # strip() of the value: leading and trailing whitespace of bytes.strip()'s set
    end = k
    while end > start and _is_strip(o[end - 1]):
        end -= 1
    i = start
    while i < end and _is_strip(o[i]):
        i += 1
    if i > start:
        memmove_(o + start, o + i, end - i)
        end -= i - start
    return _finish(raw, end)


cdef extern from "string.h":
    void* memcpy_ "memcpy"(void* dst, const void* src, size_t n) nogil
    void* memmove_ "memmove"(void* dst, const void* src, size_t n) nogil


def body(bytes message not None, Py_ssize_t offset, bint relaxed):
    """The canonical body of message[offset:] (RFC 6376 §3.4.3 / §3.4.4)."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
    if offset < 0 or offset > n:
        raise ValueError(f"body offset {offset} outside the message ({n} bytes)")
    cdef PyObject* raw = _new_bytes(NULL, n - offset + 2)
    if raw == NULL:
        raise MemoryError()
    cdef unsigned char* o = <unsigned char*>_bytes_data(raw)
    cdef Py_ssize_t k = 0, i = offset
    cdef bint ws = False
    cdef unsigned char c
    with nogil:
        if relaxed:
            # trailing space/tab before CRLF dropped, other runs made one space
            while i < n:
                c = p[i]
                if _is_ws(c):
                    ws = True
                elif c == 13 and i + 1 < n and p[i + 1] == 10:
                    ws = False
                    o[k] = 13
                    o[k + 1] = 10
                    k += 2
                    i += 1
                else:
                    if ws:
                        o[k] = 32
                        k += 1
                        ws = False
                    o[k] = c
                    k += 1
                i += 1
            if ws:
                o[k] = 32
                k += 1
        else:
            memcpy_(o, p + offset, n - offset)
            k = n - offset
        # empty lines at the end: none kept but one CRLF; a missing final CRLF added
        while k >= 2 and o[k - 2] == 13 and o[k - 1] == 10:
            k -= 2
        o[k] = 13
        o[k + 1] = 10
        k += 2
        if relaxed and k == 2:
            k = 0  # relaxed: an empty body is empty (simple: one CRLF)
    return _finish(raw, k)


def is_crlf(bytes message not None):
    """Whether every line ends with CRLF, with no lone CR or LF, the last one included."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(message)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(message)
    cdef Py_ssize_t i = 0
    cdef bint ok = True
    if n == 0:
        return True
    with nogil:
        if n < 2 or p[n - 2] != 13 or p[n - 1] != 10:
            ok = False
        while ok and i < n:
            if p[i] == 13:
                if i + 1 >= n or p[i + 1] != 10:
                    ok = False
                i += 2
            elif p[i] == 10:
                ok = False
            else:
                i += 1
    return ok
