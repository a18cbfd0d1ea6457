package state

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

func restored(t testing.TB, from *State, into *State) *State {
	t.Helper()
	if err := into.Restore(bytes.NewReader(snapshotBytes(t, from))); err != nil {
		t.Fatal(err)
	}
	if err := into.check(); err != nil {
		t.Fatalf("invariant after restore: %v", err)
	}
	return into
}

func TestSnapshotRoundTrip(t *testing.T) {
	build := func() *State {
		s := New(Config{})
		r := apply(t, s,
			register("w1", 1, "nix-system=x86_64-linux"),
			register("w2", 2, "nix-system=x86_64-linux", "nix-features=kvm"),
			drain("w2", true),
		)
		var cmds []*schedulerpb.Command
		for i := range 10 {
			cmds = append(cmds, sub{name: fmt.Sprintf("a%d", i), inv: "A", platform: []string{"nix-system=x86_64-linux"}}.cmd())
		}
		cmds = append(cmds, sub{name: "b", inv: "B", prio: 1, cancelOnDC: true}.cmd(), sub{name: "k", inv: "B", platform: []string{"nix-features=kvm"}}.cmd())
		r = apply(t, s, cmds...)
		r = apply(t, s, complete(r.Assignments[0].Operation, "w1", r.Assignments[0].Lease, 5), attach("b", "extra"))
		apply(t, s, complete(r.Assignments[0].Operation, "w1", r.Assignments[0].Lease, 6), cancel("a5"))
		return s
	}
	s := build()
	snap := snapshotBytes(t, s)
	// Restoring into a state that has other contents replaces them.
	other := New(Config{})
	apply(t, other, register("zz", 3), sub{name: "zz-op"}.cmd())
	r := restored(t, s, other)
	if got := snapshotBytes(t, r); !bytes.Equal(got, snap) {
		t.Fatal("snapshot of the restored state differs")
	}
	for _, st := range []*State{s, r} {
		if ops := st.Operations(schedulerpb.Stage_STAGE_UNSPECIFIED); len(ops) != 12 {
			t.Fatalf("%d operations", len(ops))
		}
	}
	if !slices.EqualFunc(s.Workers(), r.Workers(), func(a, b *schedulerpb.Worker) bool { return proto.Equal(a, b) }) {
		t.Fatal("workers differ")
	}
	// Going on from the restored state gives the same results as going on
	// from the original; fairness state included (A was served, B not).
	more := [][]*schedulerpb.Command{
		{drain("w2", false)},
		{complete("a2", "w1", 3, 7), detach("b", "w-b")},
		{removeWorker("w2", "gone"), register("w3", 3)},
		{detach("b", "extra"), compact(6)},
	}
	for i, cmds := range more {
		got, want := format(apply(t, r, cmds...)), format(apply(t, s, cmds...))
		if got != want {
			t.Fatalf("batch %d after restore:\n%s\nwant:\n%s", i, got, want)
		}
	}
	if !bytes.Equal(snapshotBytes(t, r), snapshotBytes(t, s)) {
		t.Fatal("snapshots differ after more commands")
	}
	// Snapshots of equal states built separately are equal.
	if !bytes.Equal(snapshotBytes(t, build()), snap) {
		t.Fatal("snapshots of two identical histories differ")
	}
}

// TestCaptureIsolated writes a captured snapshot while Apply goes on (the
// race detector checks the sharing) and gets the bytes of the moment of
// capture.
func TestCaptureIsolated(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 2, "nix-system=x86_64-linux"),
		sub{name: "a", platform: []string{"nix-system=x86_64-linux"}, waiter: "c1"}.cmd(),
		sub{name: "b", platform: []string{"nix-system=x86_64-linux"}, waiter: "c1"}.cmd(),
		sub{name: "c", platform: []string{"nix-system=x86_64-linux"}, waiter: "c1"}.cmd())
	want := snapshotBytes(t, s)
	snap := s.Capture()
	done := make(chan []byte)
	go func() {
		var b bytes.Buffer
		if err := WriteSnapshot(&b, snap); err != nil {
			t.Error(err)
		}
		done <- b.Bytes()
	}()
	for i := range 50 {
		apply(t, s, attach("c", fmt.Sprintf("x%d", i)), sub{name: fmt.Sprintf("c%d", i), hash: "h-c", waiter: fmt.Sprintf("y%d", i)}.cmd())
	}
	apply(t, s, detach("c", "c1"), complete("a", "w", r.Assignments[0].Lease, 9), cancel("b"),
		reregister("w", 5, []string{"c"}, "nix-system=aarch64-linux"), compact(100))
	if got := <-done; !bytes.Equal(got, want) {
		t.Fatal("captured snapshot changed after capture")
	}
}

func TestRestoreErrors(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("w", 1), sub{name: "a"}.cmd(), sub{name: "b"}.cmd())
	before := snapshotBytes(t, s)
	bad := func(f func(*schedulerpb.Snapshot)) []byte {
		snap := s.snapshot()
		f(snap)
		b, err := proto.Marshal(snap)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for name, b := range map[string][]byte{
		"garbage":            []byte("\xff\xff\xff"),
		"version":            bad(func(p *schedulerpb.Snapshot) { p.Version = 99 }),
		"duplicate worker":   bad(func(p *schedulerpb.Snapshot) { p.Workers = append(p.Workers, p.Workers[0]) }),
		"duplicate op":       bad(func(p *schedulerpb.Snapshot) { p.Operations = append(p.Operations, p.Operations[0]) }),
		"unknown worker":     bad(func(p *schedulerpb.Snapshot) { p.Workers = nil }),
		"lease out of range": bad(func(p *schedulerpb.Snapshot) { p.NextLease = 1 }),
		"sequence":           bad(func(p *schedulerpb.Snapshot) { p.NextSequence = 2 }),
		"stage":              bad(func(p *schedulerpb.Snapshot) { p.Operations[1].Stage = 0 }),
		"duplicate action": bad(func(p *schedulerpb.Snapshot) {
			p.Operations[1].ActionDigest = p.Operations[0].ActionDigest
		}),
	} {
		if err := s.Restore(bytes.NewReader(b)); err == nil {
			t.Errorf("%s: restored", name)
		} else if !strings.Contains(err.Error(), "scheduler snapshot") {
			t.Errorf("%s: error %v lacks context", name, err)
		}
		if !bytes.Equal(snapshotBytes(t, s), before) {
			t.Fatalf("%s: failed restore changed the state", name)
		}
	}
}

// gen generates random but mostly meaningful batches.
type gen struct {
	rng     *rand.Rand
	time    int64
	nextOp  int
	leases  []Assignment // recent assignments
	names   []string     // recent operation names
	workers []string
}

var (
	genPlatforms = [][]string{
		nil,
		{"nix-system=x86_64-linux"},
		{"nix-system=aarch64-linux"},
		{"nix-system=x86_64-linux", "nix-features=kvm"},
		{"nix-system=x86_64-linux", "nix-features=big-parallel,kvm", "memory-limit=1G"},
		{"OSFamily=linux", "network=true"},
		{"nix-system=riscv64-linux"},
	}
	genOffers = []string{"nix-system=x86_64-linux", "nix-system=aarch64-linux", "nix-features=kvm", "nix-features=big-parallel", "OSFamily=linux"}
)

func (g *gen) pick(xs []string) string {
	if len(xs) == 0 {
		return "none"
	}
	return xs[g.rng.IntN(len(xs))]
}

func (g *gen) command() *schedulerpb.Command {
	g.time += int64(g.rng.IntN(3))
	r := g.rng.IntN(100)
	switch {
	case r < 35:
		g.nextOp++
		name := fmt.Sprintf("op%d", g.nextOp)
		g.names = append(g.names, name)
		c := sub{
			name:       name,
			inv:        fmt.Sprintf("inv%d", g.rng.IntN(4)),
			hash:       fmt.Sprintf("h%d", g.rng.IntN(40)),
			waiter:     fmt.Sprintf("c%d", g.rng.IntN(6)),
			prio:       int32(g.rng.IntN(4)) - 1,
			platform:   genPlatforms[g.rng.IntN(len(genPlatforms))],
			cancelOnDC: g.rng.IntN(2) == 0,
			time:       g.time,
		}.cmd()
		c.GetSubmit().InstanceName = fmt.Sprintf("i%d", g.rng.IntN(2))
		return c
	case r < 60:
		if len(g.leases) == 0 || g.rng.IntN(10) == 0 {
			return complete(g.pick(g.names), g.pick(g.workers), uint64(g.rng.IntN(50)), g.time)
		}
		a := g.leases[g.rng.IntN(len(g.leases))]
		return complete(a.Operation, a.Worker, a.Lease, g.time)
	case r < 68:
		id := fmt.Sprintf("w%d", g.rng.IntN(6))
		if !slices.Contains(g.workers, id) {
			g.workers = append(g.workers, id)
		}
		var platform, running []string
		for _, o := range genOffers {
			if g.rng.IntN(2) == 0 {
				platform = append(platform, o)
			}
		}
		for range g.rng.IntN(4) {
			running = append(running, g.pick(g.names))
		}
		c := reregister(id, int32(g.rng.IntN(5)), running, platform...)
		c.GetRegisterWorker().TimeUnixNano = g.time
		return c
	case r < 72:
		c := removeWorker(g.pick(g.workers), "chaos")
		c.GetRemoveWorker().TimeUnixNano = g.time
		return c
	case r < 77:
		return drain(g.pick(g.workers), g.rng.IntN(3) == 0)
	case r < 81:
		return fail(g.pick(g.names), 0, int32(g.rng.IntN(17)), "failed")
	case r < 86:
		return cancel(g.pick(g.names))
	case r < 89:
		return attach(g.pick(g.names), fmt.Sprintf("c%d", g.rng.IntN(6)))
	case r < 95:
		return detach(g.pick(g.names), fmt.Sprintf("c%d", g.rng.IntN(6)))
	case r < 98:
		// Often a recent operation, which may still be in flight.
		if n := len(g.names); n > 0 && g.rng.IntN(2) == 0 {
			return deleteCmd(g.names[n-1-g.rng.IntN(min(n, 5))], g.time)
		}
		return deleteCmd(g.pick(g.names), g.time)
	default:
		return compact(g.time - int64(g.rng.IntN(20)))
	}
}

func (g *gen) batch() []*schedulerpb.Command {
	cmds := make([]*schedulerpb.Command, 1+g.rng.IntN(8))
	for i := range cmds {
		cmds[i] = g.command()
	}
	return cmds
}

func (g *gen) observe(r *Response) {
	g.leases = append(g.leases, r.Assignments...)
	if n := len(g.leases); n > 40 {
		g.leases = slices.Clone(g.leases[n-40:])
	}
	if n := len(g.names); n > 60 {
		g.names = slices.Clone(g.names[n-60:])
	}
}

// TestDeterminism applies random batches to two fresh states, and from the
// middle on to a third restored from a snapshot: their responses and
// snapshots must be identical.
func TestDeterminism(t *testing.T) {
	seeds := 20
	if testing.Short() {
		seeds = 4
	}
	for seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			g := &gen{rng: rand.New(rand.NewPCG(uint64(seed), 7))}
			a, b := New(Config{}), New(Config{})
			var c *State
			const batches = 400
			stats := map[string]int{}
			for i := range batches {
				if i == batches/2 {
					c = restored(t, a, New(Config{}))
				}
				cmds := g.batch()
				// Apply clones: a state keeps references into its batch.
				ra := applyAny(t, a, cmds...)
				rb := applyAny(t, b, cloneCmds(cmds)...)
				fa := format(ra)
				if fb := format(rb); fa != fb {
					t.Fatalf("batch %d: responses differ:\n%s\nvs\n%s", i, fa, fb)
				}
				if c != nil {
					if fc := format(applyAny(t, c, cloneCmds(cmds)...)); fa != fc {
						t.Fatalf("batch %d: restored state responds differently:\n%s\nvs\n%s", i, fa, fc)
					}
				}
				g.observe(ra)
				stats["assign"] += len(ra.Assignments)
				stats["complete"] += len(ra.Completions)
				stats["cancel"] += len(ra.Cancellations)
				for _, c := range ra.Completions {
					if c.Code == codes.Unavailable {
						stats["retry cap"]++
					}
					if c.Deleted != nil {
						stats["deleted on completion"]++
					}
				}
				for _, a := range ra.Assignments {
					if a.Attempt > 1 {
						stats["retry"]++
					}
				}
				for _, res := range ra.Results {
					switch {
					case res.Err != nil:
						stats["rejected"]++
					case res.Deduplicated:
						stats["dedup"]++
					case res.Stale:
						stats["stale"]++
					case res.Removed > 0:
						stats["removed"]++
					}
				}
				if i%50 == 49 {
					sa := snapshotBytes(t, a)
					if !bytes.Equal(sa, snapshotBytes(t, b)) || (c != nil && !bytes.Equal(sa, snapshotBytes(t, c))) {
						t.Fatalf("batch %d: snapshots differ", i)
					}
				}
			}
			for _, k := range []string{"assign", "complete", "cancel", "rejected", "dedup", "stale", "retry", "retry cap", "removed", "deleted on completion"} {
				if stats[k] == 0 {
					t.Errorf("the random run had no %s: %v", k, stats)
				}
			}
			t.Logf("%v", stats)
		})
	}
}

func cloneCmds(cmds []*schedulerpb.Command) []*schedulerpb.Command {
	out := make([]*schedulerpb.Command, len(cmds))
	for i, c := range cmds {
		out[i] = proto.Clone(c).(*schedulerpb.Command)
	}
	return out
}
