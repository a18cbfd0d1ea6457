package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// requireNix skips (or, under make test, fails) unless Nix is set up by
// scripts/nix-setup.sh and the sandbox can run (root).
func requireNix(t *testing.T) {
	t.Helper()
	fail := t.Skip
	if os.Getenv("TVIXFARM_REQUIRE_NIX") == "1" {
		fail = t.Fatal
	}
	if os.Geteuid() != 0 {
		fail("tvixfarm build's embedded farm needs root for its sandbox")
	}
	if _, err := os.Stat("/etc/nix/tvixfarm-busybox-path"); err != nil {
		fail("Nix is not set up (scripts/nix-setup.sh)")
	}
}

// run runs the binary and returns stdout, stderr and the error.
func runBin(t *testing.T, bin string, args ...string) (string, string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	return stdout.String(), stderr.String(), err
}

func nixStore(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("nix-store", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("nix-store %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestBuild runs `tvixfarm build` as a user does: the sample derivation on
// an embedded farm, its result symlink, the outputs registered in the
// local Nix store as Nix would register them, its log, and then the same
// with --farm against a `tvixfarm serve`.
func TestBuild(t *testing.T) {
	requireNix(t)
	bin := buildBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	greeting := fmt.Sprintf("hello %d", time.Now().UnixNano())
	sample, _ := filepath.Abs("../../examples/hello.nix")
	link := filepath.Join(dir, "result")
	stdout, stderr, err := runBin(t, bin, "build", "--data", data, "--argstr", "greeting", greeting, "-o", link, sample)
	if err != nil {
		t.Fatalf("build: %v\n%s", err, stderr)
	}
	out := strings.TrimSpace(stdout)
	if !strings.HasPrefix(out, "/nix/store/") || strings.Contains(out, "\n") {
		t.Fatalf("stdout = %q, want one output path", stdout)
	}
	if target, err := os.Readlink(link); err != nil || target != out {
		t.Errorf("result symlink: %q, %v", target, err)
	}
	got, err := exec.Command(filepath.Join(link, "bin", "hello")).Output()
	if err != nil || strings.TrimSpace(string(got)) != greeting {
		t.Errorf("result/bin/hello = %q, %v", got, err)
	}
	nixStore(t, "--verify-path", out)
	refs := strings.Fields(nixStore(t, "-q", "--references", out))
	if len(refs) != 2 || !strings.HasSuffix(refs[0], "-busybox") && !strings.HasSuffix(refs[1], "-busybox") {
		t.Errorf("references = %q, want busybox and the greeting", refs)
	}
	drv, err := exec.Command("nix-instantiate", "--argstr", "greeting", greeting, sample).Output()
	if err != nil {
		t.Fatal(err)
	}
	if d := nixStore(t, "-q", "--deriver", out); d != strings.TrimSpace(string(drv)) {
		t.Errorf("deriver = %s, want %s", d, drv)
	}
	// The log, by output and by derivation.
	for _, p := range []string{link, strings.TrimSpace(string(drv))} {
		logOut, stderr, err := runBin(t, bin, "log", "--data", data, p)
		if err != nil || !strings.Contains(logOut, "hello built; it refers to") {
			t.Errorf("log %s = %q, %v\n%s", p, logOut, err, stderr)
		}
	}

	// Without a local Nix: a .drv path, outputs written as plain files.
	plain := filepath.Join(dir, "plain")
	cmd := exec.Command(bin, "build", "--data", data, "-o", plain, strings.TrimSpace(string(drv)))
	cmd.Env = append(os.Environ(), "PATH=/nonexistent")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build without Nix: %v\n%s", err, out)
	}
	if st, err := os.Stat(filepath.Join(plain, "bin", "hello")); err != nil || st.Mode()&0o111 == 0 {
		t.Errorf("plain output: %v, %v", st, err)
	}

	// A failing builder: exit code and log tail, nothing on stdout.
	failing := filepath.Join(dir, "fail.nix")
	os.WriteFile(failing, []byte(`{ busybox ? builtins.replaceStrings ["\n"] [""] (builtins.readFile /etc/nix/tvixfarm-busybox-path) }:
derivation { name = "fails"; system = "x86_64-linux"; builder = "${builtins.storePath busybox}/bin/sh";
  salt = "`+greeting+`"; args = [ "-c" "echo the last words; exit 3" ]; }`), 0o644)
	stdout, stderr, err = runBin(t, bin, "build", "--data", data, "--no-link", failing)
	if err == nil || stdout != "" {
		t.Fatalf("failing build: err %v, stdout %q", err, stdout)
	}
	for _, want := range []string{"fails.drv' failed with exit code 3", "> the last words"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	// An evaluation error names the file.
	_, stderr, err = runBin(t, bin, "build", "--data", data, filepath.Join(dir, "missing.nix"))
	if err == nil || !strings.Contains(stderr, "missing.nix") {
		t.Errorf("evaluation error: %v\n%s", err, stderr)
	}

	// --farm: the same against a running farm.
	addr := freeAddr(t)
	serve := exec.Command(bin, "serve", "--listen", addr, "--data", filepath.Join(dir, "served"))
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		// A graceful stop: the executor unmounts its sandboxes.
		serve.Process.Signal(syscall.SIGTERM)
		serve.Wait()
	}()
	greeting2 := greeting + " again"
	var last string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		stdout, stderr, err = runBin(t, bin, "build", "--farm", addr, "--argstr", "greeting", greeting2, "--no-link", sample)
		if err == nil {
			break
		}
		last = stderr
		if time.Now().After(deadline) {
			t.Fatalf("build --farm: %v\n%s", err, last)
		}
	}
	out2 := strings.TrimSpace(stdout)
	if got, err := exec.Command(filepath.Join(out2, "bin", "hello")).Output(); err != nil || strings.TrimSpace(string(got)) != greeting2 {
		t.Errorf("%s/bin/hello = %q, %v", out2, got, err)
	}
	if _, err := os.Lstat("result"); err == nil {
		t.Error("--no-link made ./result")
	}
}
