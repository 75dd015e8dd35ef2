# cython: language_level=3, boundscheck=False, wraparound=False
"""Directory scan of a queue: the names of its entries and their retry state.

A scheduler rebuilds its whole schedule after a restart from this scan alone,
without opening one message file (ARCHITECTURE section 5). An entry's file
name is `<entry id>.<attempts>.<due>` (see greenarrow.lib.queue.entry); this
module reads the directory with readdir(3) and parses those names in C, so a
queue of a million entries is scanned in about a second.

Python-level API:
    scan(path: str) -> ScanResult
        ScanResult.names    list[str]    entry file names
        ScanResult.attempts array('l')   attempts made so far, per name
        ScanResult.due      array('q')   epoch second of the next attempt, per name
        ScanResult.strays   list[str]    names that are not entries (ignored by schedulers)
    parse_name(name: str) -> tuple[str, int, int] | None
"""

from cpython.array cimport array, clone
from libc.errno cimport errno
from libc.string cimport strlen

import array as _array_module


cdef extern from "dirent.h" nogil:
    ctypedef struct DIR:
        pass
    struct dirent:
        char d_name[256]
    DIR *opendir(const char *name)
    dirent *readdir(DIR *dirp)
    int closedir(DIR *dirp)


cdef array _LONG_TEMPLATE = _array_module.array("l")
cdef array _LLONG_TEMPLATE = _array_module.array("q")


class ScanResult:
    """The entries found by `scan`, as parallel sequences."""

    __slots__ = ("names", "attempts", "due", "strays")

    def __init__(self, names, attempts, due, strays):
        self.names = names
        self.attempts = attempts
        self.due = due
        self.strays = strays

    def __len__(self):
        return len(self.names)

    def __iter__(self):
        """Yield (name, attempts, due) for each entry."""
        return zip(self.names, self.attempts, self.due)


cdef inline int _parse(const char *s, Py_ssize_t n, long *attempts, long long *due) noexcept nogil:
    """Parse `<id>.<attempts>.<due>`; 1 on success, 0 for a stray name."""
    cdef Py_ssize_t i = n - 1
    cdef Py_ssize_t dot2, dot1
    cdef long long d = 0, mult = 1
    cdef long a = 0, amult = 1
    if n < 5:
        return 0
    # due: digits after the last dot
    while i >= 0 and s[i] != b'.':
        if s[i] < b'0' or s[i] > b'9':
            return 0
        d += (s[i] - 48) * mult
        mult *= 10
        i -= 1
    if i < 0 or i == n - 1:
        return 0
    dot2 = i
    i -= 1
    while i >= 0 and s[i] != b'.':
        if s[i] < b'0' or s[i] > b'9':
            return 0
        a += (s[i] - 48) * amult
        amult *= 10
        i -= 1
    if i <= 0 or i == dot2 - 1:
        return 0
    dot1 = i
    if dot2 - dot1 > 10 or n - dot2 > 19:
        return 0
    attempts[0] = a
    due[0] = d
    return 1


def parse_name(name):
    """(entry id, attempts, due) of an entry file name, or None for a stray name."""
    cdef bytes b = name.encode("ascii", "replace")
    cdef long a
    cdef long long d
    if not _parse(b, len(b), &a, &d):
        return None
    entry_id = name[: name.rfind(".", 0, name.rfind("."))]
    return entry_id, a, d


def scan(path):
    """Scan queue folder `path`; see the module docstring."""
    cdef bytes bpath = path.encode() if isinstance(path, str) else bytes(path)
    cdef DIR *d = opendir(bpath)
    cdef dirent *ent
    cdef const char *name
    cdef Py_ssize_t n
    cdef long a
    cdef long long due
    cdef list names = []
    cdef list strays = []
    cdef array attempts = clone(_LONG_TEMPLATE, 0, False)
    cdef array dues = clone(_LLONG_TEMPLATE, 0, False)
    if d == NULL:
        raise OSError(errno, f"cannot open queue folder {path}")
    try:
        while True:
            ent = readdir(d)
            if ent == NULL:
                break
            name = ent.d_name
            if name[0] == b'.':
                continue
            n = strlen(name)
            if _parse(name, n, &a, &due):
                names.append(name[:n].decode("ascii", "replace"))
                attempts.append(a)
                dues.append(due)
            else:
                strays.append(name[:n].decode("utf-8", "replace"))
    finally:
        closedir(d)
    return ScanResult(names, attempts, dues, strays)
