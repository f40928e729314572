"""cffi build module for the seccomp violation reporter (API mode): a SIGSYS handler in C.

A seccomp filter whose default action is SECCOMP_RET_TRAP sends SIGSYS to the thread that
made a forbidden syscall, with the syscall's number in ``si_syscall``. The handler must be
C: it runs on any thread (vCPU threads too), at any point, with the GIL possibly held, so
it may only use async-signal-safe calls. It writes one JSON log line naming the syscall,
restores SIGSYS's default action and sends it to its own thread: the process dies by
SIGSYS once the handler returns. Built at install time (setup.py ``cffi_modules``) into
``pymvm.syscalls._sigsys_cffi``.
"""

from cffi import FFI

CDEF = r"""
#define PYMVM_MAX_SYSCALL ...
int pymvm_set_syscall_name(int nr, const char *name);
int pymvm_install_sigsys_reporter(int log_fd, const char *process);
"""

SOURCE = r"""
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#define PYMVM_MAX_SYSCALL 1024
static char pymvm_names[PYMVM_MAX_SYSCALL][32];
static char pymvm_process[48];
static int pymvm_log_fd = 2;

static size_t put_str(char *buf, size_t pos, size_t cap, const char *s) {
    while (*s && pos < cap)
        buf[pos++] = *s++;
    return pos;
}

static size_t put_int(char *buf, size_t pos, size_t cap, long v) {
    char tmp[24];
    int n = 0;
    unsigned long u = v < 0 ? -(unsigned long)v : (unsigned long)v;
    if (v < 0 && pos < cap)
        buf[pos++] = '-';
    do {
        tmp[n++] = '0' + u % 10;
        u /= 10;
    } while (u && n < (int)sizeof tmp);
    while (n && pos < cap)
        buf[pos++] = tmp[--n];
    return pos;
}

static void pymvm_on_sigsys(int sig, siginfo_t *info, void *ucontext) {
    char buf[512];
    size_t p = 0, cap = sizeof buf - 1;
    int nr = info->si_syscall;
    long pid = syscall(SYS_getpid), tid = syscall(SYS_gettid);
    const char *name = (nr >= 0 && nr < PYMVM_MAX_SYSCALL && pymvm_names[nr][0])
                       ? pymvm_names[nr] : "unknown";
    (void)sig;
    (void)ucontext;
    p = put_str(buf, p, cap, "{\"event\": \"seccomp_violation\", \"level\": \"critical\", \"syscall\": \"");
    p = put_str(buf, p, cap, name);
    p = put_str(buf, p, cap, "\", \"nr\": ");
    p = put_int(buf, p, cap, nr);
    p = put_str(buf, p, cap, ", \"process\": \"");
    p = put_str(buf, p, cap, pymvm_process);
    p = put_str(buf, p, cap, "\", \"pid\": ");
    p = put_int(buf, p, cap, pid);
    p = put_str(buf, p, cap, ", \"tid\": ");
    p = put_int(buf, p, cap, tid);
    p = put_str(buf, p, cap, ", \"hint\": \"a syscall outside the seccomp allowlist (docs/seccomp.md); "
                             "the process is killed\"}\n");
    if (write(pymvm_log_fd, buf, p) < 0) {
        /* nothing left to report to */
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGSYS, &dfl, NULL);
    /* Pending until the handler returns (SIGSYS is blocked while it runs): then it kills. */
    syscall(SYS_tgkill, pid, tid, SIGSYS);
}

int pymvm_set_syscall_name(int nr, const char *name) {
    if (nr < 0 || nr >= PYMVM_MAX_SYSCALL)
        return -1;
    strncpy(pymvm_names[nr], name, sizeof pymvm_names[nr] - 1);
    return 0;
}

int pymvm_install_sigsys_reporter(int log_fd, const char *process) {
    struct sigaction sa;
    strncpy(pymvm_process, process, sizeof pymvm_process - 1);
    pymvm_log_fd = log_fd;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = pymvm_on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGSYS, &sa, NULL);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pymvm.syscalls._sigsys_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=False)
