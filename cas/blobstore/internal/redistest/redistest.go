// Package redistest starts a real redis-server for tests and benchmarks.
//
// Each Server runs its own redis-server process on a free 127.0.0.1 port,
// without persistence, with its working directory in a temporary directory
// of the test. The process is killed by PID when the test ends.
//
// If no redis-server binary is installed the test is skipped, unless the
// environment variable TVIXFARM_REQUIRE_REDIS is set (to any non-empty
// value), in which case a missing binary fails the test: CI sets it so that
// the Redis tests cannot silently stop running.
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// RequireEnv is the environment variable that turns a missing redis-server
// into a test failure instead of a skip.
const RequireEnv = "TVIXFARM_REQUIRE_REDIS"

// DefaultBinary is where Debian's redis-server package installs the server.
const DefaultBinary = "/usr/bin/redis-server"

// fallbackBinary is DefaultBinary; tests of this package replace it.
var fallbackBinary = DefaultBinary

// startTimeout bounds how long Start waits for the server to answer PING.
const startTimeout = 15 * time.Second

// Server is a running redis-server.
type Server struct {
	// Addr is the host:port the server listens on.
	Addr string

	cmd     *exec.Cmd
	dir     string
	logPath string
	exited  chan struct{} // closed when the process has been waited for
	waitErr error         // valid after exited is closed

	stopOnce sync.Once
}

// Binary returns the path of the redis-server binary, or "" if there is
// none: it looks in $PATH first and then at DefaultBinary.
func Binary() string {
	if p, err := exec.LookPath("redis-server"); err == nil {
		return p
	}
	if fi, err := os.Stat(fallbackBinary); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
		return fallbackBinary
	}
	return ""
}

// Available reports whether a redis-server binary is installed.
func Available() bool { return Binary() != "" }

// Start starts a redis-server on a free port of 127.0.0.1 and waits until it
// answers PING. extraArgs are appended to the command line (for example
// "--maxmemory", "256mb"). The server is stopped in tb.Cleanup.
//
// Start skips the test if no redis-server is installed, unless
// TVIXFARM_REQUIRE_REDIS is set, and fails it if the server does not come up.
func Start(tb testing.TB, extraArgs ...string) *Server {
	tb.Helper()
	bin := Binary()
	if bin == "" {
		if v := os.Getenv(RequireEnv); v != "" {
			tb.Fatalf("redis-server is not installed (not in $PATH, not at %s), and %s=%q requires the Redis tests to run", fallbackBinary, RequireEnv, v)
			return nil
		}
		tb.Skipf("skipping: redis-server is not installed (not in $PATH, not at %s); install it, or set %s=1 to make this a failure", fallbackBinary, RequireEnv)
		return nil
	}
	dir := tb.TempDir()
	var lastErr error
	// Picking a free port and handing it to redis-server races with other
	// processes taking it meanwhile; retry with a new port if the server
	// dies at start.
	for attempt := 0; attempt < 5; attempt++ {
		s, err := start(bin, dir, attempt, extraArgs)
		if err == nil {
			tb.Cleanup(s.Stop)
			return s
		}
		lastErr = err
	}
	tb.Fatalf("redistest: %v", lastErr)
	return nil
}

func start(bin, dir string, attempt int, extraArgs []string) (*Server, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, fmt.Sprintf("redis-%d.log", attempt))
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	args := []string{
		"--save", "",
		"--appendonly", "no",
		"--port", strconv.Itoa(port),
		"--bind", "127.0.0.1",
		"--dir", dir,
	}
	args = append(args, extraArgs...)
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout = logf
	cmd.Stderr = logf
	// Best effort: do not outlive the test binary if it is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	s := &Server{
		Addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		cmd:     cmd,
		dir:     dir,
		logPath: logPath,
		exited:  make(chan struct{}),
	}
	go func() {
		s.waitErr = cmd.Wait()
		close(s.exited)
	}()
	deadline := time.Now().Add(startTimeout)
	for {
		if err := Ping(s.Addr, 500*time.Millisecond); err == nil {
			return s, nil
		}
		select {
		case <-s.exited:
			return nil, fmt.Errorf("redis-server on port %d exited at start (%v); log:\n%s", port, s.waitErr, s.log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("redis-server on port %d did not answer PING within %v; log:\n%s", port, startTimeout, s.log())
		}
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Ping sends PING to the Redis server at addr and waits for +PONG.
func Ping(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if strings.TrimSpace(line) != "+PONG" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func (s *Server) log() string {
	b, _ := os.ReadFile(s.logPath)
	return string(b)
}

// Log returns what the server has written to its log so far.
func (s *Server) Log() string { return s.log() }

// PID returns the process id of the server.
func (s *Server) PID() int { return s.cmd.Process.Pid }

// Dir returns the server's working directory.
func (s *Server) Dir() string { return s.dir }

// Stop kills the server (SIGKILL by PID) and waits for it to exit. It may be
// called more than once, also on a paused server; tests call it to simulate
// a server that goes away.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		select {
		case <-s.exited:
			return
		default:
		}
		s.cmd.Process.Kill()
		<-s.exited
	})
}

// Pause stops the server process with SIGSTOP: connections stay open but
// nothing is answered, as with a hung server. Resume or Stop undoes it.
func (s *Server) Pause() error { return s.cmd.Process.Signal(syscall.SIGSTOP) }

// Resume continues a paused server with SIGCONT.
func (s *Server) Resume() error { return s.cmd.Process.Signal(syscall.SIGCONT) }
