/*
 * vc-run: start one container process inside the guest.
 *
 * The guest's root is the initial ramfs, where pivot_root(2) fails (EINVAL), so the
 * container's root is entered the way `crun --no-pivot` does it: in new namespaces, the
 * root directory (already mounted by the host's request) is bind-mounted onto itself, the
 * container's /proc, /dev, /sys and extra mounts are made under it, then it is moved onto
 * "/" (MS_MOVE) and chroot(".") enters it. The host turns an OCI config.json into these
 * options (containers/spec.py); this program only applies them, in the order the OCI
 * runtime spec gives. Measured under TCG it starts a container in ~20 ms where crun needs
 * ~0.3 s (loading its shared libraries alone takes 0.14 s): see docs/architecture.md.
 *
 *   vc-run --rootfs DIR [--cwd DIR] [--user UID:GID] [--groups G,G] [--env K=V]...
 *          [--hostname NAME] [--ns m,p,u,i,n] [--readonly] [--no-new-privs]
 *          [--caps HEXMASK] [--rlimit RESOURCE:SOFT:HARD]... [--cgroup DIR]
 *          [--mount TYPE:SOURCE:DEST:OPTIONS]... [--pid-file FILE] -- ARGV...
 *   vc-run --join PID [--cgroup DIR] [--cwd DIR] [--user UID:GID] [--env K=V]...
 *          [--caps HEXMASK] -- ARGV...
 *
 * --pid-file receives the container's first process's pid (as the guest sees it); --join
 * runs ARGV inside that running container instead (its namespaces and root: `virtc exec`).
 * --cgroup is the container's cgroup: the process that becomes ARGV joins it (vc-run's own
 * waiting parent stays out, so the cgroup holds the container's processes only).
 *
 * Exit status: the container process's (128+N for signal N); 125 when setting up failed,
 * 126 when the command cannot be executed, 127 when it is not found (as docker run).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <grp.h>

#define MAX_ITEMS 256
#define EXIT_SETUP 125

extern char **environ;

static const char *rootfs, *cwd = "/", *hostname, *cgroup, *namespaces = "m,p,u,i";
static const char *pid_file, *join;
static char *envs[MAX_ITEMS + 1];
static int n_envs;
static char *mounts[MAX_ITEMS];
static int n_mounts;
static char *rlimits[MAX_ITEMS];
static int n_rlimits;
static const char *user, *groups, *caps;
static int readonly, no_new_privs;
static pid_t child;
static int cgroup_fd = -1;

static void die(const char *fmt, ...)
{
	va_list ap;
	int e = errno;
	fputs("vc-run: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (e)
		fprintf(stderr, ": %s", strerror(e));
	fputc('\n', stderr);
	_exit(EXIT_SETUP);
}

static void add(char **list, int *n, char *item, const char *what)
{
	if (*n >= MAX_ITEMS) {
		errno = 0;
		die("too many %s options", what);
	}
	list[(*n)++] = item;
}

static int has_ns(char c)
{
	for (const char *p = namespaces; *p; p++)
		if (*p == c)
			return 1;
	return 0;
}

static void mkdirs(const char *path)
{
	char buf[4096];
	if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
		errno = ENAMETOOLONG;
		die("mkdir %s", path);
	}
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(buf, 0755) && errno != EEXIST)
			die("mkdir %s", buf);
		*p = '/';
	}
	if (mkdir(buf, 0755) && errno != EEXIST)
		die("mkdir %s", buf);
}

static void under_root(char *out, size_t size, const char *dest)
{
	size_t len = strlen(dest);
	if (dest[0] != '/' || strstr(dest, "/../") || (len >= 3 && !strcmp(dest + len - 3, "/.."))) {
		errno = 0;
		die("mount destination %s: must be absolute, without '..'", dest);
	}
	if (snprintf(out, size, "%s%s", rootfs, dest) >= (int)size) {
		errno = ENAMETOOLONG;
		die("mount destination %s", dest);
	}
}

/* Mount options: flags we know, the rest passed as data. */
static unsigned long parse_options(const char *opts, char *data, size_t size, int *bind_ro)
{
	static const struct {
		const char *name;
		unsigned long set;
	} known[] = {
		{"ro", MS_RDONLY},   {"nosuid", MS_NOSUID},   {"nodev", MS_NODEV},
		{"noexec", MS_NOEXEC}, {"bind", MS_BIND},     {"rbind", MS_BIND | MS_REC},
		{"relatime", MS_RELATIME}, {"strictatime", MS_STRICTATIME}, {"rw", 0},
		{"private", 0}, {"rprivate", 0},
	};
	unsigned long flags = 0;
	char buf[1024], *save = NULL;
	data[0] = 0;
	snprintf(buf, sizeof buf, "%s", opts);
	for (char *o = strtok_r(buf, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		size_t i;
		for (i = 0; i < sizeof known / sizeof known[0]; i++)
			if (!strcmp(o, known[i].name))
				break;
		if (i < sizeof known / sizeof known[0]) {
			flags |= known[i].set;
			continue;
		}
		size_t len = strlen(data);
		snprintf(data + len, size - len, "%s%s", len ? "," : "", o);
	}
	*bind_ro = (flags & MS_BIND) && (flags & MS_RDONLY);
	return flags;
}

static void do_mount(const char *type, const char *src, const char *dest, const char *opts)
{
	char target[4096], data[1024];
	int bind_ro;
	unsigned long flags = parse_options(opts, data, sizeof data, &bind_ro);
	under_root(target, sizeof target, dest);
	if (flags & MS_BIND) {
		struct stat st;
		if (stat(src, &st))
			die("bind mount source %s", src);
		if (S_ISDIR(st.st_mode)) {
			mkdirs(target);
		} else {
			char parent[4096];
			snprintf(parent, sizeof parent, "%s", target);
			*strrchr(parent, '/') = 0;
			mkdirs(parent);
			int fd = open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
			if (fd >= 0)
				close(fd);
		}
	} else {
		mkdirs(target);
	}
	/* A read-only bind is a bind, then a read-only remount of it. */
	unsigned long first = (flags & MS_BIND) ? (flags & ~MS_RDONLY) : flags;
	if (mount(src, target, type, first, data[0] ? data : NULL))
		die("mount %s on %s (%s)", type, dest, opts);
	if (bind_ro && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | (flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC)), NULL))
		die("remount %s read-only", dest);
}

static void make_dev(void)
{
	static const char *nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
	char path[4096], src[64];
	do_mount("tmpfs", "tmpfs", "/dev", "nosuid,mode=755,size=65536k");
	for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
		snprintf(path, sizeof path, "%s/dev/%s", rootfs, nodes[i]);
		snprintf(src, sizeof src, "/dev/%s", nodes[i]);
		int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
		if (fd < 0)
			die("create %s", path);
		close(fd);
		if (mount(src, path, NULL, MS_BIND, NULL))
			die("bind %s", src);
	}
	do_mount("devpts", "devpts", "/dev/pts", "nosuid,noexec,newinstance,ptmxmode=0666,mode=0620");
	do_mount("tmpfs", "shm", "/dev/shm", "nosuid,nodev,noexec,mode=1777,size=65536k");
	static const char *links[][2] = {{"/proc/self/fd", "fd"}, {"/proc/self/fd/0", "stdin"},
					 {"/proc/self/fd/1", "stdout"}, {"/proc/self/fd/2", "stderr"},
					 {"pts/ptmx", "ptmx"}};
	for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) {
		snprintf(path, sizeof path, "%s/dev/%s", rootfs, links[i][1]);
		if (symlink(links[i][0], path) && errno != EEXIST)
			die("symlink %s", path);
	}
}

static int rlimit_resource(const char *name)
{
	static const struct {
		const char *name;
		int res;
	} names[] = {
		{"RLIMIT_NOFILE", RLIMIT_NOFILE}, {"RLIMIT_NPROC", RLIMIT_NPROC},
		{"RLIMIT_CORE", RLIMIT_CORE},     {"RLIMIT_STACK", RLIMIT_STACK},
		{"RLIMIT_AS", RLIMIT_AS},         {"RLIMIT_CPU", RLIMIT_CPU},
		{"RLIMIT_DATA", RLIMIT_DATA},     {"RLIMIT_FSIZE", RLIMIT_FSIZE},
		{"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK}, {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE},
		{"RLIMIT_NICE", RLIMIT_NICE},     {"RLIMIT_RTPRIO", RLIMIT_RTPRIO},
		{"RLIMIT_RTTIME", RLIMIT_RTTIME}, {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING},
		{"RLIMIT_LOCKS", RLIMIT_LOCKS},   {"RLIMIT_RSS", RLIMIT_RSS},
	};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
		if (!strcmp(name, names[i].name))
			return names[i].res;
	errno = 0;
	die("unknown rlimit %s", name);
	return -1;
}

static void apply_rlimits(void)
{
	for (int i = 0; i < n_rlimits; i++) {
		char name[64];
		unsigned long long soft, hard;
		if (sscanf(rlimits[i], "%63[^:]:%llu:%llu", name, &soft, &hard) != 3) {
			errno = 0;
			die("bad --rlimit %s", rlimits[i]);
		}
		struct rlimit rl = {.rlim_cur = soft, .rlim_max = hard};
		if (setrlimit(rlimit_resource(name), &rl))
			die("setrlimit %s", name);
	}
}

static void drop_bounding(void)
{
	unsigned long long keep = strtoull(caps, NULL, 16);
	for (int c = 0; c <= 63; c++) {
		if (keep & (1ULL << c))
			continue;
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) && errno != EINVAL)
			die("drop capability %d", c);
	}
}

static void apply_caps(void)
{
	unsigned long long keep = strtoull(caps, NULL, 16);
	struct __user_cap_header_struct hdr = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof data);
	for (int i = 0; i < 2; i++) {
		__u32 word = (__u32)(keep >> (32 * i));
		data[i].effective = data[i].permitted = data[i].inheritable = word;
	}
	if (syscall(SYS_capset, &hdr, data))
		die("capset");
}

static void apply_user(void)
{
	unsigned uid = 0, gid = 0;
	if (user && sscanf(user, "%u:%u", &uid, &gid) < 1) {
		errno = 0;
		die("bad --user %s (UID[:GID])", user);
	}
	gid_t list[64];
	int n = 0;
	if (groups && *groups) {
		char buf[1024], *save = NULL;
		snprintf(buf, sizeof buf, "%s", groups);
		for (char *g = strtok_r(buf, ",", &save); g && n < 64; g = strtok_r(NULL, ",", &save))
			list[n++] = (gid_t)strtoul(g, NULL, 10);
	}
	if (setgroups(n, list))
		die("setgroups");
	if (setgid(gid))
		die("setgid %u", gid);
	if (uid != 0 && caps) {
		/* Keep the permitted set across setuid, then make it the ambient set too. */
		prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0);
	}
	if (setuid(uid))
		die("setuid %u", uid);
}

static void write_pid(pid_t pid)
{
	if (!pid_file)
		return;
	int fd = open(pid_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || dprintf(fd, "%d\n", (int)pid) < 0)
		die("write %s", pid_file);
	close(fd);
}

static int wait_child(void);

/* Opened before the root changes; written by the process that becomes the command. */
static void open_cgroup(void)
{
	char path[4096];
	if (!cgroup)
		return;
	snprintf(path, sizeof path, "%s/cgroup.procs", cgroup);
	cgroup_fd = open(path, O_WRONLY | O_CLOEXEC);
	if (cgroup_fd < 0)
		die("cgroup %s", cgroup);
}

static void join_cgroup(void)
{
	if (cgroup_fd < 0)
		return;
	if (dprintf(cgroup_fd, "0\n") < 0)
		die("join cgroup %s", cgroup);
	close(cgroup_fd);
	cgroup_fd = -1;
}

/* Enter a running container: its namespaces, then its root (as seen from its pid). */
static void enter(void)
{
	static const char *kinds[] = {"ipc", "uts", "net", "pid", "mnt"};
	char path[256];
	snprintf(path, sizeof path, "/proc/%s/root", join);
	int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0)
		die("container process %s", join);
	for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
		char self[64], target[64];
		snprintf(path, sizeof path, "/proc/%s/ns/%s", join, kinds[i]);
		snprintf(self, sizeof self, "/proc/self/ns/%s", kinds[i]);
		ssize_t a = readlink(path, target, sizeof target - 1), b;
		char mine[64];
		b = readlink(self, mine, sizeof mine - 1);
		if (a > 0 && b > 0 && a == b && !memcmp(target, mine, (size_t)a))
			continue; /* the same namespace: nothing to join */
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || setns(fd, 0))
			die("join %s namespace of %s", kinds[i], join);
		close(fd);
	}
	if (fchdir(root) || chroot("."))
		die("enter the root of %s", join);
	close(root);
	/* A new pid namespace applies to children: the command runs in one. */
	child = fork();
	if (child < 0)
		die("fork");
	if (child > 0)
		_exit(wait_child());
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
}

static void forward(int sig)
{
	if (child > 0)
		kill(child, sig);
}

/* Outside the container: forward signals, then exit as its first process did. */
static int wait_child(void)
{
	int status;
	signal(SIGTERM, forward);
	signal(SIGINT, forward);
	signal(SIGHUP, forward);
	signal(SIGQUIT, forward);
	signal(SIGUSR1, forward);
	signal(SIGUSR2, forward);
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			die("waitpid");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static void parse(int argc, char **argv, int *cmd)
{
	int i;
	for (i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--")) {
			i++;
			break;
		}
		if (i + 1 >= argc && strcmp(a, "--readonly") && strcmp(a, "--no-new-privs")) {
			errno = 0;
			die("option %s needs a value", a);
		}
		if (!strcmp(a, "--rootfs"))
			rootfs = argv[++i];
		else if (!strcmp(a, "--cwd"))
			cwd = argv[++i];
		else if (!strcmp(a, "--user"))
			user = argv[++i];
		else if (!strcmp(a, "--groups"))
			groups = argv[++i];
		else if (!strcmp(a, "--env"))
			add(envs, &n_envs, argv[++i], "--env");
		else if (!strcmp(a, "--hostname"))
			hostname = argv[++i];
		else if (!strcmp(a, "--ns"))
			namespaces = argv[++i];
		else if (!strcmp(a, "--caps"))
			caps = argv[++i];
		else if (!strcmp(a, "--rlimit"))
			add(rlimits, &n_rlimits, argv[++i], "--rlimit");
		else if (!strcmp(a, "--mount"))
			add(mounts, &n_mounts, argv[++i], "--mount");
		else if (!strcmp(a, "--cgroup"))
			cgroup = argv[++i];
		else if (!strcmp(a, "--pid-file"))
			pid_file = argv[++i];
		else if (!strcmp(a, "--join"))
			join = argv[++i];
		else if (!strcmp(a, "--readonly"))
			readonly = 1;
		else if (!strcmp(a, "--no-new-privs"))
			no_new_privs = 1;
		else {
			errno = 0;
			die("unknown option %s", a);
		}
	}
	if ((!rootfs && !join) || i >= argc) {
		errno = 0;
		die("usage: vc-run --rootfs DIR|--join PID [options] -- ARGV...");
	}
	*cmd = i;
}

int main(int argc, char **argv)
{
	int cmd;
	parse(argc, argv, &cmd);
	open_cgroup();
	if (join) {
		enter();
		goto process;
	}
	int flags = CLONE_NEWNS;
	if (has_ns('u'))
		flags |= CLONE_NEWUTS;
	if (has_ns('i'))
		flags |= CLONE_NEWIPC;
	if (has_ns('n'))
		flags |= CLONE_NEWNET;
	if (unshare(flags))
		die("unshare");
	if (has_ns('p')) {
		if (unshare(CLONE_NEWPID))
			die("unshare pid namespace");
		child = fork();
		if (child < 0)
			die("fork");
		if (child > 0) {
			write_pid(child);
			return wait_child();
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	} else {
		write_pid(getpid());
	}
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		die("make mounts private");
	if (mount(rootfs, rootfs, NULL, MS_BIND | MS_REC, NULL))
		die("bind %s", rootfs);
	do_mount("proc", "proc", "/proc", "nosuid,nodev,noexec");
	make_dev();
	do_mount("sysfs", "sysfs", "/sys", "ro,nosuid,nodev,noexec");
	for (int i = 0; i < n_mounts; i++) {
		/* TYPE:SOURCE:DEST:OPTIONS; the options may hold further colons. */
		char *spec = mounts[i], *type = spec, *src, *dest, *opts;
		if (!(src = strchr(type, ':')) || !(dest = strchr(src + 1, ':')) ||
		    !(opts = strchr(dest + 1, ':'))) {
			errno = 0;
			die("bad --mount %s (TYPE:SOURCE:DEST:OPTIONS)", spec);
		}
		*src++ = 0;
		*dest++ = 0;
		*opts++ = 0;
		do_mount(type, src, dest, opts);
	}
	if (hostname && has_ns('u') && sethostname(hostname, strlen(hostname)))
		die("sethostname");
	if (chdir(rootfs))
		die("chdir %s", rootfs);
	if (mount(rootfs, "/", NULL, MS_MOVE, NULL))
		die("move %s to /", rootfs);
	if (chroot("."))
		die("chroot");
	if (chdir("/"))
		die("chdir /");
	if (readonly && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL))
		die("remount the root read-only");
process:
	join_cgroup();
	apply_rlimits();
	if (chdir(cwd))
		die("working directory %s", cwd);
	if (caps)
		drop_bounding();
	apply_user();
	if (caps)
		apply_caps();
	if (no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		die("no_new_privs");
	envs[n_envs] = NULL;
	environ = envs;
	execvp(argv[cmd], argv + cmd);
	int e = errno;
	fprintf(stderr, "vc-run: %s: %s\n", argv[cmd], strerror(e));
	return e == ENOENT ? 127 : 126;
}
