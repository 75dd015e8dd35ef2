/*
 * The compiled `sendmail` / `qmail-inject` of an install root: it hands the
 * message to the running engine's `injectd` and exits with its answer.
 *
 * Why: a Python process per message costs about 9 ms of interpreter start
 * before any work; this client starts in well under a millisecond and the
 * processing (the same code as the Python programs: greenarrow.lib.inject.command_line)
 * runs in the long-lived daemon, as Postfix's sendmail hands mail to its
 * pickup daemon.
 *
 * The install root is the parent of the folder this binary sits in
 * ($HVMAIL_ROOT/bin/sendmail). The message is read first, then the client
 * connects, so a slow producer on standard input never holds one of the
 * daemon's few client slots. When the daemon is not running (no socket,
 * refused), the Python program `bin/<name>.py` of the same root does the
 * work instead, the message handed to it in memory (memfd), so injection
 * never depends on the daemon.
 *
 * Request on var/inject.sock, as netstrings ("<length>:<bytes>,"):
 *   the program name, the number of arguments, each argument, the number of
 *   environment variables passed, each as NAME=VALUE, then the message; then
 *   the client shuts down its sending side. The variables are those
 *   command-line injection reads (greenarrow.lib.inject.command_line.client_variable:
 *   GREENARROW_*, QMAILUSER, QMAILHOST, LOGNAME, USER); the daemon drops any
 *   other. The daemon may answer before it has read everything (a message
 *   over control/databytes is refused from its length): the client then
 *   stops sending and reads the answer.
 * Reply: "<exit code>\n" followed by what to print on standard error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

static char root[PATH_MAX];

static void fallback(char **argv, const char *name) {
    char script[PATH_MAX + 64];
    snprintf(script, sizeof script, "%s/bin/%s.py", root, name);
    execv(script, argv);
    fprintf(stderr, "%s: fatal: cannot run %s: %s\n", name, script, strerror(errno));
    exit(111);
}

/* The message on standard input of the Python program, which reads it there. */
static void fallback_with(char **argv, const char *name, const char *msg, size_t len) {
    int fd = memfd_create("message", 0);
    size_t done = 0;
    while (fd >= 0 && done < len) {
        ssize_t w = write(fd, msg + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) break;
        done += (size_t)w;
    }
    if (fd < 0 || done < len || lseek(fd, 0, SEEK_SET) < 0 || dup2(fd, 0) < 0) {
        fprintf(stderr, "%s: fatal: temporary failure: cannot hand the message on: %s\n", name,
                strerror(errno));
        exit(111);
    }
    fallback(argv, name);
}

/* send() without SIGPIPE: a daemon that answered early has closed its side. */
static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int netstring(int fd, const char *p, size_t n) {
    char head[32];
    int len = snprintf(head, sizeof head, "%zu:", n);
    if (write_all(fd, head, (size_t)len) || write_all(fd, p, n) || write_all(fd, ",", 1)) return -1;
    return 0;
}

static int passed(const char *var) {
    return strncmp(var, "GREENARROW_", 11) == 0 || strncmp(var, "QMAILUSER=", 10) == 0 ||
           strncmp(var, "QMAILHOST=", 10) == 0 || strncmp(var, "LOGNAME=", 8) == 0 ||
           strncmp(var, "USER=", 5) == 0;
}

int main(int argc, char **argv) {
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) {
        fprintf(stderr, "sendmail: fatal: cannot find my own path\n");
        return 111;
    }
    exe[n] = 0;
    char *name = basename(strdup(argv[0]));
    if (strcmp(name, "qmail-inject") != 0) name = "sendmail";
    snprintf(root, sizeof root, "%s", dirname(dirname(exe)));

    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (snprintf(addr.sun_path, sizeof addr.sun_path, "%s/var/inject.sock", root) >=
        (int)sizeof addr.sun_path)
        fallback(argv, name);
    if (access(addr.sun_path, F_OK) < 0) fallback(argv, name); /* stopped: stdin still unread */
    /* -bs is a dialogue on stdin/stdout, not a message to hand over: the Python program
     * serves it (greenarrow.lib.inject.smtp_stdio). */
    for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++)
        if (strcmp(argv[i], "-bs") == 0 && strcmp(name, "sendmail") == 0) fallback(argv, name);

    size_t cap = 65536, len = 0;
    char *msg = malloc(cap);
    for (;;) {
        if (!msg) {
            fprintf(stderr, "%s: fatal: out of memory\n", name);
            return 111;
        }
        if (len == cap) msg = realloc(msg, cap *= 2);
        if (!msg) continue;
        ssize_t r = read(0, msg + len, cap - len);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            fprintf(stderr, "%s: fatal: cannot read the message: %s\n", name, strerror(errno));
            return 111;
        }
        if (r == 0) break;
        len += (size_t)r;
    }

    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0)
        fallback_with(argv, name, msg, len);

    char count[32];
    int bad = netstring(fd, name, strlen(name));
    snprintf(count, sizeof count, "%d", argc - 1);
    bad |= netstring(fd, count, strlen(count));
    for (int i = 1; i < argc; i++) bad |= netstring(fd, argv[i], strlen(argv[i]));
    int vars = 0;
    for (char **e = environ; *e; e++) vars += passed(*e);
    snprintf(count, sizeof count, "%d", vars);
    bad |= netstring(fd, count, strlen(count));
    for (char **e = environ; *e; e++)
        if (passed(*e)) bad |= netstring(fd, *e, strlen(*e));
    bad |= netstring(fd, msg, len);
    if (!bad) shutdown(fd, SHUT_WR);

    char reply[8192];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, reply + got, sizeof reply - 1 - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
        if (got == sizeof reply - 1) break;
    }
    reply[got] = 0;
    char *nl = strchr(reply, '\n');
    if (!nl) {
        fprintf(stderr, "%s: fatal: temporary failure: %s\n", name,
                bad ? "lost the injection daemon" : "no answer from the injection daemon");
        return 111;
    }
    *nl = 0;
    int code = atoi(reply);
    if (nl[1]) fputs(nl + 1, stderr);
    return code;
}
