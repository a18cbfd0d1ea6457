package executor

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	repb "github.com/bazelbuild/remote-apis/build/bazel/remote/execution/v2"

	"tvixfarm/executor/sandbox"
)

// BenchmarkTrivialAction measures the executor's whole part of a trivial
// Nix action (busybox touch of its one output) with warm caches: the
// input root's files are in the input cache and its Directory messages in
// memory. "warm" has a prepared sandbox waiting for each action (the
// benchmark waits, untimed, until one is ready); "cold" creates the
// sandbox when the action runs. The breakdown comes from the result's
// ExecutedActionMetadata; p50 and p90 are of the executor's whole part
// (worker start to worker completed).
func BenchmarkTrivialAction(b *testing.B) {
	for _, mode := range []struct {
		name    string
		prewarm int
		paths   int  // extra store paths in the input closure, 10 files each
		links   bool // hardlink every input file for every action (no layers)
	}{{"warm", 1, 0, false}, {"cold", 0, 0, false},
		{"warm-closure-100", 1, 100, false}, {"warm-closure-1000", 1, 1000, false},
		{"warm-closure-100-hardlinks", 1, 100, true}, {"warm-closure-1000-hardlinks", 1, 1000, true}} {
		b.Run(mode.name, func(b *testing.B) {
			e := newEnv(b, mode.prewarm)
			if mode.links {
				e = newEnvLayers(b, b.TempDir(), e.sb, false)
			}
			a := e.nixAction("", func(a *action) {
				a.args = []string{"/" + busyboxPath + "/bin/busybox", "touch", "/nix/store/abc-out"}
				a.outputs = []string{"../nix/store/abc-out"}
				for i := 0; i < mode.paths; i++ {
					for j := 0; j < 10; j++ {
						dir := fmt.Sprintf("nix/store/%032d-pkg%d/%s", i, i, []string{"bin", "lib", "share/doc"}[j%3])
						a.root[fmt.Sprintf("%s/f%d", dir, j)] = file(fmt.Sprintf("file %d of package %d\n", j, i))
					}
				}
			})
			ad := e.upload(a)
			run := func() *repb.ExecuteResponse {
				resp, err := e.exec.Execute(context.Background(), &Request{Action: ad})
				if err != nil || resp.Result.ExitCode != 0 {
					b.Fatalf("%v %v", err, resp)
				}
				return resp
			}
			run() // fill the caches
			rc, _ := e.sb.(*sandbox.Runc)
			var total, fetch, start, exec, upload []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if mode.prewarm > 0 && rc != nil {
					b.StopTimer()
					for rc.Prepared() == 0 {
						time.Sleep(100 * time.Microsecond)
					}
					b.StartTimer()
				}
				md := run().Result.ExecutionMetadata
				d := func(from, to interface{ AsTime() time.Time }) time.Duration { return to.AsTime().Sub(from.AsTime()) }
				total = append(total, d(md.WorkerStartTimestamp, md.WorkerCompletedTimestamp))
				fetch = append(fetch, d(md.WorkerStartTimestamp, md.InputFetchCompletedTimestamp))
				start = append(start, d(md.InputFetchCompletedTimestamp, md.ExecutionStartTimestamp))
				exec = append(exec, d(md.ExecutionStartTimestamp, md.ExecutionCompletedTimestamp))
				upload = append(upload, d(md.ExecutionCompletedTimestamp, md.WorkerCompletedTimestamp))
			}
			b.StopTimer()
			ms := func(ds []time.Duration, q float64) float64 {
				s := slices.Clone(ds)
				slices.Sort(s)
				return float64(s[int(float64(len(s)-1)*q)].Microseconds()) / 1000
			}
			b.ReportMetric(ms(total, 0.5), "p50-ms")
			b.ReportMetric(ms(total, 0.9), "p90-ms")
			b.ReportMetric(ms(fetch, 0.5), "fetch-p50-ms")
			b.ReportMetric(ms(start, 0.5), "start-p50-ms")
			b.ReportMetric(ms(exec, 0.5), "run-p50-ms")
			b.ReportMetric(ms(upload, 0.5), "upload-p50-ms")
		})
	}
}
