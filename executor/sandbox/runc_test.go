package sandbox

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
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
	os.Chown(filepath.Join(in.InputRoot(), "build"), UID, GID)
	res, err := in.Run(context.Background(), &Command{
		Args: []string{"/bin/sh", "-c", "echo out; echo err >&2; id; hostname; pwd; exit 3"},
		Env:  []string{"PATH=/bin"},
		Dir:  "build",
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	out, errs := readOut(t, res.Stdout), readOut(t, res.Stderr)
	t.Logf("stdout=%q stderr=%q", out, errs)
	if res.ExitCode != 3 || !strings.HasPrefix(out, "out\n") || errs != "err\n" {
		t.Fatalf("exit %d, stdout %q, stderr %q", res.ExitCode, out, errs)
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
