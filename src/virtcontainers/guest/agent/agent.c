/*
 * vc-agent: the virtcontainers guest agent. Runs as /init (pid 1) in the initrd.
 *
 * Sets the guest up (mounts, kernel modules, hostname), then serves the framed
 * protocol described in src/virtcontainers/agent/PROTOCOL.md on the virtio-serial
 * port named agent.channel.0 and on AF_VSOCK (when a virtio vsock device exists;
 * only the host, CID 2, may connect). One poll() loop multiplexes every connection
 * and every running process, so several requests can be in flight at once; whatever
 * may block (file I/O on a hung filesystem, sysfs writes) runs in a forked worker per
 * request, so the loop never waits on it.
 *
 * For tests it also runs as an ordinary process: `init --unix PATH` serves on a
 * listening Unix socket and skips all pid-1 setup.
 *
 * Build: gcc -static -O2 -o init agent.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_VERSION "vc-agent 0.1.0"
#define PROTO_VERSION 1
#define HDR_LEN 20
#define MAX_FRAME (64u << 20)
#define MAX_OUTPUT_CAP ((MAX_FRAME - (1u << 20)) / 2)
#define DEFAULT_MAX_OUTPUT (16u << 20)
#define MAX_ENTROPY (1u << 20)
#define MAX_CONNS 16
#define MAX_EXECS 128
#define MAX_GROUPS 64
#define RING_CAP (1u << 20)       /* output of a detached process kept per stream for attach */
#define CONN_OUT_HIGH (8u << 20)  /* stop reading process output while this much is queued */
#define MAX_WAITS 64
#define MAX_JOBS 64
#define MAX_FIELDS 65536
#define MAX_WAIT_MS 600000
#define MAX_WANT_CPUS 8192
#define MAX_SERIAL 255
#define WAIT_RECHECK_MS 10
#define READ_CHUNK 65536
#define DEFAULT_PORT_NAME "agent.channel.0"
#define DEFAULT_VSOCK_PORT 1024
#define PORT_SCAN_MS 10000
#define CONSOLE_WAIT_MS 5000
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Frame types (requests); a reply carries type | 0x80, an error reply type 0xFF. */
enum {
	T_HELLO = 0x01,
	T_PING = 0x02,
	T_EXEC = 0x03,
	T_READ_FILE = 0x04,
	T_WRITE_FILE = 0x05,
	T_SET_TIME = 0x06,
	T_ADD_ENTROPY = 0x07,
	T_CANCEL = 0x08,
	T_ONLINE = 0x09,
	T_WAIT = 0x0A,
	T_START = 0x0B,
	T_STDIN = 0x0C,
	T_SIGNAL = 0x0D,
	T_RESIZE = 0x0E,
	T_ATTACH = 0x0F,
	T_OUTPUT = 0x10, /* notifications (id 0): output of a started process */
	T_EXITED = 0x11, /* ... and its end */
	T_NETWORK = 0x12,
	T_REPLY = 0x80,
	T_ERROR = 0xFF,
};

/* Field tags of the TLV payload. */
enum {
	F_NONCE = 0x01,
	F_VERSION = 0x02,
	F_PROTO = 0x03,
	F_MAX_FRAME = 0x04,
	F_ARGV = 0x10,
	F_ENV = 0x11,
	F_CWD = 0x12,
	F_STDIN = 0x13,
	F_TIMEOUT_MS = 0x14,
	F_MAX_OUTPUT = 0x15,
	F_UID = 0x16,
	F_GID = 0x17,
	F_GROUPS = 0x18,
	F_ROOT = 0x19,
	F_TTY = 0x1A,
	F_ROWS = 0x1B,
	F_COLS = 0x1C,
	F_DETACH = 0x1D,
	F_NAMESPACES = 0x1E,
	F_HOSTNAME = 0x1F,
	F_EXIT_CODE = 0x20,
	F_SIGNAL = 0x21,
	F_TIMED_OUT = 0x22,
	F_STDOUT = 0x23,
	F_STDERR = 0x24,
	F_TRUNCATED = 0x25,
	F_PROC = 0x26,
	F_PID = 0x27,
	F_STREAM = 0x28,
	F_CLOSE = 0x29,
	F_EXITED = 0x2A,
	F_DROPPED = 0x2B,
	F_OUT_FROM = 0x2C,
	F_ERR_FROM = 0x2D,
	F_PATH = 0x30,
	F_DATA = 0x31,
	F_MODE = 0x32,
	F_FLAGS = 0x33,
	F_SEC = 0x40,
	F_NSEC = 0x41,
	F_TARGET = 0x50,
	F_FOUND = 0x51,
	F_CPUS = 0x60,
	F_MEM_BLOCKS = 0x61,
	F_UPTIME_NS = 0x70,
	F_RUNNING = 0x71,
	F_SERIAL = 0x90,
	F_WANT_CPUS = 0x91,
	F_MEMORY = 0x92,
	F_DEVICE = 0x93,
	F_CPUS_ONLINE = 0x94,
	F_LINK = 0xA0,
	F_MAC = 0xA1,
	F_MTU = 0xA2,
	F_ADDRESS = 0xA3,
	F_ROUTE = 0xA4,
	F_DEST = 0xA5,
	F_GATEWAY = 0xA6,
	F_FAMILY = 0xA7,
	F_NEIGH = 0xA8,
	F_LLADDR = 0xA9,
	F_HOSTS = 0xAA,
	F_RESOLV = 0xAB,
	F_ERRNO = 0x80,
	F_MESSAGE = 0x81,
};

enum { WF_MKDIRS = 1 };
enum { ON_CPUS = 1, ON_MEMORY = 2 };
enum { AT_KEEP = 1 };
enum { CONN_PORT, CONN_STREAM };
enum { ST_HEADER, ST_PAYLOAD, ST_SKIP };

static const uint8_t MAGIC[4] = {'V', 'C', 'A', 'G'};

struct buf {
	uint8_t *p;
	size_t len, cap;
};

struct chunk {
	struct chunk *next;
	size_t len, off;
	uint8_t data[];
};

struct conn {
	int used;
	int fd;
	int kind;
	int connected; /* port: the host side is connected */
	uint32_t gen;
	int state;
	uint8_t hdr[HDR_LEN];
	size_t hdr_len;
	uint8_t *payload;
	uint32_t want, have;
	uint32_t cur_id;
	uint8_t cur_type;
	uint64_t skip;
	int in_garbage;
	int await_hello; /* port: a frame was cut by a hangup; skip all but a hello */
	struct chunk *out_head, *out_tail;
	size_t queued; /* bytes in out_head.. not yet written */
};

/* Output of a detached process kept for a later attach: the newest RING_CAP bytes. */
struct ring {
	uint8_t *p;
	size_t start, len;
	uint64_t dropped;
};

enum { PM_EXEC, PM_STREAM };

/* A process started by EXEC (PM_EXEC: output captured, one reply at exit) or START
 * (PM_STREAM: a handle; output and exit are notifications to the attached connection). */
struct exec {
	int used;
	int mode;
	uint32_t id;     /* the EXEC/START request */
	uint32_t handle; /* PM_STREAM: names the process in notifications and requests */
	struct conn *conn; /* where replies/notifications go (NULL: nobody attached) */
	uint32_t conn_gen;
	int detached; /* outlives its connection; output kept in rings */
	int keep;     /* attached with AT_KEEP: the exit it reports leaves it kept, not forgotten */
	int started;  /* set-up succeeded (START answered) */
	pid_t pid;
	int exited, status;
	int in_fd, out_fd, err_fd;
	int tty_fd;                  /* pty master (for resize), or -1 */
	int stat_fd;                 /* set-up outcome: EOF once exec succeeded, else {kind, errno} */
	int setup_kind, setup_errno; /* see SETUP_WHAT */
	char *argv0, *cwd, *root;    /* for the set-up error message */
	struct buf in;               /* stdin not yet written */
	size_t in_off;
	int in_close;    /* close stdin once `in` is written */
	uint32_t in_ack; /* PM_STREAM: the STDIN request answered once `in` is written */
	struct buf out, err;
	struct ring ring[2];
	size_t max_out;
	int trunc;
	int64_t deadline_ms;
	int timed_out;
};

/* A request served by a forked worker (file I/O, sysfs writes): the worker writes its whole
 * reply frame into a pipe; the loop forwards it once the pipe reaches EOF. */
struct job {
	int used;
	uint32_t id;
	struct conn *conn;
	uint32_t conn_gen;
	pid_t pid;
	int fd;
	int reaped;
	int cancelled;
	struct buf reply;
};

/* A WAIT request pending until the guest sees the hardware it names (or its deadline). */
struct wait {
	int used;
	uint32_t id;
	struct conn *conn;
	uint32_t conn_gen;
	char serial[MAX_SERIAL + 1]; /* "" when no block device is wanted */
	int64_t cpus;                /* 0 when no CPU count is wanted */
	int memory;
	int mem_blocks;
	int64_t deadline_ms;
};

static struct conn conns[MAX_CONNS];
static struct exec execs[MAX_EXECS];
static struct wait waits[MAX_WAITS];
static struct job jobs[MAX_JOBS];

/* The write end of a pipe the background module loader waits on (-1: none): it holds back
 * the drivers a start does not need while the host is being served (see
 * load_remaining_drivers and loader_tick). */
static int loader_hold = -1;
static int64_t loader_idle_from; /* since when nothing has been in progress */
static int loader_was_busy;
#define LOADER_HOLD_MS 2000
#define LOADER_IDLE_MS 150
static int loader_hold_ms = LOADER_HOLD_MS;

static void release_loader(void)
{
	if (loader_hold >= 0) {
		close(loader_hold);
		loader_hold = -1;
	}
}
static int uevent_fd = -1; /* NETLINK_KOBJECT_UEVENT, opened by the first wait */
static int uevent_tried;
static int64_t wait_next_ms; /* next fallback re-check of the waits */
static char sysroot[256];    /* tests: prefix of /sys and /dev for waits (--sysroot) */
static int debug;
static int is_pid1;
static int console_shell = 1; /* vc.console_shell=0 turns the console shell off */
static pid_t shell_pid;
static int64_t shell_respawn_ms;
#define CONSOLE_SHELL_DELAY_MS 1000
static int sig_fd = -1;
static int listen_fd = -1;     /* vsock or --unix listener */
static int listen_kind_vsock;
static char port_name[128] = DEFAULT_PORT_NAME;
static unsigned vsock_port = DEFAULT_VSOCK_PORT;
static int ready_printed;
static int ready_wanted;
static int64_t ready_deadline;
static int console_ok;
static int64_t port_scan_deadline;
static int port_found;
static uint32_t crc_table[256];

/* ---------------------------------------------------------------- utilities */

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* This thread's CPU time in us (the kernel's work in its syscalls included), for the debug
 * log: with one vCPU a step's wall time also holds whatever else ran. */
static int64_t cpu_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Point fds 0-2 at the console (which may only exist once virtio_console is loaded). */
static void attach_console(void)
{
	if (console_ok)
		return;
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		return;
	console_ok = 1;
	for (int k = 0; k < 3; k++)
		if (fd != k)
			dup3(fd, k, 0);
	if (fd > 2)
		close(fd);
}

static void console(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (is_pid1)
		attach_console();
	if ((size_t)n >= sizeof line)
		n = sizeof line - 1;
	ssize_t w = write(STDOUT_FILENO, line, (size_t)n);
	(void)w;
}

#define DEBUG(...)                     \
	do {                               \
		if (debug)                     \
			console("vc-agent: " __VA_ARGS__); \
	} while (0)

static void crc_init(void)
{
	for (uint32_t i = 0; i < 256; i++) {
		uint32_t c = i;
		for (int k = 0; k < 8; k++)
			c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
		crc_table[i] = c;
	}
}

static uint32_t crc32(const uint8_t *p, size_t n)
{
	uint32_t c = 0xFFFFFFFFu;
	while (n--)
		c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
	return c ^ 0xFFFFFFFFu;
}

static uint32_t get_u32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static int buf_reserve(struct buf *b, size_t extra)
{
	if (b->len + extra <= b->cap)
		return 0;
	size_t cap = b->cap ? b->cap : 4096;
	while (cap < b->len + extra)
		cap *= 2;
	uint8_t *p = realloc(b->p, cap);
	if (!p)
		return -1;
	b->p = p;
	b->cap = cap;
	return 0;
}

static int buf_put(struct buf *b, const void *data, size_t n)
{
	if (buf_reserve(b, n))
		return -1;
	memcpy(b->p + b->len, data, n);
	b->len += n;
	return 0;
}

static void buf_free(struct buf *b)
{
	free(b->p);
	b->p = NULL;
	b->len = b->cap = 0;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int write_text(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	size_t n = strlen(text);
	ssize_t w = write(fd, text, n);
	int e = errno;
	close(fd);
	errno = e;
	return w == (ssize_t)n ? 0 : -1;
}

static ssize_t read_text(const char *path, char *out, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, out, cap - 1);
	close(fd);
	if (n < 0)
		return -1;
	out[n] = 0;
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
		out[--n] = 0;
	return n;
}

/* ------------------------------------------------------------ TLV payloads */

struct field {
	uint16_t tag;
	uint32_t len;
	const uint8_t *val;
};

/* Iterate the fields of a payload; returns 1 with *f filled, 0 at the end, -1 if malformed. */
static int tlv_next(const uint8_t *p, size_t n, size_t *pos, struct field *f)
{
	if (*pos == n)
		return 0;
	if (n - *pos < 6)
		return -1;
	const uint8_t *h = p + *pos;
	f->tag = (uint16_t)(h[0] | h[1] << 8);
	f->len = get_u32(h + 2);
	if (f->len > n - *pos - 6)
		return -1;
	f->val = h + 6;
	*pos += 6 + (size_t)f->len;
	return 1;
}

/* Well-formed, and at most MAX_FIELDS fields (bounds the work of every later scan). */
static int tlv_valid(const uint8_t *p, size_t n)
{
	size_t pos = 0, count = 0;
	struct field f;
	int r;
	while ((r = tlv_next(p, n, &pos, &f)) == 1)
		if (++count > MAX_FIELDS)
			return 0;
	return r == 0;
}

static int tlv_find(const uint8_t *p, size_t n, uint16_t tag, struct field *out)
{
	size_t pos = 0;
	struct field f;
	while (tlv_next(p, n, &pos, &f) == 1) {
		if (f.tag == tag) {
			*out = f;
			return 1;
		}
	}
	return 0;
}

static int tlv_int(const uint8_t *p, size_t n, uint16_t tag, int64_t *out)
{
	struct field f;
	if (!tlv_find(p, n, tag, &f))
		return 0;
	if (f.len != 8)
		return -1;
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | f.val[i];
	*out = (int64_t)v;
	return 1;
}

/* A field's value as a NUL-terminated string (malloc'd); NULL if it holds a NUL byte. */
static char *field_str(const struct field *f)
{
	if (memchr(f->val, 0, f->len))
		return NULL;
	char *s = malloc((size_t)f->len + 1);
	if (!s)
		return NULL;
	memcpy(s, f->val, f->len);
	s[f->len] = 0;
	return s;
}

static int put_field(struct buf *b, uint16_t tag, const void *val, size_t len)
{
	uint8_t h[6] = {(uint8_t)tag, (uint8_t)(tag >> 8)};
	put_u32(h + 2, (uint32_t)len);
	if (buf_put(b, h, 6))
		return -1;
	return len ? buf_put(b, val, len) : 0;
}

static int put_int(struct buf *b, uint16_t tag, int64_t v)
{
	uint8_t le[8];
	uint64_t u = (uint64_t)v;
	for (int i = 0; i < 8; i++)
		le[i] = (uint8_t)(u >> (8 * i));
	return put_field(b, tag, le, 8);
}

static int put_str(struct buf *b, uint16_t tag, const char *s)
{
	return put_field(b, tag, s, strlen(s));
}

/* ---------------------------------------------------------------- output */

static void conn_drop_output(struct conn *c)
{
	struct chunk *k = c->out_head;
	while (k) {
		struct chunk *next = k->next;
		free(k);
		k = next;
	}
	c->out_head = c->out_tail = NULL;
	c->queued = 0;
}

static void conn_flush(struct conn *c)
{
	while (c->out_head) {
		struct chunk *k = c->out_head;
		ssize_t w = write(c->fd, k->data + k->off, k->len - k->off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return; /* EAGAIN: wait for POLLOUT; errors show up on read */
		}
		k->off += (size_t)w;
		c->queued -= (size_t)w;
		if (k->off < k->len)
			return;
		c->out_head = k->next;
		if (!c->out_head)
			c->out_tail = NULL;
		free(k);
	}
}

/* Queue a whole frame (k->len bytes) and start writing it. */
static void conn_queue(struct conn *c, struct chunk *k)
{
	k->off = 0;
	k->next = NULL;
	if (c->out_tail)
		c->out_tail->next = k;
	else
		c->out_head = k;
	c->out_tail = k;
	c->queued += k->len;
	conn_flush(c);
}

/* Queue one frame (header + payload) to a connection; dropped if it is gone. */
static void send_frame(struct conn *c, uint8_t type, uint32_t id, const struct buf *payload)
{
	if (!c || !c->used || (c->kind == CONN_PORT && !c->connected))
		return;
	size_t plen = payload ? payload->len : 0;
	struct chunk *k = malloc(sizeof *k + HDR_LEN + plen);
	if (!k) {
		console("vc-agent: out of memory sending a %zu-byte reply\n", plen);
		return;
	}
	uint8_t *h = k->data;
	memcpy(h, MAGIC, 4);
	h[4] = PROTO_VERSION;
	h[5] = type;
	h[6] = h[7] = 0;
	put_u32(h + 8, id);
	put_u32(h + 12, (uint32_t)plen);
	put_u32(h + 16, crc32(h, 16));
	if (plen)
		memcpy(h + HDR_LEN, payload->p, plen);
	k->len = HDR_LEN + plen;
	conn_queue(c, k);
}

static void send_error(struct conn *c, uint32_t id, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	struct buf b = {0};
	put_int(&b, F_ERRNO, err);
	put_str(&b, F_MESSAGE, msg);
	DEBUG("error reply id=%u: %s\n", id, msg);
	send_frame(c, T_ERROR, id, &b);
	buf_free(&b);
}

static void conn_kill_execs(struct conn *c);
static void conn_kill_jobs(struct conn *c);
static int job_reaped(pid_t pid);
static void port_hangup(struct conn *c);

/* ------------------------------------------------------------- processes */

static int running_execs(void)
{
	int n = 0;
	for (int i = 0; i < MAX_EXECS; i++)
		n += execs[i].used && !execs[i].exited;
	return n;
}

static void exec_kill(struct exec *e, int sig)
{
	if (e->used && !e->exited) {
		kill(-e->pid, sig);
		kill(e->pid, sig);
	}
}

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

static int proc_attached(const struct exec *e)
{
	return e->conn && e->conn->used && e->conn->gen == e->conn_gen;
}

static void ring_put(struct ring *r, const uint8_t *data, size_t n)
{
	if (!r->p && !(r->p = malloc(RING_CAP))) {
		r->dropped += n;
		return;
	}
	if (n > RING_CAP) {
		r->dropped += n - RING_CAP;
		data += n - RING_CAP;
		n = RING_CAP;
	}
	size_t over = r->len + n > RING_CAP ? r->len + n - RING_CAP : 0;
	r->start = (r->start + over) % RING_CAP;
	r->len -= over;
	r->dropped += over;
	for (size_t i = 0; i < n; i++)
		r->p[(r->start + r->len + i) % RING_CAP] = data[i];
	r->len += n;
}

/* One OUTPUT notification of a streamed process. */
static void proc_notify_output(struct exec *e, int stream, const uint8_t *data, size_t n)
{
	struct buf b = {0};
	if (!put_int(&b, F_PROC, e->handle) && !put_int(&b, F_STREAM, stream) &&
	    !put_field(&b, F_DATA, data, n))
		send_frame(e->conn, T_OUTPUT, 0, &b);
	buf_free(&b);
}

/* Read what a pipe holds: captured (EXEC) or streamed (START); 0 on EOF/error, 1 if open. */
static int exec_read(struct exec *e, int *fd, int stream, size_t budget)
{
	uint8_t tmp[READ_CHUNK];
	size_t taken = 0;
	struct buf *b = stream == 1 ? &e->out : &e->err;
	while (*fd >= 0 && taken < budget) {
		ssize_t n = read(*fd, tmp, sizeof tmp);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return 1;
			close_fd(fd); /* EIO: a pty whose other side is gone */
			return 0;
		}
		if (n == 0) {
			close_fd(fd);
			return 0;
		}
		taken += (size_t)n;
		if (e->mode == PM_STREAM) {
			if (e->detached)
				ring_put(&e->ring[stream - 1], tmp, (size_t)n);
			if (proc_attached(e))
				proc_notify_output(e, stream, tmp, (size_t)n);
			continue;
		}
		size_t room = b->len < e->max_out ? e->max_out - b->len : 0;
		size_t keep = (size_t)n < room ? (size_t)n : room;
		if (keep < (size_t)n)
			e->trunc |= stream;
		if (keep && buf_put(b, tmp, keep))
			e->trunc |= stream;
	}
	return *fd >= 0;
}

static void stdin_ack(struct exec *e, int err)
{
	if (!e->in_ack)
		return;
	if (proc_attached(e)) {
		if (err)
			send_error(e->conn, e->in_ack, err, "stdin: %s", strerror(err));
		else
			send_frame(e->conn, T_STDIN | T_REPLY, e->in_ack, NULL);
	}
	e->in_ack = 0;
}

static void exec_write_stdin(struct exec *e)
{
	while (e->in_fd >= 0 && e->in_off < e->in.len) {
		ssize_t w = write(e->in_fd, e->in.p + e->in_off, e->in.len - e->in_off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN)
				return;
			/* EPIPE: the process does not read its stdin (any more) */
			close_fd(&e->in_fd);
			buf_free(&e->in);
			e->in_off = 0;
			stdin_ack(e, EPIPE);
			return;
		}
		e->in_off += (size_t)w;
	}
	buf_free(&e->in);
	e->in_off = 0;
	if (e->in_close) {
		if (e->tty_fd >= 0 && e->in_fd >= 0) {
			ssize_t w = write(e->in_fd, "\x04", 1); /* a terminal's end of input: ^D */
			(void)w;
		}
		close_fd(&e->in_fd);
	}
	stdin_ack(e, e->in_fd >= 0 || e->in_close ? 0 : EPIPE);
}

static const char *const SETUP_WHAT[] = {
	"", "chdir", "exec", "entering the root directory", "setting the user", "namespaces",
	"terminal", "hostname",
};

/* Read the set-up outcome the child reported (non-blocking): 1 once known. A streamed
 * process is answered now (its handle, or the error). */
static int exec_setup_read(struct exec *e)
{
	if (e->stat_fd < 0)
		return 1;
	int msg[2];
	ssize_t r = read(e->stat_fd, msg, sizeof msg);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return 0;
	if (r == (ssize_t)sizeof msg && msg[0] > 0 &&
	    msg[0] < (int)(sizeof SETUP_WHAT / sizeof SETUP_WHAT[0])) {
		e->setup_kind = msg[0];
		e->setup_errno = msg[1];
	} else if (r != 0) {
		e->setup_kind = 2;
		e->setup_errno = EIO;
	}
	close_fd(&e->stat_fd);
	if (e->setup_kind) {
		if (proc_attached(e)) {
			int err = e->setup_errno;
			const char *arg = e->setup_kind == 1 ? e->cwd
					  : e->setup_kind == 2 ? e->argv0
					  : e->setup_kind == 3 ? e->root
							       : NULL;
			send_error(e->conn, e->id, err, "%s: %s%s%s: %s",
				   e->mode == PM_EXEC ? "exec" : "start", SETUP_WHAT[e->setup_kind],
				   arg ? " " : "", arg ? arg : "", strerror(err));
		}
		e->conn = NULL; /* answered: nothing more is sent for it */
		return 1;
	}
	e->started = 1;
	if (e->mode == PM_STREAM && proc_attached(e)) {
		struct buf b = {0};
		if (!put_int(&b, F_PROC, e->handle) && !put_int(&b, F_PID, e->pid))
			send_frame(e->conn, T_START | T_REPLY, e->id, &b);
		buf_free(&b);
	}
	return 1;
}

static void put_status(struct buf *b, const struct exec *e, int *ok)
{
	int code = -1, sig = 0;
	if (WIFEXITED(e->status))
		code = WEXITSTATUS(e->status);
	else if (WIFSIGNALED(e->status))
		sig = WTERMSIG(e->status);
	*ok = !put_int(b, F_EXIT_CODE, code) && !put_int(b, F_SIGNAL, sig) &&
	      !put_int(b, F_TIMED_OUT, e->timed_out);
}

static void exec_free(struct exec *e)
{
	close_fd(&e->out_fd);
	close_fd(&e->err_fd);
	close_fd(&e->in_fd);
	close_fd(&e->tty_fd);
	close_fd(&e->stat_fd);
	buf_free(&e->in);
	buf_free(&e->out);
	buf_free(&e->err);
	free(e->ring[0].p);
	free(e->ring[1].p);
	free(e->argv0);
	free(e->cwd);
	free(e->root);
	memset(e, 0, sizeof *e);
	e->in_fd = e->out_fd = e->err_fd = e->stat_fd = e->tty_fd = -1;
}

/* A streamed process that has exited: tell the attached connection and forget it; with
 * nobody attached, a detached one waits for an attach. */
static void proc_exit_notify(struct exec *e)
{
	if (!proc_attached(e)) {
		if (e->detached && e->started)
			return;
		exec_free(e);
		return;
	}
	struct buf b = {0};
	int ok = !put_int(&b, F_PROC, e->handle);
	int ok2;
	put_status(&b, e, &ok2);
	if (ok && ok2)
		send_frame(e->conn, T_EXITED, 0, &b);
	buf_free(&b);
	if (e->keep && e->detached) {
		e->conn = NULL; /* a log reader saw it: kept (output, status) for the next attach */
		return;
	}
	exec_free(e);
}

static void exec_finish(struct exec *e)
{
	exec_setup_read(e); /* the child wrote it before exiting, if it failed */
	/* The process is gone: what it wrote is in the pipes (bounded by their size). */
	if (e->started) {
		exec_read(e, &e->out_fd, 1, 4u << 20);
		exec_read(e, &e->err_fd, 2, 4u << 20);
	}
	close_fd(&e->out_fd);
	close_fd(&e->err_fd);
	close_fd(&e->in_fd);
	stdin_ack(e, EPIPE);
	DEBUG("process id=%u pid=%d done status=0x%x at %lld\n", e->id, e->pid, e->status,
	      (long long)now_ms());
	if (e->mode == PM_STREAM && e->started) {
		proc_exit_notify(e);
		return;
	}
	if (e->started && proc_attached(e)) {
		struct buf b = {0};
		int ok;
		put_status(&b, e, &ok);
		ok = ok && !put_int(&b, F_TRUNCATED, e->trunc) &&
		     !put_field(&b, F_STDOUT, e->out.p, e->out.len) &&
		     !put_field(&b, F_STDERR, e->err.p, e->err.len);
		if (ok)
			send_frame(e->conn, T_EXEC | T_REPLY, e->id, &b);
		else
			send_error(e->conn, e->id, ENOMEM, "exec: out of memory building the reply");
		buf_free(&b);
	}
	exec_free(e);
}

static void reap_children(void)
{
	for (;;) {
		int st;
		pid_t pid = waitpid(-1, &st, WNOHANG);
		if (pid <= 0)
			return;
		if (pid == shell_pid) {
			shell_pid = 0;
			shell_respawn_ms = now_ms() + 1000;
			continue;
		}
		if (job_reaped(pid))
			continue;
		for (int i = 0; i < MAX_EXECS; i++) {
			struct exec *e = &execs[i];
			if (e->used && e->pid == pid && !e->exited) {
				e->exited = 1;
				e->status = st;
				exec_finish(e);
				break;
			}
		}
	}
}

/* Set KEY=VALUE in env (replacing an existing KEY). */
static void env_set(char **env, size_t *n, char *entry)
{
	size_t klen = (size_t)(strchr(entry, '=') - entry);
	for (size_t i = 0; i < *n; i++) {
		if (strncmp(env[i], entry, klen + 1) == 0) {
			env[i] = entry;
			return;
		}
	}
	env[(*n)++] = entry;
}

/* What a child must do before exec, parsed from an EXEC/START request. */
struct spawn {
	char **argv, **env;
	char *cwd, *root, *hostname;
	int64_t uid, gid; /* -1: keep */
	gid_t groups[MAX_GROUPS];
	int ngroups, set_groups;
	int64_t namespaces;
	int tty;
	struct winsize ws;
};

static void child_fail(int fd, int kind)
{
	int msg[2] = {kind, errno};
	ssize_t w = write(fd, msg, sizeof msg);
	(void)w;
	_exit(127);
}

/* In the child: namespaces, root (MS_MOVE + chroot: the guest's root is an initramfs, where
 * pivot_root fails), user, cwd, then exec. Failures go to stat_fd as {kind, errno}. */
static void child_enter(const struct spawn *sp, int stat_fd)
{
	int ns = (int)(sp->namespaces & ~(int64_t)CLONE_NEWPID);
	if (sp->root)
		ns |= CLONE_NEWNS;
	if (ns && unshare(ns))
		child_fail(stat_fd, 5);
	if (sp->hostname && sethostname(sp->hostname, strlen(sp->hostname)))
		child_fail(stat_fd, 7);
	if (sp->root) {
		if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) ||
		    mount(sp->root, sp->root, NULL, MS_BIND | MS_REC, NULL) || chdir(sp->root) ||
		    mount(".", "/", NULL, MS_MOVE, NULL) || chroot(".") || chdir("/"))
			child_fail(stat_fd, 3);
	}
	if (sp->set_groups && setgroups((size_t)sp->ngroups, sp->groups))
		child_fail(stat_fd, 4);
	if (sp->gid >= 0 && setgid((gid_t)sp->gid))
		child_fail(stat_fd, 4);
	if (sp->uid >= 0 && setuid((uid_t)sp->uid))
		child_fail(stat_fd, 4);
	if (sp->cwd && chdir(sp->cwd))
		child_fail(stat_fd, 1);
	environ = sp->env;
	execvp(sp->argv[0], sp->argv);
	child_fail(stat_fd, 2);
}

static struct exec *exec_slot(void)
{
	for (int i = 0; i < MAX_EXECS; i++)
		if (!execs[i].used)
			return &execs[i];
	return NULL;
}

static uint32_t next_handle = 1;

/* EXEC and START: parse, fork (with clone flags for a new pid namespace), track. The
 * outcome of the child's set-up is read later from its status pipe (never waited for). */
static void proc_start(struct conn *c, uint32_t id, const uint8_t *p, size_t n, int mode)
{
	const char *op = mode == PM_EXEC ? "exec" : "start";
	size_t nargv = 0, nenv = 0, pos = 0;
	struct field f;
	while (tlv_next(p, n, &pos, &f) == 1) {
		nargv += f.tag == F_ARGV;
		nenv += f.tag == F_ENV;
	}
	if (nargv == 0) {
		send_error(c, id, EINVAL, "%s: argv is empty", op);
		return;
	}
	struct exec *e = exec_slot();
	if (!e) {
		send_error(c, id, EAGAIN, "%s: too many processes (%d)", op, MAX_EXECS);
		return;
	}
	/* strs owns every string parsed from the request; argv/env point into it. */
	char **strs = calloc(nargv + nenv + 1, sizeof *strs);
	char **argv = calloc(nargv + 1, sizeof *argv);
	char **env = calloc(nenv + 4, sizeof *env);
	size_t ns = 0, ai = 0, ei = 0;
	struct spawn sp = {.uid = -1, .gid = -1};
	int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, pstat[2] = {-1, -1};
	int master = -1;
	int64_t timeout_ms = 0, max_out = DEFAULT_MAX_OUTPUT, tty = 0, rows = 24, cols = 80;
	int64_t detach = 0;
	struct field in = {0};
	if (!strs || !argv || !env) {
		send_error(c, id, ENOMEM, "%s: out of memory", op);
		goto out;
	}
	env[ei++] = "PATH=" DEFAULT_PATH;
	env[ei++] = "HOME=/root";
	env[ei++] = "TERM=linux";
	pos = 0;
	while (tlv_next(p, n, &pos, &f) == 1) {
		char **dst = NULL;
		if (f.tag == F_ARGV) {
			char *s = field_str(&f);
			if (!s) {
				send_error(c, id, EINVAL, "%s: argv[%zu] contains a NUL byte", op, ai);
				goto out;
			}
			strs[ns++] = s;
			argv[ai++] = s;
		} else if (f.tag == F_ENV) {
			char *s = field_str(&f);
			if (s)
				strs[ns++] = s;
			if (!s || !strchr(s, '=') || s[0] == '=') {
				send_error(c, id, EINVAL, "%s: env entry %zu is not KEY=VALUE without NUL",
					   op, ei - 3);
				goto out;
			}
			env_set(env, &ei, s);
		} else if (f.tag == F_GROUPS) {
			if (f.len != 8 || sp.ngroups >= MAX_GROUPS) {
				send_error(c, id, EINVAL, "%s: groups: at most %d 8-byte integers", op,
					   MAX_GROUPS);
				goto out;
			}
			uint64_t v = 0;
			for (int i = 7; i >= 0; i--)
				v = v << 8 | f.val[i];
			if (v > 0xFFFFFFFEu) {
				send_error(c, id, EINVAL, "%s: group %llu out of range", op,
					   (unsigned long long)v);
				goto out;
			}
			sp.groups[sp.ngroups++] = (gid_t)v;
		} else if (f.tag == F_CWD) {
			dst = &sp.cwd;
		} else if (f.tag == F_ROOT) {
			dst = &sp.root;
		} else if (f.tag == F_HOSTNAME) {
			dst = &sp.hostname;
		} else if (f.tag == F_STDIN && !in.val) {
			in = f;
		}
		if (dst && !*dst && !(*dst = field_str(&f))) {
			send_error(c, id, EINVAL, "%s: field 0x%02x contains a NUL byte", op, f.tag);
			goto out;
		}
	}
	if (tlv_int(p, n, F_TIMEOUT_MS, &timeout_ms) < 0 ||
	    tlv_int(p, n, F_MAX_OUTPUT, &max_out) < 0 || tlv_int(p, n, F_UID, &sp.uid) < 0 ||
	    tlv_int(p, n, F_GID, &sp.gid) < 0 || tlv_int(p, n, F_TTY, &tty) < 0 ||
	    tlv_int(p, n, F_ROWS, &rows) < 0 || tlv_int(p, n, F_COLS, &cols) < 0 ||
	    tlv_int(p, n, F_DETACH, &detach) < 0 || tlv_int(p, n, F_NAMESPACES, &sp.namespaces) < 0) {
		send_error(c, id, EINVAL, "%s: integer fields must be 8-byte integers", op);
		goto out;
	}
	if (!argv[0][0]) {
		send_error(c, id, EINVAL, "%s: argv[0] is empty", op);
		goto out;
	}
	const int64_t ns_ok = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET;
	if (sp.uid < -1 || sp.uid > 0xFFFFFFFE || sp.gid < -1 || sp.gid > 0xFFFFFFFE ||
	    (sp.namespaces & ~ns_ok) || rows < 1 || rows > 0xFFFF || cols < 1 || cols > 0xFFFF ||
	    timeout_ms < 0 || (mode == PM_EXEC && (tty || detach))) {
		send_error(c, id, EINVAL,
			   "%s: uid/gid (0..2^32-2), namespaces (mnt, uts, ipc, pid, net), rows/cols "
			   "(1..65535) or timeout out of range",
			   op);
		goto out;
	}
	if (sp.hostname && !(sp.namespaces & CLONE_NEWUTS)) {
		send_error(c, id, EINVAL, "%s: a hostname needs a new UTS namespace", op);
		goto out;
	}
	if (sp.root && sp.root[0] != '/') {
		send_error(c, id, EINVAL, "%s: root must be an absolute path", op);
		goto out;
	}
	sp.set_groups = sp.ngroups > 0 || sp.uid >= 0 || sp.gid >= 0;
	sp.argv = argv;
	sp.env = env;
	sp.tty = (int)tty;
	sp.ws.ws_row = (unsigned short)rows;
	sp.ws.ws_col = (unsigned short)cols;
	if (max_out <= 0 || max_out > (int64_t)MAX_OUTPUT_CAP)
		max_out = MAX_OUTPUT_CAP;
	if (pipe2(pstat, O_CLOEXEC)) {
		send_error(c, id, errno, "%s: pipe: %s", op, strerror(errno));
		goto out;
	}
	char slave[64] = "";
	if (tty) {
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (master < 0 || grantpt(master) || unlockpt(master) ||
		    ptsname_r(master, slave, sizeof slave) || ioctl(master, TIOCSWINSZ, &sp.ws)) {
			send_error(c, id, errno, "%s: terminal: %s", op, strerror(errno));
			goto out;
		}
	} else if (pipe2(pin, O_CLOEXEC) || pipe2(pout, O_CLOEXEC) || pipe2(perr, O_CLOEXEC)) {
		send_error(c, id, errno, "%s: pipe: %s", op, strerror(errno));
		goto out;
	}
	/* A new pid namespace must be made by the fork itself (raw clone: the child is its pid
	 * 1); otherwise an ordinary fork (glibc's fork keeps its own state right). */
	pid_t pid = (sp.namespaces & CLONE_NEWPID)
			    ? (pid_t)syscall(SYS_clone, SIGCHLD | CLONE_NEWPID, NULL, NULL, NULL, NULL)
			    : fork();
	if (pid < 0) {
		send_error(c, id, errno, "%s: fork: %s", op, strerror(errno));
		goto out;
	}
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		setsid();
		if (tty) {
			int fd = open(slave, O_RDWR | O_CLOEXEC);
			if (fd < 0 || ioctl(fd, TIOCSCTTY, 0))
				child_fail(pstat[1], 6);
			dup2(fd, 0);
			dup2(fd, 1);
			dup2(fd, 2);
		} else {
			dup2(pin[0], 0);
			dup2(pout[1], 1);
			dup2(perr[1], 2);
		}
		child_enter(&sp, pstat[1]);
	}
	memset(e, 0, sizeof *e);
	e->used = 1;
	e->mode = mode;
	e->id = id;
	e->conn = c;
	e->conn_gen = c->gen;
	e->detached = (int)detach;
	e->pid = pid;
	e->max_out = (size_t)max_out;
	e->deadline_ms = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
	e->stat_fd = pstat[0];
	pstat[0] = -1;
	if (tty) {
		e->tty_fd = master;
		e->out_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		e->in_fd = fcntl(master, F_DUPFD_CLOEXEC, 3);
		e->err_fd = -1;
		master = -1;
	} else {
		e->tty_fd = -1;
		e->in_fd = pin[1];
		e->out_fd = pout[0];
		e->err_fd = perr[0];
		pin[1] = pout[0] = perr[0] = -1;
	}
	if (mode == PM_STREAM) {
		if (!next_handle)
			next_handle = 1;
		e->handle = next_handle++;
	}
	e->argv0 = strdup(argv[0]);
	e->cwd = sp.cwd;
	e->root = sp.root;
	sp.cwd = sp.root = NULL;
	set_nonblock(e->stat_fd);
	set_nonblock(e->in_fd);
	set_nonblock(e->out_fd);
	set_nonblock(e->err_fd);
	if (mode == PM_EXEC) {
		e->in_close = 1;
		if (in.len && buf_put(&e->in, in.val, in.len))
			buf_free(&e->in);
		exec_write_stdin(e);
	}
	DEBUG("%s id=%u pid=%d %s at %lld\n", op, id, pid, argv[0], (long long)now_ms());
out:
	close_fd(&pin[0]);
	close_fd(&pin[1]);
	close_fd(&pout[0]);
	close_fd(&pout[1]);
	close_fd(&perr[0]);
	close_fd(&perr[1]);
	close_fd(&pstat[0]);
	close_fd(&pstat[1]);
	close_fd(&master);
	for (size_t i = 0; strs && i < ns; i++)
		free(strs[i]);
	free(strs);
	free(argv);
	free(env);
	free(sp.cwd);
	free(sp.root);
	free(sp.hostname);
}

/* The streamed process a request names (F_PROC), or NULL after an ESRCH/EINVAL reply. */
static struct exec *proc_of(struct conn *c, uint32_t id, const char *op, const uint8_t *p,
			    size_t n)
{
	int64_t h = 0;
	if (tlv_int(p, n, F_PROC, &h) != 1 || h <= 0 || h > 0xFFFFFFFF) {
		send_error(c, id, EINVAL, "%s: proc (the process handle) is required", op);
		return NULL;
	}
	for (int i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (e->used && e->mode == PM_STREAM && e->started && e->handle == (uint32_t)h)
			return e;
	}
	send_error(c, id, ESRCH, "%s: no process %lld", op, (long long)h);
	return NULL;
}

static void handle_stdin(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	struct exec *e = proc_of(c, id, "stdin", p, n);
	if (!e)
		return;
	int64_t close_it = 0;
	struct field data = {0};
	tlv_find(p, n, F_DATA, &data);
	if (tlv_int(p, n, F_CLOSE, &close_it) < 0) {
		send_error(c, id, EINVAL, "stdin: close must be an 8-byte integer");
		return;
	}
	if (e->in_ack) {
		send_error(c, id, EBUSY, "stdin: a write to process %u is still in progress", e->handle);
		return;
	}
	if (e->in_fd < 0) {
		send_error(c, id, EPIPE, "stdin: process %u's stdin is closed", e->handle);
		return;
	}
	if (data.len && buf_put(&e->in, data.val, data.len)) {
		send_error(c, id, ENOMEM, "stdin: out of memory");
		return;
	}
	e->in_close = close_it != 0;
	e->in_ack = id;
	if (!proc_attached(e) || e->conn != c) {
		/* Answered on the connection that asked, which must be the attached one. */
		buf_free(&e->in);
		e->in_ack = 0;
		send_error(c, id, EPERM, "stdin: process %u is attached to another connection",
			   e->handle);
		return;
	}
	exec_write_stdin(e);
}

static void handle_signal(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	struct exec *e = proc_of(c, id, "signal", p, n);
	if (!e)
		return;
	int64_t sig = 0;
	if (tlv_int(p, n, F_SIGNAL, &sig) != 1 || sig <= 0 || sig >= 65) {
		send_error(c, id, EINVAL, "signal: signal (1..64) is required");
		return;
	}
	if (!e->exited && kill(e->pid, (int)sig)) {
		send_error(c, id, errno, "signal: %s", strerror(errno));
		return;
	}
	send_frame(c, T_SIGNAL | T_REPLY, id, NULL);
}

static void handle_resize(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	struct exec *e = proc_of(c, id, "resize", p, n);
	if (!e)
		return;
	int64_t rows = 0, cols = 0;
	if (tlv_int(p, n, F_ROWS, &rows) != 1 || tlv_int(p, n, F_COLS, &cols) != 1 || rows < 1 ||
	    rows > 0xFFFF || cols < 1 || cols > 0xFFFF) {
		send_error(c, id, EINVAL, "resize: rows and cols (1..65535) are required");
		return;
	}
	if (e->tty_fd < 0) {
		send_error(c, id, ENOTTY, "resize: process %u has no terminal", e->handle);
		return;
	}
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	if (ioctl(e->tty_fd, TIOCSWINSZ, &ws)) {
		send_error(c, id, errno, "resize: %s", strerror(errno));
		return;
	}
	send_frame(c, T_RESIZE | T_REPLY, id, NULL);
}

/* Make this connection the one a process reports to: the reply, then the kept output of a
 * detached process (from the stream offsets asked for), then (if it has exited) its end.
 * With AT_KEEP (a log reader) an exited detached process is kept for the next attach
 * instead of forgotten. */
static void handle_attach(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	struct exec *e = proc_of(c, id, "attach", p, n);
	if (!e)
		return;
	int64_t flags = 0, from[2] = {0, 0};
	if (tlv_int(p, n, F_FLAGS, &flags) < 0 || (flags & ~(int64_t)AT_KEEP) ||
	    tlv_int(p, n, F_OUT_FROM, &from[0]) < 0 || tlv_int(p, n, F_ERR_FROM, &from[1]) < 0 ||
	    from[0] < 0 || from[1] < 0) {
		send_error(c, id, EINVAL, "attach: bad flags or stream offsets");
		return;
	}
	e->keep = (flags & AT_KEEP) != 0;
	if (proc_attached(e) && e->conn != c)
		stdin_ack(e, EPIPE); /* the previous connection's write is abandoned */
	e->conn = c;
	e->conn_gen = c->gen;
	size_t skip[2];
	for (int s = 0; s < 2; s++) {
		const struct ring *r = &e->ring[s];
		uint64_t want = (uint64_t)from[s];
		skip[s] = want > r->dropped ? (size_t)(want - r->dropped) : 0;
		if (skip[s] > r->len)
			skip[s] = r->len;
	}
	struct buf b = {0};
	uint64_t dropped = e->ring[0].dropped + e->ring[1].dropped;
	if (!put_int(&b, F_PROC, e->handle) && !put_int(&b, F_PID, e->pid) &&
	    !put_int(&b, F_EXITED, e->exited) && !put_int(&b, F_DROPPED, (int64_t)dropped) &&
	    !put_int(&b, F_TTY, e->tty_fd >= 0) &&
	    !put_int(&b, F_OUT_FROM, (int64_t)(e->ring[0].dropped + skip[0])) &&
	    !put_int(&b, F_ERR_FROM, (int64_t)(e->ring[1].dropped + skip[1])))
		send_frame(c, T_ATTACH | T_REPLY, id, &b);
	buf_free(&b);
	for (int s = 0; s < 2; s++) {
		struct ring *r = &e->ring[s];
		size_t at = (r->start + skip[s]) % RING_CAP, len = r->len - skip[s];
		size_t first = at + len > RING_CAP ? RING_CAP - at : len;
		if (first)
			proc_notify_output(e, s + 1, r->p + at, first);
		if (len > first)
			proc_notify_output(e, s + 1, r->p, len - first);
	}
	if (e->exited)
		proc_exit_notify(e);
}

/* ------------------------------------------------------------------ jobs */

typedef void (*job_fn)(struct conn *c, uint32_t id, const uint8_t *p, size_t n);

static void job_free(struct job *j)
{
	close_fd(&j->fd);
	buf_free(&j->reply);
	memset(j, 0, sizeof *j);
	j->fd = -1;
}

/* Forward the worker's reply once it is whole (EOF), and free the job once reaped too. */
static void job_done_maybe(struct job *j)
{
	if (j->fd >= 0 || !j->reaped)
		return;
	struct conn *c = j->conn;
	int live = c && c->used && c->gen == j->conn_gen && !j->cancelled;
	int whole = j->reply.len >= HDR_LEN && j->reply.len == HDR_LEN + get_u32(j->reply.p + 12);
	if (live && whole && (c->kind != CONN_PORT || c->connected)) {
		struct chunk *k = malloc(sizeof *k + j->reply.len);
		if (k) {
			memcpy(k->data, j->reply.p, j->reply.len);
			k->len = j->reply.len;
			conn_queue(c, k);
		} else {
			send_error(c, j->id, ENOMEM, "out of memory forwarding a reply");
		}
	} else if (live && !whole) {
		send_error(c, j->id, EIO, "request worker died without a whole reply");
	}
	job_free(j);
}

static void job_read(struct job *j)
{
	for (;;) {
		if (buf_reserve(&j->reply, READ_CHUNK)) {
			kill(j->pid, SIGKILL);
			close_fd(&j->fd);
			buf_free(&j->reply);
			break;
		}
		ssize_t r = read(j->fd, j->reply.p + j->reply.len, READ_CHUNK);
		if (r > 0) {
			j->reply.len += (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		close_fd(&j->fd); /* EOF: the worker is done */
		break;
	}
	job_done_maybe(j);
}

static int job_reaped(pid_t pid)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (j->used && j->pid == pid) {
			j->reaped = 1;
			if (j->fd >= 0)
				job_read(j); /* what the worker wrote before exiting */
			else
				job_done_maybe(j);
			return 1;
		}
	}
	return 0;
}

/* Run fn in a forked worker whose reply frames go into a pipe; the loop forwards them. */
static struct job *start_job(struct conn *c, uint32_t id, const uint8_t *p, size_t n,
			     job_fn fn)
{
	struct job *j = NULL;
	for (int i = 0; i < MAX_JOBS && !j; i++)
		if (!jobs[i].used)
			j = &jobs[i];
	if (!j) {
		send_error(c, id, EAGAIN, "too many requests in progress (%d)", MAX_JOBS);
		return NULL;
	}
	int pfd[2];
	if (pipe2(pfd, O_CLOEXEC)) {
		send_error(c, id, errno, "pipe: %s", strerror(errno));
		return NULL;
	}
	pid_t pid = fork();
	if (pid < 0) {
		send_error(c, id, errno, "fork: %s", strerror(errno));
		close(pfd[0]);
		close(pfd[1]);
		return NULL;
	}
	if (pid == 0) {
		/* Keep only the console (0-2) and the pipe: a worker stuck on a hung filesystem
		 * must not hold the connections open. */
		if (pfd[1] != 3)
			dup2(pfd[1], 3);
		syscall(SYS_close_range, 4u, ~0u, 0u);
		/* A private connection on the pipe: the handler's reply is written there, whole. */
		struct conn w;
		memset(&w, 0, sizeof w);
		w.used = 1;
		w.fd = 3;
		w.kind = CONN_STREAM;
		w.connected = 1;
		fn(&w, id, p, n);
		while (w.out_head) {
			struct pollfd pf = {.fd = w.fd, .events = POLLOUT};
			if (poll(&pf, 1, -1) < 0 && errno != EINTR)
				break;
			if (pf.revents & (POLLERR | POLLHUP))
				break;
			conn_flush(&w);
		}
		_exit(0);
	}
	close(pfd[1]);
	set_nonblock(pfd[0]);
	memset(j, 0, sizeof *j);
	j->used = 1;
	j->id = id;
	j->conn = c;
	j->conn_gen = c->gen;
	j->pid = pid;
	j->fd = pfd[0];
	return j;
}

/* Stop the workers of a connection (gone, or a new session); no reply is sent. */
static void conn_kill_jobs(struct conn *c)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (j->used && j->conn == c && j->conn_gen == c->gen) {
			kill(j->pid, SIGKILL);
			j->cancelled = 1;
		}
	}
}

/* ------------------------------------------------------- other requests */

static char *req_path(struct conn *c, uint32_t id, const char *op, const uint8_t *p, size_t n)
{
	struct field f;
	if (!tlv_find(p, n, F_PATH, &f) || f.len == 0) {
		send_error(c, id, EINVAL, "%s: path is missing", op);
		return NULL;
	}
	char *path = field_str(&f);
	if (!path)
		send_error(c, id, EINVAL, "%s: path contains a NUL byte", op);
	return path;
}

static void handle_read_file(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	char *path = req_path(c, id, "read_file", p, n);
	if (!path)
		return;
	struct buf b = {0}, data = {0};
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0) {
		send_error(c, id, errno, "read_file %s: %s", path, strerror(errno));
		goto out;
	}
	if (fstat(fd, &st) || !S_ISREG(st.st_mode)) {
		send_error(c, id, EINVAL, "read_file %s: not a regular file", path);
		goto out;
	}
	size_t limit = MAX_FRAME - 4096;
	if ((uint64_t)st.st_size > limit) {
		send_error(c, id, EFBIG, "read_file %s: %lld bytes exceed the %zu-byte frame limit",
			   path, (long long)st.st_size, limit);
		goto out;
	}
	for (;;) {
		if (buf_reserve(&data, READ_CHUNK)) {
			send_error(c, id, ENOMEM, "read_file %s: out of memory", path);
			goto out;
		}
		ssize_t r = read(fd, data.p + data.len, READ_CHUNK);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			send_error(c, id, errno, "read_file %s: %s", path, strerror(errno));
			goto out;
		}
		if (r == 0)
			break;
		data.len += (size_t)r;
		if (data.len > limit) {
			send_error(c, id, EFBIG, "read_file %s: larger than the %zu-byte frame limit",
				   path, limit);
			goto out;
		}
	}
	if (put_field(&b, F_DATA, data.p, data.len) || put_int(&b, F_MODE, st.st_mode & 07777))
		send_error(c, id, ENOMEM, "read_file %s: out of memory", path);
	else
		send_frame(c, T_READ_FILE | T_REPLY, id, &b);
out:
	if (fd >= 0)
		close(fd);
	buf_free(&b);
	buf_free(&data);
	free(path);
}

/* Open the directory that will hold the last component of `path` (absolute), creating missing
 * directories with `mkdirs`. Symlinks on the way are followed only when root or the agent's
 * user owns them: a guest user cannot redirect a write by planting one. Returns a directory
 * fd and points *name at the last component; -1 with errno (and *what saying where). */
static int open_parent(char *path, int mkdirs, char **name, const char **what)
{
	*what = "";
	if (path[0] != '/') {
		*what = "the path must be absolute";
		errno = EINVAL;
		return -1;
	}
	char *last = strrchr(path, '/');
	if (!last[1] || !strcmp(last + 1, ".") || !strcmp(last + 1, "..")) {
		*what = "the path must name a file";
		errno = EINVAL;
		return -1;
	}
	*name = last + 1;
	int dfd = open("/", O_PATH | O_DIRECTORY | O_CLOEXEC);
	char *comp = path + 1;
	while (dfd >= 0 && comp < last + 1) {
		char *slash = strchr(comp, '/');
		*slash = 0;
		if (comp[0] && strcmp(comp, ".")) {
			struct stat st = {0};
			if (fstatat(dfd, comp, &st, AT_SYMLINK_NOFOLLOW) && errno == ENOENT && mkdirs &&
			    (mkdirat(dfd, comp, 0755) == 0 || errno == EEXIST))
				fstatat(dfd, comp, &st, AT_SYMLINK_NOFOLLOW);
			if (S_ISLNK(st.st_mode) && st.st_uid != 0 && st.st_uid != geteuid()) {
				*what = "a directory on the way is a symlink owned by another user";
				errno = ELOOP;
				*slash = '/';
				close(dfd);
				return -1;
			}
			int nd = openat(dfd, comp, O_PATH | O_DIRECTORY | O_CLOEXEC);
			int e = errno;
			close(dfd);
			dfd = nd;
			errno = e;
			if (nd < 0 && errno == ENOENT && mkdirs)
				*what = "creating parent directories";
		}
		*slash = '/';
		comp = slash + 1;
	}
	return dfd;
}

/* Create or replace a file. The last component is never followed if it is a symlink, and a
 * file owned by another user is replaced by a new one (not written in place: its owner could
 * hold it open, or have linked it elsewhere); a root-owned file is rewritten in place (/proc,
 * /sys files too). */
static void handle_write_file(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	char *path = req_path(c, id, "write_file", p, n);
	if (!path)
		return;
	struct field data = {0};
	int64_t mode = 0644, flags = 0;
	int dfd = -1, fd = -1;
	tlv_find(p, n, F_DATA, &data);
	if (tlv_int(p, n, F_MODE, &mode) < 0 || tlv_int(p, n, F_FLAGS, &flags) < 0 || mode < 0 ||
	    mode > 07777) {
		send_error(c, id, EINVAL, "write_file %s: bad mode or flags", path);
		goto out;
	}
	char *name;
	const char *what;
	dfd = open_parent(path, flags & WF_MKDIRS, &name, &what);
	if (dfd < 0) {
		int e = errno;
		send_error(c, id, e, "write_file %s: %s%s%s", path, what, what[0] ? ": " : "",
			   strerror(e));
		goto out;
	}
	const int wflags = O_WRONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY;
	struct stat st;
	fd = openat(dfd, name, wflags);
	if (fd >= 0 && (fstat(fd, &st) || st.st_uid != geteuid())) {
		close(fd);
		fd = -1;
		if (unlinkat(dfd, name, 0)) {
			send_error(c, id, errno, "write_file %s: replacing another user's file: %s", path,
				   strerror(errno));
			goto out;
		}
		errno = ENOENT;
	}
	if (fd < 0 && errno == ENOENT)
		fd = openat(dfd, name, wflags | O_CREAT | O_EXCL, (mode_t)mode);
	if (fd < 0) {
		int e = errno;
		send_error(c, id, e, "write_file %s: %s", path,
			   e == ELOOP ? "is a symbolic link (not followed)" : strerror(e));
		goto out;
	}
	if (!fstat(fd, &st) && S_ISREG(st.st_mode) && st.st_size && ftruncate(fd, 0)) {
		send_error(c, id, errno, "write_file %s: truncate: %s", path, strerror(errno));
		goto out;
	}
	size_t off = 0;
	while (off < data.len) {
		ssize_t w = write(fd, data.val + off, data.len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			send_error(c, id, errno, "write_file %s: %s", path, strerror(errno));
			goto out;
		}
		off += (size_t)w;
	}
	if (!fstat(fd, &st) && S_ISREG(st.st_mode) && (st.st_mode & 07777) != (mode_t)mode &&
	    fchmod(fd, (mode_t)mode)) {
		send_error(c, id, errno, "write_file %s: chmod: %s", path, strerror(errno));
		goto out;
	}
	send_frame(c, T_WRITE_FILE | T_REPLY, id, NULL);
out:
	if (fd >= 0)
		close(fd);
	if (dfd >= 0)
		close(dfd);
	free(path);
}

static void handle_set_time(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	int64_t sec = 0, nsec = 0;
	if (tlv_int(p, n, F_SEC, &sec) != 1 || tlv_int(p, n, F_NSEC, &nsec) < 0 || nsec < 0 ||
	    nsec >= 1000000000) {
		send_error(c, id, EINVAL, "set_time: sec (required) and nsec (0..1e9) are 8-byte integers");
		return;
	}
	struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
	if (clock_settime(CLOCK_REALTIME, &ts)) {
		send_error(c, id, errno, "set_time: %s", strerror(errno));
		return;
	}
	send_frame(c, T_SET_TIME | T_REPLY, id, NULL);
}

static void handle_add_entropy(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	struct field f;
	if (!tlv_find(p, n, F_DATA, &f) || f.len == 0 || f.len > MAX_ENTROPY) {
		send_error(c, id, EINVAL, "add_entropy: data must be 1..%u bytes", MAX_ENTROPY);
		return;
	}
	struct rand_pool_info *info = malloc(sizeof *info + f.len);
	if (!info) {
		send_error(c, id, ENOMEM, "add_entropy: out of memory");
		return;
	}
	info->entropy_count = (int)(f.len * 8);
	info->buf_size = (int)f.len;
	memcpy(info->buf, f.val, f.len);
	int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, RNDADDENTROPY, info)) {
		send_error(c, id, errno, "add_entropy: /dev/random: %s", strerror(errno));
	} else {
		ioctl(fd, RNDRESEEDCRNG);
		send_frame(c, T_ADD_ENTROPY | T_REPLY, id, NULL);
	}
	if (fd >= 0)
		close(fd);
	free(info);
}

static void handle_cancel(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	int64_t target = 0, sig = SIGKILL;
	if (tlv_int(p, n, F_TARGET, &target) != 1 || tlv_int(p, n, F_SIGNAL, &sig) < 0 || sig <= 0 ||
	    sig >= 65) {
		send_error(c, id, EINVAL, "cancel: target (request id) and signal (1..64) required");
		return;
	}
	int found = 0;
	for (int i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (e->used && e->conn == c && e->conn_gen == c->gen && e->id == (uint32_t)target) {
			exec_kill(e, (int)sig);
			found = 1;
		}
	}
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (j->used && j->conn == c && j->conn_gen == c->gen && j->id == (uint32_t)target &&
		    !j->cancelled) {
			kill(j->pid, SIGKILL); /* the client gave up on it: no reply */
			j->cancelled = 1;
			found = 1;
		}
	}
	for (int i = 0; i < MAX_WAITS; i++) {
		struct wait *w = &waits[i];
		if (w->used && w->conn == c && w->conn_gen == c->gen && w->id == (uint32_t)target) {
			memset(w, 0, sizeof *w); /* the client gave up on it: no reply */
			found = 1;
		}
	}
	struct buf b = {0};
	put_int(&b, F_FOUND, found);
	send_frame(c, T_CANCEL | T_REPLY, id, &b);
	buf_free(&b);
}

/* Bring offline CPUs / memory blocks online; returns how many were onlined. */
static int online_dir(const char *dir, const char *prefix, const char *attr, const char *off,
		      const char *alt, const char *on)
{
	DIR *d = opendir(dir);
	if (!d)
		return 0;
	int count = 0;
	struct dirent *de;
	char path[PATH_MAX], val[32];
	size_t plen = strlen(prefix);
	while ((de = readdir(d))) {
		if (strncmp(de->d_name, prefix, plen) || de->d_name[plen] < '0' || de->d_name[plen] > '9')
			continue;
		snprintf(path, sizeof path, "%s/%s/%s", dir, de->d_name, attr);
		if (read_text(path, val, sizeof val) < 0 || strcmp(val, off))
			continue;
		/* Movable first: such memory can be unplugged again; plain online otherwise. */
		if ((alt && !write_text(path, alt)) || !write_text(path, on))
			count++;
	}
	closedir(d);
	return count;
}

static void handle_online(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	int64_t what = ON_CPUS | ON_MEMORY;
	if (tlv_int(p, n, F_FLAGS, &what) < 0) {
		send_error(c, id, EINVAL, "online: flags must be an 8-byte integer");
		return;
	}
	struct buf b = {0};
	int cpus = 0, mem = 0;
	if (what & ON_CPUS)
		cpus = online_dir("/sys/devices/system/cpu", "cpu", "online", "0", NULL, "1");
	if (what & ON_MEMORY)
		mem = online_dir("/sys/devices/system/memory", "memory", "state", "offline",
				 "online_movable", "online");
	put_int(&b, F_CPUS, cpus);
	put_int(&b, F_MEM_BLOCKS, mem);
	send_frame(c, T_ONLINE | T_REPLY, id, &b);
	buf_free(&b);
}

/* ---------------------------------------------------------------- network */

/* NETWORK: configure the guest's interfaces by rtnetlink in one request (PROTOCOL.md). */
#define MAX_NET_LINKS 32
#define MAX_NET_ITEMS 1024 /* addresses (all links), routes, neighbours: at most this many each */
#define MAX_NET_FILE (1u << 20)
#define NL_BUF 8192

struct net_addr {
	int family; /* AF_INET or AF_INET6 */
	uint8_t ip[16];
	int plen;
};

struct net_link {
	uint8_t mac[6];
	int64_t mtu; /* 0: leave it */
	int first_addr, n_addrs;
	int index;
	char name[IF_NAMESIZE];
};

struct net_route {
	int family;
	int has_dst, has_gw, link; /* link: index into the links, -1 for none */
	struct net_addr dst;
	uint8_t gw[16];
};

struct net_neigh {
	struct net_addr ip;
	uint8_t lladdr[6];
	int link;
};

struct net_req {
	struct net_link links[MAX_NET_LINKS];
	int n_links;
	struct net_addr *addrs;
	int n_addrs;
	struct net_route *routes;
	int n_routes;
	struct net_neigh *neighs;
	int n_neighs;
};

static int parse_mac(const struct field *f, uint8_t mac[6])
{
	char s[18];
	if (f->len != 17)
		return -1;
	memcpy(s, f->val, 17);
	s[17] = 0;
	for (int i = 0; i < 6; i++) {
		char *hex = s + 3 * i;
		if ((i < 5 && hex[2] != ':') || !isxdigit((unsigned char)hex[0]) ||
		    !isxdigit((unsigned char)hex[1]))
			return -1;
		char two[3] = {hex[0], hex[1], 0};
		mac[i] = (uint8_t)strtoul(two, NULL, 16);
	}
	return 0;
}

/* "IP" (want_plen 0) or "IP/PREFIX" (want_plen 1) as text. */
static int parse_ip(const struct field *f, struct net_addr *a, int want_plen)
{
	char s[INET6_ADDRSTRLEN + 8];
	if (f->len == 0 || f->len >= sizeof s || memchr(f->val, 0, f->len))
		return -1;
	memcpy(s, f->val, f->len);
	s[f->len] = 0;
	char *slash = strchr(s, '/');
	if (!!slash != !!want_plen)
		return -1;
	if (slash)
		*slash = 0;
	memset(a, 0, sizeof *a);
	if (inet_pton(AF_INET, s, a->ip) == 1)
		a->family = AF_INET;
	else if (inet_pton(AF_INET6, s, a->ip) == 1)
		a->family = AF_INET6;
	else
		return -1;
	a->plen = a->family == AF_INET ? 32 : 128;
	if (slash) {
		char *end;
		const char *digits = slash + 1;
		if (!isdigit((unsigned char)digits[0]))
			return -1;
		long v = strtol(digits, &end, 10);
		if (*end || v < 0 || v > a->plen)
			return -1;
		a->plen = (int)v;
	}
	return 0;
}

/* The link a route or neighbour names by its MAC (field `tag`): its index, -1 if none named. */
static int net_link_of(const struct net_req *r, const uint8_t *p, size_t n, int *out)
{
	struct field f;
	*out = -1;
	if (!tlv_find(p, n, F_MAC, &f))
		return 0;
	uint8_t mac[6];
	if (parse_mac(&f, mac))
		return -1;
	for (int i = 0; i < r->n_links; i++)
		if (!memcmp(r->links[i].mac, mac, 6)) {
			*out = i;
			return 0;
		}
	return -1;
}

/* Parse and check the whole request before anything is changed; 0, or -1 with `err` set. */
static int net_parse(struct net_req *r, const uint8_t *p, size_t n, char *err, size_t cap)
{
	size_t pos = 0;
	struct field f, g;
	int links = 0, routes = 0, neighs = 0, addrs = 0;
	while (tlv_next(p, n, &pos, &f) == 1) {
		if (f.tag == F_LINK || f.tag == F_ROUTE || f.tag == F_NEIGH) {
			if (!tlv_valid(f.val, f.len)) {
				snprintf(err, cap, "a link, route or neighbour is a malformed payload");
				return -1;
			}
		}
		if (f.tag == F_LINK) {
			links++;
			size_t ip = 0;
			while (tlv_next(f.val, f.len, &ip, &g) == 1)
				addrs += g.tag == F_ADDRESS;
		}
		routes += f.tag == F_ROUTE;
		neighs += f.tag == F_NEIGH;
	}
	if (links > MAX_NET_LINKS || addrs > MAX_NET_ITEMS || routes > MAX_NET_ITEMS ||
	    neighs > MAX_NET_ITEMS) {
		snprintf(err, cap, "at most %d links and %d addresses, routes and neighbours each",
			 MAX_NET_LINKS, MAX_NET_ITEMS);
		return -1;
	}
	r->addrs = calloc((size_t)addrs + 1, sizeof *r->addrs);
	r->routes = calloc((size_t)routes + 1, sizeof *r->routes);
	r->neighs = calloc((size_t)neighs + 1, sizeof *r->neighs);
	if (!r->addrs || !r->routes || !r->neighs) {
		snprintf(err, cap, "out of memory");
		return -1;
	}
	pos = 0;
	while (tlv_next(p, n, &pos, &f) == 1) {
		if (f.tag != F_LINK)
			continue;
		struct net_link *l = &r->links[r->n_links];
		int k = r->n_links++;
		if (!tlv_find(f.val, f.len, F_MAC, &g) || parse_mac(&g, l->mac)) {
			snprintf(err, cap, "link %d: mac must be aa:bb:cc:dd:ee:ff", k);
			return -1;
		}
		for (int i = 0; i < k; i++)
			if (!memcmp(r->links[i].mac, l->mac, 6)) {
				snprintf(err, cap, "link %d: mac given twice", k);
				return -1;
			}
		int got = tlv_int(f.val, f.len, F_MTU, &l->mtu);
		if (got < 0 || (got && (l->mtu < 68 || l->mtu > 65535))) {
			snprintf(err, cap, "link %d: mtu must be an integer in 68..65535", k);
			return -1;
		}
		l->first_addr = r->n_addrs;
		size_t ip = 0;
		while (tlv_next(f.val, f.len, &ip, &g) == 1) {
			if (g.tag != F_ADDRESS)
				continue;
			if (parse_ip(&g, &r->addrs[r->n_addrs], 1)) {
				snprintf(err, cap, "link %d: address %d is not IP/PREFIX", k, l->n_addrs);
				return -1;
			}
			r->n_addrs++;
			l->n_addrs++;
		}
	}
	pos = 0;
	while (tlv_next(p, n, &pos, &f) == 1) {
		if (f.tag == F_ROUTE) {
			struct net_route *rt = &r->routes[r->n_routes];
			int k = r->n_routes++;
			struct net_addr gw;
			int64_t fam = 0;
			rt->has_dst = tlv_find(f.val, f.len, F_DEST, &g);
			if (rt->has_dst && parse_ip(&g, &rt->dst, 1)) {
				snprintf(err, cap, "route %d: dest is not NETWORK/PREFIX", k);
				return -1;
			}
			rt->has_gw = tlv_find(f.val, f.len, F_GATEWAY, &g);
			if (rt->has_gw && parse_ip(&g, &gw, 0)) {
				snprintf(err, cap, "route %d: gateway is not an IP address", k);
				return -1;
			}
			if (rt->has_gw)
				memcpy(rt->gw, gw.ip, 16);
			int got = tlv_int(f.val, f.len, F_FAMILY, &fam);
			if (got < 0 || (got && fam != 4 && fam != 6)) {
				snprintf(err, cap, "route %d: family must be 4 or 6", k);
				return -1;
			}
			rt->family = got ? (fam == 4 ? AF_INET : AF_INET6)
				     : rt->has_dst ? rt->dst.family
				     : rt->has_gw  ? gw.family
						   : 0;
			if (!rt->family || (rt->has_dst && rt->dst.family != rt->family) ||
			    (rt->has_gw && gw.family != rt->family)) {
				snprintf(err, cap, "route %d: no family, or dest, gateway and family disagree",
					 k);
				return -1;
			}
			if (net_link_of(r, f.val, f.len, &rt->link)) {
				snprintf(err, cap, "route %d: mac names none of the links", k);
				return -1;
			}
			if (!rt->has_gw && rt->link < 0) {
				snprintf(err, cap, "route %d: needs a gateway or a link", k);
				return -1;
			}
		} else if (f.tag == F_NEIGH) {
			struct net_neigh *nb = &r->neighs[r->n_neighs];
			int k = r->n_neighs++;
			if (!tlv_find(f.val, f.len, F_DEST, &g) || parse_ip(&g, &nb->ip, 0)) {
				snprintf(err, cap, "neighbour %d: dest is not an IP address", k);
				return -1;
			}
			if (!tlv_find(f.val, f.len, F_LLADDR, &g) || parse_mac(&g, nb->lladdr)) {
				snprintf(err, cap, "neighbour %d: lladdr must be aa:bb:cc:dd:ee:ff", k);
				return -1;
			}
			if (net_link_of(r, f.val, f.len, &nb->link) || nb->link < 0) {
				snprintf(err, cap, "neighbour %d: mac must name one of the links", k);
				return -1;
			}
		}
	}
	return 0;
}

struct nl {
	int fd;
	uint32_t seq;
};

struct nl_msg {
	struct nlmsghdr h;
	uint8_t body[NL_BUF - sizeof(struct nlmsghdr)];
} __attribute__((aligned(NLMSG_ALIGNTO)));

static void nl_init(struct nl_msg *m, uint16_t type, uint16_t flags, const void *hdr, size_t len)
{
	memset(m, 0, sizeof *m);
	m->h.nlmsg_type = type;
	m->h.nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
	m->h.nlmsg_len = (uint32_t)NLMSG_LENGTH(len);
	memcpy(NLMSG_DATA(&m->h), hdr, len);
}

static void nl_attr(struct nl_msg *m, uint16_t type, const void *data, size_t len)
{
	struct rtattr *a = (struct rtattr *)((uint8_t *)m + NLMSG_ALIGN(m->h.nlmsg_len));
	a->rta_type = type;
	a->rta_len = (uint16_t)RTA_LENGTH(len);
	memcpy(RTA_DATA(a), data, len);
	m->h.nlmsg_len = (uint32_t)(NLMSG_ALIGN(m->h.nlmsg_len) + RTA_ALIGN(a->rta_len));
}

/* Send one request and read until its ACK, or with `each` (a dump, which `each` sees every
 * message of) until its end: 0 or -errno. */
static int nl_talk(struct nl *nl, struct nl_msg *m, void (*each)(struct nlmsghdr *, void *),
		   void *arg)
{
	m->h.nlmsg_seq = ++nl->seq;
	m->h.nlmsg_flags |= NLM_F_ACK;
	if (send(nl->fd, m, m->h.nlmsg_len, 0) < 0)
		return -errno;
	static uint8_t rbuf[32768] __attribute__((aligned(NLMSG_ALIGNTO)));
	for (;;) {
		ssize_t got = recv(nl->fd, rbuf, sizeof rbuf, 0);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -errno;
		size_t left = (size_t)got;
		for (struct nlmsghdr *h = (struct nlmsghdr *)rbuf; NLMSG_OK(h, left);
		     h = NLMSG_NEXT(h, left)) {
			if (h->nlmsg_seq != nl->seq)
				continue;
			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);
				if (h->nlmsg_len < NLMSG_LENGTH(sizeof *e))
					return -EBADMSG;
				if (e->error || !each)
					return e->error;
				continue;
			}
			if (each)
				each(h, arg);
		}
	}
}

/* RTM_GETLINK dump: note the index and name of every wanted link that exists. */
static void net_found_link(struct nlmsghdr *h, void *arg)
{
	struct net_req *r = arg;
	if (h->nlmsg_type != RTM_NEWLINK || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct ifinfomsg)))
		return;
	struct ifinfomsg *ifi = NLMSG_DATA(h);
	const uint8_t *mac = NULL;
	const char *name = NULL;
	size_t name_len = 0, alen = IFLA_PAYLOAD(h);
	for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, alen); a = RTA_NEXT(a, alen)) {
		if (a->rta_type == IFLA_ADDRESS && RTA_PAYLOAD(a) == 6) {
			mac = RTA_DATA(a);
		} else if (a->rta_type == IFLA_IFNAME && RTA_PAYLOAD(a) > 0) {
			name = RTA_DATA(a);
			name_len = strnlen(name, RTA_PAYLOAD(a));
		}
	}
	if (!mac || !name)
		return;
	for (int i = 0; i < r->n_links; i++) {
		struct net_link *l = &r->links[i];
		if (!l->index && !memcmp(l->mac, mac, 6)) {
			l->index = ifi->ifi_index;
			int len = (int)(name_len < IF_NAMESIZE ? name_len : IF_NAMESIZE - 1);
			snprintf(l->name, sizeof l->name, "%.*s", len, name);
		}
	}
}

static int nl_link_up(struct nl *nl, int index, int64_t mtu)
{
	struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC,
				.ifi_index = index,
				.ifi_flags = IFF_UP,
				.ifi_change = IFF_UP};
	struct nl_msg m;
	nl_init(&m, RTM_NEWLINK, 0, &ifi, sizeof ifi);
	if (mtu) {
		uint32_t v = (uint32_t)mtu;
		nl_attr(&m, IFLA_MTU, &v, sizeof v);
	}
	return nl_talk(nl, &m, NULL, NULL);
}

static size_t ip_len(int family)
{
	return family == AF_INET ? 4 : 16;
}

static void net_fmt(const struct net_addr *a, char *out, size_t cap)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	inet_ntop(a->family, a->ip, ip, sizeof ip);
	snprintf(out, cap, "%s/%d", ip, a->plen);
}

/* Static addresses: no duplicate address detection (the host made them unique), so an IPv6
 * address is usable at once, as Kata's agent does. */
static int nl_addr(struct nl *nl, int index, const struct net_addr *a)
{
	struct ifaddrmsg ifa = {.ifa_family = (uint8_t)a->family,
				.ifa_prefixlen = (uint8_t)a->plen,
				.ifa_flags = IFA_F_NODAD | IFA_F_PERMANENT,
				.ifa_index = (uint32_t)index};
	struct nl_msg m;
	nl_init(&m, RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &ifa, sizeof ifa);
	nl_attr(&m, IFA_LOCAL, a->ip, ip_len(a->family));
	nl_attr(&m, IFA_ADDRESS, a->ip, ip_len(a->family));
	uint32_t flags = IFA_F_NODAD | IFA_F_PERMANENT;
	nl_attr(&m, IFA_FLAGS, &flags, sizeof flags);
	return nl_talk(nl, &m, NULL, NULL);
}

static int nl_route(struct nl *nl, const struct net_route *rt, int oif)
{
	struct rtmsg rtm = {.rtm_family = (uint8_t)rt->family,
			    .rtm_dst_len = (uint8_t)(rt->has_dst ? rt->dst.plen : 0),
			    .rtm_table = RT_TABLE_MAIN,
			    .rtm_protocol = RTPROT_BOOT,
			    .rtm_scope = rt->has_gw ? RT_SCOPE_UNIVERSE : RT_SCOPE_LINK,
			    .rtm_type = RTN_UNICAST};
	struct nl_msg m;
	nl_init(&m, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &rtm, sizeof rtm);
	if (rt->has_dst)
		nl_attr(&m, RTA_DST, rt->dst.ip, ip_len(rt->family));
	if (rt->has_gw)
		nl_attr(&m, RTA_GATEWAY, rt->gw, ip_len(rt->family));
	if (oif > 0) {
		uint32_t v = (uint32_t)oif;
		nl_attr(&m, RTA_OIF, &v, sizeof v);
	}
	return nl_talk(nl, &m, NULL, NULL);
}

static int nl_neigh(struct nl *nl, const struct net_neigh *nb, int index)
{
	struct ndmsg ndm = {.ndm_family = (uint8_t)nb->ip.family,
			    .ndm_ifindex = index,
			    .ndm_state = NUD_PERMANENT,
			    .ndm_type = RTN_UNICAST};
	struct nl_msg m;
	nl_init(&m, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &ndm, sizeof ndm);
	nl_attr(&m, NDA_DST, nb->ip.ip, ip_len(nb->ip.family));
	nl_attr(&m, NDA_LLADDR, nb->lladdr, 6);
	return nl_talk(nl, &m, NULL, NULL);
}

/* A netlink socket that hears of new links (RTMGRP_LINK), or -1. */
static int nl_watch_links(void)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE);
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = RTMGRP_LINK};
	if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa)) {
		close(fd);
		fd = -1;
	}
	return fd;
}

/* Replace sysroot + `path` with `data` (the guest's own /etc: root's, no symlink followed). */
static int net_write_file(const char *path, const struct field *data)
{
	char full[PATH_MAX], dir[PATH_MAX];
	snprintf(dir, sizeof dir, "%s/etc", sysroot);
	mkdir(dir, 0755);
	snprintf(full, sizeof full, "%s%s", sysroot, path);
	int fd = open(full, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY, 0644);
	if (fd < 0)
		return -errno;
	size_t off = 0;
	while (off < data->len) {
		ssize_t w = write(fd, data->val + off, data->len - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			int e = errno;
			close(fd);
			return -e;
		}
		off += (size_t)w;
	}
	return close(fd) ? -errno : 0;
}

static void net_req_free(struct net_req *r)
{
	free(r->addrs);
	free(r->routes);
	free(r->neighs);
	free(r);
}

static void handle_network(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	int64_t t0 = now_ms(), c0 = cpu_us();
	struct net_req *r = calloc(1, sizeof *r);
	struct nl nl = {.fd = -1};
	int watch = -1;
	struct buf b = {0};
	char err[200] = "", what[160] = "";
	int e = EINVAL;
	if (!r) {
		send_error(c, id, ENOMEM, "network: out of memory");
		return;
	}
	int64_t timeout = 0;
	struct field host = {0}, hosts = {0}, resolv = {0};
	int has_host = tlv_find(p, n, F_HOSTNAME, &host);
	int has_hosts = tlv_find(p, n, F_HOSTS, &hosts);
	int has_resolv = tlv_find(p, n, F_RESOLV, &resolv);
	if (tlv_int(p, n, F_TIMEOUT_MS, &timeout) < 0 || timeout < 0 || timeout > MAX_WAIT_MS) {
		snprintf(err, sizeof err, "timeout_ms must be an integer in 0..%d", MAX_WAIT_MS);
		goto fail;
	}
	if (has_host && (host.len > 64 || memchr(host.val, 0, host.len))) {
		snprintf(err, sizeof err, "hostname must be 0..64 bytes without NUL");
		goto fail;
	}
	if ((has_hosts && hosts.len > MAX_NET_FILE) || (has_resolv && resolv.len > MAX_NET_FILE)) {
		snprintf(err, sizeof err, "hosts and resolv must be at most %u bytes", MAX_NET_FILE);
		goto fail;
	}
	if (net_parse(r, p, n, err, sizeof err))
		goto fail;
	/* Everything is checked: from here on the guest is changed. */
	if (has_host && host.len) {
		struct field line = host;
		if (sethostname((const char *)host.val, host.len)) {
			e = errno;
			snprintf(what, sizeof what, "hostname");
			goto sys;
		}
		char text[80];
		snprintf(text, sizeof text, "%.*s\n", (int)host.len, (const char *)host.val);
		line.val = (const uint8_t *)text;
		line.len = (uint32_t)strlen(text);
		if ((e = -net_write_file("/etc/hostname", &line))) {
			snprintf(what, sizeof what, "/etc/hostname");
			goto sys;
		}
	}
	nl.fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (nl.fd < 0) {
		e = errno;
		snprintf(what, sizeof what, "netlink socket");
		goto sys;
	}
	int lo = (int)if_nametoindex("lo");
	int64_t t_lo0 = now_ms(), c_lo0 = cpu_us();
	if (lo && (e = -nl_link_up(&nl, lo, 0))) {
		snprintf(what, sizeof what, "loopback up");
		goto sys;
	}
	int64_t t_lo1 = now_ms(), c_lo1 = cpu_us();
	/* Find each link by its MAC (a NIC may still be probing: its driver loads right after
	 * the ready marker, or it was just hotplugged): a dump, then another as soon as the
	 * kernel announces a new link (or every 100 ms), until all are there or time is up. */
	int64_t deadline = now_ms() + timeout;
	for (;;) {
		struct ifinfomsg ifi = {.ifi_family = AF_UNSPEC};
		struct nl_msg m;
		nl_init(&m, RTM_GETLINK, NLM_F_DUMP, &ifi, sizeof ifi);
		if ((e = -nl_talk(&nl, &m, net_found_link, r))) {
			snprintf(what, sizeof what, "listing links");
			goto sys;
		}
		int missing = -1;
		for (int i = 0; i < r->n_links && missing < 0; i++)
			if (!r->links[i].index)
				missing = i;
		if (missing < 0)
			break;
		int64_t left = deadline - now_ms();
		if (left <= 0) {
			const uint8_t *mac = r->links[missing].mac;
			e = ETIMEDOUT;
			snprintf(err, sizeof err,
				 "no interface with MAC %02x:%02x:%02x:%02x:%02x:%02x after %lld ms",
				 mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], (long long)timeout);
			goto fail;
		}
		if (watch < 0) {
			/* Subscribed, then dumped again: a link that comes after is announced. */
			if ((watch = nl_watch_links()) >= 0)
				continue;
			struct timespec ts = {0, 10 * 1000000L};
			nanosleep(&ts, NULL);
			continue;
		}
		struct pollfd pw = {.fd = watch, .events = POLLIN};
		if (poll(&pw, 1, (int)(left < 100 ? left : 100)) > 0) {
			static uint8_t drain[8192];
			while (recv(watch, drain, sizeof drain, MSG_DONTWAIT) > 0)
				;
		}
	}
	int64_t t_found = now_ms(), c_found = cpu_us();
	for (int i = 0; i < r->n_links; i++) {
		struct net_link *l = &r->links[i];
		if ((e = -nl_link_up(&nl, l->index, l->mtu))) {
			snprintf(what, sizeof what, "%s: up, mtu %lld", l->name, (long long)l->mtu);
			goto sys;
		}
		for (int k = 0; k < l->n_addrs; k++) {
			const struct net_addr *a = &r->addrs[l->first_addr + k];
			if ((e = -nl_addr(&nl, l->index, a))) {
				char t[64];
				net_fmt(a, t, sizeof t);
				snprintf(what, sizeof what, "%s: address %s", l->name, t);
				goto sys;
			}
		}
	}
	int64_t t_addr = now_ms(), c_addr = cpu_us();
	/* Routes to the link first: a gateway must be reachable when its route is added. */
	for (int pass = 0; pass < 2; pass++)
		for (int i = 0; i < r->n_routes; i++) {
			const struct net_route *rt = &r->routes[i];
			if (rt->has_gw != pass)
				continue;
			int oif = rt->link >= 0 ? r->links[rt->link].index : 0;
			if ((e = -nl_route(&nl, rt, oif))) {
				char d[64] = "default", g[INET6_ADDRSTRLEN] = "";
				if (rt->has_dst)
					net_fmt(&rt->dst, d, sizeof d);
				if (rt->has_gw)
					inet_ntop(rt->family, rt->gw, g, sizeof g);
				snprintf(what, sizeof what, "route %d (%s%s%s)", i, d, g[0] ? " via " : "",
					 g);
				goto sys;
			}
		}
	for (int i = 0; i < r->n_neighs; i++) {
		const struct net_neigh *nb = &r->neighs[i];
		if ((e = -nl_neigh(&nl, nb, r->links[nb->link].index))) {
			char t[64];
			net_fmt(&nb->ip, t, sizeof t);
			snprintf(what, sizeof what, "neighbour %s", t);
			goto sys;
		}
	}
	if (has_hosts && (e = -net_write_file("/etc/hosts", &hosts))) {
		snprintf(what, sizeof what, "/etc/hosts");
		goto sys;
	}
	if (has_resolv && (e = -net_write_file("/etc/resolv.conf", &resolv))) {
		snprintf(what, sizeof what, "/etc/resolv.conf");
		goto sys;
	}
	for (int i = 0; i < r->n_links; i++)
		put_str(&b, F_DEVICE, r->links[i].name);
	send_frame(c, T_NETWORK | T_REPLY, id, &b);
	DEBUG("network id=%u: %d links in %lld ms (from %lld: loopback %lld ms, links found +%lld, "
	      "up with addresses +%lld); the agent's CPU %lld us: loopback %lld, links up with "
	      "addresses %lld\n",
	      id, r->n_links, (long long)(now_ms() - t0), (long long)t0, (long long)(t_lo1 - t_lo0),
	      (long long)(t_found - t0), (long long)(t_addr - t0), (long long)(cpu_us() - c0),
	      (long long)(c_lo1 - c_lo0), (long long)(c_addr - c_found));
	goto out;
sys:
	snprintf(err, sizeof err, "%s: %s", what, strerror(e));
fail:
	send_error(c, id, e, "network: %s", err);
out:
	if (nl.fd >= 0)
		close(nl.fd);
	if (watch >= 0)
		close(watch);
	buf_free(&b);
	net_req_free(r);
}

/* ------------------------------------------------------------------ waits */

/* A file's raw bytes (sysfs binary attributes such as vpd_pg80); -1 if unreadable. */
static ssize_t read_bytes(const char *path, uint8_t *out, size_t cap)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n;
	do
		n = read(fd, out, cap);
	while (n < 0 && errno == EINTR);
	close(fd);
	return n;
}

static int word_byte(uint8_t b)
{
	return b > ' ' && b < 0x7f;
}

/* Does data hold serial as a whole word (bounded by the ends, blanks or non-printables)? */
static int holds_serial(const uint8_t *data, size_t n, const char *serial)
{
	size_t k = strlen(serial);
	for (size_t i = 0; k && i + k <= n; i++) {
		if (memcmp(data + i, serial, k))
			continue;
		if ((i == 0 || !word_byte(data[i - 1])) && (i + k == n || !word_byte(data[i + k])))
			return 1;
	}
	return 0;
}

/* The block device whose serial (virtio-blk) or VPD page 0x80 (SCSI) is `serial` and whose
 * /dev node exists: its name goes to `name`. Returns 1 if found. */
static int find_block(const char *serial, char *name, size_t cap)
{
	char path[PATH_MAX];
	snprintf(path, sizeof path, "%s/sys/block", sysroot);
	DIR *d = opendir(path);
	if (!d)
		return 0;
	struct dirent *de;
	uint8_t val[512];
	int found = 0;
	while (!found && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "%s/sys/block/%s/serial", sysroot, de->d_name);
		ssize_t n = read_bytes(path, val, sizeof val);
		int match = n > 0 && holds_serial(val, (size_t)n, serial);
		if (!match) {
			snprintf(path, sizeof path, "%s/sys/block/%s/device/vpd_pg80", sysroot, de->d_name);
			n = read_bytes(path, val, sizeof val);
			/* Page header: qualifier/type, page code 0x80, 16-bit length; then the serial. */
			if (n > 4 && val[1] == 0x80) {
				size_t len = (size_t)(val[2] << 8 | val[3]);
				if (len > (size_t)n - 4)
					len = (size_t)n - 4;
				match = holds_serial(val + 4, len, serial);
			}
		}
		if (!match)
			continue;
		snprintf(path, sizeof path, "%s/dev/%s", sysroot, de->d_name);
		if (access(path, F_OK))
			continue; /* the node follows the sysfs entry: not usable yet */
		snprintf(name, cap, "%s", de->d_name);
		found = 1;
	}
	closedir(d);
	return found;
}

/* Online CPUs, from the cpu/online range list ("0-3,5"); -1 if it cannot be read. */
static int online_cpu_count(void)
{
	char path[PATH_MAX], text[1024];
	snprintf(path, sizeof path, "%s/sys/devices/system/cpu/online", sysroot);
	if (read_text(path, text, sizeof text) < 0)
		return -1;
	int count = 0;
	char *s = text;
	while (*s) {
		char *end;
		long a = strtol(s, &end, 10), b = a;
		if (end == s)
			return -1;
		s = end;
		if (*s == '-') {
			b = strtol(s + 1, &end, 10);
			if (end == s + 1 || b < a)
				return -1;
			s = end;
		}
		count += (int)(b - a + 1);
		if (*s == ',')
			s++;
		else if (*s)
			return -1;
	}
	return count;
}

static int waits_active(void)
{
	for (int i = 0; i < MAX_WAITS; i++)
		if (waits[i].used)
			return 1;
	return 0;
}

static void wait_free(struct wait *w)
{
	memset(w, 0, sizeof *w);
}

/* The connection went away or a new session began: its waits are dropped unanswered. */
static void conn_drop_waits(struct conn *c)
{
	for (int i = 0; i < MAX_WAITS; i++)
		if (waits[i].used && waits[i].conn == c)
			wait_free(&waits[i]);
}

/* Online what the wait asks for, then reply if everything is there, or fail it once its
 * deadline has passed. */
static void wait_check(struct wait *w, int64_t now)
{
	struct conn *c = w->conn;
	if (!c->used || c->gen != w->conn_gen) {
		wait_free(w);
		return;
	}
	char dir[PATH_MAX], name[256] = "";
	if (w->cpus) {
		snprintf(dir, sizeof dir, "%s/sys/devices/system/cpu", sysroot);
		online_dir(dir, "cpu", "online", "0", NULL, "1");
	}
	if (w->memory) {
		snprintf(dir, sizeof dir, "%s/sys/devices/system/memory", sysroot);
		w->mem_blocks += online_dir(dir, "memory", "state", "offline", "online_movable", "online");
	}
	int have_block = !w->serial[0] || find_block(w->serial, name, sizeof name);
	int cpus = w->cpus ? online_cpu_count() : 0;
	int have_cpus = !w->cpus || cpus >= w->cpus;
	if (have_block && have_cpus) {
		struct buf b = {0};
		char dev[300];
		int ok = 1;
		if (w->serial[0]) {
			snprintf(dev, sizeof dev, "/dev/%s", name);
			ok = !put_str(&b, F_DEVICE, name) && !put_str(&b, F_PATH, dev);
		}
		if (w->cpus)
			ok = ok && !put_int(&b, F_CPUS_ONLINE, cpus);
		ok = ok && !put_int(&b, F_MEM_BLOCKS, w->mem_blocks);
		if (ok)
			send_frame(c, T_WAIT | T_REPLY, w->id, &b);
		else
			send_error(c, w->id, ENOMEM, "wait: out of memory building the reply");
		DEBUG("wait id=%u done: %s\n", w->id, name[0] ? name : "-");
		buf_free(&b);
		wait_free(w);
		return;
	}
	if (now < w->deadline_ms)
		return;
	char missing[600] = "", cpu_text[96] = "";
	if (!have_block)
		snprintf(missing, sizeof missing,
			 "no block device with serial '%s' (/sys/block/*/serial or device/vpd_pg80) "
			 "and a /dev node",
			 w->serial);
	if (!have_cpus) {
		if (cpus < 0)
			snprintf(cpu_text, sizeof cpu_text, "/sys/devices/system/cpu/online unreadable, "
				 "%lld CPUs wanted", (long long)w->cpus);
		else
			snprintf(cpu_text, sizeof cpu_text, "%d of %lld CPUs online", cpus,
				 (long long)w->cpus);
	}
	send_error(c, w->id, ETIMEDOUT, "wait: timed out: %s%s%s", missing,
		   missing[0] && cpu_text[0] ? "; " : "", cpu_text);
	wait_free(w);
}

static void waits_check_all(void)
{
	int64_t now = now_ms();
	for (int i = 0; i < MAX_WAITS; i++)
		if (waits[i].used)
			wait_check(&waits[i], now);
	wait_next_ms = now_ms() + WAIT_RECHECK_MS;
}

/* Kernel uevents wake the waits as soon as hardware appears; without them (no netlink)
 * the fallback timer alone re-checks. */
static void uevent_open(void)
{
	if (uevent_tried)
		return;
	uevent_tried = 1;
	int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
			NETLINK_KOBJECT_UEVENT);
	if (fd < 0) {
		console("vc-agent: uevent socket: %s (waits poll instead)\n", strerror(errno));
		return;
	}
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = 1};
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa)) {
		console("vc-agent: uevent bind: %s (waits poll instead)\n", strerror(errno));
		close(fd);
		return;
	}
	int size = 1 << 20;
	if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size))
		setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
	uevent_fd = fd;
}

/* Discard queued uevents (their content does not matter: every wait is re-checked). */
static void uevent_drain(void)
{
	char tmp[8192];
	while (uevent_fd >= 0) {
		ssize_t r = recv(uevent_fd, tmp, sizeof tmp, 0);
		if (r >= 0 || errno == EINTR || errno == ENOBUFS)
			continue; /* ENOBUFS: events were lost, the re-check covers them */
		return;
	}
}

static void handle_wait(struct conn *c, uint32_t id, const uint8_t *p, size_t n)
{
	int64_t timeout_ms = 0, cpus = 0, memory = 0;
	struct field f;
	if (tlv_int(p, n, F_TIMEOUT_MS, &timeout_ms) != 1 || timeout_ms < 1 ||
	    timeout_ms > MAX_WAIT_MS) {
		send_error(c, id, EINVAL, "wait: timeout_ms is required: an 8-byte integer 1..%d",
			   MAX_WAIT_MS);
		return;
	}
	if (tlv_int(p, n, F_WANT_CPUS, &cpus) < 0 || cpus < 0 || cpus > MAX_WANT_CPUS) {
		send_error(c, id, EINVAL, "wait: cpus must be an 8-byte integer 0..%d", MAX_WANT_CPUS);
		return;
	}
	if (tlv_int(p, n, F_MEMORY, &memory) < 0 || memory < 0 || memory > 1) {
		send_error(c, id, EINVAL, "wait: memory must be an 8-byte integer 0 or 1");
		return;
	}
	int has_serial = tlv_find(p, n, F_SERIAL, &f);
	if (has_serial && (f.len == 0 || f.len > MAX_SERIAL || memchr(f.val, 0, f.len))) {
		send_error(c, id, EINVAL, "wait: serial must be 1..%d bytes without NUL", MAX_SERIAL);
		return;
	}
	if (!has_serial && !cpus && !memory) {
		send_error(c, id, EINVAL, "wait: nothing to wait for (give serial, cpus or memory)");
		return;
	}
	struct wait *w = NULL;
	for (int i = 0; i < MAX_WAITS && !w; i++)
		if (!waits[i].used)
			w = &waits[i];
	if (!w) {
		send_error(c, id, EAGAIN, "wait: too many pending waits (%d)", MAX_WAITS);
		return;
	}
	w->used = 1;
	w->id = id;
	w->conn = c;
	w->conn_gen = c->gen;
	if (has_serial)
		memcpy(w->serial, f.val, f.len);
	w->cpus = cpus;
	w->memory = (int)memory;
	int64_t now = now_ms();
	w->deadline_ms = now + timeout_ms;
	DEBUG("wait id=%u serial=%s cpus=%lld memory=%d\n", id, w->serial, (long long)cpus,
	      w->memory);
	uevent_open();
	uevent_drain(); /* what is queued predates this wait: the check below covers it */
	wait_check(w, now);
	if (w->used && wait_next_ms <= now)
		wait_next_ms = now + WAIT_RECHECK_MS;
}

static void handle_ping(struct conn *c, uint32_t id, int hello, const uint8_t *p, size_t n)
{
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	struct buf b = {0};
	if (hello) {
		struct field f;
		if (!tlv_find(p, n, F_NONCE, &f)) {
			send_error(c, id, EINVAL, "hello: nonce is missing");
			return;
		}
		if (c->kind == CONN_PORT) {
			/* The host socket takes one client at a time, so a hello on the port means
			 * the previous client is gone, even if its hangup was never seen here. */
			conn_kill_execs(c);
			conn_drop_waits(c);
			c->gen++;
			conn_drop_output(c);
			c->await_hello = 0;
		}
		put_field(&b, F_NONCE, f.val, f.len);
		put_int(&b, F_PROTO, PROTO_VERSION);
		put_int(&b, F_MAX_FRAME, MAX_FRAME);
	}
	put_str(&b, F_VERSION, AGENT_VERSION);
	put_int(&b, F_UPTIME_NS, (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec);
	put_int(&b, F_RUNNING, running_execs());
	send_frame(c, (uint8_t)((hello ? T_HELLO : T_PING) | T_REPLY), id, &b);
	buf_free(&b);
}

static void dispatch(struct conn *c, uint8_t type, uint32_t id, const uint8_t *p, size_t n)
{
	loader_idle_from = now_ms();
	DEBUG("request type=0x%02x id=%u len=%zu at %lld\n", type, id, n,
	      (long long)loader_idle_from);
	if (!tlv_valid(p, n)) {
		send_error(c, id, EBADMSG, "request 0x%02x: malformed payload", type);
		return;
	}
	switch (type) {
	case T_HELLO:
		handle_ping(c, id, 1, p, n);
		break;
	case T_PING:
		handle_ping(c, id, 0, p, n);
		break;
	case T_EXEC:
		proc_start(c, id, p, n, PM_EXEC);
		break;
	case T_START:
		proc_start(c, id, p, n, PM_STREAM);
		break;
	case T_STDIN:
		handle_stdin(c, id, p, n);
		break;
	case T_SIGNAL:
		handle_signal(c, id, p, n);
		break;
	case T_RESIZE:
		handle_resize(c, id, p, n);
		break;
	case T_ATTACH:
		handle_attach(c, id, p, n);
		break;
	case T_READ_FILE:
		start_job(c, id, p, n, handle_read_file);
		break;
	case T_WRITE_FILE:
		start_job(c, id, p, n, handle_write_file);
		break;
	case T_SET_TIME:
		handle_set_time(c, id, p, n);
		break;
	case T_ADD_ENTROPY:
		handle_add_entropy(c, id, p, n);
		break;
	case T_CANCEL:
		handle_cancel(c, id, p, n);
		break;
	case T_ONLINE:
		start_job(c, id, p, n, handle_online);
		break;
	case T_WAIT:
		release_loader(); /* the hardware waited for may need a held driver */
		handle_wait(c, id, p, n);
		break;
	case T_NETWORK:
		start_job(c, id, p, n, handle_network);
		break;
	default:
		send_error(c, id, ENOSYS, "unknown request type 0x%02x", type);
	}
}

/* ---------------------------------------------------------- frame parser */

static void parser_reset(struct conn *c)
{
	free(c->payload);
	c->payload = NULL;
	c->state = ST_HEADER;
	c->hdr_len = 0;
	c->want = c->have = 0;
	c->skip = 0;
	c->in_garbage = 0;
	c->await_hello = 0;
}

static int parser_mid_frame(const struct conn *c)
{
	return c->state != ST_HEADER || c->hdr_len > 0;
}

/* Drop the first k header bytes and look for the next magic. */
static void hdr_shift(struct conn *c, size_t k)
{
	memmove(c->hdr, c->hdr + k, c->hdr_len - k);
	c->hdr_len -= k;
}

static void garbage(struct conn *c)
{
	if (!c->in_garbage && !c->await_hello) {
		c->in_garbage = 1;
		send_error(c, 0, EBADMSG, "malformed frame header; resynchronising");
	}
}

static void feed(struct conn *c, const uint8_t *data, size_t len)
{
	while (len && c->used) {
		if (c->state == ST_SKIP) {
			size_t k = len < c->skip ? len : (size_t)c->skip;
			c->skip -= k;
			data += k;
			len -= k;
			if (!c->skip)
				c->state = ST_HEADER;
			continue;
		}
		if (c->state == ST_PAYLOAD) {
			size_t k = len < c->want - c->have ? len : c->want - c->have;
			memcpy(c->payload + c->have, data, k);
			c->have += (uint32_t)k;
			data += k;
			len -= k;
			if (c->have == c->want) {
				uint8_t *pl = c->payload;
				c->payload = NULL;
				c->state = ST_HEADER;
				dispatch(c, c->cur_type, c->cur_id, pl, c->want);
				free(pl);
			}
			continue;
		}
		size_t k = HDR_LEN - c->hdr_len;
		if (k > len)
			k = len;
		memcpy(c->hdr + c->hdr_len, data, k);
		c->hdr_len += k;
		data += k;
		len -= k;
		/* Keep the buffer starting at a (possible) magic. */
		while (c->hdr_len) {
			size_t m = c->hdr_len < 4 ? c->hdr_len : 4;
			if (!memcmp(c->hdr, MAGIC, m))
				break;
			garbage(c);
			hdr_shift(c, 1);
		}
		if (c->hdr_len < HDR_LEN)
			continue;
		int hello_ok = c->hdr[5] == T_HELLO && get_u32(c->hdr + 12) <= 256;
		if (crc32(c->hdr, 16) != get_u32(c->hdr + 16) || (c->await_hello && !hello_ok)) {
			garbage(c);
			hdr_shift(c, 1);
			/* Re-feed the remaining header bytes through the magic scan. */
			uint8_t tmp[HDR_LEN];
			size_t t = c->hdr_len;
			memcpy(tmp, c->hdr, t);
			c->hdr_len = 0;
			feed(c, tmp, t);
			continue;
		}
		c->in_garbage = 0;
		c->hdr_len = 0;
		uint8_t version = c->hdr[4], type = c->hdr[5];
		uint32_t id = get_u32(c->hdr + 8), plen = get_u32(c->hdr + 12);
		if (plen > MAX_FRAME || version != PROTO_VERSION) {
			if (plen > MAX_FRAME)
				send_error(c, id, EMSGSIZE, "frame of %u bytes exceeds the limit of %u",
					   plen, MAX_FRAME);
			else
				send_error(c, id, EPROTO, "protocol version %u not supported (want %u)",
					   version, PROTO_VERSION);
			c->skip = plen;
			c->state = plen ? ST_SKIP : ST_HEADER;
			continue;
		}
		c->cur_type = type;
		c->cur_id = id;
		if (plen == 0) {
			dispatch(c, type, id, NULL, 0);
			continue;
		}
		c->payload = malloc(plen);
		if (!c->payload) {
			send_error(c, id, ENOMEM, "no memory for a %u-byte frame", plen);
			c->skip = plen;
			c->state = ST_SKIP;
			continue;
		}
		c->want = plen;
		c->have = 0;
		c->state = ST_PAYLOAD;
	}
}

/* ----------------------------------------------------------- connections */

/* The connection's session ends: its processes are killed, except detached ones, which run
 * on unattached (their output kept for a later ATTACH). */
static void conn_kill_execs(struct conn *c)
{
	for (int i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (e->used && e->conn == c && e->conn_gen == c->gen) {
			if (e->detached && e->started) {
				stdin_ack(e, EPIPE);
				e->conn = NULL;
			} else {
				exec_kill(e, SIGKILL);
			}
		}
	}
	conn_kill_jobs(c);
}

/* The peer went away: kill its processes, forget its partial frames and queued replies. */
static void conn_reset(struct conn *c)
{
	conn_kill_execs(c);
	conn_drop_waits(c);
	c->gen++;
	parser_reset(c);
	conn_drop_output(c);
}

static void conn_close(struct conn *c)
{
	DEBUG("connection fd=%d closed\n", c->fd);
	conn_reset(c);
	close(c->fd);
	c->used = 0;
	c->fd = -1;
}

static struct conn *conn_add(int fd, int kind)
{
	for (int i = 0; i < MAX_CONNS; i++) {
		struct conn *c = &conns[i];
		if (!c->used) {
			uint32_t gen = c->gen;
			memset(c, 0, sizeof *c);
			c->gen = gen + 1;
			c->used = 1;
			c->fd = fd;
			c->kind = kind;
			c->connected = kind != CONN_PORT;
			set_nonblock(fd);
			return c;
		}
	}
	return NULL;
}

static void conn_readable(struct conn *c)
{
	uint8_t tmp[READ_CHUNK];
	for (;;) {
		ssize_t r = read(c->fd, tmp, sizeof tmp);
		if (r > 0) {
			feed(c, tmp, (size_t)r);
			if (!c->used || !c->connected)
				return;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && errno == EAGAIN)
			return;
		if (c->kind == CONN_PORT) {
			port_hangup(c); /* EOF on virtio-serial: the host side disconnected */
		} else {
			conn_close(c);
		}
		return;
	}
}

/*
 * The host side of the port went away. Nothing is discarded here: what is buffered may
 * already come from the next client (its data can overtake the "connected" notice), and
 * virtio-serial keeps one byte stream across host connections. Sessions are delimited
 * by hellos instead (handle_ping). Only a frame cut in the middle is abandoned, and the
 * stream is then skipped up to the next hello.
 */
static void port_hangup(struct conn *c)
{
	if (c->connected)
		DEBUG("host disconnected from the port\n");
	c->connected = 0;
	if (parser_mid_frame(c)) {
		parser_reset(c);
		c->await_hello = 1;
	}
}

static void port_check(struct conn *c)
{
	struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
	if (poll(&pfd, 1, 0) < 0)
		return;
	if (pfd.revents & POLLHUP) {
		if (c->connected)
			port_hangup(c);
		return;
	}
	if (!c->connected) {
		DEBUG("host connected to the port\n");
		c->connected = 1;
	}
}

/* ------------------------------------------------------------ guest setup */

static void mount_fs(const char *src, const char *dst, const char *type, unsigned long flags,
		     const char *data)
{
	mkdir(dst, 0755);
	if (mount(src, dst, type, flags, data) && errno != EBUSY)
		console("vc-agent: mount %s on %s: %s\n", type, dst, strerror(errno));
}

/* The host cold-plugged no SCSI disk (vc.scsi=late): virtio_scsi, whose probe scans the
 * empty bus (170-250 ms of the vCPU under TCG, and module loading waits for the scan), loads
 * after the ready marker. A disk hotplugged later is found by WAIT, which polls until the
 * background loader has brought the driver. */
static int scsi_late;

/* The kernel command line, kept for the module parameters on it (read_cmdline). */
static char cmdline[4096];

static void parse_cmdline(void)
{
	char line[4096];
	if (read_text("/proc/cmdline", line, sizeof line) < 0)
		return;
	snprintf(cmdline, sizeof cmdline, "%s", line);
	char *save = NULL;
	for (char *tok = strtok_r(line, " ", &save); tok; tok = strtok_r(NULL, " ", &save)) {
		if (!strcmp(tok, "vc.debug") || !strcmp(tok, "vc.debug=1"))
			debug = 1;
		else if (!strncmp(tok, "vc.agent_port=", 14))
			vsock_port = (unsigned)strtoul(tok + 14, NULL, 10);
		else if (!strncmp(tok, "vc.channel=", 11))
			snprintf(port_name, sizeof port_name, "%s", tok + 11);
		else if (!strncmp(tok, "vc.hostname=", 12))
			sethostname(tok + 12, strlen(tok + 12));
		else if (!strcmp(tok, "vc.console_shell=0"))
			console_shell = 0;
		else if (!strcmp(tok, "vc.scsi=late"))
			scsi_late = 1;
		else if (!strncmp(tok, "vc.loader_hold_ms=", 18))
			loader_hold_ms = atoi(tok + 18);
	}
}

#define MAX_MODULES 96
#define MAX_DEPS 16

struct module {
	char name[64];
	char path[192];
	int deps[MAX_DEPS];
	int ndeps;
	int loaded;
};

static struct module modules[MAX_MODULES];
static int nmodules;
static char kernel_release[256];

static int module_index(const char *name)
{
	for (int i = 0; i < nmodules; i++)
		if (!strcmp(modules[i].name, name))
			return i;
	return -1;
}

/* Read /etc/vc-modules: "name path dep,dep|-" per line, dependencies first. */
static void read_module_list(void)
{
	char line[1024];
	FILE *f = fopen("/etc/vc-modules", "re");
	if (!f)
		return;
	if (read_text("/proc/sys/kernel/osrelease", kernel_release, sizeof kernel_release) < 0) {
		fclose(f);
		return;
	}
	while (fgets(line, sizeof line, f) && nmodules < MAX_MODULES) {
		char name[64], path[192], deps[700];
		if (line[0] == '#' || sscanf(line, "%63s %191s %699s", name, path, deps) != 3)
			continue;
		struct module *m = &modules[nmodules];
		memset(m, 0, sizeof *m);
		snprintf(m->name, sizeof m->name, "%s", name);
		snprintf(m->path, sizeof m->path, "%s", path);
		char *save = NULL;
		for (char *d = strtok_r(deps, ",", &save); d && m->ndeps < MAX_DEPS;
		     d = strtok_r(NULL, ",", &save)) {
			int k = strcmp(d, "-") ? module_index(d) : -1;
			if (k >= 0)
				m->deps[m->ndeps++] = k;
		}
		nmodules++;
	}
	fclose(f);
}

/* A module's parameters from the kernel command line ("virtio_scsi.x=1 scsi_mod.scan=none"):
 * the kernel applies them only to built-in code, modprobe passes them for modules, and so
 * does the agent. '-' and '_' are the same in a module's name; quoted values are not split. */
static void module_params(const char *name, char *out, size_t cap)
{
	size_t len = strlen(name), used = 0;
	out[0] = 0;
	char line[sizeof cmdline], *save = NULL;
	snprintf(line, sizeof line, "%s", cmdline);
	for (char *tok = strtok_r(line, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
		size_t k = 0;
		while (k < len && (tok[k] == name[k] ||
				   (strchr("-_", tok[k]) && tok[k] && strchr("-_", name[k]))))
			k++;
		if (k < len || tok[k] != '.' || !tok[k + 1])
			continue;
		int n = snprintf(out + used, cap - used, "%s%s", used ? " " : "", tok + k + 1);
		if (n < 0 || (size_t)n >= cap - used) {
			out[used] = 0; /* too long: the parameters that fitted */
			break;
		}
		used += (size_t)n;
	}
}

static void load_module(int i)
{
	struct module *m = &modules[i];
	if (m->loaded)
		return;
	m->loaded = 1;
	for (int k = 0; k < m->ndeps; k++)
		load_module(m->deps[k]);
	char path[PATH_MAX];
	snprintf(path, sizeof path, "/lib/modules/%s/%s", kernel_release, m->path);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		console("vc-agent: module %s: %s\n", path, strerror(errno));
		return;
	}
	char params[512];
	module_params(m->name, params, sizeof params);
	int64_t t0 = now_ms();
	if (syscall(SYS_finit_module, fd, params, 0) && errno != EEXIST)
		console("vc-agent: loading %s (%s): %s\n", m->name, params, strerror(errno));
	DEBUG("loaded %s in %lld ms at %lld%s%s\n", m->name, (long long)(now_ms() - t0),
	      (long long)now_ms(), params[0] ? ": " : "", params);
	close(fd);
}

static void load_module_named(const char *name)
{
	int i = module_index(name);
	if (i >= 0)
		load_module(i);
}

/* A NIC's driver (virtio_net, with failover and net_failover: ~20-30 ms of the vCPU under
 * TCG) is not needed for the ready marker: it loads right after it, first and at normal
 * priority, while the host connects and sends its NETWORK request (which waits for the link
 * to appear), in time the vCPU would otherwise give to the background loading. */
static int nic_deferred;

/* Drivers for the virtio devices present now (ids from the virtio spec). */
static void load_present_drivers(void)
{
	static const struct {
		unsigned id;
		const char *mods[2];
	} table[] = {
		{1, {"virtio_net"}},       {2, {"virtio_blk"}},
		{3, {"virtio_console"}},   {4, {"virtio_rng"}},
		{5, {"virtio_balloon"}},   {8, {"virtio_scsi", "sd_mod"}},
		{19, {"vmw_vsock_virtio_transport"}}, {24, {"virtio_mem"}},
		{26, {"virtiofs"}},        {27, {"virtio_pmem", "nd_pmem"}},
	};
	load_module_named("virtio_pci");
	load_module_named("virtio_mmio");
	DIR *d = opendir("/sys/bus/virtio/devices");
	struct dirent *de;
	char path[PATH_MAX], val[32];
	while (d && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", de->d_name);
		if (read_text(path, val, sizeof val) <= 0)
			continue;
		unsigned id = (unsigned)strtoul(val, NULL, 16);
		if (id == 1) {
			nic_deferred = 1;
			continue;
		}
		if (id == 8 && scsi_late)
			continue;
		for (size_t t = 0; t < sizeof table / sizeof table[0]; t++)
			for (int k = 0; k < 2 && table[t].id == id && table[t].mods[k]; k++)
				load_module_named(table[t].mods[k]);
	}
	if (d)
		closedir(d);
	if (!access("/sys/firmware/acpi/tables/NFIT", F_OK)) {
		load_module_named("nfit");
		load_module_named("nd_pmem");
	}
}

/* The rest (a deferred NIC driver first, then hotplug drivers, filesystems) in a child, so
 * the agent serves meanwhile; all but the NIC's at the lowest priority. Nice 19 is not
 * enough: under TCG the loader holds the one vCPU inside finit_module (scsi_mod's load and
 * virtio_scsi's bus scan 170-250 ms) while the host's requests wait. So after the NIC's
 * driver it waits until the agent closes the pipe's other end: once the agent has been idle
 * LOADER_IDLE_MS (no request unanswered, no process a connection waits on: the start's
 * NETWORK and a container's first run are served first), when a WAIT asks for hardware that
 * may need a held driver, or after loader_hold_ms (vc.loader_hold_ms, LOADER_HOLD_MS unless
 * set) in all. A mount that needs a held driver (a share hot-added to a sandbox booted
 * without one) retries until then. */

static void load_remaining_drivers(void)
{
	int left = 0;
	for (int i = 0; i < nmodules; i++)
		left += !modules[i].loaded;
	if (!left)
		return;
	int hold[2] = {-1, -1};
	if (pipe2(hold, O_CLOEXEC))
		hold[0] = hold[1] = -1;
	pid_t pid = fork();
	if (pid == 0) {
		if (hold[1] >= 0)
			close(hold[1]);
		if (nic_deferred)
			load_module_named("virtio_net");
		if (hold[0] >= 0) {
			struct pollfd pw = {.fd = hold[0], .events = POLLIN};
			int64_t t0 = now_ms();
			while (poll(&pw, 1, loader_hold_ms) < 0 && errno == EINTR)
				;
			DEBUG("background loading held %lld ms\n", (long long)(now_ms() - t0));
		}
		setpriority(PRIO_PROCESS, 0, 19);
		if (scsi_late) { /* first of the rest: a disk may be hotplugged soon */
			load_module_named("virtio_scsi");
			load_module_named("sd_mod");
		}
		for (int i = 0; i < nmodules; i++)
			load_module(i);
		DEBUG("all modules loaded\n");
		_exit(0);
	}
	if (hold[0] >= 0)
		close(hold[0]);
	if (pid > 0) {
		loader_hold = hold[1];
		loader_idle_from = now_ms();
	} else if (hold[1] >= 0)
		close(hold[1]);
	if (pid < 0) {
		for (int i = 0; i < nmodules; i++)
			load_module(i);
	}
}

/* Is there a virtio device of this id (3 = console, 19 = vsock)? */
static int virtio_device_present(unsigned want)
{
	DIR *d = opendir("/sys/bus/virtio/devices");
	if (!d)
		return 0;
	struct dirent *de;
	char path[PATH_MAX], val[32];
	int found = 0;
	while (!found && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", de->d_name);
		if (read_text(path, val, sizeof val) > 0 && strtoul(val, NULL, 16) == want)
			found = 1;
	}
	closedir(d);
	return found;
}

/* Is the agent serving something: a request unanswered, or a process a connection waits on? */
static int agent_busy(void)
{
	for (int i = 0; i < MAX_JOBS; i++)
		if (jobs[i].used)
			return 1;
	for (int i = 0; i < MAX_EXECS; i++)
		if (execs[i].used && !execs[i].exited && proc_attached(&execs[i]))
			return 1;
	return waits_active();
}

/* Release the background loader once the agent has been idle LOADER_IDLE_MS; returns how
 * long until it should look again (-1: not while busy, or nothing held). */
static int64_t loader_tick(int64_t now)
{
	if (loader_hold < 0)
		return -1;
	if (agent_busy()) {
		loader_was_busy = 1;
		return -1;
	}
	if (loader_was_busy) { /* idle from now, not from before the poll that waited */
		loader_was_busy = 0;
		loader_idle_from = now;
	}
	int64_t left = loader_idle_from + LOADER_IDLE_MS - now;
	if (left > 0)
		return left;
	DEBUG("agent idle %d ms: background loading released at %lld\n", LOADER_IDLE_MS,
	      (long long)now);
	release_loader();
	return -1;
}

/* Print the boot marker once the agent serves. A virtio console (hvc0) appears a little
 * after its driver loads: the marker waits for it (bounded), or it would be lost. */
static void print_ready(void)
{
	if (!ready_wanted) {
		ready_wanted = 1;
		ready_deadline = now_ms() + CONSOLE_WAIT_MS;
	}
	if (ready_printed)
		return;
	if (is_pid1)
		attach_console();
	if (console_ok || !is_pid1 || now_ms() >= ready_deadline) {
		ready_printed = 1;
		/* The console shell (for a human) starts a second later: its exec and banner
		 * competed for the vCPU with the host's first requests (the start's). */
		shell_respawn_ms = now_ms() + CONSOLE_SHELL_DELAY_MS;
		console("VC-AGENT-READY\n");
		DEBUG("ready at %lld\n", (long long)now_ms()); /* the loads' clock */
	}
}

/* A shell on the console's tty, for `virtc console`: only the host can reach that device.
 * Respawned a second after it exits. */
static void spawn_console_shell(void)
{
	char name[64] = "console", dev[80];
	if (read_text("/sys/class/tty/console/active", name, sizeof name) > 0) {
		char *last = strrchr(name, ' ');
		memmove(name, last ? last + 1 : name, strlen(last ? last + 1 : name) + 1);
		name[strcspn(name, "\n")] = 0;
	}
	snprintf(dev, sizeof dev, "/dev/%s", name[0] ? name : "console");
	pid_t pid = fork();
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		signal(SIGPIPE, SIG_DFL);
		setsid();
		int fd = open(dev, O_RDWR);
		if (fd < 0)
			_exit(127);
		ioctl(fd, TIOCSCTTY, 1);
		dup2(fd, 0);
		dup2(fd, 1);
		dup2(fd, 2);
		if (fd > 2)
			close(fd);
		char *argv[] = {"-sh", NULL};
		char *envp[] = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "TERM=linux",
				"PS1=\\h:\\w# ", NULL};
		execve("/bin/sh", argv, envp);
		_exit(127);
	}
	if (pid < 0)
		shell_respawn_ms = now_ms() + 1000;
	else
		shell_pid = pid;
}

/* Look for the named virtio-serial port; returns 1 once it is open and served. */
static int scan_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return 0;
	struct dirent *de;
	char path[PATH_MAX], val[256];
	int ok = 0;
	while (!ok && (de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
		if (read_text(path, val, sizeof val) <= 0 || strcmp(val, port_name))
			continue;
		snprintf(path, sizeof path, "/dev/%s", de->d_name);
		int fd = open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
		if (fd < 0) {
			console("vc-agent: open %s: %s\n", path, strerror(errno));
			continue;
		}
		struct conn *c = conn_add(fd, CONN_PORT);
		if (!c) {
			close(fd);
			continue;
		}
		fcntl(fd, F_SETOWN, getpid());
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC);
		port_check(c);
		DEBUG("serving on %s (%s)\n", path, port_name);
		ok = 1;
	}
	closedir(d);
	return ok;
}

static int vsock_peer_is_host(const struct sockaddr_storage *peer, socklen_t len)
{
	const struct sockaddr_vm *vm = (const struct sockaddr_vm *)peer;
	return len >= sizeof *vm && vm->svm_family == AF_VSOCK && vm->svm_cid == VMADDR_CID_HOST;
}

static int listen_vsock(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0) {
		console("vc-agent: vsock socket: %s\n", strerror(errno));
		return -1;
	}
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
				   .svm_port = vsock_port};
	if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 8)) {
		console("vc-agent: vsock port %u: %s\n", vsock_port, strerror(errno));
		close(fd);
		return -1;
	}
	DEBUG("listening on vsock port %u\n", vsock_port);
	return fd;
}

static int listen_unix(const char *path)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (fd < 0 || strlen(path) >= sizeof addr.sun_path) {
		fprintf(stderr, "vc-agent: bad unix socket path %s\n", path);
		exit(2);
	}
	strcpy(addr.sun_path, path);
	unlink(path);
	if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 8)) {
		fprintf(stderr, "vc-agent: listen %s: %s\n", path, strerror(errno));
		exit(2);
	}
	return fd;
}

static void setup_pid1(void)
{
	mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=620,ptmxmode=666");
	mount_fs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_fs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mount_fs("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	/* A guest user's links in sticky directories (/tmp) are not followed by others (root
	 * included), nor may they hard-link files they cannot write. */
	write_text("/proc/sys/fs/protected_symlinks", "1");
	write_text("/proc/sys/fs/protected_hardlinks", "1");
	attach_console();
	sethostname("sandbox", 7);
	parse_cmdline();
	read_module_list();
	load_present_drivers();
	/* Hotplugged memory comes online by itself, movable so it can be unplugged again;
	 * memory cold-plugged as DIMMs is still offline here. */
	write_text("/sys/devices/system/memory/auto_online_blocks", "online_movable");
	online_dir("/sys/devices/system/memory", "memory", "state", "offline", "online_movable",
		   "online");
	/* The console may be a virtio console (hvc0) that only exists now. */
	attach_console();
}

/* ----------------------------------------------------------------- main */

#define MAX_POLL (MAX_CONNS + 4 * MAX_EXECS + MAX_JOBS + 4)

int main(int argc, char **argv)
{
	const char *unix_path = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--unix") && i + 1 < argc)
			unix_path = argv[++i];
		else if (!strcmp(argv[i], "--sysroot") && i + 1 < argc)
			snprintf(sysroot, sizeof sysroot, "%s", argv[++i]);
		else if (!strcmp(argv[i], "--debug"))
			debug = 1;
		else if (!strcmp(argv[i], "--version")) {
			puts(AGENT_VERSION);
			return 0;
		}
	}
	crc_init();
	for (int i = 0; i < MAX_EXECS; i++)
		execs[i].in_fd = execs[i].out_fd = execs[i].err_fd = execs[i].stat_fd =
			execs[i].tty_fd = -1;
	for (int i = 0; i < MAX_CONNS; i++)
		conns[i].fd = -1;
	for (int i = 0; i < MAX_JOBS; i++)
		jobs[i].fd = -1;
	is_pid1 = getpid() == 1;
	if (is_pid1) {
		/* Without an initial console the kernel starts us with fds 0-2 closed: hold
		 * them, so that no descriptor opened below lands there and gets clobbered. */
		int fd;
		while ((fd = open("/", O_RDONLY | O_CLOEXEC)) >= 0 && fd < 3)
			fcntl(fd, F_SETFD, 0);
		if (fd > 2)
			close(fd);
	}
	signal(SIGPIPE, SIG_IGN);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigaddset(&mask, SIGIO);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sig_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

	int want_port = 0;
	if (is_pid1 && !unix_path) {
		setup_pid1();
		want_port = virtio_device_present(3);
		if (virtio_device_present(19) && (listen_fd = listen_vsock()) >= 0)
			listen_kind_vsock = 1;
		port_scan_deadline = now_ms() + PORT_SCAN_MS;
		if (want_port && scan_port())
			port_found = 1;
		if (listen_fd < 0 && !want_port)
			console("vc-agent: warning: no agent channel (no virtio console or vsock device)\n");
		if (port_found || listen_fd >= 0 || !want_port)
			print_ready();
		load_remaining_drivers();
	} else if (unix_path) {
		listen_fd = listen_unix(unix_path);
		print_ready();
		fflush(stdout);
	}

	struct pollfd pfds[MAX_POLL];
	void *owners[MAX_POLL];
	int kinds[MAX_POLL];
	enum { K_SIG, K_LISTEN, K_CONN, K_IN, K_OUT, K_ERR, K_UEVENT, K_STAT, K_JOB };

	for (;;) {
		int np = 0;
		int64_t now = now_ms(), timeout = -1;
		pfds[np] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
		kinds[np++] = K_SIG;
		if (listen_fd >= 0) {
			pfds[np] = (struct pollfd){.fd = listen_fd, .events = POLLIN};
			kinds[np++] = K_LISTEN;
		}
		for (int i = 0; i < MAX_CONNS; i++) {
			struct conn *c = &conns[i];
			if (!c->used)
				continue;
			if (c->kind == CONN_PORT && !c->connected) {
				/* A disconnected port polls HUP forever: recheck it on SIGIO or a timer. */
				timeout = timeout < 0 || timeout > 200 ? 200 : timeout;
				continue;
			}
			pfds[np] = (struct pollfd){.fd = c->fd,
						   .events = (short)(POLLIN | (c->out_head ? POLLOUT : 0))};
			owners[np] = c;
			kinds[np++] = K_CONN;
		}
#define POLL_ADD(fd_, ev, owner, kind)                                       \
	do {                                                                 \
		pfds[np] = (struct pollfd){.fd = (fd_), .events = (short)(ev)}; \
		owners[np] = (owner);                                        \
		kinds[np++] = (kind);                                        \
	} while (0)
		for (int i = 0; i < MAX_EXECS; i++) {
			struct exec *e = &execs[i];
			if (!e->used)
				continue;
			/* A streamed process's output waits for its START reply, and while its
			 * connection has much queued (backpressure on the process). */
			int reading = e->mode == PM_EXEC ||
				      (e->started && (!proc_attached(e) || e->conn->queued < CONN_OUT_HIGH));
			if (e->in_fd >= 0 && e->in_off < e->in.len)
				POLL_ADD(e->in_fd, POLLOUT, e, K_IN);
			if (e->out_fd >= 0 && reading)
				POLL_ADD(e->out_fd, POLLIN, e, K_OUT);
			if (e->err_fd >= 0 && reading)
				POLL_ADD(e->err_fd, POLLIN, e, K_ERR);
			if (e->stat_fd >= 0)
				POLL_ADD(e->stat_fd, POLLIN, e, K_STAT);
			if (e->deadline_ms && !e->timed_out) {
				int64_t left = e->deadline_ms - now;
				if (left < 0)
					left = 0;
				if (timeout < 0 || left < timeout)
					timeout = left;
			}
		}
		for (int i = 0; i < MAX_JOBS; i++)
			if (jobs[i].used && jobs[i].fd >= 0)
				POLL_ADD(jobs[i].fd, POLLIN, &jobs[i], K_JOB);
		int waiting = waits_active();
		if (waiting) {
			if (uevent_fd >= 0) {
				pfds[np] = (struct pollfd){.fd = uevent_fd, .events = POLLIN};
				kinds[np++] = K_UEVENT;
			}
			int64_t left = wait_next_ms > now ? wait_next_ms - now : 0;
			if (timeout < 0 || left < timeout)
				timeout = left;
		}
		int64_t idle_left = loader_tick(now);
		if (idle_left >= 0 && (timeout < 0 || idle_left < timeout))
			timeout = idle_left;
		int uevents = 0;
		if ((want_port && !port_found && now < port_scan_deadline) ||
		    (ready_wanted && !ready_printed))
			timeout = timeout < 0 || timeout > 5 ? 5 : timeout;
		if (is_pid1 && console_shell && ready_printed && !shell_pid) {
			if (now >= shell_respawn_ms)
				spawn_console_shell();
			else if (timeout < 0 || shell_respawn_ms - now < timeout)
				timeout = shell_respawn_ms - now;
		}

		int r = poll(pfds, (nfds_t)np, (int)timeout);
		if (r < 0 && errno != EINTR) {
			console("vc-agent: poll: %s\n", strerror(errno));
			sleep(1);
			continue;
		}
		for (int i = 0; r > 0 && i < np; i++) {
			short rev = pfds[i].revents;
			if (!rev)
				continue;
			switch (kinds[i]) {
			case K_SIG: {
				struct signalfd_siginfo si;
				while (read(sig_fd, &si, sizeof si) == (ssize_t)sizeof si)
					;
				reap_children();
				break;
			}
			case K_LISTEN: {
				struct sockaddr_storage peer;
				socklen_t plen = sizeof peer;
				int fd = accept4(listen_fd, (struct sockaddr *)&peer, &plen, SOCK_CLOEXEC);
				if (fd >= 0 && listen_kind_vsock && !vsock_peer_is_host(&peer, plen)) {
					/* Only the host may drive the agent: a guest process reaching the
					 * port over vsock loopback would otherwise run commands as root. */
					console("vc-agent: refused a vsock connection from CID %u\n",
						((struct sockaddr_vm *)&peer)->svm_cid);
					close(fd);
					break;
				}
				if (fd >= 0 && !conn_add(fd, CONN_STREAM)) {
					console("vc-agent: too many connections\n");
					close(fd);
				}
				break;
			}
			case K_CONN: {
				struct conn *c = owners[i];
				if (!c->used)
					break;
				if (c->kind == CONN_PORT && (rev & POLLHUP)) {
					port_hangup(c);
					break;
				}
				if (rev & (POLLIN | POLLHUP | POLLERR))
					conn_readable(c);
				if (c->used && (rev & POLLOUT))
					conn_flush(c);
				break;
			}
			case K_IN: {
				struct exec *e = owners[i];
				if (e->used)
					exec_write_stdin(e);
				break;
			}
			case K_OUT: {
				struct exec *e = owners[i];
				if (e->used)
					exec_read(e, &e->out_fd, 1, 1u << 20);
				break;
			}
			case K_ERR: {
				struct exec *e = owners[i];
				if (e->used)
					exec_read(e, &e->err_fd, 2, 1u << 20);
				break;
			}
			case K_UEVENT:
				uevent_drain();
				uevents = 1;
				break;
			case K_STAT: {
				struct exec *e = owners[i];
				if (e->used)
					exec_setup_read(e);
				break;
			}
			case K_JOB: {
				struct job *j = owners[i];
				if (j->used)
					job_read(j);
				break;
			}
			}
		}
		/* Timers: waits, exec deadlines, disconnected ports, port discovery. */
		now = now_ms();
		if (waits_active() && (uevents || now >= wait_next_ms)) {
			waits_check_all();
			now = now_ms();
		}
		for (int i = 0; i < MAX_EXECS; i++) {
			struct exec *e = &execs[i];
			if (e->used && e->deadline_ms && !e->timed_out && now >= e->deadline_ms) {
				DEBUG("exec id=%u timed out\n", e->id);
				e->timed_out = 1;
				exec_kill(e, SIGKILL);
			}
		}
		for (int i = 0; i < MAX_CONNS; i++)
			if (conns[i].used && conns[i].kind == CONN_PORT && !conns[i].connected)
				port_check(&conns[i]);
		loader_tick(now);
		if (ready_wanted && !ready_printed)
			print_ready();
		if (want_port && !port_found) {
			if (scan_port()) {
				port_found = 1;
				print_ready();
			} else if (now >= port_scan_deadline) {
				console("vc-agent: virtio-serial port %s not found\n", port_name);
				want_port = 0;
				print_ready();
			}
		}
	}
}
