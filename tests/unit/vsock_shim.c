/* LD_PRELOAD shim that lets the real guest agent serve "vsock" on a host without a vsock
 * transport, for tests/unit/test_agent_vsock_native.py.
 *
 * - opendir/open of /sys/bus/virtio/devices[/...] go to $VC_SHIM_VIRTIO instead (a fake
 *   device list naming a virtio vsock device), so the agent takes its vsock branch.
 * - socket(AF_VSOCK, ...) returns a copy of the listening Unix socket inherited as fd
 *   $VC_SHIM_LISTEN_FD; bind() of a sockaddr_vm to it succeeds without doing anything.
 * - accept()/accept4() on that socket report the peer as a sockaddr_vm whose CID comes from
 *   the name the connecting client bound its own Unix socket to: ".../cid-<N>".
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#define VIRTIO_DIR "/sys/bus/virtio/devices"

static int vsock_fd = -1; /* the agent's "vsock" listener (a Unix socket) */

static const char *redirect(const char *path, char *buf, size_t cap)
{
	const char *fake = getenv("VC_SHIM_VIRTIO");
	size_t n = strlen(VIRTIO_DIR);
	if (!fake || !path || strncmp(path, VIRTIO_DIR, n) || (path[n] && path[n] != '/'))
		return path;
	snprintf(buf, cap, "%s%s", fake, path + n);
	return buf;
}

DIR *opendir(const char *path)
{
	static DIR *(*real)(const char *);
	char buf[4096];
	if (!real)
		real = (DIR * (*)(const char *)) dlsym(RTLD_NEXT, "opendir");
	return real(redirect(path, buf, sizeof buf));
}

static int open_common(const char *sym, const char *path, int flags, va_list ap)
{
	int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, sym);
	mode_t mode = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;
	char buf[4096];
	return real(redirect(path, buf, sizeof buf), flags, mode);
}

int open(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int r = open_common("open", path, flags, ap);
	va_end(ap);
	return r;
}

int open64(const char *path, int flags, ...)
{
	va_list ap;
	va_start(ap, flags);
	int r = open_common("open64", path, flags, ap);
	va_end(ap);
	return r;
}

int socket(int domain, int type, int protocol)
{
	static int (*real)(int, int, int);
	if (!real)
		real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
	const char *inherited = getenv("VC_SHIM_LISTEN_FD");
	if (domain != AF_VSOCK || !inherited)
		return real(domain, type, protocol);
	int fd = fcntl(atoi(inherited), (type & SOCK_CLOEXEC) ? F_DUPFD_CLOEXEC : F_DUPFD, 3);
	if (fd >= 0 && (type & SOCK_NONBLOCK))
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	vsock_fd = fd;
	return fd;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	static int (*real)(int, const struct sockaddr *, socklen_t);
	if (!real)
		real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
	if (fd == vsock_fd && fd >= 0 && addr && addr->sa_family == AF_VSOCK)
		return 0; /* the inherited socket is bound and listening already */
	return real(fd, addr, len);
}

/* The peer as vsock would name it: CID from the client's bound path, or -1 (EPROTO). */
static int as_vsock_peer(const struct sockaddr_un *un, socklen_t unlen, struct sockaddr *addr,
			 socklen_t *len)
{
	const char *name = unlen > sizeof(sa_family_t) ? strrchr(un->sun_path, '/') : NULL;
	if (!name || strncmp(name, "/cid-", 5)) {
		errno = EPROTO;
		return -1;
	}
	struct sockaddr_vm vm = {.svm_family = AF_VSOCK,
				 .svm_cid = (unsigned)strtoul(name + 5, NULL, 10),
				 .svm_port = 1024 + 1};
	if (addr && len) {
		memcpy(addr, &vm, *len < sizeof vm ? *len : sizeof vm);
		*len = sizeof vm;
	}
	return 0;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	static int (*real)(int, struct sockaddr *, socklen_t *, int);
	if (!real)
		real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
	if (fd != vsock_fd || fd < 0)
		return real(fd, addr, len, flags);
	struct sockaddr_un un;
	socklen_t unlen = sizeof un;
	memset(&un, 0, sizeof un);
	int c = real(fd, (struct sockaddr *)&un, &unlen, flags);
	if (c >= 0 && as_vsock_peer(&un, unlen, addr, len) < 0) {
		close(c);
		errno = EPROTO;
		return -1;
	}
	return c;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	return accept4(fd, addr, len, 0);
}
