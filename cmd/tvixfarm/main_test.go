package main

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// buildBinary builds tvixfarm into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "tvixfarm")
	out, err := exec.Command(goTool(), "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// TestServeAndSIGTERM runs the real binary: it serves REAPI on --listen
// with its data in --data, the binary cache on --http-listen, and exits 0
// on SIGTERM after a clean shutdown.
func TestServeAndSIGTERM(t *testing.T) {
	bin := buildBinary(t)
	addr, httpAddr, data := freeAddr(t), freeAddr(t), t.TempDir()
	cmd := exec.Command(bin, "serve", "--listen", addr, "--http-listen", httpAddr, "--data", data)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var caps *repb.ServerCapabilities
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		caps, err = repb.NewCapabilitiesClient(conn).GetCapabilities(ctx, &repb.GetCapabilitiesRequest{})
		cancel()
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("GetCapabilities: %v\n%s", err, stderr.String())
	}
	if caps.CacheCapabilities.MaxBatchTotalSizeBytes != 4<<20 {
		t.Errorf("max batch = %d", caps.CacheCapabilities.MaxBatchTotalSizeBytes)
	}
	for _, d := range []string{"cas", "ac"} {
		if _, err := os.Stat(filepath.Join(data, d, "LOCK")); err != nil {
			t.Errorf("disk store %s not under --data: %v", d, err)
		}
	}
	resp, err := http.Get("http://" + httpAddr + "/nix-cache-info")
	if err != nil {
		t.Fatalf("binary cache: %v\n%s", err, stderr.String())
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "StoreDir: /nix/store\n") {
		t.Errorf("/nix-cache-info: %s %q", resp.Status, body)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit within 30s of SIGTERM")
	}
	if !strings.Contains(stderr.String(), "msg=stopped") {
		t.Errorf("log lacks the clean stop:\n%s", stderr.String())
	}
}

// TestServeRejectsBadConfig: an unknown key is an error naming the key,
// and the process exits non-zero without serving.
func TestServeRejectsBadConfig(t *testing.T) {
	bin := buildBinary(t)
	cfg := filepath.Join(t.TempDir(), "bad.yaml")
	os.WriteFile(cfg, []byte("storage:\n  cas:\n    disk:\n      path: cas\n      max_sise: 1GiB\n"), 0o644)
	out, err := exec.Command(bin, "serve", "--config", cfg, "--data", t.TempDir(), "--listen", freeAddr(t)).CombinedOutput()
	if err == nil {
		t.Fatal("serve accepted an unknown config key")
	}
	if !strings.Contains(string(out), "storage.cas.disk.max_sise") {
		t.Errorf("error does not name the key: %s", out)
	}
	os.WriteFile(cfg, []byte("binary_cache:\n  secret_key_file: /nonexistent/farm.sec\n"), 0o644)
	out, err = exec.Command(bin, "serve", "--config", cfg, "--data", t.TempDir(), "--listen", freeAddr(t)).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "binary_cache.secret_key_file") {
		t.Errorf("missing secret key file: %v %s", err, out)
	}
	out, err = exec.Command(bin, "serve", "--role", "juggler").CombinedOutput()
	if err == nil || !strings.Contains(string(out), `unknown role "juggler"`) {
		t.Errorf("unknown role: %v %s", err, out)
	}
}

// goTool is the go command of the toolchain running the test, so the test
// works when go is not on PATH.
func goTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
