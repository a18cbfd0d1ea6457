package sandbox

// The stub, in C. It runs from a constructor, before the Go runtime
// starts, in every process of this binary, and does nothing unless the
// environment marks the process as a stub (stubEnv). A stub never starts
// the Go runtime: it enters the user namespace if asked, speaks the
// protocol of stub.go on the control socket and replaces itself with the
// command, or exits. Starting this binary's Go runtime and package
// initialisers costs about 11 ms of CPU, once per action.
//
// The user namespace of a Nix action's builder, as Nix's sandbox gives it:
// the builder is uid 1000 and gid 100 in a user namespace that maps only
// these two ids, to the host build user and group of its sandbox, with
// setgroups denied. Everything owned by another host id (root's files,
// devices, /proc) shows as nobody/nogroup, the build group as nixbld.
//
// runc cannot make that namespace: as root it requires container uid 0 to
// be mapped and never denies setgroups. So the stub makes it itself, as
// the unprivileged build user, which may map exactly its own uid and gid.
// unshare(CLONE_NEWUSER) refuses multithreaded callers, and the Go runtime
// starts threads before any Go code runs, which is one more reason for C.
//
// The stub has every capability in its new namespace; it drops them all,
// including the bounding set, first. The namespace owns no other
// namespace (the container's mount, pid, uts, ipc and network namespaces
// belong to the host's), so nothing of the sandbox can be changed with
// them anyway. A stub that fails before it could report on the control
// socket exits with 126 and the reason on stderr, which the executor
// reports.

/*
#cgo CFLAGS: -Wall
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <termios.h>
#include <unistd.h>
#include <linux/capability.h>

#define TF_EXE_FD 3
#define TF_CTL_FD 4
#define TF_MAX_REQUEST (16 << 20)

// tf_fail_fd is where tf_fail reports: the control socket, or in a
// reusable sandbox's command process the pipe its zygote reads.
static int tf_fail_fd = TF_CTL_FD;

static void tf_write_all(int fd, const char *p, size_t n) {
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

// tf_early_fail reports on stderr and exits 126: the sandbox, not the
// command, failed.
static void tf_early_fail(const char *what) {
	int e = errno;
	char buf[512];
	int n = snprintf(buf, sizeof buf, "tvixfarm sandbox stub: user namespace: %s: %s\n", what, strerror(e));
	if (n > (int)sizeof buf - 1)
		n = sizeof buf - 1;
	if (n > 0)
		tf_write_all(2, buf, (size_t)n);
	_exit(126);
}

// tf_errstr is strerror as Go spells it (lower case), so messages read as
// the Go executor's do.
static const char *tf_errstr(int e) {
	static char buf[128];
	snprintf(buf, sizeof buf, "%s", strerror(e));
	buf[0] = (char)tolower((unsigned char)buf[0]);
	return buf;
}

// tf_fail reports why the command cannot start ('E' and the message) and
// exits 127: the command's own failure.
static void tf_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void tf_fail(const char *fmt, ...) {
	char buf[4096];
	buf[0] = 'E';
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf + 1, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	tf_write_all(tf_fail_fd, buf, (size_t)n + 1);
	_exit(127);
}

// tf_failfn reports a failure of the sandbox set-up and exits.
typedef void (*tf_failfn)(const char *what);

static void tf_write_file(const char *path, const char *data, tf_failfn fail) {
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		fail(path);
	size_t len = strlen(data);
	if (write(fd, data, len) != (ssize_t)len)
		fail(path);
	close(fd);
}

// tf_map_ids makes the calling process, just unshared or cloned into a
// new user namespace, inUID and inGID there, mapped to its host uid and
// gid, with setgroups denied.
static void tf_map_ids(unsigned inUID, unsigned inGID, unsigned uid, unsigned gid, tf_failfn fail) {
	char buf[64];
	tf_write_file("/proc/self/setgroups", "deny", fail);
	snprintf(buf, sizeof buf, "%u %u 1\n", inUID, uid);
	tf_write_file("/proc/self/uid_map", buf, fail);
	snprintf(buf, sizeof buf, "%u %u 1\n", inGID, gid);
	tf_write_file("/proc/self/gid_map", buf, fail);
}

// tf_drop_caps drops every capability, the bounding set included.
static void tf_drop_caps(tf_failfn fail) {
	for (int c = 0; c < 64; c++) {
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
			fail("drop the capability bounding set");
	}
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof data);
	if (syscall(SYS_capset, &hdr, data) < 0)
		fail("drop capabilities");
}

static void tf_userns(const char *ids) {
	unsigned int inUID, inGID;
	char extra;
	if (sscanf(ids, "%u:%u%c", &inUID, &inGID, &extra) != 2) {
		errno = EINVAL;
		tf_early_fail("_TVIXFARM_SANDBOX_USERNS");
	}
	unsigned int uid = geteuid(), gid = getegid();
	if (unshare(CLONE_NEWUSER) < 0)
		tf_early_fail("unshare (are unprivileged user namespaces disabled on this host?)");
	tf_map_ids(inUID, inGID, uid, gid, tf_early_fail);
	tf_drop_caps(tf_early_fail);
}

// tf_read_full reads exactly n bytes; 0 on success.
static int tf_read_full(int fd, void *p, size_t n) {
	char *c = p;
	while (n > 0) {
		ssize_t r = read(fd, c, n);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		c += r;
		n -= (size_t)r;
	}
	return 0;
}

// tf_req is a decoded request (see encodeStubRequest in stub.go).
struct tf_req {
	int pty;
	char *path, *dir;
	char **argv, **envp;
	int bad; // a string contains NUL: exec fails with EINVAL
};

struct tf_cursor {
	const unsigned char *p, *end;
};

static int tf_u32(struct tf_cursor *c, uint32_t *v) {
	if (c->end - c->p < 4)
		return -1;
	*v = (uint32_t)c->p[0] | (uint32_t)c->p[1] << 8 | (uint32_t)c->p[2] << 16 | (uint32_t)c->p[3] << 24;
	c->p += 4;
	return 0;
}

static char *tf_str(struct tf_cursor *c, int *bad) {
	uint32_t n;
	if (tf_u32(c, &n) < 0 || (uint64_t)(c->end - c->p) < n)
		tf_fail("bad request: truncated");
	char *s = malloc((size_t)n + 1);
	if (s == NULL)
		tf_fail("bad request: out of memory");
	memcpy(s, c->p, n);
	s[n] = 0;
	if (memchr(c->p, 0, n) != NULL)
		*bad = 1;
	c->p += n;
	return s;
}

static char **tf_strs(struct tf_cursor *c, int *bad) {
	uint32_t n;
	if (tf_u32(c, &n) < 0 || n > (uint32_t)(c->end - c->p) / 4)
		tf_fail("bad request: truncated");
	char **v = calloc((size_t)n + 1, sizeof *v);
	if (v == NULL)
		tf_fail("bad request: out of memory");
	for (uint32_t i = 0; i < n; i++)
		v[i] = tf_str(c, bad);
	return v;
}

static void tf_decode(const unsigned char *buf, size_t n, struct tf_req *r) {
	struct tf_cursor c = {buf, buf + n};
	memset(r, 0, sizeof *r);
	if (c.p == c.end)
		tf_fail("bad request: empty");
	r->pty = *c.p++ != 0;
	r->path = tf_str(&c, &r->bad);
	r->dir = tf_str(&c, &r->bad);
	r->argv = tf_strs(&c, &r->bad);
	r->envp = tf_strs(&c, &r->bad);
	if (c.p != c.end)
		tf_fail("bad request: trailing bytes");
}

// tf_executable is stub.go's executable: 0, or an errno with the failed
// operation in *op.
static int tf_executable(const char *p, const char **op) {
	struct stat st;
	if (stat(p, &st) < 0) {
		*op = "stat";
		return errno;
	}
	*op = "exec";
	if (S_ISDIR(st.st_mode))
		return EISDIR;
	if (access(p, X_OK) < 0)
		return errno;
	return 0;
}

// tf_lookpath is stub.go's lookPath.
static char *tf_lookpath(const char *p, char **envp) {
	const char *op;
	int e;
	if (*p == 0)
		tf_fail("empty program name");
	if (strchr(p, '/') != NULL) {
		if ((e = tf_executable(p, &op)) != 0)
			tf_fail("%s %s: %s", op, p, tf_errstr(e));
		return (char *)p;
	}
	const char *path = "";
	for (char **kv = envp; *kv != NULL; kv++) {
		if (strncmp(*kv, "PATH=", 5) == 0)
			path = *kv + 5;
	}
	const char *dir = path;
	for (;;) {
		const char *colon = strchr(dir, ':');
		size_t dl = colon ? (size_t)(colon - dir) : strlen(dir);
		char *cand = malloc(dl + strlen(p) + 3);
		if (cand == NULL)
			tf_fail("out of memory");
		if (dl == 0)
			sprintf(cand, "./%s", p);
		else
			sprintf(cand, "%.*s/%s", (int)dl, dir, p);
		if (tf_executable(cand, &op) == 0)
			return cand;
		free(cand);
		if (colon == NULL)
			break;
		dir = colon + 1;
	}
	tf_fail("%s: command not found in PATH \"%s\"", p, path);
}

// tf_pty opens a pseudo-terminal pair in the sandbox's own devpts (so the
// command sees /dev/pts/0) in raw mode, so the log keeps tabs, CRs and
// newlines byte-exact, hands the master to the executor ('P' with
// SCM_RIGHTS) and makes the slave the command's stdout and stderr.
static void tf_pty(void) {
	int master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (master < 0)
		tf_fail("pty: open /dev/ptmx: %s", tf_errstr(errno));
	int unlock = 0, n;
	if (ioctl(master, TIOCSPTLCK, &unlock) < 0)
		tf_fail("pty: unlockpt: %s", tf_errstr(errno));
	if (ioctl(master, TIOCGPTN, &n) < 0)
		tf_fail("pty: ptsname: %s", tf_errstr(errno));
	char name[64];
	snprintf(name, sizeof name, "/dev/pts/%d", n);
	int slave = open(name, O_RDWR | O_NOCTTY);
	if (slave < 0)
		tf_fail("pty: open %s: %s", name, tf_errstr(errno));
	struct termios t;
	if (tcgetattr(slave, &t) < 0)
		tf_fail("pty: tcgetattr: %s", tf_errstr(errno));
	cfmakeraw(&t);
	if (tcsetattr(slave, TCSANOW, &t) < 0)
		tf_fail("pty: tcsetattr: %s", tf_errstr(errno));
	char tag = 'P';
	struct iovec iov = {&tag, 1};
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	memset(&u, 0, sizeof u);
	struct msghdr msg = {0};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = u.buf;
	msg.msg_controllen = sizeof u.buf;
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &master, sizeof(int));
	if (sendmsg(TF_CTL_FD, &msg, 0) < 0)
		_exit(126);
	close(master);
	dup2(slave, 1);
	dup2(slave, 2);
	close(slave);
}

// A reusable sandbox (stubReuseEnv): the stub stays, as a zygote, and
// runs each command in a process of its own, cloned into new user, mount,
// pid, ipc, uts and network namespaces, as Nix's sandbox clones its
// builder. The container (runc's namespaces, cgroup, seccomp filter,
// read-only root, no capabilities, no_new_privs) is made once and serves
// one command after another; what a command could leave behind is its
// namespaces' and dies with them: its processes (the clone is pid 1 of
// its pid namespace, so the kernel kills the rest when it exits), SysV
// IPC, sockets, /proc and /dev/pts. The executor empties the writable
// directories, /tmp and the container's /dev/shm between commands.
//
// Protocol on the control socket, after 'R' (ready):
//
//	executor → stub: uint32 length, request, with SCM_RIGHTS(stdout, stderr)
//	stub → executor: 'P' + SCM_RIGHTS(master)   only for PTY requests
//	stub → executor: 'S'                        the command was exec'ed, or
//	                 'E' uint32 n, message      the command cannot start (exit 127), or
//	                 'F' uint32 n, message      the sandbox failed
//	stub → executor: 'X' uint32 wait status, uint64 user µs, system µs, max RSS KiB
//	                                            (after 'S' or 'E')
//	stub → executor: 'R'                        ready for the next command

// tf_sbfail reports, from a command process of a reusable sandbox, that
// the sandbox itself failed ('F'), and exits 126.
static void tf_sbfail(const char *what) __attribute__((noreturn));
static void tf_sbfail(const char *what) {
	int e = errno;
	char buf[512];
	int n = snprintf(buf, sizeof buf, "F%s: %s", what, tf_errstr(e));
	if (n > (int)sizeof buf - 1)
		n = sizeof buf - 1;
	if (n > 0)
		tf_write_all(tf_fail_fd, buf, (size_t)n);
	_exit(126);
}

// The container's /proc is not masked (a new procfs can only be mounted
// where an unmasked one is visible); each command's own /proc is, with
// the lists of spec() in runc.go.
static const char *tf_masked[] = {"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
	"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", NULL};
static const char *tf_readonly[] = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger", NULL};

// tf_child sets up a command process's namespaces and execs the command.
static void tf_child(const unsigned char *buf, size_t n, int out, int err, unsigned inUID, unsigned inGID, unsigned uid, unsigned gid) __attribute__((noreturn));
static void tf_child(const unsigned char *buf, size_t n, int out, int err, unsigned inUID, unsigned inGID, unsigned uid, unsigned gid) {
	tf_map_ids(inUID, inGID, uid, gid, tf_sbfail);
	if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
		tf_sbfail("make the mounts slaves");
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL) < 0)
		tf_sbfail("mount /proc");
	for (const char **p = tf_masked; *p != NULL; p++) {
		struct stat st;
		if (stat(*p, &st) < 0)
			continue;
		if (S_ISDIR(st.st_mode)) {
			if (mount("tmpfs", *p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=0") < 0)
				tf_sbfail(*p);
		} else if (mount("/dev/null", *p, NULL, MS_BIND, NULL) < 0) {
			tf_sbfail(*p);
		}
	}
	for (const char **p = tf_readonly; *p != NULL; p++) {
		struct stat st;
		if (stat(*p, &st) < 0)
			continue;
		if (mount(*p, *p, NULL, MS_BIND | MS_REC, NULL) < 0 ||
		    mount(*p, *p, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
			tf_sbfail(*p);
	}
	if (mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") < 0)
		tf_sbfail("mount /dev/pts");
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		tf_sbfail("socket");
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
		tf_sbfail("lo flags");
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
		tf_sbfail("bring lo up");
	close(s);
	tf_drop_caps(tf_sbfail);

	struct tf_req r;
	tf_decode(buf, n, &r);
	if (chdir(r.dir) < 0)
		tf_fail("working directory %s: %s", r.dir, tf_errstr(errno));
	setsid();
	int null = open("/dev/null", O_RDONLY);
	if (null < 0)
		tf_fail("open /dev/null: %s", tf_errstr(errno));
	dup2(null, 0);
	close(null);
	dup2(out, 1);
	dup2(err, 2);
	close(out);
	close(err);
	if (r.pty)
		tf_pty();
	char *prog = tf_lookpath(r.path, r.envp);
	if (r.bad)
		tf_fail("exec %s: %s", r.path, tf_errstr(EINVAL));
	execve(prog, r.argv, r.envp);
	tf_fail("exec %s: %s", r.path, tf_errstr(errno));
}

// tf_recv_len reads the 4-byte length of a request and the two file
// descriptors sent with it; -1 at EOF or on error.
static int tf_recv_len(unsigned char len[4], int fds[2]) {
	union {
		char buf[CMSG_SPACE(2 * sizeof(int))];
		struct cmsghdr align;
	} u;
	size_t got = 0;
	fds[0] = fds[1] = -1;
	while (got < 4) {
		struct iovec iov = {len + got, 4 - got};
		struct msghdr msg = {0};
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = u.buf;
		msg.msg_controllen = sizeof u.buf;
		ssize_t r = recvmsg(TF_CTL_FD, &msg, MSG_CMSG_CLOEXEC);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
			if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
				size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				int *v = (int *)CMSG_DATA(cm);
				for (size_t i = 0; i < k; i++) {
					if (i < 2 && fds[i] < 0)
						fds[i] = v[i];
					else
						close(v[i]);
				}
			}
		}
		got += (size_t)r;
	}
	return 0;
}

static void tf_send_framed(char tag, const char *p, size_t n) {
	unsigned char h[5] = {(unsigned char)tag, (unsigned char)n, (unsigned char)(n >> 8), (unsigned char)(n >> 16), (unsigned char)(n >> 24)};
	tf_write_all(TF_CTL_FD, (const char *)h, 5);
	tf_write_all(TF_CTL_FD, p, n);
}

static void tf_put64(unsigned char *b, uint64_t v) {
	for (int i = 0; i < 8; i++)
		b[i] = (unsigned char)(v >> (8 * i));
}

static void tf_zygote(const char *ids) __attribute__((noreturn));
static void tf_zygote(const char *ids) {
	unsigned int inUID, inGID;
	char extra;
	if (sscanf(ids, "%u:%u%c", &inUID, &inGID, &extra) != 2) {
		errno = EINVAL;
		tf_early_fail("_TVIXFARM_SANDBOX_REUSE");
	}
	unsigned int uid = geteuid(), gid = getegid();
	close(TF_EXE_FD);
	fcntl(TF_CTL_FD, F_SETFD, FD_CLOEXEC);
	for (;;) {
		if (write(TF_CTL_FD, "R", 1) != 1)
			_exit(126);
		unsigned char len[4];
		int fds[2];
		if (tf_recv_len(len, fds) < 0)
			_exit(0); // the executor closed the socket: the sandbox is being destroyed
		uint32_t n = (uint32_t)len[0] | (uint32_t)len[1] << 8 | (uint32_t)len[2] << 16 | (uint32_t)len[3] << 24;
		if (n > TF_MAX_REQUEST || fds[0] < 0 || fds[1] < 0)
			_exit(126);
		unsigned char *buf = malloc(n ? n : 1);
		if (buf == NULL || tf_read_full(TF_CTL_FD, buf, n) < 0)
			_exit(126);
		int p[2];
		if (pipe2(p, O_CLOEXEC) < 0)
			_exit(126);
		pid_t pid = (pid_t)syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS | SIGCHLD, 0, 0, 0, 0);
		if (pid == 0) {
			close(p[0]);
			tf_fail_fd = p[1];
			tf_child(buf, n, fds[0], fds[1], inUID, inGID, uid, gid);
		}
		int cloneErr = errno;
		close(p[1]);
		close(fds[0]);
		close(fds[1]);
		free(buf);
		if (pid < 0) {
			close(p[0]);
			char m[256];
			int k = snprintf(m, sizeof m, "clone the command's namespaces: %s", tf_errstr(cloneErr));
			tf_send_framed('F', m, (size_t)k);
			continue;
		}
		// The pipe closes when the command is exec'ed, or after the
		// command process's report.
		static char msg[4096];
		size_t m = 0;
		for (;;) {
			char chunk[512];
			ssize_t r = read(p[0], chunk, sizeof chunk);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				break;
			size_t c = (size_t)r;
			if (c > sizeof msg - m)
				c = sizeof msg - m;
			memcpy(msg + m, chunk, c);
			m += c;
		}
		close(p[0]);
		if (m == 0)
			tf_write_all(TF_CTL_FD, "S", 1);
		else
			tf_send_framed(msg[0] == 'F' ? 'F' : 'E', msg + 1, m - 1);
		int st;
		struct rusage ru;
		while (wait4(pid, &st, 0, &ru) < 0) {
			if (errno != EINTR)
				_exit(126);
		}
		unsigned char x[29];
		x[0] = 'X';
		x[1] = (unsigned char)st;
		x[2] = (unsigned char)(st >> 8);
		x[3] = (unsigned char)(st >> 16);
		x[4] = (unsigned char)(st >> 24);
		tf_put64(x + 5, (uint64_t)ru.ru_utime.tv_sec * 1000000 + (uint64_t)ru.ru_utime.tv_usec);
		tf_put64(x + 13, (uint64_t)ru.ru_stime.tv_sec * 1000000 + (uint64_t)ru.ru_stime.tv_usec);
		tf_put64(x + 21, (uint64_t)ru.ru_maxrss);
		tf_write_all(TF_CTL_FD, (const char *)x, sizeof x);
	}
}

// glibc passes argc, argv and envp to constructors, in static binaries too.
__attribute__((constructor)) static void tvixfarm_stub(int argc, char **argv, char **envp) {
	const char *stub = getenv("_TVIXFARM_SANDBOX_STUB");
	if (stub == NULL || strcmp(stub, "1") != 0 || argc < 2 || strcmp(argv[1], "sandbox-stub") != 0)
		return;
	const char *reuse = getenv("_TVIXFARM_SANDBOX_REUSE");
	if (reuse != NULL)
		tf_zygote(reuse);
	const char *ids = getenv("_TVIXFARM_SANDBOX_USERNS");
	if (ids != NULL)
		tf_userns(ids);
	close(TF_EXE_FD);
	if (write(TF_CTL_FD, "R", 1) != 1)
		_exit(126);
	unsigned char len[4];
	if (tf_read_full(TF_CTL_FD, len, 4) < 0)
		_exit(126); // the executor went away: this sandbox is being destroyed
	uint32_t n = (uint32_t)len[0] | (uint32_t)len[1] << 8 | (uint32_t)len[2] << 16 | (uint32_t)len[3] << 24;
	if (n > TF_MAX_REQUEST)
		tf_fail("request too large");
	unsigned char *buf = malloc(n ? n : 1);
	if (buf == NULL)
		tf_fail("out of memory");
	if (tf_read_full(TF_CTL_FD, buf, n) < 0)
		_exit(126);
	struct tf_req r;
	tf_decode(buf, n, &r);
	if (chdir(r.dir) < 0)
		tf_fail("working directory %s: %s", r.dir, tf_errstr(errno));
	setsid();
	int null = open("/dev/null", O_RDONLY);
	if (null < 0)
		tf_fail("open /dev/null: %s", tf_errstr(errno));
	dup2(null, 0);
	close(null);
	if (r.pty)
		tf_pty();
	char *prog = tf_lookpath(r.path, r.envp);
	if (r.bad)
		tf_fail("exec %s: %s", r.path, tf_errstr(EINVAL));
	// The control socket must not survive into the command: its closing
	// tells the executor that the exec happened.
	fcntl(TF_CTL_FD, F_SETFD, FD_CLOEXEC);
	execve(prog, r.argv, r.envp);
	tf_fail("exec %s: %s", r.path, tf_errstr(errno));
}
*/
import "C"

// stubUsernsEnv, set in the stub's environment to "UID:GID", makes the
// stub enter a user namespace in which its host uid and gid are UID and
// GID.
const stubUsernsEnv = "_TVIXFARM_SANDBOX_USERNS"

// stubReuseEnv, set to "UID:GID" instead of stubUsernsEnv, makes the stub
// a zygote that runs one command after another, each in new namespaces
// with a user namespace in which it is UID and GID (see tf_zygote).
const stubReuseEnv = "_TVIXFARM_SANDBOX_REUSE"
