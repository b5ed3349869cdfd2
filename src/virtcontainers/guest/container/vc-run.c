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
 *   vc-run --rootfs DIR [--share TAG [--read-ahead KIB]] [--cwd DIR] [--user UID:GID]
 *          [--groups G,G] [--env K=V]...
 *          [--hostname NAME] [--ns m,p,u,i,n,c,U] [--uid-map C:H:N]... [--gid-map C:H:N]...
 *          [--readonly] [--no-new-privs] [--caps HEXMASK] [--rlimit RESOURCE:SOFT:HARD]...
 *          [--cgroup DIR] [--mount TYPE:SOURCE:DEST:OPTIONS]... [--pid-file FILE]
 *          [--device PATH:c|b|p:MAJOR:MINOR:MODE:UID:GID]... [--sysctl KEY=VALUE]...
 *          [--join-ns LETTER:PIDFILE]... [--device-cgroup allow|deny
 *          [--device-rule c|b:MAJOR:MINOR:ACCESS]...] [SECCOMP...] -- ARGV...
 *   vc-run --join PID [--cgroup DIR] [--cwd DIR] [--user UID:GID] [--env K=V]...
 *          [--caps HEXMASK] [SECCOMP...] -- ARGV...
 *   vc-run --oom-events DIR
 *
 * --share mounts the virtio-fs share TAG on DIR first (in the guest's mount namespace, made
 * if missing, unless something is mounted there already; a hot-added share is probed a
 * moment after it is plugged: retried every 50 ms for 10 s), its read-ahead set to KIB: no
 * set-up shell runs before vc-run for a container's root (under TCG its start and script
 * cost a cold container ~0.1 s).
 * --pid-file receives the container's first process's pid (as the guest sees it; its
 * directory is made if missing); --join
 * runs ARGV inside that running container instead (its namespaces and root: `virtc exec`).
 * --cgroup is the container's cgroup (made if missing; its parent, the guest's cgroup2
 * hierarchy, mounted with the memory, pids and cpu controllers enabled if it is not): the
 * process that becomes ARGV joins it (vc-run's own waiting parent stays out, so the cgroup
 * holds the container's processes only).
 * --ns letters: m mount, p pid, u uts, i ipc, n network, c cgroup, U user (with the
 * --uid-map/--gid-map lines, CONTAINER:HOST:COUNT, written from outside by a helper).
 * --join-ns p:FILE joins the pid namespace (i, u, n: ipc, uts, network) of the process whose
 * pid FILE holds instead of making one: a pod's containers share its sandbox container's.
 * --device-cgroup is the default of the cgroup's device program (cgroup v2's device
 * controller: an eBPF program attached to --cgroup, as crun and runc make it); each
 * --device-rule is an exception to it (MAJOR, MINOR a number or *; ACCESS of r, w, m). The
 * host has already reduced the OCI rules to these (containers/spec.py), so their order does
 * not matter: an allow exception matches a request whose accesses it all grants, a deny
 * exception one that asks any access it denies (as cgroup v1 does).
 * --oom-events prints the oom_kill count of cgroup DIR's memory.events (a line, as soon as
 * it grows) until the cgroup is removed: it sleeps in inotify (the kernel reports each
 * change of memory.events as IN_MODIFY), never polling.
 *
 * SECCOMP, an OCI linux.seccomp profile (libseccomp, linked statically):
 *   --seccomp-default ACTION  --seccomp-arch NAME...  --seccomp-flag log|spec_allow...
 *   --seccomp-syscall ACTION:NAME[,NAME...][:INDEX,OP,VALUE,VALUE2]...
 * ACTION: kill, kill_process, trap, allow, log, errno=N, trace=N; OP: ne, lt, le, eq, ge,
 * gt, masked_eq. Conditions of one rule must all match (AND). Names libseccomp does not
 * know are skipped (as runc does); anything else malformed is refused before anything
 * starts. The filter is built first and loaded last: just before exec, or, without
 * no_new_privs, just before the user and capabilities change (loading needs either
 * no_new_privs or CAP_SYS_ADMIN, as in runc).
 *
 * When stdin is a terminal the command runs in a child (as it does in a new or joined pid
 * namespace), which gets a terminal of the container's own devpts instance (as runc's
 * console), so `tty` names it; the waiting parent relays between it and its own terminal, put in raw
 * mode, and passes its window size on at each SIGWINCH.
 *
 * Exit status: the container process's (128+N for signal N); 125 when setting up failed,
 * 126 when the command cannot be executed, 127 when it is not found (as docker run).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/capability.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>
#include <grp.h>
#include <seccomp.h>

#define MAX_ITEMS 256
#define EXIT_SETUP 125

extern char **environ;

static const char *rootfs, *cwd = "/", *hostname, *cgroup, *namespaces = "m,p,u,i";
static const char *pid_file, *join, *share;
static int read_ahead_kib;
static char *joins[MAX_ITEMS];
static int n_joins;
static int pid_fd = -1;
static char *envs[MAX_ITEMS + 1];
static int n_envs;
static char *mounts[MAX_ITEMS];
static int n_mounts;
static char *devices[MAX_ITEMS];
static int n_devices;
static char *sysctls[MAX_ITEMS];
static int n_sysctls;
static char *rlimits[MAX_ITEMS];
static int n_rlimits;
static char *uid_maps[MAX_ITEMS], *gid_maps[MAX_ITEMS];
static int n_uid_maps, n_gid_maps;
static char *sc_rules[MAX_ITEMS], *sc_archs[MAX_ITEMS], *sc_flags[MAX_ITEMS];
static int n_sc_rules, n_sc_archs, n_sc_flags;
static const char *sc_default;
static scmp_filter_ctx filter;
static const char *user, *groups, *caps;
static int readonly, no_new_privs;
static pid_t child;
static int console_sock[2] = {-1, -1}; /* the child sends its terminal's master over it */
static volatile sig_atomic_t resized;
static int cgroup_fd = -1;
static const char *dev_default;
static const char *dev_cache; /* --device-program-cache DIR */
static char *dev_rules[MAX_ITEMS];
static int n_dev_rules;
static struct bpf_insn dev_prog[MAX_ITEMS * 8 + 8];
static int dev_len;
static int trace; /* VC_RUN_TRACE in vc-run's own environment: stamps on stderr */

/* With VC_RUN_TRACE set: "vc-run: SECONDS.MICROS WHAT" (CLOCK_MONOTONIC) on stderr, to see
 * where a container's start goes inside the guest. */
static void stamp(const char *what)
{
	struct timespec ts;
	if (!trace)
		return;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	fprintf(stderr, "vc-run: %lld.%06ld %d %s\n", (long long)ts.tv_sec, ts.tv_nsec / 1000,
		(int)getpid(), what);
}

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

/* The guest's node `src` bound onto a new empty file `target`. */
static void bind_node(const char *src, const char *target)
{
	int fd = open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0666);
	if (fd < 0)
		die("create %s", target);
	close(fd);
	if (mount(src, target, NULL, MS_BIND, NULL))
		die("bind %s", src);
}

static void make_dev(void)
{
	static const char *nodes[] = {"null", "zero", "full", "random", "urandom", "tty"};
	char path[4096], src[64];
	do_mount("tmpfs", "tmpfs", "/dev", "nosuid,mode=755,size=65536k");
	for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
		snprintf(path, sizeof path, "%s/dev/%s", rootfs, nodes[i]);
		snprintf(src, sizeof src, "/dev/%s", nodes[i]);
		bind_node(src, path);
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

/* PATH:TYPE:MAJOR:MINOR:MODE:UID:GID (TYPE c, b or p; MODE octal), checked before set-up. */
static int parse_device(const char *spec, char *path, size_t size, char *type, unsigned *major,
			unsigned *minor, unsigned *mode, unsigned *uid, unsigned *gid)
{
	const char *colon = strchr(spec, ':');
	if (!colon || (size_t)(colon - spec) >= size)
		return -1;
	memcpy(path, spec, (size_t)(colon - spec));
	path[colon - spec] = 0;
	char end;
	if (sscanf(colon + 1, "%c:%u:%u:%o:%u:%u%c", type, major, minor, mode, uid, gid, &end) != 6)
		return -1;
	return (*type == 'c' || *type == 'b' || *type == 'p') && path[0] == '/' ? 0 : -1;
}

static void check_devices(void)
{
	char path[4096], type;
	unsigned major, minor, mode, uid, gid;
	for (int i = 0; i < n_devices; i++)
		if (parse_device(devices[i], path, sizeof path, &type, &major, &minor, &mode, &uid,
				 &gid)) {
			errno = 0;
			die("bad --device %s (PATH:c|b|p:MAJOR:MINOR:MODE:UID:GID)", devices[i]);
		}
}

/*
 * The config's device nodes, made in the container's /dev after the standard ones (a path
 * that already exists is left as it is). A user namespace may not mknod: there the guest's
 * own node of the same path, type and number is bound instead, as rootless runc does.
 */
static void make_devices(int userns)
{
	for (int i = 0; i < n_devices; i++) {
		char path[4096], target[4096], parent[4096], type;
		unsigned major, minor, mode, uid, gid;
		struct stat st;
		parse_device(devices[i], path, sizeof path, &type, &major, &minor, &mode, &uid, &gid);
		under_root(target, sizeof target, path);
		if (!lstat(target, &st))
			continue;
		snprintf(parent, sizeof parent, "%s", target);
		*strrchr(parent, '/') = 0;
		mkdirs(parent);
		mode_t kind = type == 'c' ? S_IFCHR : type == 'b' ? S_IFBLK : S_IFIFO;
		dev_t dev = kind == S_IFIFO ? 0 : makedev(major, minor);
		if (userns) {
			if (stat(path, &st) || (st.st_mode & S_IFMT) != kind || st.st_rdev != dev) {
				errno = 0;
				die("device %s: a user namespace cannot make device nodes, and the guest "
				    "has no such one to bind", path);
			}
			bind_node(path, target);
			continue;
		}
		if (mknod(target, kind | (mode & 07777), dev))
			die("mknod %s", path);
		if (chmod(target, mode & 07777) || lchown(target, uid, gid))
			die("device %s: mode and owner", path);
	}
}

/* KEY=VALUE -> /proc/sys/KEY (dots as slashes) and VALUE; -1 when malformed. */
static int sysctl_path(const char *item, char *path, size_t size, const char **value)
{
	const char *eq = strchr(item, '=');
	size_t len = eq ? (size_t)(eq - item) : 0;
	if (!len || len >= 256 || strstr(item, "..") || memchr(item, '/', len))
		return -1;
	snprintf(path, size, "/proc/sys/%.*s", (int)len, item);
	for (char *p = path + strlen("/proc/sys/"); *p; p++)
		if (*p == '.')
			*p = '/';
	*value = eq + 1;
	return 0;
}

static void check_sysctls(void)
{
	char path[512];
	const char *value;
	for (int i = 0; i < n_sysctls; i++)
		if (sysctl_path(sysctls[i], path, sizeof path, &value)) {
			errno = 0;
			die("bad --sysctl %s (KEY=VALUE)", sysctls[i]);
		}
}

/* Written from inside the new namespaces: net, ipc and uts sysctls are the writer's. */
static void apply_sysctls(void)
{
	for (int i = 0; i < n_sysctls; i++) {
		char path[512];
		const char *value;
		sysctl_path(sysctls[i], path, sizeof path, &value);
		int fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, value, strlen(value)) < 0)
			die("sysctl %s", sysctls[i]);
		close(fd);
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

/* "kill", "errno=1"... -> the libseccomp action; anything else is refused by name. */
static uint32_t seccomp_action(const char *text)
{
	static const struct {
		const char *name;
		uint32_t action;
	} plain[] = {
		{"kill", SCMP_ACT_KILL_THREAD}, {"kill_process", SCMP_ACT_KILL_PROCESS},
		{"trap", SCMP_ACT_TRAP},        {"allow", SCMP_ACT_ALLOW},
		{"log", SCMP_ACT_LOG},
	};
	for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++)
		if (!strcmp(text, plain[i].name))
			return plain[i].action;
	unsigned n;
	char end;
	if (sscanf(text, "errno=%u%c", &n, &end) == 1 && n <= 0xffff)
		return SCMP_ACT_ERRNO(n);
	if (sscanf(text, "trace=%u%c", &n, &end) == 1 && n <= 0xffff)
		return SCMP_ACT_TRACE(n);
	errno = 0;
	die("unknown seccomp action %s", text);
	return 0;
}

static enum scmp_compare seccomp_op(const char *text)
{
	static const struct {
		const char *name;
		enum scmp_compare op;
	} ops[] = {
		{"ne", SCMP_CMP_NE}, {"lt", SCMP_CMP_LT}, {"le", SCMP_CMP_LE}, {"eq", SCMP_CMP_EQ},
		{"ge", SCMP_CMP_GE}, {"gt", SCMP_CMP_GT}, {"masked_eq", SCMP_CMP_MASKED_EQ},
	};
	for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++)
		if (!strcmp(text, ops[i].name))
			return ops[i].op;
	errno = 0;
	die("unknown seccomp operator %s", text);
	return SCMP_CMP_EQ;
}

static void seccomp_fail(int rc, const char *fmt, const char *what)
{
	errno = -rc;
	die(fmt, what);
}

/* ACTION:NAME[,NAME...][:INDEX,OP,VALUE,VALUE2]... added to the filter. */
static void seccomp_rule(uint32_t def, char *rule)
{
	char *save = NULL, *action = strtok_r(rule, ":", &save), *names = strtok_r(NULL, ":", &save);
	if (!action || !names) {
		errno = 0;
		die("bad --seccomp-syscall %s (ACTION:NAMES[:ARG]...)", rule);
	}
	uint32_t act = seccomp_action(action);
	struct scmp_arg_cmp cmp[6];
	unsigned n = 0;
	for (char *arg = strtok_r(NULL, ":", &save); arg; arg = strtok_r(NULL, ":", &save)) {
		unsigned index;
		char op[16];
		unsigned long long a, b;
		if (n >= 6 || sscanf(arg, "%u,%15[a-z_],%llu,%llu", &index, op, &a, &b) != 4 ||
		    index > 5) {
			errno = 0;
			die("bad seccomp argument condition %s (INDEX,OP,VALUE,VALUE2, at most 6)", arg);
		}
		cmp[n++] = (struct scmp_arg_cmp){.arg = index, .op = seccomp_op(op), .datum_a = a,
						 .datum_b = b};
	}
	if (act == def)
		return; /* libseccomp refuses a rule that repeats the default; runc skips it */
	char *nsave = NULL;
	for (char *name = strtok_r(names, ",", &nsave); name; name = strtok_r(NULL, ",", &nsave)) {
		int nr = seccomp_syscall_resolve_name(name);
		if (nr == __NR_SCMP_ERROR)
			continue; /* a name this libseccomp does not know: skipped, as runc does */
		int rc = seccomp_rule_add_array(filter, act, nr, n, cmp);
		if (rc < 0)
			seccomp_fail(rc, "seccomp rule for %s", name);
	}
}

/* Build the whole filter before anything starts, so a bad profile changes nothing. */
static void build_seccomp(void)
{
	if (!sc_default) {
		if (n_sc_rules || n_sc_archs || n_sc_flags) {
			errno = 0;
			die("seccomp options need --seccomp-default");
		}
		return;
	}
	uint32_t def = seccomp_action(sc_default);
	filter = seccomp_init(def);
	if (!filter) {
		errno = 0;
		die("seccomp_init");
	}
	/* no_new_privs is the config's choice, not libseccomp's default. */
	int rc = seccomp_attr_set(filter, SCMP_FLTATR_CTL_NNP, 0);
	if (rc < 0)
		seccomp_fail(rc, "seccomp attribute %s", "no_new_privs");
	for (int i = 0; i < n_sc_archs; i++) {
		uint32_t arch = seccomp_arch_resolve_name(sc_archs[i]);
		if (!arch) {
			errno = 0;
			die("unknown seccomp architecture %s", sc_archs[i]);
		}
		rc = seccomp_arch_add(filter, arch);
		if (rc < 0 && rc != -EEXIST)
			seccomp_fail(rc, "seccomp architecture %s", sc_archs[i]);
	}
	for (int i = 0; i < n_sc_flags; i++) {
		enum scmp_filter_attr attr;
		if (!strcmp(sc_flags[i], "log"))
			attr = SCMP_FLTATR_CTL_LOG;
		else if (!strcmp(sc_flags[i], "spec_allow"))
			attr = SCMP_FLTATR_CTL_SSB;
		else {
			errno = 0;
			die("unknown seccomp flag %s", sc_flags[i]);
		}
		rc = seccomp_attr_set(filter, attr, 1);
		if (rc < 0)
			seccomp_fail(rc, "seccomp flag %s", sc_flags[i]);
	}
	for (int i = 0; i < n_sc_rules; i++)
		seccomp_rule(def, sc_rules[i]);
}

static void load_seccomp(void)
{
	if (!filter)
		return;
	int rc = seccomp_load(filter);
	if (rc < 0)
		seccomp_fail(rc, "load the seccomp filter%s", "");
	seccomp_release(filter);
	filter = NULL;
}

/* The id maps, checked before anything is set up. */
static void check_maps(void)
{
	if (has_ns('U') && (!n_uid_maps || !n_gid_maps)) {
		errno = 0;
		die("a user namespace needs --uid-map and --gid-map");
	}
	for (int i = 0; i < n_uid_maps + n_gid_maps; i++) {
		const char *m = i < n_uid_maps ? uid_maps[i] : gid_maps[i - n_uid_maps];
		unsigned long c, h, count;
		char end;
		if (sscanf(m, "%lu:%lu:%lu%c", &c, &h, &count, &end) != 3) {
			errno = 0;
			die("bad id map %s (CONTAINER:HOST:COUNT)", m);
		}
	}
}

/* One write of "C H N" lines (the kernel takes a map in a single write). */
static void write_map(pid_t pid, const char *file, char **maps, int n)
{
	char path[64], buf[4096];
	size_t len = 0;
	for (int i = 0; i < n; i++) {
		unsigned long c, h, count;
		char end;
		sscanf(maps[i], "%lu:%lu:%lu%c", &c, &h, &count, &end);
		len += (size_t)snprintf(buf + len, sizeof buf - len, "%lu %lu %lu\n", c, h, count);
		if (len >= sizeof buf) {
			errno = E2BIG;
			die("%s", file);
		}
	}
	snprintf(path, sizeof path, "/proc/%d/%s", (int)pid, file);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0 || write(fd, buf, len) != (ssize_t)len)
		die("write %s", path);
	close(fd);
}

/*
 * A new user namespace, its id maps written by a helper left outside it (only a process
 * with CAP_SETUID in the parent namespace may map other ids than its own).
 */
static void enter_userns(void)
{
	int go[2];
	pid_t self = getpid();
	if (pipe2(go, O_CLOEXEC))
		die("pipe");
	pid_t helper = fork();
	if (helper < 0)
		die("fork");
	if (helper == 0) {
		char c;
		close(go[1]);
		if (read(go[0], &c, 1) != 1)
			_exit(EXIT_SETUP);
		write_map(self, "uid_map", uid_maps, n_uid_maps);
		write_map(self, "gid_map", gid_maps, n_gid_maps);
		_exit(0);
	}
	close(go[0]);
	int failed = unshare(CLONE_NEWUSER);
	int e = errno;
	if (!failed && write(go[1], "u", 1) != 1)
		failed = 1, e = errno;
	close(go[1]);
	int status;
	while (waitpid(helper, &status, 0) < 0)
		if (errno != EINTR)
			die("waitpid");
	errno = e;
	if (failed)
		die("unshare user namespace");
	if (!WIFEXITED(status) || WEXITSTATUS(status)) {
		errno = 0;
		die("the user namespace's id maps were not written");
	}
	/* Become the namespace's root: files it makes (the container's /dev) need mapped ids. */
	if (setresgid(0, 0, 0) || setresuid(0, 0, 0))
		die("become root in the user namespace (container id 0 must be mapped)");
}

/* Opened before a user namespace is entered: its root may not create files here. */
/* Its directory made first (the container's guest directory: nothing else needs it). */
static void open_pid_file(void)
{
	char dir[4096];
	if (!pid_file)
		return;
	if (snprintf(dir, sizeof dir, "%s", pid_file) >= (int)sizeof dir) {
		errno = ENAMETOOLONG;
		die("pid file %s", pid_file);
	}
	char *slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = 0;
		mkdirs(dir);
	}
	if ((pid_fd = open(pid_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0)
		die("open %s", pid_file);
}

static void write_pid(pid_t pid)
{
	if (pid_fd < 0)
		return;
	if (dprintf(pid_fd, "%d\n", (int)pid) < 0)
		die("write %s", pid_file);
	close(pid_fd);
	pid_fd = -1;
}

/* The pid is published only once the container is made: an exec joining it earlier would
 * find its mounts, root or namespaces half made. The child writes a byte here then. */
static int ready_pipe[2] = {-1, -1};

static void signal_ready(void)
{
	if (ready_pipe[1] < 0) {
		write_pid(getpid());
		return;
	}
	if (write(ready_pipe[1], "r", 1) != 1)
		die("tell the parent the container is made");
	close(ready_pipe[1]);
	ready_pipe[1] = -1;
}

/*
 * The teardown of a container's namespaces left to a holder. When vc-run exits, its
 * namespaces (the container's mounts: its root's bind, /proc, /dev, /sys...) and memory
 * would be torn down in its exit, before its parent (the agent) can see it and report the
 * container's exit. Instead a process sharing them, at the lowest priority (SCHED_IDLE),
 * outlives vc-run and releases them once the CPU has nothing else to do: the exit is
 * reported first (docs/architecture.md 6.6).
 */
static int guest_pidns = -1; /* the guest's pid namespace: the holder is made in it */
static pid_t holder_parent;
static char holder_stack[16384] __attribute__((aligned(16)));

static int hold(void *arg)
{
	struct sched_param none = {0};
	(void)arg;
	syscall(SYS_close_range, 0U, ~0U, 0U); /* the container's stdio is not kept open */
	sched_setscheduler(0, SCHED_IDLE, &none);
	prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
	if (getppid() == holder_parent)
		pause(); /* until vc-run is gone (killed by its death, then torn down) */
	return 0;
}

/* Made once the container's first process is reaped, just before vc-run exits; without a
 * holder (it cannot be made) vc-run's own exit tears them down, as before. */
static void leave_teardown_behind(void)
{
	if (guest_pidns < 0)
		return;
	/* The container's pid namespace is dead: a process can only be made in the guest's. */
	if (setns(guest_pidns, CLONE_NEWPID))
		return;
	holder_parent = getpid();
	clone(hold, holder_stack + sizeof holder_stack, CLONE_VM | SIGCHLD, NULL);
}

static int wait_child(void);
static void forward_signals(void);
static void prepare_console(void);

static void emit(__u8 code, __u8 dst, __u8 src, __s16 off, __s32 imm)
{
	dev_prog[dev_len++] = (struct bpf_insn){.code = code, .dst_reg = dst, .src_reg = src,
						.off = off, .imm = imm};
}

/* "c:1:*:rw" -> type, major, minor (-1: any) and BPF_DEVCG_ACC_* bits; -1 when malformed. */
static int parse_dev_rule(const char *rule, int *type, long long *num, int *access)
{
	char kind, nums[2][16], acc[8], end;
	if (sscanf(rule, "%c:%15[0-9*]:%15[0-9*]:%7[rwm]%c", &kind, nums[0], nums[1], acc, &end) != 4 ||
	    (kind != 'c' && kind != 'b'))
		return -1;
	*type = kind == 'c' ? BPF_DEVCG_DEV_CHAR : BPF_DEVCG_DEV_BLOCK;
	for (int i = 0; i < 2; i++) {
		char *stop;
		errno = 0;
		num[i] = !strcmp(nums[i], "*") ? -1 : strtoll(nums[i], &stop, 10);
		if (num[i] != -1 && (errno || *stop || num[i] > 0xffffffffLL))
			return -1;
	}
	*access = (strchr(acc, 'r') ? BPF_DEVCG_ACC_READ : 0) |
		  (strchr(acc, 'w') ? BPF_DEVCG_ACC_WRITE : 0) |
		  (strchr(acc, 'm') ? BPF_DEVCG_ACC_MKNOD : 0);
	return 0;
}

/*
 * The device program, built before anything is set up. r2: device type, r3: the accesses
 * asked, r4: major, r5: minor (from struct bpf_cgroup_dev_ctx); each exception is a block
 * of 32-bit compares jumping to the next block on a mismatch, then returning its verdict;
 * the default verdict ends the program.
 */
static void build_device_program(void)
{
	if (!dev_default) {
		if (n_dev_rules) {
			errno = 0;
			die("--device-rule needs --device-cgroup");
		}
		return;
	}
	if (strcmp(dev_default, "allow") && strcmp(dev_default, "deny")) {
		errno = 0;
		die("bad --device-cgroup %s (allow or deny)", dev_default);
	}
	if (!cgroup) {
		errno = 0;
		die("--device-cgroup needs --cgroup");
	}
	int allow = !strcmp(dev_default, "allow");
	emit(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_2, BPF_REG_1, 0, 0);
	emit(BPF_ALU | BPF_AND | BPF_K, BPF_REG_2, 0, 0, 0xffff);
	emit(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_3, BPF_REG_1, 0, 0);
	emit(BPF_ALU | BPF_RSH | BPF_K, BPF_REG_3, 0, 0, 16);
	emit(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_4, BPF_REG_1, 4, 0);
	emit(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_5, BPF_REG_1, 8, 0);
	for (int i = 0; i < n_dev_rules; i++) {
		int type, access, jumps[4], n = 0;
		long long num[2];
		if (parse_dev_rule(dev_rules[i], &type, num, &access)) {
			errno = 0;
			die("bad --device-rule %s (c|b:MAJOR|*:MINOR|*:ACCESS)", dev_rules[i]);
		}
		jumps[n++] = dev_len;
		emit(BPF_JMP32 | BPF_JNE | BPF_K, BPF_REG_2, 0, 0, type);
		if (access != (BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE | BPF_DEVCG_ACC_MKNOD)) {
			emit(BPF_ALU | BPF_MOV | BPF_X, BPF_REG_1, BPF_REG_3, 0, 0);
			emit(BPF_ALU | BPF_AND | BPF_K, BPF_REG_1, 0, 0, access);
			jumps[n++] = dev_len;
			if (allow) /* a deny exception: any access it names */
				emit(BPF_JMP32 | BPF_JEQ | BPF_K, BPF_REG_1, 0, 0, 0);
			else /* an allow exception: all the accesses asked */
				emit(BPF_JMP32 | BPF_JNE | BPF_X, BPF_REG_1, BPF_REG_3, 0, 0);
		}
		for (int k = 0; k < 2; k++)
			if (num[k] != -1) {
				jumps[n++] = dev_len;
				emit(BPF_JMP32 | BPF_JNE | BPF_K, k ? BPF_REG_5 : BPF_REG_4, 0, 0,
				     (__s32)(__u32)num[k]);
			}
		emit(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, !allow);
		emit(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
		for (int j = 0; j < n; j++)
			dev_prog[jumps[j]].off = (__s16)(dev_len - jumps[j] - 1);
	}
	emit(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, allow);
	emit(BPF_JMP | BPF_EXIT, 0, 0, 0, 0);
}

/*
 * --device-program-cache DIR: programs loaded once are kept pinned in DIR/bpf (a bpffs),
 * each under a hash of its instructions, with those instructions in DIR/HASH.insns; a
 * later container whose program is the same, byte for byte, attaches the pinned one. The
 * load (the verifier and the JIT) is most of a container's device set-up under TCG:
 * ~20 ms in a warm guest, 20-150 ms under load, against microseconds for the attach
 * (docs/architecture.md 6.6). A pooled VM's warm-up container loads a default spec's
 * program while the VM waits. Best effort: any failure here falls back to a load.
 */
static void dev_cache_paths(char *pin, char *insns, size_t size)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	const unsigned char *b = (const unsigned char *)dev_prog;
	for (size_t i = 0; i < (size_t)dev_len * sizeof dev_prog[0]; i++)
		h = (h ^ b[i]) * 1099511628211ULL;
	snprintf(pin, size, "%s/bpf/dev-%016llx", dev_cache, (unsigned long long)h);
	snprintf(insns, size, "%s/dev-%016llx.insns", dev_cache, (unsigned long long)h);
}

static int dev_cache_get(void)
{
	char pin[4096], insns[4096];
	static struct bpf_insn kept[sizeof dev_prog / sizeof dev_prog[0] + 1];
	if (!dev_cache)
		return -1;
	dev_cache_paths(pin, insns, sizeof pin);
	int fd = open(insns, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, kept, sizeof kept);
	close(fd);
	if (n != (ssize_t)(dev_len * sizeof dev_prog[0]) || memcmp(kept, dev_prog, (size_t)n))
		return -1;
	union bpf_attr attr;
	memset(&attr, 0, sizeof attr);
	attr.pathname = (__u64)(uintptr_t)pin;
	return (int)syscall(SYS_bpf, BPF_OBJ_GET, &attr, sizeof attr);
}

/* The pin first, then its instructions (renamed into place): a reader needs both. */
static void dev_cache_put(int prog)
{
	char pin[4096], insns[4096], tmp[4200];
	union bpf_attr attr;
	if (!dev_cache)
		return;
	dev_cache_paths(pin, insns, sizeof pin);
	memset(&attr, 0, sizeof attr);
	attr.pathname = (__u64)(uintptr_t)pin;
	attr.bpf_fd = (__u32)prog;
	if (syscall(SYS_bpf, BPF_OBJ_PIN, &attr, sizeof attr))
		return;
	snprintf(tmp, sizeof tmp, "%s.%d", insns, (int)getpid());
	int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return;
	size_t len = (size_t)dev_len * sizeof dev_prog[0];
	int ok = write(fd, dev_prog, len) == (ssize_t)len;
	close(fd);
	if (!ok || rename(tmp, insns))
		unlink(tmp);
}

/* Loaded and attached while vc-run still holds the guest's capabilities (before a user
 * namespace), before the container's first process joins the cgroup. */
static void attach_device_program(void)
{
	static char log[16384];
	union bpf_attr attr;
	if (!dev_len)
		return;
	int dir = open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0)
		die("cgroup %s", cgroup);
	int prog = dev_cache_get();
	if (prog < 0) {
		memset(&attr, 0, sizeof attr);
		attr.prog_type = BPF_PROG_TYPE_CGROUP_DEVICE;
		attr.insns = (__u64)(uintptr_t)dev_prog;
		attr.insn_cnt = (__u32)dev_len;
		attr.license = (__u64)(uintptr_t) "GPL";
		/* Without the verifier's log: writing it costs the load most of its time under
		 * TCG (6.6); it is asked for only to say why a load failed. */
		prog = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
		if (prog < 0) {
			int e = errno;
			attr.log_buf = (__u64)(uintptr_t)log;
			attr.log_size = sizeof log;
			attr.log_level = 1;
			if (syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr) < 0)
				fprintf(stderr, "%s", log);
			errno = e;
			die("load the device program (CONFIG_CGROUP_BPF)");
		}
		dev_cache_put(prog);
	}
	memset(&attr, 0, sizeof attr);
	attr.target_fd = (__u32)dir;
	attr.attach_bpf_fd = (__u32)prog;
	attr.attach_type = BPF_CGROUP_DEVICE;
	if (syscall(SYS_bpf, BPF_PROG_ATTACH, &attr, sizeof attr))
		die("attach the device program to %s", cgroup);
	close(prog);
	close(dir);
}

/* --share: the root's share mounted on --rootfs (see the usage above). */
static void mount_share(void)
{
	struct stat st, up;
	char parent[4096];
	if (!share || join)
		return;
	mkdirs(rootfs);
	snprintf(parent, sizeof parent, "%s/..", rootfs);
	if (!stat(rootfs, &st) && !stat(parent, &up) && st.st_dev != up.st_dev)
		return; /* mounted already (an earlier start of this container) */
	for (int n = 0; mount(share, rootfs, "virtiofs", 0, NULL); n++) {
		if (n >= 200)
			die("mount virtio-fs share %s on %s", share, rootfs);
		usleep(50000);
	}
	stamp("mounted");
	if (read_ahead_kib <= 0)
		return;
	/* FUSE lowers the read-ahead to what the daemon's answer to INIT allows: a listing
	 * waits for that answer. */
	DIR *d = opendir(rootfs);
	if (d) {
		readdir(d);
		closedir(d);
	}
	if (stat(rootfs, &st))
		return;
	snprintf(parent, sizeof parent, "/sys/class/bdi/%u:%u/read_ahead_kb", major(st.st_dev),
		 minor(st.st_dev));
	int fd = open(parent, O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		dprintf(fd, "%d\n", read_ahead_kib);
		close(fd);
	}
}

/* The guest's cgroup2 hierarchy (--cgroup's parent), mounted with the controllers containers
 * use enabled, once per guest (if nothing has yet). */
static void cgroup_hierarchy(void)
{
	char root[4096], path[4200];
	snprintf(root, sizeof root, "%s", cgroup);
	char *slash = strrchr(root, '/');
	if (!slash || slash == root)
		return;
	*slash = 0;
	snprintf(path, sizeof path, "%s/cgroup.controllers", root);
	if (!access(path, F_OK))
		return;
	if (mount("none", root, "cgroup2", 0, NULL) && errno != EBUSY)
		die("mount cgroup2 on %s", root);
	snprintf(path, sizeof path, "%s/cgroup.subtree_control", root);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		/* As the set-up shell wrote it: a controller the kernel lacks leaves all off. */
		if (write(fd, "+memory +pids +cpu", 18) < 0)
			errno = 0;
		close(fd);
	}
}

/* Made (a new container's) and opened before the root changes; written by the process that
 * becomes the command. */
static void open_cgroup(void)
{
	char path[4096];
	if (!cgroup)
		return;
	if (!join)
		cgroup_hierarchy();
	if (!join && mkdir(cgroup, 0755) && errno != EEXIST)
		die("make cgroup %s", cgroup);
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

/* Join the `kind` namespace of guest process `pid` (nothing to do when it is already ours). */
static void join_ns(const char *pid, const char *kind)
{
	char path[256], self[64], target[64], mine[64];
	snprintf(path, sizeof path, "/proc/%s/ns/%s", pid, kind);
	snprintf(self, sizeof self, "/proc/self/ns/%s", kind);
	ssize_t a = readlink(path, target, sizeof target - 1), b;
	b = readlink(self, mine, sizeof mine - 1);
	if (a > 0 && b > 0 && a == b && !memcmp(target, mine, (size_t)a))
		return;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || setns(fd, 0))
		die("join %s namespace of %s", kind, pid);
	close(fd);
}

/* --join-ns LETTER:PIDFILE: join that namespace of the process whose pid the file holds (a
 * pod's container joining the pid namespace of the pod's sandbox container). */
static int join_shared(void)
{
	int pidns = 0;
	for (int i = 0; i < n_joins; i++) {
		char *spec = joins[i], pid[32] = "";
		const char *kind = spec[1] != ':' ? NULL
				   : spec[0] == 'p' ? "pid"
				   : spec[0] == 'i' ? "ipc"
				   : spec[0] == 'u' ? "uts"
				   : spec[0] == 'n' ? "net"
						    : NULL;
		if (!kind || has_ns(spec[0])) {
			errno = 0;
			die("bad --join-ns %s (LETTER:PIDFILE, p i u or n, not also in --ns)", spec);
		}
		FILE *f = fopen(spec + 2, "re");
		if (!f || !fgets(pid, sizeof pid, f) || !strtol(pid, NULL, 10))
			die("--join-ns %s: no running process", spec);
		fclose(f);
		pid[strcspn(pid, "\n")] = 0;
		join_ns(pid, kind);
		pidns |= spec[0] == 'p';
	}
	return pidns;
}

/* Enter a running container: its namespaces, then its root (as seen from its pid). */
static void enter(void)
{
	/* The user namespace first: it owns the others, whose joining needs its capabilities. */
	static const char *kinds[] = {"user", "cgroup", "ipc", "uts", "net", "pid", "mnt"};
	char path[256];
	snprintf(path, sizeof path, "/proc/%s/root", join);
	int root = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0)
		die("container process %s", join);
	for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
		join_ns(join, kinds[i]);
	if (fchdir(root) || chroot("."))
		die("enter the root of %s", join);
	close(root);
	/* A new pid namespace applies to children: the command runs in one. */
	prepare_console();
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

static void on_winch(int sig)
{
	(void)sig;
	resized = 1;
}

/* Before forking: a terminal on stdin is replaced by one of the container's in the child. */
static void prepare_console(void)
{
	if (isatty(0) && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, console_sock))
		die("socketpair");
}

/* In the child, inside the container's root: a new terminal of its devpts becomes its
 * controlling terminal and stdio; the master goes to the parent. */
static void make_console(void)
{
	if (console_sock[1] < 0)
		return;
	close(console_sock[0]);
	int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0 || unlockpt(master))
		die("open the container's /dev/ptmx");
	struct winsize ws;
	if (!ioctl(0, TIOCGWINSZ, &ws))
		ioctl(master, TIOCSWINSZ, &ws);
	char name[64];
	if (ptsname_r(master, name, sizeof name))
		die("ptsname");
	int slave = open(name, O_RDWR | O_NOCTTY);
	if (slave < 0)
		die("open %s", name);
	if (setsid() < 0 || ioctl(slave, TIOCSCTTY, 0))
		die("make %s the controlling terminal", name);
	char data = 0;
	char control[CMSG_SPACE(sizeof(int))] = {0};
	struct iovec iov = {.iov_base = &data, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
			     .msg_controllen = sizeof control};
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &master, sizeof(int));
	if (sendmsg(console_sock[1], &msg, 0) != 1)
		die("send the terminal to vc-run");
	close(console_sock[1]);
	close(master);
	for (int fd = 0; fd < 3; fd++)
		if (dup2(slave, fd) < 0)
			die("dup2 %s", name);
	if (slave > 2)
		close(slave);
}

static int receive_console(void)
{
	char data, control[CMSG_SPACE(sizeof(int))];
	struct iovec iov = {.iov_base = &data, .iov_len = 1};
	struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
			     .msg_controllen = sizeof control};
	close(console_sock[1]);
	ssize_t n;
	while ((n = recvmsg(console_sock[0], &msg, 0)) < 0 && errno == EINTR)
		;
	close(console_sock[0]);
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (n != 1 || !c || c->cmsg_type != SCM_RIGHTS)
		return -1; /* the child failed before making its terminal */
	int master;
	memcpy(&master, CMSG_DATA(c), sizeof(int));
	return master;
}

static int copy(int from, int to)
{
	char buf[4096];
	ssize_t n = read(from, buf, sizeof buf);
	if (n <= 0)
		return n < 0 && errno == EINTR ? 0 : -1;
	for (ssize_t off = 0; off < n;) {
		ssize_t w = write(to, buf + off, (size_t)(n - off));
		if (w < 0 && errno != EINTR)
			return -1;
		off += w > 0 ? w : 0;
	}
	return 0;
}

/* Relay between our terminal (raw) and the child's until the child's side is closed. */
static void relay_console(void)
{
	int master = receive_console();
	if (master < 0)
		return;
	struct termios saved, raw;
	int restore = !tcgetattr(0, &saved);
	if (restore) {
		raw = saved;
		cfmakeraw(&raw);
		tcsetattr(0, TCSANOW, &raw);
	}
	/* A resize may have come after the child copied our size and before this handler: the
	 * first turn copies it again. SIGWINCH is let in only inside ppoll, so none is missed
	 * between the check and the wait. */
	sigset_t winch, waiting;
	sigemptyset(&winch);
	sigaddset(&winch, SIGWINCH);
	sigprocmask(SIG_BLOCK, &winch, &waiting);
	sigdelset(&waiting, SIGWINCH);
	struct sigaction sa = {.sa_handler = on_winch};
	sigaction(SIGWINCH, &sa, NULL);
	resized = 1;
	struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = master, .events = POLLIN}};
	for (;;) {
		if (resized) {
			struct winsize ws;
			resized = 0;
			if (!ioctl(0, TIOCGWINSZ, &ws))
				ioctl(master, TIOCSWINSZ, &ws);
		}
		if (ppoll(fds, 2, NULL, &waiting) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (fds[1].revents && copy(master, 1) < 0)
			break; /* EIO: every process of the child's terminal is gone */
		if (fds[0].revents && copy(0, master) < 0)
			fds[0].fd = -1; /* our stdin ended: the child's terminal stays */
	}
	close(master);
	if (restore)
		tcsetattr(0, TCSANOW, &saved);
}

/* Outside the container: forward signals, then exit as its first process did. */
static void forward_signals(void)
{
	signal(SIGTERM, forward);
	signal(SIGINT, forward);
	signal(SIGHUP, forward);
	signal(SIGQUIT, forward);
	signal(SIGUSR1, forward);
	signal(SIGUSR2, forward);
}

static int wait_child(void)
{
	int status;
	forward_signals();
	if (console_sock[0] >= 0)
		relay_console();
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			die("waitpid");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* The "oom_kill N" count of a memory.events file; -1 once it is gone (the cgroup removed). */
static long long oom_kills(const char *path)
{
	FILE *f = fopen(path, "re");
	if (!f)
		return -1;
	char line[128];
	long long n = 0;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "oom_kill %lld", &n) == 1)
			break;
	fclose(f);
	return n;
}

static int oom_events(const char *dir)
{
	char path[4096];
	if (snprintf(path, sizeof path, "%s/memory.events", dir) >= (int)sizeof path) {
		errno = ENAMETOOLONG;
		die("cgroup %s", dir);
	}
	int fd = inotify_init1(IN_CLOEXEC);
	if (fd < 0)
		die("inotify");
	/* Watched before the first read: a kill in between is in that read or wakes the next. */
	if (inotify_add_watch(fd, path, IN_MODIFY) < 0)
		die("watch %s", path);
	long long seen = 0;
	for (;;) {
		long long n = oom_kills(path);
		if (n < 0)
			return 0;
		if (n > seen) {
			seen = n;
			printf("%lld\n", n);
			fflush(stdout);
		}
		char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
		ssize_t r = read(fd, buf, sizeof buf);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			die("read inotify events of %s", path);
		for (char *p = buf; p < buf + r;) {
			struct inotify_event *ev = (struct inotify_event *)p;
			if (ev->mask & IN_IGNORED)
				return 0; /* the watch went with the file */
			p += sizeof *ev + ev->len;
		}
	}
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
		else if (!strcmp(a, "--share"))
			share = argv[++i];
		else if (!strcmp(a, "--read-ahead"))
			read_ahead_kib = atoi(argv[++i]);
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
		else if (!strcmp(a, "--join-ns"))
			add(joins, &n_joins, argv[++i], "--join-ns");
		else if (!strcmp(a, "--sysctl"))
			add(sysctls, &n_sysctls, argv[++i], "--sysctl");
		else if (!strcmp(a, "--device"))
			add(devices, &n_devices, argv[++i], "--device");
		else if (!strcmp(a, "--device-cgroup"))
			dev_default = argv[++i];
		else if (!strcmp(a, "--device-program-cache"))
			dev_cache = argv[++i];
		else if (!strcmp(a, "--device-rule"))
			add(dev_rules, &n_dev_rules, argv[++i], "--device-rule");
		else if (!strcmp(a, "--uid-map"))
			add(uid_maps, &n_uid_maps, argv[++i], "--uid-map");
		else if (!strcmp(a, "--gid-map"))
			add(gid_maps, &n_gid_maps, argv[++i], "--gid-map");
		else if (!strcmp(a, "--seccomp-default"))
			sc_default = argv[++i];
		else if (!strcmp(a, "--seccomp-arch"))
			add(sc_archs, &n_sc_archs, argv[++i], "--seccomp-arch");
		else if (!strcmp(a, "--seccomp-flag"))
			add(sc_flags, &n_sc_flags, argv[++i], "--seccomp-flag");
		else if (!strcmp(a, "--seccomp-syscall"))
			add(sc_rules, &n_sc_rules, argv[++i], "--seccomp-syscall");
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
	if (argc == 3 && !strcmp(argv[1], "--oom-events"))
		return oom_events(argv[2]);
	trace = getenv("VC_RUN_TRACE") != NULL;
	stamp("main");
	parse(argc, argv, &cmd);
	build_seccomp();
	check_maps();
	check_devices();
	check_sysctls();
	if (!join)
		build_device_program();
	mount_share();
	open_cgroup();
	stamp("checked");
	if (join) {
		enter();
		goto process;
	}
	attach_device_program();
	if (dev_len)
		stamp("devices");
	/* Before a user namespace of its own: the shared ones belong to the guest's. */
	int shared_pid = join_shared();
	open_pid_file();
	if (has_ns('U'))
		enter_userns();
	int flags = CLONE_NEWNS;
	if (has_ns('u'))
		flags |= CLONE_NEWUTS;
	if (has_ns('i'))
		flags |= CLONE_NEWIPC;
	if (has_ns('n'))
		flags |= CLONE_NEWNET;
	if (unshare(flags))
		die("unshare");
	stamp("unshared");
	if (has_ns('p') || shared_pid || isatty(0)) {
		if (has_ns('p') && !has_ns('U'))
			guest_pidns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
		if (has_ns('p') && unshare(CLONE_NEWPID))
			die("unshare pid namespace");
		prepare_console();
		if (pipe2(ready_pipe, O_CLOEXEC))
			die("pipe");
		child = fork();
		if (child < 0)
			die("fork");
		if (child > 0) {
			close(ready_pipe[1]);
			forward_signals();
			char made;
			ssize_t n;
			while ((n = read(ready_pipe[0], &made, 1)) < 0 && errno == EINTR)
				;
			close(ready_pipe[0]);
			if (n == 1)
				write_pid(child);
			int status = wait_child();
			stamp("reaped");
			leave_teardown_behind();
			return status;
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
		close(ready_pipe[0]);
	}
	stamp("forked");
	apply_sysctls();
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL))
		die("make mounts private");
	if (mount(rootfs, rootfs, NULL, MS_BIND | MS_REC, NULL))
		die("bind %s", rootfs);
	do_mount("proc", "proc", "/proc", "nosuid,nodev,noexec");
	stamp("proc");
	make_dev();
	make_devices(has_ns('U'));
	stamp("dev");
	if (has_ns('U') && !has_ns('n'))
		/* sysfs can be mounted only by the user namespace owning the network namespace */
		do_mount("bind", "/sys", "/sys", "rbind,ro,nosuid,nodev,noexec");
	else
		do_mount("sysfs", "sysfs", "/sys", "ro,nosuid,nodev,noexec");
	stamp("sys");
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
	stamp("rooted");
	if (chdir("/"))
		die("chdir /");
	if (readonly && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL))
		die("remount the root read-only");
process:
	make_console();
	join_cgroup();
	/* After joining the cgroup: it becomes the namespace's root. */
	if (!join && has_ns('c') && unshare(CLONE_NEWCGROUP))
		die("unshare cgroup namespace");
	apply_rlimits();
	if (chdir(cwd))
		die("working directory %s", cwd);
	if (!join)
		signal_ready(); /* before seccomp, which may not allow write(2) */
	if (caps)
		drop_bounding();
	if (!no_new_privs)
		load_seccomp(); /* while CAP_SYS_ADMIN is still held */
	apply_user();
	if (caps)
		apply_caps();
	if (no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		die("no_new_privs");
	load_seccomp();
	envs[n_envs] = NULL;
	stamp("exec");
	environ = envs;
	execvp(argv[cmd], argv + cmd);
	int e = errno;
	fprintf(stderr, "vc-run: %s: %s\n", argv[cmd], strerror(e));
	return e == ENOENT ? 127 : 126;
}
