package state

import (
	"slices"
	"testing"
	"time"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

func TestProbe(t *testing.T) {
	b := &testing.B{}
	_ = b
	f := newBenchFarm(t)
	running := f.fill(100_000)
	var ds []time.Duration
	var phase [3]time.Duration
	for i := 0; i < 300; i++ {
		f.time++
		cmds := make([]*schedulerpb.Command, len(running))
		for j, a := range running {
			cmds[j] = &schedulerpb.Command{Command: &schedulerpb.Command_Complete{Complete: &schedulerpb.Complete{
				Operation: a.Operation, Worker: a.Worker, Lease: a.Lease, Result: []byte("x"), TimeUnixNano: f.time,
			}}}
		}
		t0 := time.Now()
		r := f.s.Apply(&schedulerpb.Batch{Commands: cmds})
		ds = append(ds, time.Since(t0))
		running = r.Assignments
		if i%20 == 19 {
			f.s.Apply(&schedulerpb.Batch{Commands: []*schedulerpb.Command{compact(f.time + 1)}})
			f.fill(20_000)
		}
		_ = phase
	}
	slices.Sort(ds)
	t.Logf("complete1000: min %v p50 %v p90 %v max %v", ds[0], ds[len(ds)/2], ds[len(ds)*9/10], ds[len(ds)-1])
	ds = ds[:0]
	for i := 0; i < 300; i++ {
		batch := f.submits(1000)
		t0 := time.Now()
		f.s.Apply(batch)
		ds = append(ds, time.Since(t0))
	}
	slices.Sort(ds)
	t.Logf("submit1000: min %v p50 %v p90 %v max %v", ds[0], ds[len(ds)/2], ds[len(ds)*9/10], ds[len(ds)-1])
}
