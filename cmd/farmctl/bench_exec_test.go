package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"tvixfarm/internal/config"
	"tvixfarm/internal/farm"
)

// startExecFarm serves a farm with the default roles (storage, scheduler,
// executor) on loopback for the duration of t, with the executor's
// sandbox set to sandbox.
func startExecFarm(t *testing.T, sandbox string) string {
	t.Helper()
	cfg := config.Default()
	cfg.Listen = "127.0.0.1:0"
	cfg.Data = t.TempDir()
	cfg.Executor.Sandbox = sandbox
	if sandbox == "noop" {
		cfg.Executor.Slots = 64
	}
	ctx, cancel := context.WithCancel(context.Background())
	f, err := farm.New(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		cancel()
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

// benchExecJSON runs bench exec with --json and returns its report.
func benchExecJSON(t *testing.T, args ...string) (*execReport, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := runBenchExec(append(args, "--json"), &out, &errOut)
	if errOut.Len() > 0 {
		t.Logf("stderr: %s", errOut.String())
	}
	if out.Len() == 0 {
		return nil, err
	}
	var rep execReport
	if jerr := json.Unmarshal(out.Bytes(), &rep); jerr != nil {
		t.Fatalf("the output is not one JSON object: %v\n%s", jerr, out.String())
	}
	return &rep, err
}

// checkReport checks the counts of a clean run (never timings).
func checkReport(t *testing.T, rep *execReport, actions int) {
	t.Helper()
	if rep.Actions != actions || rep.Completed != actions || rep.Errors != 0 || len(rep.FirstErrors) != 0 {
		t.Errorf("report %+v", rep)
	}
	for name, l := range map[string]execLatency{"accept": rep.Accept, "dispatch": rep.Dispatch, "end to end": rep.EndToEnd} {
		if l.N != actions || l.P50 > l.P90 || l.P90 > l.P99 || l.P99 > l.Max || l.P50 <= 0 {
			t.Errorf("%s latency %+v", name, l)
		}
	}
	if rep.ActionsPerS <= 0 {
		t.Errorf("actions/s %v", rep.ActionsPerS)
	}
}

// TestBenchExecNoop runs the benchmark against a farm whose executor is in
// no-op mode, in both output formats, and checks its failure cases.
func TestBenchExecNoop(t *testing.T) {
	addr := startExecFarm(t, "noop")
	samples := t.TempDir() + "/samples.csv"
	rep, err := benchExecJSON(t, "--farm", addr, "--actions", "300", "--concurrency", "50", "--warmup", "5", "--samples", samples)
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, rep, 300)
	if data, err := os.ReadFile(samples); err != nil || strings.Count(string(data), "\n") != 301 {
		t.Errorf("samples file: %v\n%s", err, data)
	}
	if rep.Mode != "noop" || rep.Concurrency != 50 || strings.Join(rep.Platform, ",") != "OSFamily=linux" {
		t.Errorf("report %+v", rep)
	}

	// The human-readable report; the default concurrency, over one
	// connection; a platform property the no-op worker offers.
	var out, errOut bytes.Buffer
	if err := runBenchExec([]string{"--farm", addr, "--actions", "100", "--connections", "1", "--platform", "ISA=x86-64"}, &out, &errOut); err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}
	for _, want := range []string{"completed 100 ", "actions/s", "dispatch", "end to end", "ISA=x86-64,OSFamily=linux"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}

	// Actions no worker can run stay queued (the scheduler waits for such
	// a worker for a while): each hits its deadline, and the run fails.
	rep, err = benchExecJSON(t, "--farm", addr, "--actions", "3", "--warmup", "0", "--platform", "no-such-property=1", "--timeout", "500ms")
	if err == nil {
		t.Fatal("a run whose actions all failed succeeded")
	}
	if rep == nil || rep.Errors != 3 || rep.ErrorKinds["rpc"] != 3 || len(rep.FirstErrors) != 3 || rep.Completed != 0 {
		t.Errorf("report of a failed run: %+v", rep)
	}

	for _, args := range [][]string{
		{"--mode", "bogus"},
		{"--platform", "novalue"},
		{"--actions", "0"},
		{"--digest-function", "md5"},
		{"extra"},
	} {
		if err := runBenchExec(append([]string{"--farm", addr}, args...), io.Discard, io.Discard); err == nil {
			t.Errorf("%v accepted", args)
		}
	}
	// Nobody serves this address.
	if err := runBenchExec([]string{"--farm", "127.0.0.1:1", "--timeout", "500ms"}, io.Discard, io.Discard); err == nil {
		t.Error("a run against an address nobody serves succeeded")
	}
}

// TestBenchExecTrivial really runs trivial actions in the sandbox, end to
// end, and checks their output file came back.
func TestBenchExecTrivial(t *testing.T) {
	if os.Geteuid() != 0 {
		if os.Getenv("TVIXFARM_REQUIRE_SANDBOX") == "1" {
			t.Fatal("sandbox required: not root")
		}
		t.Skip("the sandbox needs root")
	}
	addr := startExecFarm(t, "")
	rep, err := benchExecJSON(t, "--farm", addr, "--mode", "trivial", "--actions", "5", "--warmup", "1")
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, rep, 5)
	if rep.Concurrency != 1 {
		t.Errorf("trivial mode's default concurrency is %d, want 1", rep.Concurrency)
	}
	rep, err = benchExecJSON(t, "--farm", addr, "--mode", "trivial", "--actions", "8", "--concurrency", "4", "--warmup", "0")
	if err != nil {
		t.Fatal(err)
	}
	checkReport(t, rep, 8)
}
