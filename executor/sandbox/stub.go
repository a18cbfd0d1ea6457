package sandbox

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
// the executor's own executable), entered through init() below before
// main runs. A stub of the Chroot layout (a Nix action) has first, before
// the Go runtime started, entered a user namespace of its own in which it
// is uid 1000 and gid 100 (userns.go); so is the command it execs.
//
// Protocol on fd 4 (a unix stream socket, the other end held by the
// executor):
//
//	stub → executor: 'R'                       ready
//	executor → stub: uint32 length, JSON stubRequest
//	stub → executor: 'P' + SCM_RIGHTS(master)  only for PTY requests
//	stub → executor: 'E' + message             when the command cannot start
//	EOF                                        the command was exec'ed
const (
	stubEnv   = "_TVIXFARM_SANDBOX_STUB"
	stubExeFd = 3
	stubCtlFd = 4
)

// stubRequest is what the executor sends the stub.
type stubRequest struct {
	Path string   `json:"path"` // program to execve, absolute or relative to Dir
	Args []string `json:"args"`
	Env  []string `json:"env"`
	Dir  string   `json:"dir"` // absolute, inside the sandbox
	PTY  bool     `json:"pty"`
}

// maxStubRequest bounds a request (Linux's ARG_MAX is 2 MiB for argv+env;
// JSON escaping can grow it).
const maxStubRequest = 16 << 20

func init() {
	if os.Getenv(stubEnv) == "1" && len(os.Args) > 1 && os.Args[1] == "sandbox-stub" {
		stubMain()
	}
}

// stubMain never returns.
func stubMain() {
	unix.Close(stubExeFd)
	ctl := os.NewFile(stubCtlFd, "ctl")
	fail := func(format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		ctl.Write(append([]byte{'E'}, msg...))
		os.Exit(127)
	}
	if _, err := ctl.Write([]byte{'R'}); err != nil {
		os.Exit(126)
	}
	var n uint32
	if err := binary.Read(ctl, binary.LittleEndian, &n); err != nil {
		os.Exit(126) // the executor went away: this sandbox is being destroyed
	}
	if n > maxStubRequest {
		fail("request too large")
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(ctl, buf); err != nil {
		os.Exit(126)
	}
	var req stubRequest
	if err := json.Unmarshal(buf, &req); err != nil {
		fail("bad request: %v", err)
	}
	if err := unix.Chdir(req.Dir); err != nil {
		fail("working directory %s: %v", req.Dir, err)
	}
	unix.Setsid()
	null, err := unix.Open("/dev/null", unix.O_RDONLY, 0)
	if err != nil {
		fail("open /dev/null: %v", err)
	}
	unix.Dup2(null, 0)
	unix.Close(null)
	if req.PTY {
		master, slave, err := openPTY()
		if err != nil {
			fail("pty: %v", err)
		}
		rights := unix.UnixRights(master)
		if err := unix.Sendmsg(stubCtlFd, []byte{'P'}, rights, nil, 0); err != nil {
			os.Exit(126)
		}
		unix.Close(master)
		unix.Dup2(slave, 1)
		unix.Dup2(slave, 2)
		unix.Close(slave)
	}
	prog, err := lookPath(req.Path, req.Env)
	if err != nil {
		fail("%v", err)
	}
	// The control socket must not survive into the command: its closing
	// tells the executor that the exec happened.
	unix.CloseOnExec(stubCtlFd)
	err = unix.Exec(prog, req.Args, req.Env)
	fail("exec %s: %v", req.Path, err)
}

// openPTY opens a pseudo-terminal pair in the sandbox's own devpts (so
// the command sees /dev/pts/0, as under Nix) and puts it in raw mode, so
// the log keeps tabs, CRs and newlines byte-exact.
func openPTY() (master, slave int, err error) {
	master, err = unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, -1, err
	}
	if err := unix.IoctlSetPointerInt(master, unix.TIOCSPTLCK, 0); err != nil {
		return -1, -1, fmt.Errorf("unlockpt: %w", err)
	}
	n, err := unix.IoctlGetInt(master, unix.TIOCGPTN)
	if err != nil {
		return -1, -1, fmt.Errorf("ptsname: %w", err)
	}
	slave, err = unix.Open(fmt.Sprintf("/dev/pts/%d", n), unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, -1, err
	}
	t, err := unix.IoctlGetTermios(slave, unix.TCGETS)
	if err != nil {
		return -1, -1, err
	}
	// cfmakeraw
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	if err := unix.IoctlSetTermios(slave, unix.TCSETS, t); err != nil {
		return -1, -1, err
	}
	return master, slave, nil
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
