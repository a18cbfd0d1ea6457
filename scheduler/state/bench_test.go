package state

import (
	"bytes"
	"fmt"
	"testing"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// benchFarm is a farm of 100 workers with 10 slots each: 80 x86_64-linux
// (also i686, with kvm and big-parallel), 20 aarch64-linux.
type benchFarm struct {
	s    *State
	next int
	time int64
}

var benchPlatforms = [][]*schedulerpb.Property{
	props("nix-system=x86_64-linux"),
	props("nix-system=x86_64-linux", "nix-features=kvm"),
	props("nix-system=x86_64-linux", "nix-features=big-parallel", "memory-limit=4G"),
	props("nix-system=i686-linux"),
	props("nix-system=aarch64-linux"),
}

func newBenchFarm(b testing.TB) *benchFarm {
	f := &benchFarm{s: New(Config{})}
	var cmds []*schedulerpb.Command
	for i := range 100 {
		p := []string{"nix-system=x86_64-linux", "nix-system=i686-linux", "nix-features=kvm,big-parallel"}
		if i >= 80 {
			p = []string{"nix-system=aarch64-linux"}
		}
		cmds = append(cmds, register(fmt.Sprintf("worker-%03d", i), 10, p...))
	}
	apply(b, f.s, cmds...)
	return f
}

// submits returns n new submits spread over 10 invocations and the
// platforms, with distinct actions.
func (f *benchFarm) submits(n int) *schedulerpb.Batch {
	f.time++
	cmds := make([]*schedulerpb.Command, n)
	for i := range cmds {
		f.next++
		cmds[i] = &schedulerpb.Command{Command: &schedulerpb.Command_Submit{Submit: &schedulerpb.Submit{
			Operation:      fmt.Sprintf("op-%d", f.next),
			InstanceName:   "main",
			DigestFunction: 1,
			ActionDigest:   &schedulerpb.Digest{Hash: fmt.Sprintf("%064x", f.next), SizeBytes: 142},
			Platform:       benchPlatforms[f.next%len(benchPlatforms)],
			Priority:       int32(f.next % 3),
			InvocationId:   fmt.Sprintf("inv-%d", f.next%10),
			Waiter:         fmt.Sprintf("stream-%d", f.next),
			TimeUnixNano:   f.time,
		}}}
	}
	return &schedulerpb.Batch{Commands: cmds}
}

// fill queues n operations in batches of 1000.
func (f *benchFarm) fill(n int) []Assignment {
	var as []Assignment
	for range n / 1000 {
		as = append(as, f.s.Apply(f.submits(1000)).Assignments...)
	}
	return as
}

// BenchmarkSubmit1000 applies batches of 1000 submits to a state with 100k
// queued operations and no free slots.
func BenchmarkSubmit1000(b *testing.B) {
	f := newBenchFarm(b)
	f.fill(100_000)
	for b.Loop() {
		b.StopTimer()
		batch := f.submits(1000)
		b.StartTimer()
		r := f.s.Apply(batch)
		b.StopTimer()
		if len(r.Assignments) != 0 || r.Results[999].Operation == "" {
			b.Fatal("unexpected response")
		}
		// Take them out again, so the queue stays at 100k.
		cancels := make([]*schedulerpb.Command, 0, 1000)
		for _, res := range r.Results {
			cancels = append(cancels, cancel(res.Operation))
		}
		f.s.Apply(&schedulerpb.Batch{Commands: cancels})
		f.s.Apply(&schedulerpb.Batch{Commands: []*schedulerpb.Command{compact(f.time + 1)}})
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/submit")
}

// BenchmarkComplete1000 applies batches of 1000 completions, each followed
// by the dispatch of 1000 queued operations (out of about 100k) onto the
// freed slots.
func BenchmarkComplete1000(b *testing.B) {
	f := newBenchFarm(b)
	running := f.fill(100_000)
	if len(running) != 1000 {
		b.Fatalf("%d running, want 1000", len(running))
	}
	result := []byte("an ExecuteResponse")
	i := 0
	for b.Loop() {
		b.StopTimer()
		f.time++
		cmds := make([]*schedulerpb.Command, len(running))
		for j, a := range running {
			cmds[j] = &schedulerpb.Command{Command: &schedulerpb.Command_Complete{Complete: &schedulerpb.Complete{
				Operation: a.Operation, Worker: a.Worker, Lease: a.Lease, Result: result, TimeUnixNano: f.time,
			}}}
		}
		batch := &schedulerpb.Batch{Commands: cmds}
		b.StartTimer()
		r := f.s.Apply(batch)
		b.StopTimer()
		if len(r.Assignments) != 1000 || len(r.Completions) != 1000 {
			b.Fatalf("%d assignments, %d completions", len(r.Assignments), len(r.Completions))
		}
		running = r.Assignments
		if i++; i%20 == 0 {
			f.s.Apply(&schedulerpb.Batch{Commands: []*schedulerpb.Command{compact(f.time + 1)}})
			f.fill(20_000)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1000, "ns/complete")
}

// BenchmarkCapture100k captures a state with 100k queued and 1000
// executing operations: the part of a snapshot that blocks Apply.
func BenchmarkCapture100k(b *testing.B) {
	f := newBenchFarm(b)
	f.fill(101_000)
	for b.Loop() {
		f.s.Capture()
	}
}

// BenchmarkSnapshot100k snapshots (captures and marshals) a state with 100k
// queued and 1000 executing operations.
func BenchmarkSnapshot100k(b *testing.B) {
	f := newBenchFarm(b)
	f.fill(101_000)
	var size int
	for b.Loop() {
		var buf bytes.Buffer
		if err := f.s.Snapshot(&buf); err != nil {
			b.Fatal(err)
		}
		size = buf.Len()
	}
	b.ReportMetric(float64(size), "bytes")
}

// BenchmarkRestore100k restores the snapshot of BenchmarkSnapshot100k.
func BenchmarkRestore100k(b *testing.B) {
	f := newBenchFarm(b)
	f.fill(101_000)
	var buf bytes.Buffer
	if err := f.s.Snapshot(&buf); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := New(Config{}).Restore(bytes.NewReader(buf.Bytes())); err != nil {
			b.Fatal(err)
		}
	}
}
