package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

// startFarm serves an all-in-one farm on loopback for the duration of t.
func startFarm(t *testing.T) string {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Data = t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	f, err := farm.New(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- f.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("farm did not stop")
		}
	})
	return f.Addr()
}

func quietStdout(t *testing.T) {
	old := os.Stdout
	devnull, _ := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	os.Stdout = devnull
	t.Cleanup(func() { os.Stdout = old; devnull.Close() })
}

// TestBenchCAS runs every measure against a real farm, with both digest
// functions; each measure verifies what it reads back.
func TestBenchCAS(t *testing.T) {
	addr := startFarm(t)
	quietStdout(t)
	for _, fn := range []string{"sha256", "blake3"} {
		if err := benchCAS([]string{"--farm", addr, "--runs", "2", "--large-mib", "3", "--digest-function", fn, "--json"}); err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
	}
	if err := benchCAS([]string{"--farm", addr, "--digest-function", "md5"}); err == nil {
		t.Error("an unknown digest function was accepted")
	}
}

func TestStatus(t *testing.T) {
	addr := startFarm(t)
	quietStdout(t)
	if err := statusCmd([]string{"--farm", addr}); err != nil {
		t.Fatal(err)
	}
	if err := statusCmd([]string{"--farm", "127.0.0.1:1", "--timeout", "500ms"}); err == nil {
		t.Error("status of an address nobody serves succeeded")
	}
}
