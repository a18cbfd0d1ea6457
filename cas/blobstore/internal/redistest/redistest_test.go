package redistest

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeTB records Skipf and Fatalf instead of ending the test.
type fakeTB struct {
	testing.TB
	skipped, fatal string
}

type stop struct{}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Skipf(format string, args ...any) {
	f.skipped = fmt.Sprintf(format, args...)
	panic(stop{})
}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.fatal = fmt.Sprintf(format, args...)
	panic(stop{})
}

func runStart(tb *fakeTB) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(stop); !ok {
				panic(r)
			}
		}
	}()
	Start(tb)
}

func TestMissingBinary(t *testing.T) {
	saved := fallbackBinary
	t.Cleanup(func() { fallbackBinary = saved })
	fallbackBinary = filepath.Join(t.TempDir(), "no-redis-server")
	t.Setenv("PATH", t.TempDir())

	t.Setenv(RequireEnv, "")
	if Available() {
		t.Fatal("Available() with no binary")
	}
	tb := &fakeTB{TB: t}
	runStart(tb)
	if tb.skipped == "" || tb.fatal != "" {
		t.Fatalf("without %s: skipped %q, fatal %q; want a skip", RequireEnv, tb.skipped, tb.fatal)
	}
	if !strings.Contains(tb.skipped, "redis-server is not installed") || !strings.Contains(tb.skipped, RequireEnv) {
		t.Errorf("skip message %q does not explain itself", tb.skipped)
	}

	t.Setenv(RequireEnv, "1")
	tb = &fakeTB{TB: t}
	runStart(tb)
	if tb.fatal == "" || tb.skipped != "" {
		t.Fatalf("with %s=1: skipped %q, fatal %q; want a failure", RequireEnv, tb.skipped, tb.fatal)
	}
}

func TestStartStop(t *testing.T) {
	srv := Start(t, "--maxmemory", "64mb")
	if err := Ping(srv.Addr, time.Second); err != nil {
		t.Fatalf("PING: %v", err)
	}
	if srv.PID() <= 0 {
		t.Fatalf("PID() = %d", srv.PID())
	}
	srv.Stop()
	srv.Stop() // idempotent
	if err := Ping(srv.Addr, 200*time.Millisecond); err == nil {
		t.Fatal("server still answers PING after Stop")
	}
}

func TestTwoServers(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr == b.Addr {
		t.Fatalf("two servers on %s", a.Addr)
	}
	a.Stop()
	if err := Ping(b.Addr, time.Second); err != nil {
		t.Fatalf("second server after stopping the first: %v", err)
	}
}
