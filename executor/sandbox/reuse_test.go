package sandbox

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReuse runs commands one after another in one reusable sandbox and
// checks that each finds what a fresh sandbox has: nothing the one before
// wrote or started, its own pid 1, only lo, no capabilities, and the
// identity of a Nix builder.
func TestReuse(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	shape := Shape{Layout: Chroot, Writable: []string{"build", "nix/store"}}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Prewarm: 1, Reuse: 5, Seed: []Shape{shape}, Defaults: Limits{Pids: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const script = `
echo pid=$$ id=$(id -u):$(id -g) groups=$(cat /proc/self/setgroups) caps=$(grep CapEff /proc/self/status | tr -d '\t')
echo ifs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ') routes=$(tail -n +2 /proc/net/route | wc -l)
echo sleeps=$(cat /proc/[0-9]*/comm | grep -c sleep) tmp=$(ls -A /tmp | wc -l) shm=$(ls -A /dev/shm | wc -l) build=$(ls -A /build | wc -l) store=$(ls -A /nix/store | wc -l)
echo kcore=$(cat /proc/kcore 2>/dev/null | wc -c) sys=$(touch /proc/sys/x 2>/dev/null && echo rw || echo ro)
stat -c '%n %a %u:%g' /tmp /dev/shm
mkdir /tmp/d /build/d /nix/store/abc-out; echo x > /tmp/f; echo x > /dev/shm/f; echo x > /build/f
(sleep 1000 &)
`
	var ids []string
	for i := 0; i < 7; i++ {
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		ri := in.(*runcInstance)
		ids = append(ids, ri.id)
		busyboxRoot(t, in.InputRoot())
		uid, gid := in.BuildUser()
		os.Chown(filepath.Join(in.InputRoot(), "build"), uid, gid)
		os.Chmod(filepath.Join(in.InputRoot(), "nix/store"), 0o1777)
		res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/bin"}, Dir: "build"})
		if err != nil {
			t.Fatalf("run %d: %v", i, err)
		}
		out, errs := readOut(t, res.Stdout), readOut(t, res.Stderr)
		want := []string{
			"pid=1 id=1000:100 groups=deny caps=CapEff:0000000000000000",
			"ifs=lo routes=0",
			"sleeps=0 tmp=0 shm=0 build=0 store=0",
			"kcore=0 sys=ro",
			"/tmp 1777 65534:65534",
			"/dev/shm 1777 65534:65534",
		}
		if res.ExitCode != 0 || strings.TrimSpace(out) != strings.Join(want, "\n") {
			t.Errorf("run %d (sandbox %s, warm %v): exit %d\nstdout:\n%s\nwant:\n%s\nstderr: %s", i, ri.id, res.Warm, res.ExitCode, out, strings.Join(want, "\n"), errs)
		}
		in.Release()
	}
	// Reuse: 5 means one container ran runs 0–4 and another 5–6.
	if ids[0] != ids[4] || ids[4] == ids[5] || ids[5] != ids[6] {
		t.Errorf("sandboxes of the runs: %v; want one for five runs, then another", ids)
	}
}

// TestReuseAfterFailures checks that a command that cannot start, one
// that fails and one that is killed by its timeout leave a sandbox that either runs the next command correctly or is replaced.
func TestReuseAfterFailures(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	shape := Shape{Layout: Chroot, Writable: []string{"build"}}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Prewarm: 1, Reuse: 100, Seed: []Shape{shape}, Defaults: Limits{Pids: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// run runs cmd and returns its result with the captured streams
	// (which Release removes) in Stdout and Stderr.
	run := func(cmd *Command) (*Result, string) {
		t.Helper()
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Release()
		busyboxRoot(t, in.InputRoot())
		res, err := in.Run(context.Background(), cmd)
		if err != nil {
			t.Fatal(err)
		}
		res.Stdout = readOut(t, res.Stdout)
		if res.Stderr != "" {
			res.Stderr = readOut(t, res.Stderr)
		}
		return res, in.(*runcInstance).id
	}
	ok := &Command{Args: []string{"/bin/sh", "-c", "echo ok $$"}, Env: []string{"PATH=/bin"}, Dir: "build"}
	res, id0 := run(&Command{Args: []string{"/bin/nonexistent"}, Dir: "build"})
	if res.ExitCode != 127 || !strings.Contains(res.Stderr, "nonexistent") {
		t.Errorf("missing program: exit %d, stderr %q", res.ExitCode, res.Stderr)
	}
	res, id1 := run(ok)
	if out := res.Stdout; res.ExitCode != 0 || out != "ok 1\n" || id1 != id0 {
		t.Errorf("after a command that could not start: exit %d, stdout %q, sandbox %s then %s", res.ExitCode, out, id0, id1)
	}
	res, _ = run(&Command{Args: []string{"/bin/sh", "-c", "exit 3"}, Dir: "build"})
	if res.ExitCode != 3 {
		t.Errorf("exit 3: exit %d", res.ExitCode)
	}
	res, id2 := run(&Command{Args: []string{"/bin/sh", "-c", "sleep 100"}, Dir: "build", Timeout: 200 * time.Millisecond})
	if !res.TimedOut || res.ExitCode != 137 {
		t.Errorf("timeout: %+v", res)
	}
	res, id3 := run(ok)
	if out := res.Stdout; res.ExitCode != 0 || out != "ok 1\n" || id3 == id2 {
		t.Errorf("after a timeout: exit %d, stdout %q, sandbox %s then %s (want a new one)", res.ExitCode, out, id2, id3)
	}
	res, _ = run(&Command{Args: []string{"/bin/sh", "-c", "echo tty; [ -t 1 ] && echo is-tty"}, Dir: "build", PTY: true, Env: []string{"PATH=/bin"}})
	if out := res.Stdout; out != "tty\r\nis-tty\r\n" && out != "tty\nis-tty\n" {
		t.Errorf("pty: stdout %q", out)
	}
}

// TestReuseOverlay gives each command of a reusable sandbox its own
// overlay of store paths: a command sees its layers and its own outputs,
// never the layers or outputs of the one before, and Release releases the
// layers each time.
func TestReuseOverlay(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	shape := Shape{Layout: Chroot, Writable: []string{"build", "nix/store"}, Overlay: "nix/store"}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Prewarm: 0, Reuse: 10, Defaults: Limits{Pids: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var first string // made for run 0 with its overlay mounted, then reused
	for i := 0; i < 4; i++ {
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = in.(*runcInstance).id
		} else if id := in.(*runcInstance).id; id != first {
			t.Errorf("run %d ran in sandbox %s, not %s", i, id, first)
		}
		busyboxRoot(t, in.InputRoot())
		n := 1 + i
		if i == 2 {
			n = 2*maxLayers + 1 // overlays of overlays
		}
		layers := makeLayers(t, n)
		done := make(chan struct{})
		if err := in.Overlay(layers, func() { close(done) }); err != nil {
			t.Fatal(err)
		}
		store := filepath.Join(in.InputRoot(), "nix/store")
		uid, gid := in.BuildUser()
		os.Chown(store, 0, gid)
		os.Chmod(store, 0o1775)
		os.Chown(filepath.Join(in.InputRoot(), "build"), uid, gid)
		script := fmt.Sprintf("ls /nix/store | wc -l; cat /nix/store/p%d/f; ls -d /nix/store/out* 2>/dev/null; mkdir /nix/store/out%d", n-1, i)
		res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/bin"}, Dir: "build"})
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("%d\nlayer %d\n", n, n-1)
		if out := readOut(t, res.Stdout); out != want || res.ExitCode != 0 {
			t.Errorf("run %d: exit %d, stdout %q (want %q), stderr %q", i, res.ExitCode, out, want, readOut(t, res.Stderr))
		}
		if _, err := os.Stat(filepath.Join(store, fmt.Sprintf("out%d", i))); err != nil {
			t.Errorf("run %d: output through the overlay: %v", i, err)
		}
		in.Release()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("run %d: the layers were not released", i)
		}
	}
}

func TestNested(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{{"/tmp/x", "/tmp/x/data/state", true}, {"/tmp/x/data/state", "/tmp/x", true}, {"/tmp/x", "/tmp/xy/state", false}, {"/work/bin", "/work/.demo-data/state", false}, {"/", "/var", true}} {
		if got := nested(c.a, c.b); got != c.want {
			t.Errorf("nested(%q, %q) = %v", c.a, c.b, got)
		}
	}
}

// TestReuseHostRoot reuses a sandbox of the HostRoot layout: each
// command finds /tmp, its writable directory and the input root as a new
// sandbox has them.
func TestReuseHostRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Reuse: 10, Defaults: Limits{Pids: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, w := range []string{"out", ""} {
		t.Run("writable="+w, func(t *testing.T) { testReuseHostRoot(t, b, w) })
	}
}

func testReuseHostRoot(t *testing.T, b *Runc, w string) {
	shape := Shape{Layout: HostRoot, Writable: []string{w}}
	if w == "" {
		shape.Writable = []string{"", "out"}
	}
	var first string
	for i := 0; i < 3; i++ {
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		if id := in.(*runcInstance).id; i == 0 {
			first = id
		} else if id != first {
			t.Errorf("run %d ran in sandbox %s, not %s", i, id, first)
		}
		os.WriteFile(filepath.Join(in.InputRoot(), fmt.Sprintf("in%d", i)), nil, 0o644)
		os.MkdirAll(filepath.Join(in.InputRoot(), "out"), 0o755)
		os.Chown(filepath.Join(in.InputRoot(), "out"), UID, GID)
		os.Chown(in.InputRoot(), UID, GID)
		script := `echo $(ls -A /work | tr '\n' ' ') tmp=$(ls -A /tmp | wc -l) out=$(ls -A /work/out | wc -l) $(id -u):$(id -g) $(stat -c %a /tmp); touch /tmp/x /work/out/y; touch /work/z 2>/dev/null; true`
		res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/usr/bin:/bin"}, Dir: ""})
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("in%d out tmp=0 out=0 1000:100 1777\n", i)
		if out := readOut(t, res.Stdout); out != want || res.ExitCode != 0 {
			t.Errorf("run %d: exit %d, stdout %q (want %q), stderr %q", i, res.ExitCode, out, want, readOut(t, res.Stderr))
		}
		in.Release()
	}
}

// TestStubConnReset reads from a zygote that died with a message unread:
// the read fails with ECONNRESET, which the reader reports as an error
// rather than a panic (recvmsg's -1 is not a length).
func TestStubConnReset(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "ctl")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer fc.Close()
	in := &runcInstance{ctl: fc.(*net.UnixConn)}
	if _, err := in.ctl.Write([]byte("command the zygote never reads")); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[1]) // the zygote dies
	c := &stubConn{in: in}
	if _, _, _, err := c.next(); err == nil {
		t.Fatal("next on a reset connection: no error")
	}
}
