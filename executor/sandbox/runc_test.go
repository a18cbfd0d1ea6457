package sandbox

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func newTestRunc(t testing.TB, prewarm int) *Runc {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Prewarm: prewarm, Defaults: Limits{Pids: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

// busyboxRoot puts a static busybox at bin/busybox and bin/sh.
func busyboxRoot(t testing.TB, root string) {
	t.Helper()
	src, err := os.Open("/bin/busybox")
	if err != nil {
		t.Skip("busybox-static is not installed")
	}
	defer src.Close()
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	dst, err := os.OpenFile(filepath.Join(root, "bin/busybox"), os.O_CREATE|os.O_WRONLY, 0o555)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(dst, src)
	dst.Close()
	os.Symlink("busybox", filepath.Join(root, "bin/sh"))
}

func readOut(t testing.TB, p string) string {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestRuncSmoke(t *testing.T) {
	b := newTestRunc(t, 0)
	in, err := b.Acquire(context.Background(), Shape{Layout: Chroot, Writable: []string{"build"}})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Release()
	busyboxRoot(t, in.InputRoot())
	uid, gid := in.BuildUser()
	if u := DefaultBuildUsers; uid < u.FirstUID || uid >= u.FirstUID+u.Count || gid != u.GID {
		t.Fatalf("build user %d:%d is not one of the default build users", uid, gid)
	}
	build := filepath.Join(in.InputRoot(), "build")
	os.Chown(build, uid, gid)
	res, err := in.Run(context.Background(), &Command{
		Args: []string{"/bin/sh", "-c", "echo out; echo err >&2; echo $(id -u):$(id -g) $(cat /proc/self/setgroups) $(stat -c %u:%g /) >&2; touch made; exit 3"},
		Env:  []string{"PATH=/bin"},
		Dir:  "build",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	out, errs := readOut(t, res.Stdout), readOut(t, res.Stderr)
	t.Logf("stdout=%q stderr=%q", out, errs)
	// uid 1000 and gid 100 in a user namespace where root is unmapped.
	if res.ExitCode != 3 || out != "out\n" || errs != "err\n1000:100 deny 65534:65534\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", res.ExitCode, out, errs)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(build, "made"), &st); err != nil || int(st.Uid) != uid || int(st.Gid) != gid {
		t.Errorf("a file the build made is owned by %d:%d (%v), want the build user %d:%d", st.Uid, st.Gid, err, uid, gid)
	}
}

// TestBuildUsers checks that sandboxes of the Chroot layout have build
// uids of their own, which return to the range when they are destroyed,
// and that other layouts keep uid 1000.
func TestBuildUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the runc sandbox needs root")
	}
	users := BuildUsers{FirstUID: 0x7000f000, Count: 2, GID: 0x7000f000}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), BuildUsers: users})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	shape := Shape{Layout: Chroot, Writable: []string{"build"}}
	acquire := func() Instance {
		t.Helper()
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		return in
	}
	in1, in2 := acquire(), acquire()
	u1, g1 := in1.BuildUser()
	u2, g2 := in2.BuildUser()
	if u1 == u2 || min(u1, u2) != users.FirstUID || max(u1, u2) != users.FirstUID+1 || g1 != users.GID || g2 != users.GID {
		t.Fatalf("build users %d:%d and %d:%d", u1, g1, u2, g2)
	}
	if _, err := b.Acquire(context.Background(), shape); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a third sandbox with two build users: %v", err)
	}
	if in, err := b.Acquire(context.Background(), Shape{Layout: HostRoot}); err != nil {
		t.Fatal(err)
	} else if u, g := in.BuildUser(); u != UID || g != GID {
		t.Errorf("host-root sandbox: build user %d:%d, want %d:%d", u, g, UID, GID)
	} else {
		in.Release()
	}
	in1.Release()
	deadline := time.Now().Add(10 * time.Second)
	for {
		in, err := b.Acquire(context.Background(), shape)
		if err == nil {
			if u, _ := in.BuildUser(); u != u1 {
				t.Errorf("got uid %d, want the released %d", u, u1)
			}
			in.Release()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the released sandbox's uid did not return: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	in2.Release()
}

func TestBuildUsersCheck(t *testing.T) {
	for _, u := range []BuildUsers{
		{FirstUID: 0, Count: 10, GID: 5000},
		{FirstUID: 65000, Count: 1000, GID: 5000},
		{FirstUID: 70000, Count: 0, GID: 5000},
		{FirstUID: 70000, Count: 10, GID: 0},
		{FirstUID: 70000, Count: 10, GID: 65534},
		{FirstUID: 1<<32 - 10, Count: 10, GID: 5000},
	} {
		if err := u.check(); err == nil {
			t.Errorf("%+v accepted", u)
		}
	}
	for _, u := range []BuildUsers{DefaultBuildUsers, {FirstUID: 999, Count: 1, GID: 994}} {
		if err := u.check(); err != nil {
			t.Errorf("%+v: %v", u, err)
		}
	}
}

func BenchmarkRuncTrue(b *testing.B) {
	for _, prewarm := range []int{0, 2} {
		b.Run(map[int]string{0: "cold", 2: "warm"}[prewarm], func(b *testing.B) {
			shape := Shape{Layout: Chroot, Writable: []string{"build"}}
			sb := newTestRunc(b, prewarm)
			if prewarm > 0 {
				sb.opts.Seed = nil
				sb.prepare(shape)
				sb.prepare(shape)
			}
			var create, start, wait time.Duration
			for i := 0; i < b.N; i++ {
				in, err := sb.Acquire(context.Background(), shape)
				if err != nil {
					b.Fatal(err)
				}
				busyboxRoot(b, in.InputRoot())
				res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/busybox", "true"}, Dir: "build"})
				if err != nil || res.ExitCode != 0 {
					b.Fatal(err, res)
				}
				create += res.Timings.Create
				start += res.Timings.Start
				wait += res.Exited.Sub(res.Started) + res.Timings.Wait
				in.Release()
			}
			b.ReportMetric(float64(create.Microseconds())/float64(b.N)/1000, "create-ms/op")
			b.ReportMetric(float64(start.Microseconds())/float64(b.N)/1000, "start-ms/op")
			b.ReportMetric(float64(wait.Microseconds())/float64(b.N)/1000, "run+wait-ms/op")
		})
	}
}

// TestRecoverAfterKilledExecutor kills an executor (a child process of the
// test) while its sandbox runs, and checks that the next start destroys
// the orphaned container, its cgroup and its directories.
func TestRecoverAfterKilledExecutor(t *testing.T) {
	if os.Getenv("TVIXFARM_SANDBOX_CHILD") != "" {
		return
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledExecutorChild$", "-test.v")
	cmd.Env = append(os.Environ(), "TVIXFARM_SANDBOX_CHILD="+dir)
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var pid int
	var id string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "sandbox pid %d id %s", &pid, &id); err == nil {
			break
		}
	}
	if pid == 0 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal("child did not start a sandbox")
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("the sandbox died with its executor (%v); the test proves nothing", err)
	}
	b, err := NewRunc(RuncOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	deadline := time.Now().Add(5 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Fatalf("sandbox process %d still alive after recovery", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "state")); len(ents) != 0 {
		t.Errorf("container state left: %v", ents)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "slots")); len(ents) != 0 {
		t.Errorf("sandbox directories left: %v", ents)
	}
	if ms := mountsUnder(t, dir); len(ms) != 0 {
		t.Errorf("mounts left: %q", ms)
	}
	parent, err := defaultCgroupParent(dir)
	if err != nil {
		t.Fatal(err)
	}
	if cg := filepath.Join("/sys/fs/cgroup/pids", parent, id); id == "" {
		t.Error("child did not report its container id")
	} else if _, err := os.Stat(cg); err == nil {
		t.Errorf("cgroup %s of the killed executor's container was not removed", cg)
	}
}

// TestKilledExecutorChild is the executor that TestRecoverAfterKilledExecutor kills.
func TestKilledExecutorChild(t *testing.T) {
	dir := os.Getenv("TVIXFARM_SANDBOX_CHILD")
	if dir == "" {
		t.Skip("helper of TestRecoverAfterKilledExecutor")
	}
	b, err := NewRunc(RuncOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	in, err := b.Acquire(context.Background(), Shape{Layout: Chroot, Writable: []string{"build", "nix/store"}, Overlay: "nix/store"})
	if err != nil {
		t.Fatal(err)
	}
	busyboxRoot(t, in.InputRoot())
	// An overlay, whose mounts outlive the process.
	if err := in.Overlay(makeLayers(t, 2), nil); err != nil {
		t.Fatal(err)
	}
	go in.Run(context.Background(), &Command{Args: []string{"/bin/busybox", "sleep", "1000"}, Dir: "build"})
	ri := in.(*runcInstance)
	for ri.proc == nil {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	pid, _ := ri.proc.Pid()
	fmt.Printf("sandbox pid %d id %s\n", pid, ri.id)
	select {}
}

func TestPreparedSandboxIsUsed(t *testing.T) {
	shape := Shape{Layout: Chroot, Writable: []string{"build", "nix/store"}}
	b, err := NewRunc(RuncOptions{Dir: t.TempDir(), Prewarm: 1, Seed: []Shape{shape}})
	if err != nil {
		t.Skip(err)
	}
	defer b.Close()
	for i := 0; i < 3; i++ {
		deadline := time.Now().Add(10 * time.Second)
		for {
			b.mu.Lock()
			n := len(b.pool)
			b.mu.Unlock()
			if n > 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		in, err := b.Acquire(context.Background(), Shape{Layout: Chroot, Writable: []string{"nix/store", "build/"}})
		if err != nil {
			t.Fatal(err)
		}
		busyboxRoot(t, in.InputRoot())
		res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", "echo $0 $$ $(id -u) $FOO"}, Argv0: "sh", Env: []string{"FOO=bar"}, Dir: "build"})
		if err != nil {
			t.Fatal(err)
		}
		if !res.Warm {
			t.Errorf("run %d: the prepared sandbox was not used", i)
		}
		if out := readOut(t, res.Stdout); out != "sh 1 1000 bar\n" {
			t.Errorf("run %d: stdout %q stderr %q", i, out, readOut(t, res.Stderr))
		}
		in.Release()
	}
}

func TestUnsandboxedRefuses(t *testing.T) {
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o711)
	u, err := NewUnsandboxed(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	for _, s := range []Shape{{Layout: Chroot}, {Layout: HostRoot, Network: NetworkNone}, {Layout: HostRoot, Limits: Limits{Pids: 10}}} {
		if _, err := u.Acquire(context.Background(), s); !errors.Is(err, ErrUnsupported) {
			t.Errorf("shape %+v: err %v, want ErrUnsupported", s, err)
		}
	}
	in, err := u.Acquire(context.Background(), Shape{Layout: HostRoot})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Release()
	res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", "echo hi; exit 4"}})
	if err != nil || res.ExitCode != 4 || readOut(t, res.Stdout) != "hi\n" {
		t.Fatalf("%v %+v", err, res)
	}
	if _, err := in.Run(context.Background(), &Command{Args: []string{"true"}, PTY: true}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("pty: %v", err)
	}
}

// makeLayers returns n layer directories in a temporary directory, each
// holding a store path p<i> with a read-only file f, as inputs.Layers
// makes them.
func makeLayers(t testing.TB, n int) []string {
	t.Helper()
	base := t.TempDir()
	layers := make([]string, n)
	for i := range layers {
		layers[i] = filepath.Join(base, fmt.Sprint(i))
		p := filepath.Join(layers[i], fmt.Sprintf("p%d", i))
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "f"), []byte(fmt.Sprintf("layer %d\n", i)), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	return layers
}

// mountsUnder lists the mountpoints at or below dir.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var ms []string
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) > 4 && (f[4] == dir || strings.HasPrefix(f[4], dir+"/")) {
			ms = append(ms, f[4])
		}
	}
	return ms
}

// TestOverlay mounts store paths as an overlay in prepared and new
// sandboxes, with few layers and with more than one overlay takes: the
// build sees every store path, cannot change them, and writes its outputs
// to the upper layer, where the host reads them; Release unmounts all.
func TestOverlay(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prewarm int
		layers  int
	}{{"cold-3", 0, 3}, {"warm-3", 1, 3}, {"warm-1001", 1, 1001}} {
		t.Run(tc.name, func(t *testing.T) {
			shape := Shape{Layout: Chroot, Writable: []string{"build", "nix/store"}, Overlay: "nix/store"}
			if os.Geteuid() != 0 {
				t.Skip("needs root")
			}
			dir := t.TempDir()
			b, err := NewRunc(RuncOptions{Dir: dir, Prewarm: tc.prewarm, Seed: []Shape{shape}, Defaults: Limits{Pids: 1024}})
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			deadline := time.Now().Add(10 * time.Second)
			for tc.prewarm > 0 && b.Prepared() == 0 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			in, err := b.Acquire(context.Background(), shape)
			if err != nil {
				t.Fatal(err)
			}
			busyboxRoot(t, in.InputRoot())
			layers := makeLayers(t, tc.layers)
			done := make(chan struct{})
			if err := in.Overlay(layers, func() { close(done) }); err != nil {
				t.Fatal(err)
			}
			store := filepath.Join(in.InputRoot(), "nix/store")
			uid, gid := in.BuildUser()
			os.Chown(store, 0, gid)
			os.Chmod(store, 0o1775)
			os.Chown(filepath.Join(in.InputRoot(), "build"), uid, gid)
			last := tc.layers - 1
			script := fmt.Sprintf(`ls /nix/store | wc -l; cat /nix/store/p0/f /nix/store/p%d/f
echo x > /nix/store/p0/f 2>/dev/null && echo wrote-input
touch /nix/store/p0/new 2>/dev/null && echo wrote-input-dir
mkdir /nix/store/out && echo built > /nix/store/out/o && echo ok`, last)
			res, err := in.Run(context.Background(), &Command{Args: []string{"/bin/sh", "-c", script}, Env: []string{"PATH=/bin"}, Dir: "build"})
			if err != nil {
				t.Fatal(err)
			}
			if res.Warm != (tc.prewarm > 0) {
				t.Errorf("warm = %v", res.Warm)
			}
			want := fmt.Sprintf("%d\nlayer 0\nlayer %d\nok\n", tc.layers, last)
			if out := readOut(t, res.Stdout); out != want || res.ExitCode != 0 {
				t.Errorf("exit %d, stdout %q (want %q), stderr %q", res.ExitCode, out, want, readOut(t, res.Stderr))
			}
			if got, err := os.ReadFile(filepath.Join(store, "out/o")); err != nil || string(got) != "built\n" {
				t.Errorf("output through the overlay: %q, %v", got, err)
			}
			if ents, _ := os.ReadDir(filepath.Join(layers[0], "p0")); len(ents) != 1 {
				t.Errorf("layer 0 changed: %v", ents)
			}
			slot := filepath.Dir(in.InputRoot())
			in.Release()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("the layers were not released")
			}
			if ms := mountsUnder(t, slot); len(ms) != 0 {
				t.Errorf("mounts left after Release: %q", ms)
			}
		})
	}
}

// TestPoolSettles uses and releases sandboxes with a full pool, then
// idles: no container is created while idle (an evicted sandbox must not
// prepare a replacement that evicts another), and every sandbox's
// process is reaped (no zombies).
func TestPoolSettles(t *testing.T) {
	shape := Shape{Layout: Chroot, Writable: []string{"build"}}
	b := newTestRunc(t, 1)
	b.opts.Seed = nil
	b.prepare(shape)
	for i := 0; i < 4; i++ {
		deadline := time.Now().Add(10 * time.Second)
		for b.Prepared() == 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		in, err := b.Acquire(context.Background(), shape)
		if err != nil {
			t.Fatal(err)
		}
		busyboxRoot(t, in.InputRoot())
		if _, err := in.Run(context.Background(), &Command{Args: []string{"/bin/busybox", "true"}, Dir: "build"}); err != nil {
			t.Fatal(err)
		}
		in.Release()
	}
	time.Sleep(time.Second)
	before := b.created.Load()
	time.Sleep(time.Second)
	if n := b.created.Load() - before; n != 0 {
		t.Errorf("%d containers created in 1 s of idling", n)
	}
	b.mu.Lock()
	n := len(b.pool)
	b.mu.Unlock()
	b.Close()
	if z := zombies(t); z != 0 {
		t.Errorf("%d zombie children (pool held %d)", z, n)
	}
}

// zombies counts this process's zombie children.
func zombies(t *testing.T) int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	me := fmt.Sprint(os.Getpid())
	n := 0
	for _, e := range ents {
		data, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(data)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[0] == "Z" && f[1] == me {
			n++
		}
	}
	return n
}

// TestBackendsShareHost starts a second backend (another directory, as a
// second executor on the host has) while a sandbox of the first runs a
// command: the second's recovery must leave it alone.
func TestBackendsShareHost(t *testing.T) {
	a := newTestRunc(t, 0)
	in, err := a.Acquire(context.Background(), Shape{Layout: Chroot, Writable: []string{"build"}})
	if err != nil {
		t.Fatal(err)
	}
	defer in.Release()
	busyboxRoot(t, in.InputRoot())
	uid, gid := in.BuildUser()
	os.Chown(filepath.Join(in.InputRoot(), "build"), uid, gid)
	type result struct {
		res *Result
		err error
	}
	done := make(chan result, 1)
	go func() {
		res, err := in.Run(context.Background(), &Command{
			Args: []string{"/bin/sh", "-c", "touch started; sleep 1; echo survived"},
			Env:  []string{"PATH=/bin"},
			Dir:  "build",
		})
		done <- result{res, err}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(in.InputRoot(), "build/started")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the command did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	newTestRunc(t, 0) // recovers its own directory
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if out := readOut(t, r.res.Stdout); r.res.ExitCode != 0 || out != "survived\n" {
		t.Fatalf("the first backend's command: exit %d, stdout %q", r.res.ExitCode, out)
	}
}

// TestStubCommandFailures checks the stub's answers for commands that
// cannot start (exit 127 and the reason on stderr, as a result, not a
// sandbox error), its PATH search, and the pty.
func TestStubCommandFailures(t *testing.T) {
	b := newTestRunc(t, 0)
	for _, c := range []struct {
		name string
		cmd  Command
		code int
		out  string // stdout, or a substring of stderr for failures
	}{
		{"path search", Command{Args: []string{"sh", "-c", "echo $0"}, Env: []string{"PATH=/nowhere::/bin"}}, 0, "sh\n"},
		{"argv0", Command{Args: []string{"/bin/busybox", "-c", "echo $0"}, Argv0: "sh"}, 0, "sh\n"}, // busybox runs the applet argv[0] names
		{"env", Command{Args: []string{"/bin/sh", "-c", "echo \"$A|$B\""}, Env: []string{"A=x y", "B="}}, 0, "x y|\n"},
		{"not in PATH", Command{Args: []string{"nope"}, Env: []string{"PATH=/bin"}}, 127, `nope: command not found in PATH "/bin"`},
		{"missing", Command{Args: []string{"/bin/nope"}}, 127, "stat /bin/nope: no such file or directory"},
		{"directory", Command{Args: []string{"/bin"}}, 127, "exec /bin: is a directory"},
		{"not executable", Command{Args: []string{"/build/data"}}, 127, "exec /build/data: permission denied"},
		{"NUL in an argument", Command{Args: []string{"/bin/sh", "a\x00b"}}, 127, "exec /bin/sh: invalid argument"},
		{"working directory", Command{Args: []string{"/bin/sh"}, Dir: "nope"}, 127, "working directory /nope: no such file or directory"},
		{"pty", Command{Args: []string{"/bin/sh", "-c", "[ -t 1 ] && [ -t 2 ] && [ ! -t 0 ] && readlink /proc/self/fd/1"}, PTY: true}, 0, "/dev/pts/0\n"},
	} {
		t.Run(c.name, func(t *testing.T) {
			in, err := b.Acquire(context.Background(), Shape{Layout: Chroot, Writable: []string{"build"}})
			if err != nil {
				t.Fatal(err)
			}
			defer in.Release()
			busyboxRoot(t, in.InputRoot())
			uid, gid := in.BuildUser()
			build := filepath.Join(in.InputRoot(), "build")
			os.Chown(build, uid, gid)
			os.WriteFile(filepath.Join(build, "data"), []byte("x"), 0o644)
			cmd := c.cmd
			if cmd.Dir == "" {
				cmd.Dir = "build"
			}
			res, err := in.Run(context.Background(), &cmd)
			if err != nil {
				t.Fatal(err)
			}
			out, errs := readOut(t, res.Stdout), readOut(t, res.Stderr)
			if res.ExitCode != c.code {
				t.Fatalf("exit %d, stdout %q, stderr %q", res.ExitCode, out, errs)
			}
			if c.code == 0 && out != c.out || c.code != 0 && !strings.Contains(errs, c.out) {
				t.Errorf("stdout %q, stderr %q, want %q", out, errs, c.out)
			}
		})
	}
}
