package sandbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Unsandboxed runs commands as plain child processes in their input root,
// with no namespaces, no cgroup and the host's network. It exists only for
// development on machines without runc, is chosen explicitly in the
// configuration, and refuses what it cannot give: Nix actions (they need
// the input root as their root file system), an explicit request for no
// network, resource limits and a pty. Run as root, it runs commands as
// uid 1000 (the hardlinked inputs must stay read-only to them); the path
// to its directory must then be searchable by that user.
type Unsandboxed struct {
	slots   string
	trash   *trash
	cancel  context.CancelFunc
	trashWG sync.WaitGroup
	mu      sync.Mutex
	n       int
}

// NewUnsandboxed creates the development backend in dir. It logs a loud
// warning: builds can see and change the whole machine.
func NewUnsandboxed(dir string, log *slog.Logger) (*Unsandboxed, error) {
	if log == nil {
		log = slog.Default()
	}
	log.Warn("SANDBOX DISABLED: actions run as plain processes that can read the whole machine and use its network; use only for development")
	u := &Unsandboxed{slots: filepath.Join(dir, "slots")}
	if err := os.MkdirAll(u.slots, 0o711); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	os.Chmod(dir, 0o711) // the build user must reach its directory
	os.Chmod(u.slots, 0o711)
	var ctx context.Context
	ctx, u.cancel = context.WithCancel(context.Background())
	var err error
	if u.trash, err = newTrash(ctx, filepath.Join(dir, "trash"), log, &u.trashWG); err != nil {
		return nil, err
	}
	old, _ := os.ReadDir(u.slots)
	for _, e := range old {
		u.trash.put(filepath.Join(u.slots, e.Name()))
	}
	return u, nil
}

// Acquire returns a directory for the input root, or refuses the shape.
func (u *Unsandboxed) Acquire(ctx context.Context, s Shape) (Instance, error) {
	switch {
	case s.Layout == Chroot:
		return nil, fmt.Errorf("the input root as root file system (Nix actions): %w", ErrUnsupported)
	case s.Network == NetworkNone:
		return nil, fmt.Errorf("network isolation: %w", ErrUnsupported)
	case s.Limits != (Limits{}):
		return nil, fmt.Errorf("resource limits: %w", ErrUnsupported)
	case s.Overlay != "":
		return nil, fmt.Errorf("overlays: %w", ErrUnsupported)
	}
	if err := s.Normalize(); err != nil {
		return nil, err
	}
	u.mu.Lock()
	u.n++
	dir := filepath.Join(u.slots, fmt.Sprintf("u%d-%d", os.Getpid(), u.n))
	u.mu.Unlock()
	in := &plainInstance{u: u, dir: dir, root: filepath.Join(dir, "root")}
	if err := os.MkdirAll(in.root, 0o755); err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	for _, w := range s.Writable {
		if err := os.MkdirAll(filepath.Join(in.root, w), 0o755); err != nil {
			return nil, fmt.Errorf("sandbox: %w", err)
		}
	}
	return in, nil
}

// Close waits for background removal of directories.
func (u *Unsandboxed) Close() error {
	u.cancel()
	u.trashWG.Wait()
	return nil
}

type plainInstance struct {
	u         *Unsandboxed
	dir, root string
}

func (in *plainInstance) InputRoot() string { return in.root }

// BuildUser is uid 1000 and gid 100, which Run uses when it runs as root.
func (in *plainInstance) BuildUser() (uid, gid int) { return UID, GID }

// Overlay is not supported: Acquire refuses shapes with an overlay.
func (in *plainInstance) Overlay(layers []string, done func()) error {
	if done != nil {
		done()
	}
	return fmt.Errorf("overlays: %w", ErrUnsupported)
}

func (in *plainInstance) Run(ctx context.Context, c *Command) (*Result, error) {
	if c.PTY {
		return nil, fmt.Errorf("pty: %w", ErrUnsupported)
	}
	if len(c.Args) == 0 {
		return nil, errors.New("sandbox: no command")
	}
	res := &Result{Stdout: filepath.Join(in.dir, "stdout"), Stderr: filepath.Join(in.dir, "stderr")}
	stdout, err := os.Create(res.Stdout)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer stdout.Close()
	stderr, err := os.Create(res.Stderr)
	if err != nil {
		return nil, fmt.Errorf("sandbox: %w", err)
	}
	defer stderr.Close()
	dir := filepath.Join(in.root, c.Dir)
	prog := c.Args[0]
	if strings.Contains(prog, "/") {
		if !filepath.IsAbs(prog) {
			prog = filepath.Join(dir, prog)
		}
	} else if prog, err = lookPath(prog, c.Env); err != nil {
		fmt.Fprintf(stderr, "tvixfarm sandbox: %v\n", err)
		res.ExitCode = 127
		return res, nil
	}
	args := append([]string(nil), c.Args...)
	if c.Argv0 != "" {
		args[0] = c.Argv0
	}
	cmd := &exec.Cmd{Path: prog, Args: args, Env: c.Env, Dir: dir, Stdout: stdout, Stderr: stderr,
		SysProcAttr: &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}}
	if os.Geteuid() == 0 {
		// As root the build could write through the hardlinks into the
		// input cache: run it as the sandbox user.
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: UID, Gid: GID}
	}
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(stderr, "tvixfarm sandbox: %v\n", err)
		res.ExitCode = 127
		return res, nil
	}
	res.Started = time.Now()
	res.Timings.Start = res.Started.Sub(t0)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var timer <-chan time.Time
	if c.Timeout > 0 {
		t := time.NewTimer(c.Timeout)
		defer t.Stop()
		timer = t.C
	}
	kill := func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	select {
	case <-done:
	case <-timer:
		res.TimedOut = true
		kill()
		<-done
	case <-ctx.Done():
		kill()
		<-done
		return nil, ctx.Err()
	}
	res.Exited = time.Now()
	res.setExit(cmd.ProcessState)
	return res, nil
}

func (in *plainInstance) Release() { in.u.trash.put(in.dir) }
