// Package sandbox runs one command in an isolated environment whose root
// file system is (or contains) a directory the caller has filled with the
// action's input root.
//
// The interface is split in two steps because creating a sandbox is the
// expensive part (runc's namespaces, mounts and cgroups cost ~25 ms here)
// and does not depend on the command: Acquire hands out a sandbox of a given
// Shape, possibly prepared ahead of time, whose InputRoot the caller fills;
// Run then starts the command in it. The libcontainer backend keeps a pool
// of prepared sandboxes per Shape; see runc.go.
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"
	"syscall"
	"time"
)

// The identity a sandboxed command has: Nix's nixbld user and group. A
// Nix action (the Chroot layout) has it inside a user namespace of its
// own, as under Nix: there it is uid 1000 and gid 100, mapped to a host
// build user and group of the backend (Instance.BuildUser), and every
// other host id shows as nobody (65534) and nogroup (65534). Other
// actions run as host uid 1000 and gid 100, with no user namespace.
const (
	UID = 1000
	GID = 100
)

// Layout says how the input root appears inside the sandbox.
type Layout uint8

const (
	// Chroot makes the input root the sandbox's root file system, as
	// Buildbarn's chroot_into_input_root does: absolute paths such as
	// /nix/store/<hash>-busybox/bin/sh and /build resolve inside it, and
	// nothing of the host is visible. Nix actions use it.
	Chroot Layout = iota
	// HostRoot mounts the input root at InputRootPath on top of a
	// read-only root file system made of the host directories the
	// backend is configured with (/usr, /bin, /lib*, /etc essentials).
	// Other REAPI actions (Bazel, rexec) use it: they expect /bin/bash.
	HostRoot
)

// InputRootPath is where the HostRoot layout mounts the input root.
const InputRootPath = "/work"

// String names the layout in messages.
func (l Layout) String() string {
	if l == HostRoot {
		return "host-root"
	}
	return "chroot"
}

// Network says which network a sandbox sees.
type Network uint8

const (
	// NetworkDefault is a private network namespace with only lo: the
	// action did not ask for anything.
	NetworkDefault Network = iota
	// NetworkNone is a private network namespace with only lo, asked for
	// explicitly (a backend that cannot isolate refuses it).
	NetworkNone
	// NetworkHost shares the host's network, for fixed-output derivations:
	// the sandbox also gets the host's resolv.conf, hosts and services and
	// an nsswitch.conf, as Nix gives them.
	NetworkHost
)

// Limits bound the resources of one sandbox. Zero means the backend's
// default.
type Limits struct {
	// MemoryBytes is the memory limit; exceeding it OOM-kills the build.
	MemoryBytes int64
	// Pids bounds the number of processes and threads.
	Pids int64
	// CPUs bounds CPU time, in cores (1.5 = one and a half cores).
	CPUs float64
}

// Shape is everything that is fixed when a sandbox is created: the
// layout, the network and which directories are writable. Sandboxes of
// equal shape are interchangeable, so a backend may prepare them before
// the action that needs one arrives.
type Shape struct {
	Layout  Layout
	Network Network
	// Writable lists directories, relative to the input root, that the
	// command may write to (its working directory and the parents of its
	// outputs). Everything else of the input root is mounted read-only.
	// "" means the whole input root. Acquire creates missing ones.
	Writable []string
	// Overlay, if set, is a directory relative to the input root (such
	// as "nix/store", which must also be Writable) where the caller will
	// mount an overlay of read-only layers with Instance.Overlay. Its
	// contents are then what the command sees there; what the command
	// writes goes to an upper layer private to the sandbox.
	Overlay string
	// Limits are applied when the command starts; they do not change the
	// shape, since they can be set on a prepared sandbox.
	Limits Limits
}

// Key identifies the shape for pooling (limits excluded).
func (s Shape) Key() string {
	return fmt.Sprintf("%s/%d/%s/%s", s.Layout, s.Network, s.Overlay, strings.Join(s.Writable, "\x00"))
}

// Normalize cleans and validates Writable: relative, no "..", sorted, and
// without directories nested in another listed one.
func (s *Shape) Normalize() error {
	ws := make([]string, 0, len(s.Writable))
	for _, w := range s.Writable {
		c := path.Clean("/" + w)[1:]
		if w != "" && (path.IsAbs(w) || c != strings.TrimSuffix(w, "/")) {
			return fmt.Errorf("writable directory %q is not a clean relative path", w)
		}
		ws = append(ws, c)
	}
	slices.Sort(ws)
	ws = slices.Compact(ws)
	out := ws[:0]
	for _, w := range ws {
		if len(out) > 0 && within(w, out[len(out)-1]) {
			continue
		}
		out = append(out, w)
	}
	s.Writable = out
	if s.Overlay != "" {
		if c := path.Clean("/" + s.Overlay)[1:]; path.IsAbs(s.Overlay) || c != s.Overlay {
			return fmt.Errorf("overlay directory %q is not a clean relative path", s.Overlay)
		}
		if !slices.ContainsFunc(s.Writable, func(w string) bool { return within(s.Overlay, w) }) {
			return fmt.Errorf("overlay directory %q is not writable", s.Overlay)
		}
	}
	return nil
}

// within reports whether p is dir or below it ("" is the root).
func within(p, dir string) bool {
	return dir == "" || p == dir || strings.HasPrefix(p, dir+"/")
}

// Command is what runs in a sandbox.
type Command struct {
	// Args are the program and its arguments. The program is resolved as
	// REAPI specifies: a path with a slash relative to Dir (or absolute),
	// a bare name through PATH in Env.
	Args []string
	// Argv0, if set, replaces Args[0] as the argv[0] the program sees
	// (Nix passes the builder's basename).
	Argv0 string
	// Env is the environment, "NAME=value", in the order given.
	Env []string
	// Dir is the working directory relative to the input root.
	Dir string
	// PTY merges stdout and stderr into one pseudo-terminal, as Nix's
	// builders see them; the stream is returned as stdout.
	PTY bool
	// Timeout kills the whole sandbox with SIGKILL from outside.
	Timeout time.Duration
}

// Result is how a command ended.
type Result struct {
	// ExitCode is the exit status, or 128+signal for a killed process.
	ExitCode int
	// Signal is the signal that killed the process, or 0.
	Signal int
	// OOMKilled is set when the memory limit killed a process.
	OOMKilled bool
	// TimedOut is set when the timeout killed the sandbox.
	TimedOut bool
	// Stdout and Stderr are host paths of the captured streams, valid
	// until the instance is released. With PTY, Stderr is empty.
	Stdout, Stderr string
	// UserTime and SystemTime are the CPU time of the command and the
	// children it waited for.
	UserTime, SystemTime time.Duration
	// MaxRSS is the peak resident set size in bytes.
	MaxRSS int64
	// Started and Exited are when the command was exec'ed and reaped.
	Started, Exited time.Time
	// Warm reports whether the sandbox was prepared ahead of time.
	Warm bool
	// Timings break the sandbox's own overhead down, for benchmarks.
	Timings Timings
}

// setStatus records the exit code of a wait status (128+signal for a
// killed process, as shells report it).
func (r *Result) setStatus(ws syscall.WaitStatus) {
	switch {
	case ws.Exited():
		r.ExitCode = ws.ExitStatus()
	case ws.Signaled():
		r.Signal = int(ws.Signal())
		r.ExitCode = 128 + r.Signal
	}
}

// setExit records how a reaped process ended: its exit code (128+signal
// for a killed one, as shells report it) and its resource usage.
func (r *Result) setExit(st *os.ProcessState) {
	if ws, ok := st.Sys().(syscall.WaitStatus); ok {
		r.setStatus(ws)
	}
	if ru, ok := st.SysUsage().(*syscall.Rusage); ok {
		r.UserTime = time.Duration(ru.Utime.Nano())
		r.SystemTime = time.Duration(ru.Stime.Nano())
		r.MaxRSS = ru.Maxrss * 1024
	}
}

// Timings are the sandbox's own costs for one run.
type Timings struct {
	Create time.Duration // creating the container (0 when warm)
	Start  time.Duration // from Run to the command's exec
	Wait   time.Duration // from the command's exit to Run returning
}

// Sandbox is a sandboxing backend.
type Sandbox interface {
	// Acquire returns a sandbox of the given shape whose input root the
	// caller fills before calling Run. It fails when the backend cannot
	// give the isolation the shape asks for.
	Acquire(ctx context.Context, s Shape) (Instance, error)
	// Close releases prepared sandboxes and waits for background cleanup.
	Close() error
}

// Instance is one sandbox, used for one command.
type Instance interface {
	// InputRoot is the host directory to fill with the input root. It
	// may already contain the writable directories and mountpoints.
	InputRoot() string
	// BuildUser is the host uid and gid the command runs as (outside its
	// user namespace, if it has one). Files and directories that belong to
	// the build user (its working directory) must be owned by them; those
	// the build may add entries to but not own (/nix/store) belong to root
	// and this group.
	BuildUser() (uid, gid int)
	// Overlay mounts, at the shape's Overlay directory, an overlay of the
	// layers (host directories whose entries must not collide) below a
	// writable upper layer, before Run. The layers must stay unchanged
	// until Release, which unmounts it. Outputs the command writes there
	// are read through InputRoot until Release. done, if not nil, is
	// called once the layers are no longer used, at the latest when
	// Release has unmounted the overlay.
	Overlay(layers []string, done func()) error
	// Run runs the command and waits for it. An error means the sandbox
	// failed (the farm's fault); a command that fails is a Result.
	Run(ctx context.Context, c *Command) (*Result, error)
	// Release destroys the sandbox; its directories are removed in the
	// background.
	Release()
}

// ErrUnsupported is wrapped by errors for shapes or commands a backend
// cannot run with the isolation they ask for.
var ErrUnsupported = errors.New("not supported by this sandbox")
