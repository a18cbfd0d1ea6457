package sandbox

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// The stub is the first program of every container: runc sets the
// container up (namespaces, mounts, cgroup, user, capabilities, seccomp)
// and executes the stub as pid 1, which then waits for the command on a
// control socket and replaces itself with it by execve. This lets a
// sandbox be created before its command is known, so the ~25 ms of runc's
// setup are paid ahead of time, without weakening isolation: the stub is
// already confined exactly as the command will be, and nothing of it
// survives the execve.
//
// The stub is this very binary (runc executes /proc/self/fd/3, an fd of
// the executor's own executable), written in C and run from a constructor
// before the Go runtime starts (stubc.go). A stub of the Chroot layout (a
// Nix action) first enters a user namespace of its own in which it is uid
// 1000 and gid 100; so is the command it execs.
//
// Protocol on fd 4 (a unix stream socket, the other end held by the
// executor):
//
//	stub → executor: 'R'                       ready
//	executor → stub: uint32 length, request    (encodeStubRequest)
//	stub → executor: 'P' + SCM_RIGHTS(master)  only for PTY requests
//	stub → executor: 'E' + message             when the command cannot start
//	EOF                                        the command was exec'ed
//
// A reusable sandbox's stub (reuse.go) speaks the zygote protocol of
// tf_zygote in stubc.go instead: it stays, and clones each command into
// new namespaces.
const (
	stubEnv   = "_TVIXFARM_SANDBOX_STUB"
	stubExeFd = 3
	stubCtlFd = 4
)

// stubRequest is what the executor sends the stub.
type stubRequest struct {
	Path string // program to execve, absolute or relative to Dir
	Args []string
	Env  []string
	Dir  string // absolute, inside the sandbox
	PTY  bool
}

// maxStubRequest bounds a request (Linux's ARG_MAX is 2 MiB for argv+env).
const maxStubRequest = 16 << 20

// encodeStubRequest frames r for the stub: a little-endian uint32 length,
// then a PTY byte, Path and Dir, then Args and Env as a uint32 count and
// strings; each string is a uint32 length and its bytes.
func encodeStubRequest(r stubRequest) []byte {
	n := 4 + 1 + 8 + len(r.Path) + len(r.Dir) + 8
	for _, s := range r.Args {
		n += 4 + len(s)
	}
	for _, s := range r.Env {
		n += 4 + len(s)
	}
	b := make([]byte, 4, n)
	pty := byte(0)
	if r.PTY {
		pty = 1
	}
	b = append(b, pty)
	str := func(s string) {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	str(r.Path)
	str(r.Dir)
	for _, l := range [][]string{r.Args, r.Env} {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(l)))
		for _, s := range l {
			str(s)
		}
	}
	binary.LittleEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

// lookPath resolves the program as REAPI specifies: a path with a slash
// is used as is (relative to the working directory), a bare name is
// searched in the command's own PATH.
func lookPath(p string, env []string) (string, error) {
	if p == "" {
		return "", errors.New("empty program name")
	}
	if strings.Contains(p, "/") {
		if err := executable(p); err != nil {
			return "", err
		}
		return p, nil
	}
	var pathVar string
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathVar = v
		}
	}
	for _, dir := range filepath.SplitList(pathVar) {
		if dir == "" {
			dir = "."
		}
		c := filepath.Join(dir, p)
		if executable(c) == nil {
			return c, nil
		}
	}
	return "", fmt.Errorf("%s: command not found in PATH %q", p, pathVar)
}

func executable(p string) error {
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		return &os.PathError{Op: "stat", Path: p, Err: err}
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return &os.PathError{Op: "exec", Path: p, Err: syscall.EISDIR}
	}
	if err := unix.Access(p, unix.X_OK); err != nil {
		return &os.PathError{Op: "exec", Path: p, Err: err}
	}
	return nil
}
