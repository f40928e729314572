/*
 * pymvm-agent: the guest agent of the pymvm test initramfs (protocol: docs/agent.md).
 *
 * Listens on an AF_VSOCK stream port (or, for the host-side tests, a UNIX socket) and serves
 * each connection in a forked child: one request per connection, either a command to run
 * (argv or a shell string, stdin, separate stdout/stderr, environment, working directory,
 * timeout that kills the command's process group) or a file to put or get, binary-safe.
 *
 * Frames in both directions: 1 byte type, 4 bytes big-endian payload length, payload.
 * Built statically by pymvm.images.initramfs (gcc -static -O2); no dependency but libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define PROTOCOL_VERSION 1
#define DEFAULT_PORT 1024
#define MAX_FRAME (1u << 20)   /* largest payload either side may send */
#define CHUNK (64u * 1024)     /* output and file data are sent in chunks of this size */

/* client -> agent */
#define T_EXEC 'E'
#define T_STDIN 'I'
#define T_PUT 'P'
#define T_GET 'G'
#define T_DATA 'D'
#define T_PING 'V'
/* agent -> client */
#define T_STDOUT 'O'
#define T_STDERR 'e'
#define T_RESULT 'R'
#define T_ERROR 'X'

/* result kinds */
#define R_EXITED 0
#define R_SIGNALED 1
#define R_TIMED_OUT 2

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0)
            return 0; /* EOF */
        p += n;
        len -= (size_t)n;
    }
    return 1;
}

static int send_frame(int fd, char type, const void *data, uint32_t len)
{
    unsigned char hdr[5] = {(unsigned char)type, len >> 24, len >> 16, len >> 8, len};
    if (write_all(fd, hdr, sizeof hdr) < 0)
        return -1;
    return len ? write_all(fd, data, len) : 0;
}

static void send_error(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void send_error(int fd, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    send_frame(fd, T_ERROR, msg, (uint32_t)n);
}

static void send_result(int fd, int kind, int32_t code)
{
    unsigned char out[5] = {(unsigned char)kind, (uint32_t)code >> 24, (uint32_t)code >> 16,
                            (uint32_t)code >> 8, (uint32_t)code};
    send_frame(fd, T_RESULT, out, sizeof out);
}

/* Reads one frame; returns 1 with *payload malloc'ed (NUL-terminated), 0 on EOF, -1 on error
   (an error frame is sent for a protocol violation). */
static int recv_frame(int fd, char *type, char **payload, uint32_t *len)
{
    unsigned char hdr[5];
    int rc = read_all(fd, hdr, sizeof hdr);
    if (rc <= 0)
        return rc;
    *type = (char)hdr[0];
    *len = (uint32_t)hdr[1] << 24 | (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 8 | hdr[4];
    if (*len > MAX_FRAME) {
        send_error(fd, "frame of %u bytes is larger than the limit of %u", *len, MAX_FRAME);
        return -1;
    }
    *payload = malloc(*len + 1);
    if (!*payload) {
        send_error(fd, "out of memory for a %u-byte frame", *len);
        return -1;
    }
    if (*len && read_all(fd, *payload, *len) != 1) {
        free(*payload);
        return -1;
    }
    (*payload)[*len] = '\0';
    return 1;
}

/* ---- request decoding: u32 big-endian counts and lengths ---- */

struct cursor {
    const unsigned char *p;
    uint32_t left;
    int bad;
};

static uint32_t take_u32(struct cursor *c)
{
    if (c->left < 4) {
        c->bad = 1;
        return 0;
    }
    uint32_t v = (uint32_t)c->p[0] << 24 | (uint32_t)c->p[1] << 16 | (uint32_t)c->p[2] << 8 | c->p[3];
    c->p += 4;
    c->left -= 4;
    return v;
}

/* A length-prefixed string, copied and NUL-terminated (embedded NULs are refused). */
static char *take_str(struct cursor *c)
{
    uint32_t n = take_u32(c);
    if (c->bad || n > c->left || memchr(c->p, 0, n)) {
        c->bad = 1;
        return NULL;
    }
    char *s = malloc(n + 1);
    if (!s) {
        c->bad = 1;
        return NULL;
    }
    memcpy(s, c->p, n);
    s[n] = '\0';
    c->p += n;
    c->left -= n;
    return s;
}

static char **take_strs(struct cursor *c, uint32_t *count)
{
    uint32_t n = take_u32(c);
    if (c->bad || n > c->left / 4) { /* each string needs at least its length */
        c->bad = 1;
        return NULL;
    }
    char **v = calloc(n + 1, sizeof *v);
    if (!v) {
        c->bad = 1;
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        v[i] = take_str(c);
        if (c->bad)
            return v;
    }
    *count = n;
    return v;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- exec ---- */

struct buffer {
    char *data;
    size_t len, cap;
};

static int buffer_add(struct buffer *b, const char *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return 0;
}

/* Forward what a pipe has; returns 0 at EOF, 1 otherwise. */
static int pump(int from, int conn, char type)
{
    char buf[CHUNK];
    ssize_t n = read(from, buf, sizeof buf);
    if (n < 0)
        return (errno == EINTR || errno == EAGAIN) ? 1 : 0;
    if (n == 0)
        return 0;
    send_frame(conn, type, buf, (uint32_t)n);
    return 1;
}

/* Forward everything a pipe holds now, without waiting for its writers to close it. */
static void drain(int from, int conn, char type)
{
    char buf[CHUNK];
    for (;;) {
        ssize_t n = read(from, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        send_frame(conn, type, buf, (uint32_t)n);
    }
}

static void do_exec(int conn, const char *payload, uint32_t len)
{
    struct cursor c = {(const unsigned char *)payload, len, 0};
    uint32_t flags = take_u32(&c);
    uint32_t timeout_ms = take_u32(&c);
    uint32_t argc = 0, envc = 0;
    char **argv = take_strs(&c, &argc);
    char **env = c.bad ? NULL : take_strs(&c, &envc);
    char *cwd = c.bad ? NULL : take_str(&c);
    int shell = flags & 1, clear_env = flags & 2, want_stdin = flags & 4;
    if (c.bad || c.left) {
        send_error(conn, "malformed exec request");
        return;
    }
    if (argc == 0 || (shell && argc != 1)) {
        send_error(conn, shell ? "a shell command is one string" : "argv is empty");
        return;
    }

    int in[2], out[2], err[2];
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) {
        send_error(conn, "pipe: %s", strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_error(conn, "fork: %s", strerror(errno));
        return;
    }
    if (pid == 0) {
        setpgid(0, 0); /* the timeout kills the whole group */
        signal(SIGPIPE, SIG_DFL);
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        if (clear_env)
            clearenv();
        for (uint32_t i = 0; i < envc; i++)
            putenv(env[i]);
        if (cwd[0] && chdir(cwd) < 0) {
            dprintf(2, "pymvm-agent: cannot change to directory %s: %s\n", cwd, strerror(errno));
            _exit(127);
        }
        if (shell)
            execl("/bin/sh", "sh", "-c", argv[0], (char *)NULL);
        else
            execvp(argv[0], argv);
        dprintf(2, "pymvm-agent: cannot run %s: %s\n", shell ? "/bin/sh" : argv[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    close(in[0]);
    close(out[1]);
    close(err[1]);
    fcntl(in[1], F_SETFL, O_NONBLOCK);
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    if (!want_stdin) {
        close(in[1]);
        in[1] = -1;
    }

    struct buffer pending = {0};
    int stdin_eof = !want_stdin, out_open = 1, err_open = 1, conn_open = 1, exited = 0;
    int status = 0, timed_out = 0;
    int64_t deadline = timeout_ms ? now_ms() + timeout_ms : 0;

    while (!exited || out_open || err_open) {
        struct pollfd fds[4];
        int nfds = 0, i_conn = -1, i_in = -1, i_out = -1, i_err = -1;
        if (conn_open) { /* stdin frames, and the client hanging up */
            i_conn = nfds;
            fds[nfds++] = (struct pollfd){conn, POLLIN, 0};
        }
        if (in[1] >= 0 && pending.len) {
            i_in = nfds;
            fds[nfds++] = (struct pollfd){in[1], POLLOUT, 0};
        }
        if (out_open) {
            i_out = nfds;
            fds[nfds++] = (struct pollfd){out[0], POLLIN, 0};
        }
        if (err_open) {
            i_err = nfds;
            fds[nfds++] = (struct pollfd){err[0], POLLIN, 0};
        }
        int wait = exited ? 0 : 50; /* reap promptly even if a grandchild holds the pipes */
        if (!out_open && !err_open && !exited)
            wait = 10;
        if (deadline && !timed_out) {
            int64_t left = deadline - now_ms();
            if (left <= 0) {
                kill(-pid, SIGKILL);
                timed_out = 1;
            } else if (left < wait) {
                wait = (int)left;
            }
        }
        int n = poll(fds, (nfds_t)nfds, wait);
        if (n < 0 && errno != EINTR)
            break;
        if (n > 0) {
            if (i_out >= 0 && fds[i_out].revents)
                out_open = pump(out[0], conn, T_STDOUT);
            if (i_err >= 0 && fds[i_err].revents)
                err_open = pump(err[0], conn, T_STDERR);
            if (i_in >= 0 && fds[i_in].revents) {
                ssize_t w = write(in[1], pending.data, pending.len);
                if (w > 0) {
                    memmove(pending.data, pending.data + w, pending.len - (size_t)w);
                    pending.len -= (size_t)w;
                } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                    pending.len = 0; /* the command closed its stdin: drop the rest */
                    close(in[1]);
                    in[1] = -1;
                }
            }
            if (i_conn >= 0 && fds[i_conn].revents) {
                char type, *data;
                uint32_t dlen;
                int rc = recv_frame(conn, &type, &data, &dlen);
                if (rc <= 0) { /* the client went away: nobody wants the result */
                    conn_open = 0;
                    kill(-pid, SIGKILL);
                } else {
                    if (type != T_STDIN || stdin_eof) {
                        /* nothing else may come while a command runs: ignore it */
                    } else if (dlen == 0) {
                        stdin_eof = 1;
                    } else {
                        if (in[1] >= 0 && buffer_add(&pending, data, dlen) < 0)
                            kill(-pid, SIGKILL);
                    }
                    free(data);
                }
            }
        }
        if (stdin_eof && !pending.len && in[1] >= 0) {
            close(in[1]);
            in[1] = -1;
        }
        if (!exited) {
            pid_t r = waitpid(pid, &status, WNOHANG);
            if (r == pid) {
                exited = 1;
                /* What the command left in the pipes still goes out; a background process
                   that inherited them does not hold up the result. */
                if (out_open)
                    drain(out[0], conn, T_STDOUT);
                if (err_open)
                    drain(err[0], conn, T_STDERR);
                out_open = err_open = 0;
            }
        }
    }
    if (in[1] >= 0)
        close(in[1]);
    close(out[0]);
    close(err[0]);
    free(pending.data);
    if (!conn_open)
        return;
    if (timed_out)
        send_result(conn, R_TIMED_OUT, SIGKILL);
    else if (WIFSIGNALED(status))
        send_result(conn, R_SIGNALED, WTERMSIG(status));
    else
        send_result(conn, R_EXITED, WEXITSTATUS(status));
}

/* ---- files ---- */

static void do_put(int conn, const char *payload, uint32_t len)
{
    struct cursor c = {(const unsigned char *)payload, len, 0};
    uint32_t mode = take_u32(&c);
    char *path = take_str(&c);
    if (c.bad || c.left || !path[0]) {
        send_error(conn, "malformed put request");
        return;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777);
    int saved = errno;
    for (;;) {
        char type, *data;
        uint32_t dlen;
        if (recv_frame(conn, &type, &data, &dlen) != 1 || type != T_DATA) {
            if (fd >= 0) {
                close(fd);
                unlink(path);
            }
            return; /* the client went away or broke the protocol: no result */
        }
        if (dlen == 0) {
            free(data);
            break;
        }
        if (fd >= 0 && write_all(fd, data, dlen) < 0) {
            saved = errno;
            close(fd);
            fd = -1;
        }
        free(data);
    }
    if (fd < 0) {
        send_error(conn, "cannot write %s: %s", path, strerror(saved));
        return;
    }
    if (fchmod(fd, mode & 07777) < 0 || close(fd) < 0) {
        send_error(conn, "cannot finish %s: %s", path, strerror(errno));
        return;
    }
    send_result(conn, R_EXITED, 0);
}

static void do_get(int conn, const char *payload, uint32_t len)
{
    struct cursor c = {(const unsigned char *)payload, len, 0};
    char *path = take_str(&c);
    if (c.bad || c.left || !path[0]) {
        send_error(conn, "malformed get request");
        return;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        send_error(conn, "cannot read %s: %s", path, strerror(errno));
        return;
    }
    if (S_ISDIR(st.st_mode)) {
        send_error(conn, "cannot read %s: Is a directory", path);
        return;
    }
    char *buf = malloc(CHUNK);
    for (;;) {
        ssize_t n = read(fd, buf, CHUNK);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            send_error(conn, "cannot read %s: %s", path, strerror(errno));
            return;
        }
        if (n == 0)
            break;
        if (send_frame(conn, T_DATA, buf, (uint32_t)n) < 0)
            return;
    }
    close(fd);
    free(buf);
    send_frame(conn, T_DATA, NULL, 0);
    send_result(conn, R_EXITED, 0);
}

static void serve(int conn)
{
    char type, *payload;
    uint32_t len;
    if (recv_frame(conn, &type, &payload, &len) != 1)
        return;
    switch (type) {
    case T_EXEC:
        do_exec(conn, payload, len);
        break;
    case T_PUT:
        do_put(conn, payload, len);
        break;
    case T_GET:
        do_get(conn, payload, len);
        break;
    case T_PING: {
        char version[16];
        int n = snprintf(version, sizeof version, "%d", PROTOCOL_VERSION);
        send_frame(conn, T_PING, version, (uint32_t)n);
        break;
    }
    default:
        send_error(conn, "unknown request type 0x%02x; expected E, P, G or V", (unsigned char)type);
    }
    free(payload);
}

static void usage(void)
{
    fprintf(stderr, "usage: pymvm-agent [--port N | --unix PATH | --connect CID:PORT]\n");
    exit(2);
}

/* --connect CID:PORT: a vsock client for tests (guest -> host is CID 2): sends stdin, half-closes,
   then copies what the peer sends to stdout until it closes. */
static int connect_mode(const char *spec)
{
    char *end;
    unsigned long cid = strtoul(spec, &end, 10), port;
    if (*end != ':')
        usage();
    port = strtoul(end + 1, &end, 10);
    if (*end || port > 0xFFFFFFFFul || cid > 0xFFFFFFFFul)
        usage();
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = (unsigned int)cid,
                               .svm_port = (unsigned int)port};
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "pymvm-agent: cannot connect to vsock %lu:%lu: %s\n", cid, port,
                strerror(errno));
        return 1;
    }
    char buf[CHUNK];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0)
        if (write_all(fd, buf, (size_t)n) < 0)
            return 1;
    shutdown(fd, SHUT_WR);
    while ((n = read(fd, buf, sizeof buf)) > 0)
        if (write_all(1, buf, (size_t)n) < 0)
            return 1;
    return n < 0;
}

int main(int argc, char **argv)
{
    unsigned long port = DEFAULT_PORT;
    const char *unix_path = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--port") && i + 1 < argc) {
            char *end;
            port = strtoul(argv[++i], &end, 10);
            if (*end || port == 0 || port > 0xFFFFFFFEul)
                usage();
        } else if (!strcmp(argv[i], "--unix") && i + 1 < argc) {
            unix_path = argv[++i];
        } else if (!strcmp(argv[i], "--connect") && i + 1 < argc) {
            return connect_mode(argv[i + 1]);
        } else {
            usage();
        }
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN); /* connection children are reaped by the kernel */

    int srv;
    if (unix_path) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        if (strlen(unix_path) >= sizeof addr.sun_path) {
            fprintf(stderr, "pymvm-agent: socket path too long\n");
            return 2;
        }
        strcpy(addr.sun_path, unix_path);
        srv = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        unlink(unix_path);
        if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fprintf(stderr, "pymvm-agent: cannot listen on %s: %s\n", unix_path, strerror(errno));
            return 1;
        }
    } else {
        struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
                                   .svm_port = (unsigned int)port};
        srv = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (srv < 0 || bind(srv, (struct sockaddr *)&addr, sizeof addr) < 0) {
            fprintf(stderr, "pymvm-agent: cannot listen on vsock port %lu: %s\n", port,
                    strerror(errno));
            return 1;
        }
    }
    if (listen(srv, 128) < 0) {
        fprintf(stderr, "pymvm-agent: listen: %s\n", strerror(errno));
        return 1;
    }
    for (;;) {
        int conn = accept4(srv, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            fprintf(stderr, "pymvm-agent: accept: %s\n", strerror(errno));
            sleep(1);
            continue;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(srv);
            signal(SIGCHLD, SIG_DFL); /* the command's status must be collectable */
            serve(conn);
            _exit(0);
        }
        close(conn);
    }
}
