/* System V shared memory for a single process, over calloc: bench/block's guest kernel is
 * built without SYSVIPC, and fio keeps its job table in a segment it creates and attaches
 * itself. With --thread every job is a thread of that one process, so plain memory is
 * shared memory. LD_PRELOAD'ed by bench/block.py into fio only. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/shm.h>

#define MAX_SEGMENTS 256

static struct {
    void *addr;
    size_t size;
    int used;
} segments[MAX_SEGMENTS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

int shmget(key_t key, size_t size, int flags)
{
    (void)key;
    (void)flags;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_SEGMENTS; i++) {
        if (!segments[i].used) {
            segments[i].addr = calloc(1, size ? size : 1);
            if (segments[i].addr == NULL) {
                pthread_mutex_unlock(&lock);
                errno = ENOMEM;
                return -1;
            }
            segments[i].size = size;
            segments[i].used = 1;
            pthread_mutex_unlock(&lock);
            return i;
        }
    }
    pthread_mutex_unlock(&lock);
    errno = ENOSPC;
    return -1;
}

void *shmat(int id, const void *addr, int flags)
{
    (void)addr;
    (void)flags;
    if (id < 0 || id >= MAX_SEGMENTS || !segments[id].used) {
        errno = EINVAL;
        return (void *)-1;
    }
    return segments[id].addr;
}

int shmdt(const void *addr)
{
    (void)addr;
    return 0; /* freed with the process */
}

int shmctl(int id, int cmd, struct shmid_ds *buf)
{
    if (id < 0 || id >= MAX_SEGMENTS || !segments[id].used) {
        errno = EINVAL;
        return -1;
    }
    if (cmd == IPC_STAT && buf != NULL) {
        memset(buf, 0, sizeof(*buf));
        buf->shm_segsz = segments[id].size;
    }
    return 0; /* IPC_RMID: fio may still be attached; freed with the process */
}
