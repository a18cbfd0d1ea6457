package sandbox

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
// starts threads before any Go code runs, so this is C, in a constructor
// that runs before the runtime (as runc's nsenter does). It runs in every
// process of this binary and does nothing unless the environment marks it
// as a stub that wants a user namespace.
//
// The stub has every capability in its new namespace; it drops them all,
// including the bounding set, before any Go code runs. The namespace owns
// no other namespace (the container's mount, pid, uts, ipc and network
// namespaces belong to the host's), so nothing of the sandbox can be
// changed with them anyway. On failure the stub exits with 126 and the
// reason on stderr, which the executor reports.

/*
#cgo CFLAGS: -Wall
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>

static void tvixfarm_userns_fail(const char *what) {
	int e = errno;
	char buf[512];
	int n = snprintf(buf, sizeof buf, "tvixfarm sandbox stub: user namespace: %s: %s\n", what, strerror(e));
	if (n > (int)sizeof buf - 1)
		n = sizeof buf - 1;
	if (n > 0) {
		ssize_t w = write(2, buf, n);
		(void)w;
	}
	_exit(126);
}

static void tvixfarm_userns_write(const char *path, const char *data) {
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		tvixfarm_userns_fail(path);
	size_t len = strlen(data);
	if (write(fd, data, len) != (ssize_t)len)
		tvixfarm_userns_fail(path);
	close(fd);
}

__attribute__((constructor)) static void tvixfarm_stub_userns(void) {
	const char *stub = getenv("_TVIXFARM_SANDBOX_STUB");
	const char *ids = getenv("_TVIXFARM_SANDBOX_USERNS");
	if (stub == NULL || strcmp(stub, "1") != 0 || ids == NULL)
		return;
	unsigned int inUID, inGID;
	char extra;
	if (sscanf(ids, "%u:%u%c", &inUID, &inGID, &extra) != 2) {
		errno = EINVAL;
		tvixfarm_userns_fail("_TVIXFARM_SANDBOX_USERNS");
	}
	unsigned int uid = geteuid(), gid = getegid();
	if (unshare(CLONE_NEWUSER) < 0)
		tvixfarm_userns_fail("unshare (are unprivileged user namespaces disabled on this host?)");
	char buf[64];
	tvixfarm_userns_write("/proc/self/setgroups", "deny");
	snprintf(buf, sizeof buf, "%u %u 1\n", inUID, uid);
	tvixfarm_userns_write("/proc/self/uid_map", buf);
	snprintf(buf, sizeof buf, "%u %u 1\n", inGID, gid);
	tvixfarm_userns_write("/proc/self/gid_map", buf);
	for (int c = 0; c < 64; c++) {
		if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) < 0 && errno != EINVAL)
			tvixfarm_userns_fail("drop the capability bounding set");
	}
	struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct data[2];
	memset(data, 0, sizeof data);
	if (syscall(SYS_capset, &hdr, data) < 0)
		tvixfarm_userns_fail("drop capabilities");
}
*/
import "C"

// stubUsernsEnv, set in the stub's environment to "UID:GID", makes the
// constructor above give it a user namespace in which its host uid and
// gid are UID and GID.
const stubUsernsEnv = "_TVIXFARM_SANDBOX_USERNS"
