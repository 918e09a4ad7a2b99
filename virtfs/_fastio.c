/* virtfs._fastio: the C fast path of the agent's READ and WRITE requests (cfast.py).
 *
 * N worker pthreads each epoll_wait() and read() the mount's /dev/fuse fd (the session's
 * own fd, set O_NONBLOCK: a thread that loses the race gets EAGAIN and polls again)
 * into a buffer of their own, and parse the fuse_in_header themselves. A FUSE_READ
 * (or FUSE_WRITE, of a handle opened for writing) whose file handle is bound to a
 * disk, whose range lies in one published entry that allows it, and that comes while
 * the lease deadline has not passed, is served here with no Python at all: one
 * pread()/pwrite() on the container fd under the disk's read lock, one writev() of
 * the reply. Everything else (any other opcode, a miss, a failed or short I/O) is
 * handed over unchanged: the raw request is queued and an eventfd is signalled; the
 * trio side takes the queue (take()) and feeds each request to libfuse
 * (pyfuse3.process_raw), as pyfuse3's own loop would.
 *
 * The table is fed by Python (publish/invalidate) and is, per disk, a sorted array
 * of (virtual start, virtual end, container fd, container offset, LUN, may read, may
 * write) of the entries DataPath.plain would serve. publish() and invalidate() take
 * the disk's write lock, so when they return no I/O still uses the old entries (an
 * I/O holds the read lock across its pread/pwrite). The rwlocks prefer writers.
 * What Python does per write besides the pwrite (the sync debt, the times, the
 * metrics) is counted here (atomics, the debt before the pwrite, all before the
 * reply) and folded into Python by counters().
 *
 * Source of the wire format: linux/fuse.h (fuse_in_header, fuse_read_in,
 * fuse_out_header); the rule that a reply goes to the fd that read the request: the
 * kernel's per-fd processing queue (fs/fuse/dev.c).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define IN_BUF (16u << 20) + (64u << 10) /* a request: >= libfuse's bufsize */
#define DATA_BUF (16u << 20)              /* the largest read served here */
#define NBUCKETS 32

#define MAXLUN 256 /* writes to LUNs from here on go through Python */

struct ent {
    int64_t vstart, vend, coff;
    int fd, lun;
    int may_read, may_write;
};

struct counts { /* served here, not yet folded into Python (metrics) */
    atomic_ullong ops, bytes, ns;
    atomic_ullong buckets[NBUCKETS + 1];
};

struct disk {
    pthread_rwlock_t lock;
    struct ent *ents;
    size_t n;
    struct counts r, w;
    atomic_ullong written[MAXLUN]; /* writes per LUN (fsync debts), not yet folded */
    atomic_llong lo, hi, last_lo, last_hi; /* writes' extent, and the last one's */
};

struct req {
    struct req *next;
    size_t n;
    char data[];
};

/* a container read or write that failed here (answered with its error: handing it to
 * Python would try it again and hide a transient error from the writer): Python logs
 * and reports it (DataPath._io_error), as for its own I/O */
struct ioerr {
    struct ioerr *next;
    uint64_t fh;
    int64_t coff;
    int lun, err, write;
};

static pthread_rwlock_t map_lock; /* the disk array and the fh map */
static struct disk **disks;
static size_t ndisks;
static uint64_t *fh_keys; /* fh -> disk index, as parallel arrays (few handles) */
static size_t *fh_disks;
static char *fh_writable;
static size_t nfh, capfh;

static atomic_llong lease_ns; /* CLOCK_MONOTONIC deadline of the lease */
static uint64_t bucket_ns[NBUCKETS];
static size_t nbounds;

static int fuse_fd = -1, wake_fd = -1, stop_fd = -1;
static int writes; /* serve writes too */
static atomic_int stopping, ended;
static pthread_t *threads;
static size_t nthreads;
static pthread_mutex_t q_lock = PTHREAD_MUTEX_INITIALIZER;
static struct req *q_head, *q_tail;
static struct ioerr *e_head, *e_tail; /* under q_lock too */
static atomic_ullong n_served, n_written, n_handed;
static atomic_int pending; /* served I/O not yet folded */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void init_rwlock(pthread_rwlock_t *l)
{
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(l, &a);
    pthread_rwlockattr_destroy(&a);
}

static void wake(void)
{
    uint64_t one = 1;
    ssize_t r = write(wake_fd, &one, sizeof one);
    (void)r;
}

static ssize_t write_all_header(const struct fuse_out_header *out)
{
    return write(fuse_fd, out, sizeof *out);
}

static void hand_over(const char *buf, size_t n)
{
    struct req *r = malloc(sizeof *r + n);
    if (r == NULL) {
        /* nothing sane left: end the session rather than lose a request */
        atomic_store(&ended, ENOMEM);
        wake();
        return;
    }
    r->next = NULL;
    r->n = n;
    memcpy(r->data, buf, n);
    pthread_mutex_lock(&q_lock);
    if (q_tail)
        q_tail->next = r;
    else
        q_head = r;
    q_tail = r;
    pthread_mutex_unlock(&q_lock);
    atomic_fetch_add(&n_handed, 1);
    wake();
}

/* A container I/O of fh's at (lun, coff) failed with err: queued for Python, which is
 * woken; the request gets the error the Python path gives (reads EIO; writes ENOSPC
 * and EDQUOT as they are, else EIO). */
static void io_failed(const struct fuse_in_header *h, uint64_t fh, int lun, int64_t coff,
                      int err, int is_write)
{
    struct ioerr *x = malloc(sizeof *x);
    if (x != NULL) {
        *x = (struct ioerr){.next = NULL, .fh = fh, .coff = coff, .lun = lun, .err = err,
                            .write = is_write};
        pthread_mutex_lock(&q_lock);
        if (e_tail)
            e_tail->next = x;
        else
            e_head = x;
        e_tail = x;
        pthread_mutex_unlock(&q_lock);
    }
    int code = is_write && (err == ENOSPC || err == EDQUOT) ? err : EIO;
    struct fuse_out_header out = {.len = sizeof out, .error = -code, .unique = h->unique};
    ssize_t w = write_all_header(&out);
    (void)w;
    wake();
}

/* fh's disk, read-locked (the caller unlocks it), or NULL. The disk is locked before
 * the map is let go, so once unbind() and invalidate() have returned no I/O that found
 * the disk through fh is left (a slot can then serve another disk). Disks are never
 * freed while the threads run. */
static struct disk *disk_of(uint64_t fh, int write)
{
    struct disk *d = NULL;
    pthread_rwlock_rdlock(&map_lock);
    for (size_t i = 0; i < nfh; i++)
        if (fh_keys[i] == fh) {
            if (!write || fh_writable[i])
                d = disks[fh_disks[i]];
            break;
        }
    if (d != NULL)
        pthread_rwlock_rdlock(&d->lock);
    pthread_rwlock_unlock(&map_lock);
    return d;
}

static void count(struct counts *c, uint64_t nbytes, int64_t t0)
{
    uint64_t dt = (uint64_t)(now_ns() - t0);
    atomic_fetch_add(&c->ops, 1);
    atomic_fetch_add(&c->bytes, nbytes);
    atomic_fetch_add(&c->ns, dt);
    size_t b = 0;
    while (b < nbounds && dt > bucket_ns[b])
        b++;
    atomic_fetch_add(&c->buckets[b], 1);
}

/* the entry of d holding [off, end) whole, or NULL (read lock held) */
static struct ent *find(struct disk *d, int64_t off, int64_t end)
{
    if (!d->n)
        return NULL;
    size_t lo = 0, hi = d->n; /* the last entry with vstart <= off */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (d->ents[mid].vstart <= off)
            lo = mid;
        else
            hi = mid;
    }
    struct ent *e = &d->ents[lo];
    return e->vstart <= off && end <= e->vend ? e : NULL;
}

static void atomic_min(atomic_llong *a, int64_t v)
{
    long long cur = atomic_load(a);
    while (v < cur && !atomic_compare_exchange_weak(a, &cur, v))
        ;
}

static void atomic_max(atomic_llong *a, int64_t v)
{
    long long cur = atomic_load(a);
    while (v > cur && !atomic_compare_exchange_weak(a, &cur, v))
        ;
}

/* 1: served (answered); 0: hand it over. The write's debt is counted before the
 * pwrite (a write that fails half-way may have landed in part: blockio.pwrite). */
static int serve_write(const struct fuse_in_header *h, const struct fuse_write_in *in,
                       const char *data, size_t avail)
{
    if (in->size == 0 || in->size != avail || in->offset > (uint64_t)INT64_MAX - in->size)
        return 0;
    struct disk *d = disk_of(in->fh, 1);
    if (d == NULL)
        return 0;
    int64_t off = (int64_t)in->offset, end = off + in->size;
    int64_t t0 = now_ns();
    ssize_t put = -1;
    int err = 0, lun = -1;
    int64_t coff = 0;
    struct ent *e = t0 < atomic_load(&lease_ns) ? find(d, off, end) : NULL;
    if (e != NULL && e->may_write) {
        atomic_fetch_add(&d->written[e->lun], 1);
        atomic_store(&pending, 1);
        lun = e->lun;
        coff = e->coff + (off - e->vstart);
        put = pwrite(e->fd, data, in->size, coff);
        err = put < 0 ? errno : 0;
    }
    if (put == (ssize_t)in->size) { /* counted under the lock: the slot is still d's */
        atomic_min(&d->lo, off);
        atomic_max(&d->hi, end);
        atomic_store(&d->last_lo, off);
        atomic_store(&d->last_hi, end);
        count(&d->w, in->size, t0);
        atomic_store(&pending, 1); /* (again: a fold may have run since the first) */
    }
    pthread_rwlock_unlock(&d->lock);
    if (err != 0) {
        io_failed(h, in->fh, lun, coff, err, 1);
        return 1;
    }
    if (put != (ssize_t)in->size)
        return 0; /* a miss or a short write: Python does it (again) */
    atomic_fetch_add(&n_written, 1);
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof out + sizeof(struct fuse_write_out)), .error = 0,
        .unique = h->unique};
    struct fuse_write_out wo = {.size = in->size, .padding = 0};
    struct iovec iov[2] = {{&out, sizeof out}, {&wo, sizeof wo}};
    ssize_t w = writev(fuse_fd, iov, 2);
    (void)w;
    return 1;
}

/* 1: served (answered); 0: hand it over */
static int serve_read(const struct fuse_in_header *h, const struct fuse_read_in *in,
                      char *data)
{
    if (in->size == 0 || in->size > DATA_BUF || in->offset > (uint64_t)INT64_MAX - in->size)
        return 0;
    struct disk *d = disk_of(in->fh, 0);
    if (d == NULL)
        return 0;
    int64_t off = (int64_t)in->offset, end = off + in->size;
    int64_t t0 = now_ns();
    ssize_t got = -1;
    int err = 0, lun = -1;
    int64_t coff = 0;
    struct ent *e = t0 < atomic_load(&lease_ns) ? find(d, off, end) : NULL;
    if (e != NULL && e->may_read) {
        lun = e->lun;
        coff = e->coff + (off - e->vstart);
        got = pread(e->fd, data, in->size, coff);
        err = got < 0 ? errno : 0;
    }
    if (got == (ssize_t)in->size) {
        count(&d->r, in->size, t0); /* under the lock: the slot is still d's */
        atomic_store(&pending, 1);
    }
    pthread_rwlock_unlock(&d->lock);
    if (err != 0) {
        io_failed(h, in->fh, lun, coff, err, 0);
        return 1;
    }
    if (got != (ssize_t)in->size)
        return 0; /* a miss or a short read: Python does it again */
    struct fuse_out_header out = {
        .len = (uint32_t)(sizeof out + in->size), .error = 0, .unique = h->unique};
    struct iovec iov[2] = {{&out, sizeof out}, {data, in->size}};
    ssize_t w = writev(fuse_fd, iov, 2);
    (void)w; /* ENOENT: the request was interrupted meanwhile; nothing to do */
    atomic_fetch_add(&n_served, 1);
    return 1;
}

static void *worker(void *arg)
{
    (void)arg;
    char *buf = malloc(IN_BUF), *data = malloc(DATA_BUF);
    if (buf == NULL || data == NULL) {
        free(buf);
        free(data);
        atomic_store(&ended, ENOMEM);
        wake();
        return NULL;
    }
    /* one epoll per thread, the FUSE fd EPOLLEXCLUSIVE: a request wakes one thread, not
     * all of them (each other one would read EAGAIN); the stop fd wakes every one */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event fe = {.events = EPOLLIN | EPOLLEXCLUSIVE, .data.fd = fuse_fd};
    struct epoll_event se = {.events = EPOLLIN, .data.fd = stop_fd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fuse_fd, &fe) < 0 ||
        epoll_ctl(ep, EPOLL_CTL_ADD, stop_fd, &se) < 0) {
        atomic_store(&ended, errno);
        wake();
        if (ep >= 0)
            close(ep);
        free(buf);
        free(data);
        return NULL;
    }
    while (!atomic_load(&stopping)) {
        struct epoll_event ev[2];
        int nev = epoll_wait(ep, ev, 2, -1);
        if (nev < 0) {
            if (errno == EINTR)
                continue;
            atomic_store(&ended, errno);
            wake();
            break;
        }
        int stop = atomic_load(&stopping);
        for (int i = 0; i < nev; i++)
            stop |= ev[i].data.fd == stop_fd; /* (the FUSE fd's errors: read says which) */
        if (stop)
            break;
        ssize_t n = read(fuse_fd, buf, IN_BUF);
        if (n < 0) {
            int e = errno;
            if (e == EAGAIN || e == EINTR || e == ENOENT)
                continue; /* another reader took it; or it was interrupted */
            atomic_store(&ended, e); /* ENODEV: unmounted */
            wake();
            break;
        }
        if (n == 0) {
            atomic_store(&ended, ENODEV);
            wake();
            break;
        }
        const struct fuse_in_header *h = (const struct fuse_in_header *)buf;
        if ((size_t)n >= sizeof *h + sizeof(struct fuse_read_in) && h->opcode == FUSE_READ &&
            serve_read(h, (const struct fuse_read_in *)(buf + sizeof *h), data))
            continue;
        size_t wh = sizeof *h + sizeof(struct fuse_write_in);
        if (writes && (size_t)n >= wh && h->opcode == FUSE_WRITE && h->total_extlen == 0 &&
            serve_write(h, (const struct fuse_write_in *)(buf + sizeof *h), buf + wh,
                        (size_t)n - wh))
            continue;
        hand_over(buf, (size_t)n);
    }
    close(ep);
    free(buf);
    free(data);
    return NULL;
}

/* ------------------------------------------------------------------ Python API */

static PyObject *py_start(PyObject *self, PyObject *args)
{
    int fd, n, w;
    PyObject *bounds;
    if (!PyArg_ParseTuple(args, "iiOp", &fd, &n, &bounds, &w))
        return NULL;
    if (threads != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the fast path runs already");
        return NULL;
    }
    if (n < 1 || n > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be 1..64");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(bounds, "bounds must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    if (nb > NBUCKETS) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many latency buckets");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        bucket_ns[i] = v;
    }
    nbounds = (size_t)nb;
    Py_DECREF(seq);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd < 0 || stop_fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    fuse_fd = fd;
    writes = w;
    atomic_store(&stopping, 0);
    atomic_store(&ended, 0);
    threads = calloc((size_t)n, sizeof *threads);
    if (threads == NULL)
        return PyErr_NoMemory();
    for (nthreads = 0; nthreads < (size_t)n; nthreads++) {
        int e = pthread_create(&threads[nthreads], NULL, worker, NULL);
        if (e) {
            errno = e;
            PyErr_SetFromErrno(PyExc_OSError);
            break; /* the caller calls stop() */
        }
    }
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(wake_fd);
}

static PyObject *py_stop(PyObject *self, PyObject *unused)
{
    if (threads == NULL)
        Py_RETURN_NONE;
    atomic_store(&stopping, 1);
    uint64_t one = 1;
    ssize_t r = write(stop_fd, &one, sizeof one);
    (void)r;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < nthreads; i++)
        pthread_join(threads[i], NULL);
    Py_END_ALLOW_THREADS
    free(threads);
    threads = NULL;
    nthreads = 0;
    close(stop_fd);
    close(wake_fd);
    stop_fd = wake_fd = -1;
    fuse_fd = -1;
    pthread_mutex_lock(&q_lock);
    struct req *q = q_head;
    q_head = q_tail = NULL;
    pthread_mutex_unlock(&q_lock);
    while (q) {
        struct req *next = q->next;
        free(q);
        q = next;
    }
    Py_RETURN_NONE;
}

/* errors() -> [(fh, lun, container offset, errno, write)]: the container I/O that failed
 * here since the last call (answered with its error already), oldest first */
static PyObject *py_errors(PyObject *self, PyObject *unused)
{
    pthread_mutex_lock(&q_lock);
    struct ioerr *x = e_head;
    e_head = e_tail = NULL;
    pthread_mutex_unlock(&q_lock);
    PyObject *list = PyList_New(0);
    while (x) {
        struct ioerr *next = x->next;
        PyObject *t = list ? Py_BuildValue("(KiLiO)", (unsigned long long)x->fh, x->lun,
                                           (long long)x->coff, x->err,
                                           x->write ? Py_True : Py_False)
                           : NULL;
        if (t == NULL || PyList_Append(list, t) < 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
        free(x);
        x = next;
    }
    return list;
}

/* take() -> (list of raw requests (bytes), ended: 0 or the errno that ended the reader) */
static PyObject *py_take(PyObject *self, PyObject *unused)
{
    pthread_mutex_lock(&q_lock);
    struct req *q = q_head;
    q_head = q_tail = NULL;
    pthread_mutex_unlock(&q_lock);
    PyObject *list = PyList_New(0);
    while (q) {
        struct req *next = q->next;
        PyObject *b = list ? PyBytes_FromStringAndSize(q->data, (Py_ssize_t)q->n) : NULL;
        if (b == NULL || PyList_Append(list, b) < 0)
            Py_CLEAR(list);
        Py_XDECREF(b);
        free(q);
        q = next;
    }
    if (list == NULL)
        return NULL;
    return Py_BuildValue("(Ni)", list, atomic_load(&ended));
}

static PyObject *py_set_lease(PyObject *self, PyObject *args)
{
    long long deadline;
    if (!PyArg_ParseTuple(args, "L", &deadline))
        return NULL;
    atomic_store(&lease_ns, deadline);
    Py_RETURN_NONE;
}

/* new_disk() -> its index (slots are never freed: drop() empties one) */
static PyObject *py_new_disk(PyObject *self, PyObject *unused)
{
    struct disk *d = calloc(1, sizeof *d);
    if (d == NULL)
        return PyErr_NoMemory();
    init_rwlock(&d->lock);
    atomic_store(&d->lo, INT64_MAX);
    atomic_store(&d->hi, -1);
    struct disk **nd;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&map_lock);
    Py_END_ALLOW_THREADS
    nd = realloc(disks, (ndisks + 1) * sizeof *disks);
    if (nd == NULL) {
        pthread_rwlock_unlock(&map_lock);
        free(d);
        return PyErr_NoMemory();
    }
    disks = nd;
    disks[ndisks] = d;
    size_t k = ndisks++;
    pthread_rwlock_unlock(&map_lock);
    return PyLong_FromSize_t(k);
}

static struct disk *get_disk(Py_ssize_t k)
{
    struct disk *d = NULL;
    pthread_rwlock_rdlock(&map_lock);
    if (k >= 0 && (size_t)k < ndisks)
        d = disks[k];
    pthread_rwlock_unlock(&map_lock);
    if (d == NULL)
        PyErr_SetString(PyExc_KeyError, "no such disk slot");
    return d;
}

static void set_entries(struct disk *d, struct ent *ents, size_t n)
{
    struct ent *old;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&d->lock);
    Py_END_ALLOW_THREADS
    old = d->ents;
    d->ents = ents;
    d->n = n;
    pthread_rwlock_unlock(&d->lock);
    free(old);
}

/* publish(disk, vstart 'q', lun 'i', offset 'q', flags 'B', gen 'I', cur_gen, size,
 * luns, fds, read_mask, write_mask): the entries i whose LUN is in luns (open,
 * buffered: its fd at the same index of fds) and that may be read (flags & read_mask
 * == 0) or written (flags & write_mask == 0 and gen[i] == cur_gen: DiskTable.fence)
 * become the disk's table, ending at the next vstart (the last at size); the old
 * table is gone when this returns. Returns the count. */
static PyObject *py_publish(PyObject *self, PyObject *args)
{
    Py_ssize_t k;
    Py_buffer vs, lu, of, fl, gn;
    long long size;
    unsigned int cur, rmask, wmask;
    PyObject *luns, *fds;
    if (!PyArg_ParseTuple(args, "ny*y*y*y*y*ILOOII", &k, &vs, &lu, &of, &fl, &gn, &cur, &size,
                          &luns, &fds, &rmask, &wmask))
        return NULL;
    PyObject *ret = NULL, *ls = NULL, *fs = NULL;
    struct ent *ents = NULL;
    int *lv = NULL, *fv = NULL;
    struct disk *d = get_disk(k);
    size_t n = (size_t)vs.len / 8;
    if (d == NULL)
        goto out;
    if (vs.len % 8 || lu.len != (Py_ssize_t)(n * 4) || of.len != (Py_ssize_t)(n * 8) ||
        fl.len != (Py_ssize_t)n || gn.len != (Py_ssize_t)(n * 4)) {
        PyErr_SetString(PyExc_ValueError, "the columns do not match");
        goto out;
    }
    ls = PySequence_Fast(luns, "luns");
    fs = ls ? PySequence_Fast(fds, "fds") : NULL;
    if (fs == NULL)
        goto out;
    Py_ssize_t nl = PySequence_Fast_GET_SIZE(ls);
    if (PySequence_Fast_GET_SIZE(fs) != nl) {
        PyErr_SetString(PyExc_ValueError, "luns and fds differ in length");
        goto out;
    }
    lv = calloc((size_t)nl + 1, sizeof *lv);
    fv = calloc((size_t)nl + 1, sizeof *fv);
    ents = calloc(n + 1, sizeof *ents);
    if (!lv || !fv || !ents) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < nl; i++) {
        lv[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(ls, i));
        fv[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fs, i));
    }
    if (PyErr_Occurred())
        goto out;
    const int64_t *v = vs.buf, *o = of.buf;
    const int32_t *l = lu.buf;
    const uint8_t *f = fl.buf;
    const uint32_t *g = gn.buf;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int r = !(f[i] & rmask);
        int w = !(f[i] & wmask) && g[i] == cur && l[i] >= 0 && l[i] < MAXLUN;
        if (!r && !w)
            continue;
        int fd = -1;
        for (Py_ssize_t j = 0; j < nl; j++)
            if (lv[j] == l[i]) {
                fd = fv[j];
                break;
            }
        if (fd < 0)
            continue;
        int64_t end = i + 1 < n ? v[i + 1] : (int64_t)size;
        if (end > size)
            end = size;
        if (v[i] >= end)
            continue;
        ents[m++] = (struct ent){.vstart = v[i], .vend = end, .coff = o[i], .fd = fd,
                                 .lun = l[i], .may_read = r, .may_write = w};
    }
    set_entries(d, ents, m);
    ents = NULL;
    ret = PyLong_FromSize_t(m);
out:
    free(ents);
    free(lv);
    free(fv);
    Py_XDECREF(ls);
    Py_XDECREF(fs);
    PyBuffer_Release(&vs);
    PyBuffer_Release(&lu);
    PyBuffer_Release(&of);
    PyBuffer_Release(&fl);
    PyBuffer_Release(&gn);
    return ret;
}

/* invalidate(disk): empty its table; no read uses the old one when this returns */
static PyObject *py_invalidate(PyObject *self, PyObject *args)
{
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "n", &k))
        return NULL;
    struct disk *d = get_disk(k);
    if (d == NULL)
        return NULL;
    set_entries(d, NULL, 0);
    Py_RETURN_NONE;
}

/* bind(fh, disk) / unbind(fh): which disk a FUSE file handle reads */
static PyObject *py_bind(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    Py_ssize_t k;
    int writable;
    if (!PyArg_ParseTuple(args, "Knp", &fh, &k, &writable))
        return NULL;
    if (get_disk(k) == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&map_lock);
    Py_END_ALLOW_THREADS
    size_t i;
    for (i = 0; i < nfh && fh_keys[i] != fh; i++)
        ;
    if (i == nfh) {
        if (nfh == capfh) {
            size_t cap = capfh ? capfh * 2 : 64;
            uint64_t *nk = realloc(fh_keys, cap * sizeof *nk);
            if (nk)
                fh_keys = nk;
            size_t *nd = nk ? realloc(fh_disks, cap * sizeof *nd) : NULL;
            if (nd)
                fh_disks = nd;
            char *nw = nd ? realloc(fh_writable, cap) : NULL;
            if (nw)
                fh_writable = nw;
            if (!nk || !nd || !nw) {
                pthread_rwlock_unlock(&map_lock);
                return PyErr_NoMemory();
            }
            capfh = cap;
        }
        nfh++;
    }
    fh_keys[i] = fh;
    fh_disks[i] = (size_t)k;
    fh_writable[i] = (char)writable;
    pthread_rwlock_unlock(&map_lock);
    Py_RETURN_NONE;
}

static PyObject *py_unbind(PyObject *self, PyObject *args)
{
    unsigned long long fh;
    if (!PyArg_ParseTuple(args, "K", &fh))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_wrlock(&map_lock);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < nfh; i++)
        if (fh_keys[i] == fh) {
            fh_keys[i] = fh_keys[nfh - 1];
            fh_disks[i] = fh_disks[nfh - 1];
            fh_writable[i] = fh_writable[nfh - 1];
            nfh--;
            break;
        }
    pthread_rwlock_unlock(&map_lock);
    Py_RETURN_NONE;
}

static PyObject *take_counts(struct counts *c)
{
    PyObject *b = PyList_New((Py_ssize_t)nbounds + 1);
    if (b == NULL)
        return NULL;
    for (size_t i = 0; i <= nbounds; i++)
        PyList_SET_ITEM(b, (Py_ssize_t)i,
                        PyLong_FromUnsignedLongLong(atomic_exchange(&c->buckets[i], 0)));
    unsigned long long ops = atomic_exchange(&c->ops, 0);
    unsigned long long bytes = atomic_exchange(&c->bytes, 0);
    unsigned long long ns = atomic_exchange(&c->ns, 0);
    return Py_BuildValue("(KKKN)", ops, bytes, ns, b);
}

/* counters(disk) -> ((ops, bytes, ns, [per latency bucket]) of the reads, the same of
 * the writes, [(lun, writes)], the writes' extent (lo, hi: hi < 0 without writes), the
 * last write's (lo, hi)), all since the last call */
static PyObject *py_counters(PyObject *self, PyObject *args)
{
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "n", &k))
        return NULL;
    struct disk *d = get_disk(k);
    if (d == NULL)
        return NULL;
    PyObject *luns = PyList_New(0);
    for (int i = 0; luns && i < MAXLUN; i++) {
        unsigned long long n = atomic_exchange(&d->written[i], 0);
        if (n) {
            PyObject *t = Py_BuildValue("(iK)", i, n);
            if (t == NULL || PyList_Append(luns, t) < 0)
                Py_CLEAR(luns);
            Py_XDECREF(t);
        }
    }
    if (luns == NULL)
        return NULL;
    long long lo = atomic_exchange(&d->lo, INT64_MAX), hi = atomic_exchange(&d->hi, -1);
    return Py_BuildValue("(NNN(LL)(LL))", take_counts(&d->r), take_counts(&d->w), luns, lo,
                         hi, (long long)atomic_load(&d->last_lo),
                         (long long)atomic_load(&d->last_hi));
}

/* entries(disk) -> [(vstart, vend, fd, coff, lun, may_read, may_write)] (tests) */
static PyObject *py_entries(PyObject *self, PyObject *args)
{
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "n", &k))
        return NULL;
    struct disk *d = get_disk(k);
    if (d == NULL)
        return NULL;
    PyObject *list = PyList_New(0);
    Py_BEGIN_ALLOW_THREADS
    pthread_rwlock_rdlock(&d->lock);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; list && i < d->n; i++) {
        struct ent *e = &d->ents[i];
        PyObject *t = Py_BuildValue("(LLiLiOO)", (long long)e->vstart, (long long)e->vend, e->fd,
                                    (long long)e->coff, e->lun,
                                    e->may_read ? Py_True : Py_False,
                                    e->may_write ? Py_True : Py_False);
        if (t == NULL || PyList_Append(list, t) < 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
    }
    pthread_rwlock_unlock(&d->lock);
    return list;
}

/* pending() -> whether any I/O was served here since the last call */
static PyObject *py_pending(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(atomic_exchange(&pending, 0));
}

/* stats() -> (reads served here, writes served here, requests handed over) since the
 * module was loaded */
static PyObject *py_stats(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(KKK)", (unsigned long long)atomic_load(&n_served),
                         (unsigned long long)atomic_load(&n_written),
                         (unsigned long long)atomic_load(&n_handed));
}

static PyMethodDef methods[] = {
    {"start", py_start, METH_VARARGS,
     "start(fd, threads, bucket_bounds_ns, writes) -> eventfd: O_NONBLOCK on fd, start the "
     "readers (writes: serve FUSE_WRITE too)"},
    {"stop", py_stop, METH_NOARGS, "stop() : stop and join the readers (idempotent)"},
    {"take", py_take, METH_NOARGS, "take() -> (raw requests handed over, ended errno or 0)"},
    {"errors", py_errors, METH_NOARGS,
     "errors() -> [(fh, lun, offset, errno, write)] of container I/O that failed in C"},
    {"set_lease", py_set_lease, METH_VARARGS, "set_lease(deadline_ns CLOCK_MONOTONIC)"},
    {"new_disk", py_new_disk, METH_NOARGS, "new_disk() -> slot"},
    {"publish", py_publish, METH_VARARGS,
     "publish(slot, vs, lun, off, flags, size, luns, fds, mask) -> entries"},
    {"invalidate", py_invalidate, METH_VARARGS, "invalidate(slot)"},
    {"bind", py_bind, METH_VARARGS, "bind(fh, slot)"},
    {"unbind", py_unbind, METH_VARARGS, "unbind(fh)"},
    {"counters", py_counters, METH_VARARGS,
     "counters(slot) -> (reads, writes, [(lun, writes)], (lo, hi), (last lo, last hi))"},
    {"entries", py_entries, METH_VARARGS, "entries(slot) -> the disk's table (tests)"},
    {"pending", py_pending, METH_NOARGS, "pending() -> any I/O served since the last call"},
    {"stats", py_stats, METH_NOARGS, "stats() -> (reads served, writes served, handed over)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastio",
                                    "virtfs's C fast path for FUSE reads (virtfs/cfast.py)",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastio(void)
{
    init_rwlock(&map_lock);
    return PyModule_Create(&module);
}
