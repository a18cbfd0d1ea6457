package state

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

func TestSubmitDedup(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, sub{name: "op1", hash: "a"}.cmd(), sub{name: "op2", hash: "a", waiter: "w2"}.cmd(), sub{name: "op3", hash: "b"}.cmd())
	want := []Result{{Operation: "op1"}, {Operation: "op1", Deduplicated: true}, {Operation: "op3"}}
	if !slices.Equal(r.Results, want) {
		t.Fatalf("results %+v, want %+v", r.Results, want)
	}
	if op := mustOp(t, s, "op1"); !slices.Equal(op.Waiters, []string{"w-op1", "w2"}) {
		t.Errorf("waiters %v", op.Waiters)
	}
	if _, ok := s.Operation("op2"); ok {
		t.Error("deduplicated submit created op2")
	}
	// While executing, a submit still joins.
	r = apply(t, s, register("w1", 1))
	if got := assigned(r); !slices.Equal(got, []string{"op1@w1"}) {
		t.Fatalf("assignments %v", got)
	}
	r = apply(t, s, sub{name: "op4", hash: "a", waiter: "w4"}.cmd())
	if r.Results[0] != (Result{Operation: "op1", Deduplicated: true, Executing: true}) {
		t.Fatalf("submit while executing: %+v", r.Results[0])
	}
	if name, ok := s.InFlight("main", 1, &schedulerpb.Digest{Hash: "a", SizeBytes: 10}); !ok || name != "op1" {
		t.Errorf("InFlight = %q, %v", name, ok)
	}
	// Another instance or digest function is another action.
	other := sub{name: "op5", hash: "a"}.cmd()
	other.GetSubmit().InstanceName = "other"
	other2 := sub{name: "op6", hash: "a"}.cmd()
	other2.GetSubmit().DigestFunction = 9
	r = apply(t, s, other, other2)
	if r.Results[0].Deduplicated || r.Results[1].Deduplicated {
		t.Fatalf("different instance or function deduplicated: %+v", r.Results)
	}
	// After completion, a submit is a new operation.
	r = apply(t, s, complete("op1", "w1", 1, 5))
	if len(r.Completions) != 1 || r.Completions[0].Operation != "op1" || string(r.Completions[0].Result) != "result-op1" ||
		!slices.Equal(r.Completions[0].Waiters, []string{"w-op1", "w2", "w4"}) {
		t.Fatalf("completions %+v", r.Completions)
	}
	if _, ok := s.InFlight("main", 1, &schedulerpb.Digest{Hash: "a", SizeBytes: 10}); ok {
		t.Error("completed action still in flight")
	}
	r = apply(t, s, sub{name: "op7", hash: "a"}.cmd())
	if r.Results[0] != (Result{Operation: "op7"}) {
		t.Fatalf("submit after completion: %+v", r.Results[0])
	}
	// The same waiter submitting twice is listed once.
	apply(t, s, sub{name: "op8", hash: "a", waiter: "w-op7"}.cmd())
	if op := mustOp(t, s, "op7"); !slices.Equal(op.Waiters, []string{"w-op7"}) {
		t.Errorf("waiters %v", op.Waiters)
	}
}

func TestDedupPromotesPriority(t *testing.T) {
	s := New(Config{})
	apply(t, s, sub{name: "a", prio: 5}.cmd(), sub{name: "b", prio: 3}.cmd())
	apply(t, s, sub{name: "a2", hash: "h-a", prio: 1}.cmd())
	if op := mustOp(t, s, "a"); op.Priority != 1 {
		t.Fatalf("priority %d, want 1", op.Priority)
	}
	r := apply(t, s, register("w", 1))
	if got := assignedOps(r); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("assignments %v, want [a]", got)
	}
	// A less urgent submit does not demote it.
	apply(t, s, sub{name: "b2", hash: "h-b", prio: 9}.cmd())
	if op := mustOp(t, s, "b"); op.Priority != 3 {
		t.Fatalf("priority %d, want 3", op.Priority)
	}
}

// drainAll completes every assignment of r, one batch per assignment, and
// returns the order of all assignments made.
func drainAll(t *testing.T, s *State, r *Response) []string {
	t.Helper()
	var order []string
	pending := slices.Clone(r.Assignments)
	for len(pending) > 0 {
		a := pending[0]
		pending = pending[1:]
		order = append(order, a.Operation)
		r := apply(t, s, complete(a.Operation, a.Worker, a.Lease, 10))
		pending = append(pending, r.Assignments...)
	}
	return order
}

func TestPriorityOrder(t *testing.T) {
	s := New(Config{})
	apply(t, s,
		sub{name: "p5", prio: 5}.cmd(),
		sub{name: "p1", prio: 1}.cmd(),
		sub{name: "pneg", prio: -2}.cmd(),
		sub{name: "p3", prio: 3}.cmd(),
		sub{name: "p1b", prio: 1}.cmd(),
	)
	want := []QueueLength{{-2, 1}, {1, 2}, {3, 1}, {5, 1}}
	if got := s.QueueLengths(); !slices.Equal(got, want) {
		t.Errorf("QueueLengths = %v, want %v", got, want)
	}
	order := drainAll(t, s, apply(t, s, register("w", 1)))
	if want := []string{"pneg", "p1", "p1b", "p3", "p5"}; !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
	if got := s.QueueLengths(); len(got) != 0 {
		t.Errorf("QueueLengths = %v, want none", got)
	}
}

func TestFIFOWithinInvocation(t *testing.T) {
	s := New(Config{})
	var cmds []*schedulerpb.Command
	var want []string
	for i := range 20 {
		name := fmt.Sprintf("op%02d", 19-i) // names in reverse, so order is not by name
		cmds = append(cmds, sub{name: name, inv: "inv"}.cmd())
		want = append(want, name)
	}
	apply(t, s, cmds...)
	if order := drainAll(t, s, apply(t, s, register("w", 1))); !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
}

func TestFairness(t *testing.T) {
	s := New(Config{})
	var cmds []*schedulerpb.Command
	for i := range 1000 {
		cmds = append(cmds, sub{name: fmt.Sprintf("a%04d", i), inv: "A"}.cmd())
	}
	apply(t, s, cmds...)
	apply(t, s, sub{name: "b", inv: "B"}.cmd())
	r := apply(t, s, register("w", 2))
	if got := assignedOps(r); !slices.Contains(got, "b") {
		t.Fatalf("first assignments %v do not include B's operation", got)
	}
}

func TestFairnessRoundRobin(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("w", 1), sub{name: "busy", inv: "X"}.cmd())
	// The worker is busy; queue A's backlog, then B's and C's.
	var cmds []*schedulerpb.Command
	for i := range 5 {
		cmds = append(cmds, sub{name: fmt.Sprintf("a%d", i), inv: "A"}.cmd())
	}
	cmds = append(cmds, sub{name: "b0", inv: "B"}.cmd(), sub{name: "b1", inv: "B"}.cmd(), sub{name: "c0", inv: "C"}.cmd())
	apply(t, s, cmds...)
	r := apply(t, s, complete("busy", "w", 1, 2))
	order := drainAll(t, s, r)
	want := []string{"a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"}
	if !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
}

// TestFairnessTrickle: an invocation that keeps emptying its queue, one
// operation at a time, takes turns with a backlog instead of jumping ahead
// of it every time.
func TestFairnessTrickle(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 1), sub{name: "first", inv: "A"}.cmd())
	var cmds []*schedulerpb.Command
	for i := range 10 {
		cmds = append(cmds, sub{name: fmt.Sprintf("a%d", i), inv: "A"}.cmd())
	}
	apply(t, s, cmds...)
	running := r.Assignments[0]
	var order []string
	for i := range 10 {
		// B submits one operation, then the worker finishes its current one.
		apply(t, s, sub{name: fmt.Sprintf("b%d", i), inv: "B"}.cmd())
		r = apply(t, s, complete(running.Operation, "w", running.Lease, 2))
		running = r.Assignments[0]
		order = append(order, running.Operation[:1])
	}
	if got, want := strings.Join(order, ""), "ababababab"; got != want {
		t.Fatalf("order %s, want %s", got, want)
	}
}

func TestPlatformMatching(t *testing.T) {
	for _, tc := range []struct {
		name   string
		worker []string
		op     []string
		match  bool
	}{
		{"no properties", nil, nil, true},
		{"equal", []string{"OSFamily=linux"}, []string{"OSFamily=linux"}, true},
		{"different value", []string{"OSFamily=linux"}, []string{"OSFamily=darwin"}, false},
		{"missing key", nil, []string{"OSFamily=linux"}, false},
		{"worker offers more", []string{"OSFamily=linux", "ISA=x86-64"}, []string{"OSFamily=linux"}, true},
		{"multi-valued worker key", []string{"nix-system=x86_64-linux", "nix-system=i686-linux"}, []string{"nix-system=i686-linux"}, true},
		{"multi-valued worker key, other", []string{"nix-system=x86_64-linux", "nix-system=i686-linux"}, []string{"nix-system=aarch64-linux"}, false},
		{"op key twice, both offered", []string{"nix-system=x86_64-linux", "nix-system=i686-linux"}, []string{"nix-system=i686-linux", "nix-system=x86_64-linux"}, true},
		{"op key twice, one offered", []string{"nix-system=x86_64-linux"}, []string{"nix-system=i686-linux", "nix-system=x86_64-linux"}, false},
		{"features subset", []string{"nix-features=kvm,big-parallel,benchmark"}, []string{"nix-features=big-parallel,kvm"}, true},
		{"features union of values", []string{"nix-features=kvm", "nix-features=big-parallel"}, []string{"nix-features=big-parallel,kvm"}, true},
		{"features missing one", []string{"nix-features=kvm"}, []string{"nix-features=big-parallel,kvm"}, false},
		{"features empty op value", nil, []string{"nix-features="}, true},
		{"features spaces and duplicates", []string{"nix-features=kvm"}, []string{"nix-features= kvm,,kvm "}, true},
		{"ignored keys", nil, []string{"network=true", "nix-pty=true", "memory-limit=1G", "pids-limit=10", "cpu-limit=2"}, true},
		{"ignored and matched", []string{"nix-system=x86_64-linux"}, []string{"nix-system=x86_64-linux", "memory-limit=8G"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := New(Config{})
			apply(t, s, register("w", 1, tc.worker...))
			r := apply(t, s, sub{name: "op", platform: tc.op}.cmd())
			if got := len(r.Assignments) == 1; got != tc.match {
				t.Fatalf("assigned = %v, want %v", got, tc.match)
			}
			if !tc.match {
				if op := mustOp(t, s, "op"); op.Stage != schedulerpb.Stage_STAGE_QUEUED {
					t.Fatalf("stage %v, want queued", op.Stage)
				}
			}
			// The same with the worker registering after the submit.
			s = New(Config{})
			apply(t, s, sub{name: "op", platform: tc.op}.cmd())
			r = apply(t, s, register("w", 1, tc.worker...))
			if got := len(r.Assignments) == 1; got != tc.match {
				t.Fatalf("assigned on register = %v, want %v", got, tc.match)
			}
			_, _, unsat := s.Unsatisfiable(props(tc.op...))
			if unsat == tc.match {
				t.Fatalf("Unsatisfiable = %v with match %v", unsat, tc.match)
			}
		})
	}
}

func TestConfigKeys(t *testing.T) {
	// Nothing ignored, and no list keys: nix-features is an equal key.
	s := New(Config{IgnoredKeys: []string{}, ListKeys: []string{}})
	apply(t, s, register("w", 2, "nix-features=a,b"))
	r := apply(t, s, sub{name: "x", platform: []string{"network=true"}}.cmd(), sub{name: "y", platform: []string{"nix-features=a"}}.cmd(),
		sub{name: "z", platform: []string{"nix-features=a,b"}}.cmd())
	if got := assignedOps(r); !slices.Equal(got, []string{"z"}) {
		t.Fatalf("assignments %v, want [z]", got)
	}
}

func TestSpreadAcrossWorkers(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("a", 2), register("b", 4), register("c", 4))
	var cmds []*schedulerpb.Command
	for i := range 6 {
		cmds = append(cmds, sub{name: fmt.Sprintf("op%d", i)}.cmd())
	}
	r := apply(t, s, cmds...)
	want := []string{"op0@b", "op1@c", "op2@b", "op3@c", "op4@a", "op5@b"}
	if got := assigned(r); !slices.Equal(got, want) {
		t.Fatalf("assignments %v, want %v", got, want)
	}
	for _, a := range r.Assignments {
		if a.Attempt != 1 || a.Instance != "main" || a.DigestFunction != 1 || a.ActionDigest.GetHash() != "h-"+a.Operation || a.QueuedUnixNano != 1 {
			t.Fatalf("assignment %+v", a)
		}
	}
}

func TestGroupsCompeteByPriority(t *testing.T) {
	s := New(Config{})
	// One worker serves two platforms; the more urgent one goes first,
	// whichever group it is in.
	apply(t, s,
		sub{name: "x-low", prio: 5, platform: []string{"nix-system=x86_64-linux"}}.cmd(),
		sub{name: "i-high", prio: 1, platform: []string{"nix-system=i686-linux"}}.cmd(),
		sub{name: "x-high", prio: 1, platform: []string{"nix-system=x86_64-linux"}}.cmd(),
	)
	order := drainAll(t, s, apply(t, s, register("w", 1, "nix-system=x86_64-linux", "nix-system=i686-linux")))
	if want := []string{"i-high", "x-high", "x-low"}; !slices.Equal(order, want) {
		t.Fatalf("order %v, want %v", order, want)
	}
}

func TestDrain(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("w", 2))
	r := apply(t, s, sub{name: "a"}.cmd(), drain("w", true))
	// Dispatch runs after the batch: the drained worker gets nothing.
	if len(r.Assignments) != 0 {
		t.Fatalf("drained worker got %v", assigned(r))
	}
	apply(t, s, drain("w", false))
	if op := mustOp(t, s, "a"); op.Stage != schedulerpb.Stage_STAGE_EXECUTING {
		t.Fatalf("stage %v after undrain", op.Stage)
	}
	// A drained worker keeps its running operations and can complete them.
	apply(t, s, drain("w", true), sub{name: "b"}.cmd())
	if op := mustOp(t, s, "a"); op.Stage != schedulerpb.Stage_STAGE_EXECUTING || op.Worker != "w" {
		t.Fatalf("drained worker lost its operation: %v", op)
	}
	if ws := s.Workers(); len(ws) != 1 || !ws[0].Drained || !slices.Equal(ws[0].Running, []string{"a"}) {
		t.Fatalf("workers %v", ws)
	}
	r = apply(t, s, complete("a", "w", 1, 4))
	if r.Results[0].Stale || len(r.Assignments) != 0 {
		t.Fatalf("complete on drained worker: %+v", r)
	}
	r = apply(t, s, drain("w", false))
	if got := assignedOps(r); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("assignments %v after undrain", got)
	}
}

func TestRemoveWorkerRequeuesAndRetryCap(t *testing.T) {
	s := New(Config{MaxAttempts: 3})
	apply(t, s, sub{name: "op"}.cmd(), sub{name: "other"}.cmd())
	for attempt := int32(1); attempt <= 3; attempt++ {
		id := fmt.Sprintf("w%d", attempt)
		r := apply(t, s, register(id, 1))
		if len(r.Assignments) != 1 || r.Assignments[0].Operation != "op" || r.Assignments[0].Attempt != attempt {
			t.Fatalf("attempt %d: assignments %+v", attempt, r.Assignments)
		}
		r = apply(t, s, removeWorker(id, "missed heartbeats"))
		op := mustOp(t, s, "op")
		if attempt < 3 {
			if op.Stage != schedulerpb.Stage_STAGE_QUEUED || op.Attempts != attempt || op.Worker != "" || len(r.Completions) != 0 {
				t.Fatalf("attempt %d: after removal %v", attempt, op)
			}
			// Requeued in its place: ahead of later operations.
			continue
		}
		if op.Stage != schedulerpb.Stage_STAGE_COMPLETED || op.Status.GetCode() != int32(codes.Unavailable) {
			t.Fatalf("after the last attempt: %v", op)
		}
		want := "lost 3 times, last by worker w3: missed heartbeats"
		if op.Status.GetMessage() != want || len(r.Completions) != 1 || r.Completions[0].Message != want || r.Completions[0].Code != codes.Unavailable {
			t.Fatalf("message %q, completions %+v; want %q", op.Status.GetMessage(), r.Completions, want)
		}
	}
	if ws := s.Workers(); len(ws) != 0 {
		t.Fatalf("workers %v after removal", ws)
	}
	if op := mustOp(t, s, "other"); op.Stage != schedulerpb.Stage_STAGE_QUEUED {
		t.Fatalf("other: %v", op)
	}
}

func TestReregisterReconciles(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 3), sub{name: "a"}.cmd(), sub{name: "b"}.cmd(), sub{name: "c"}.cmd())
	if len(r.Assignments) != 3 {
		t.Fatalf("assignments %v", assigned(r))
	}
	apply(t, s, sub{name: "d"}.cmd())
	// The worker comes back running a, c and something unknown to it; b is
	// lost, requeued behind nothing (it is older than d) and leased again.
	r = apply(t, s, reregister("w", 2, []string{"a", "c", "zzz", "a"}))
	if want := []Cancellation{{Operation: "zzz", Worker: "w"}}; !slices.Equal(r.Cancellations, want) {
		t.Fatalf("cancellations %+v, want %+v", r.Cancellations, want)
	}
	if got := assignedOps(r); len(got) != 0 {
		t.Fatalf("assignments %v with 2 slots, 2 running", got)
	}
	for name, stage := range map[string]schedulerpb.Stage{"a": schedulerpb.Stage_STAGE_EXECUTING, "c": schedulerpb.Stage_STAGE_EXECUTING, "b": schedulerpb.Stage_STAGE_QUEUED, "d": schedulerpb.Stage_STAGE_QUEUED} {
		if op := mustOp(t, s, name); op.Stage != stage {
			t.Errorf("%s: stage %v, want %v", name, op.Stage, stage)
		}
	}
	// The old lease of a is still good.
	r = apply(t, s, complete("a", "w", 1, 5))
	if r.Results[0].Stale {
		t.Fatal("complete of a reconciled lease is stale")
	}
	if got := assignedOps(r); !slices.Equal(got, []string{"b"}) {
		t.Fatalf("assignments %v, want [b]", got)
	}
	if a := r.Assignments[0]; a.Attempt != 2 {
		t.Fatalf("attempt %d, want 2", a.Attempt)
	}
	// Re-registering with a new platform changes what it matches.
	apply(t, s, sub{name: "e", platform: []string{"nix-system=aarch64-linux"}}.cmd())
	r = apply(t, s, reregister("w", 10, []string{"b", "c"}, "nix-system=aarch64-linux"))
	// e's queue was never served, so it goes before d.
	if got := assignedOps(r); !slices.Equal(got, []string{"e", "d"}) {
		t.Fatalf("assignments %v, want [e d]", got)
	}
	r = apply(t, s, sub{name: "f", platform: []string{"nix-system=x86_64-linux"}}.cmd())
	if got := assignedOps(r); len(got) != 0 {
		t.Fatalf("assignments %v: the worker no longer offers x86_64-linux", got)
	}
}

func TestStaleComplete(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w1", 1), sub{name: "op"}.cmd())
	first := r.Assignments[0]
	apply(t, s, removeWorker("w1", "gone"))
	r = apply(t, s, register("w2", 1))
	second := r.Assignments[0]
	if second.Lease == first.Lease {
		t.Fatal("lease reused")
	}
	for _, c := range []*schedulerpb.Command{
		complete("op", "w1", first.Lease, 5),  // the lost lease
		complete("op", "w2", first.Lease, 5),  // right worker, old lease
		complete("op", "w1", second.Lease, 5), // wrong worker
	} {
		r = apply(t, s, c)
		if !r.Results[0].Stale || len(r.Completions) != 0 {
			t.Fatalf("%v: %+v", c, r)
		}
	}
	r = apply(t, s, complete("op", "w2", second.Lease, 5))
	if r.Results[0].Stale || len(r.Completions) != 1 {
		t.Fatalf("current lease: %+v", r)
	}
	op := mustOp(t, s, "op")
	if op.Stage != schedulerpb.Stage_STAGE_COMPLETED || string(op.Result) != "result-op" || op.Status != nil ||
		op.CompletedUnixNano != 5 || op.Attempts != 2 {
		t.Fatalf("completed op %v", op)
	}
	// A second completion is stale too, and the slot was freed once.
	r = apply(t, s, complete("op", "w2", second.Lease, 6))
	if !r.Results[0].Stale {
		t.Fatal("second completion not stale")
	}
	if ws := s.Workers(); len(ws[0].Running) != 0 {
		t.Fatalf("worker still running %v", ws[0].Running)
	}
	r = apply(t, s, sub{name: "next"}.cmd())
	if got := assigned(r); !slices.Equal(got, []string{"next@w2"}) {
		t.Fatalf("assignments %v", got)
	}
}

func TestCancel(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 1), sub{name: "run"}.cmd(), sub{name: "wait"}.cmd())
	lease := r.Assignments[0].Lease
	r = apply(t, s, cancel("wait"))
	if len(r.Cancellations) != 0 || len(r.Completions) != 1 || r.Completions[0].Code != codes.Canceled {
		t.Fatalf("cancel queued: %+v", r)
	}
	apply(t, s, sub{name: "next"}.cmd())
	r = apply(t, s, cancel("run"))
	if want := []Cancellation{{Operation: "run", Worker: "w", Lease: lease}}; !slices.Equal(r.Cancellations, want) {
		t.Fatalf("cancellations %+v, want %+v", r.Cancellations, want)
	}
	if op := mustOp(t, s, "run"); op.Stage != schedulerpb.Stage_STAGE_COMPLETED || op.Status.GetCode() != int32(codes.Canceled) || op.Worker != "" {
		t.Fatalf("cancelled op %v", op)
	}
	// The slot is free again.
	if got := assignedOps(r); !slices.Equal(got, []string{"next"}) {
		t.Fatalf("assignments %v", got)
	}
	r = apply(t, s, cancel("run"))
	if !r.Results[0].Stale || len(r.Completions) != 0 {
		t.Fatalf("second cancel: %+v", r)
	}
	// The late completion of the cancelled lease is stale.
	if r = apply(t, s, complete("run", "w", lease, 9)); !r.Results[0].Stale {
		t.Fatal("completion after cancel not stale")
	}
}

func TestFail(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 2), sub{name: "x"}.cmd(), sub{name: "y"}.cmd())
	lx, ly := r.Assignments[0].Lease, r.Assignments[1].Lease
	apply(t, s, sub{name: "q", platform: []string{"nix-system=mips-linux"}}.cmd())
	r = apply(t, s, fail("q", 0, int32(codes.FailedPrecondition), "no worker offers nix-system=mips-linux"))
	if len(r.Completions) != 1 || r.Completions[0].Code != codes.FailedPrecondition {
		t.Fatalf("fail queued: %+v", r)
	}
	// From the worker itself: lease-guarded, no cancellation.
	if r = apply(t, s, fail("x", ly, int32(codes.Internal), "boom")); !r.Results[0].Stale {
		t.Fatal("fail with another lease not stale")
	}
	r = apply(t, s, fail("x", lx, int32(codes.Internal), "boom"))
	if len(r.Cancellations) != 0 || len(r.Completions) != 1 {
		t.Fatalf("fail with lease: %+v", r)
	}
	// From the leader: the worker is told to stop.
	r = apply(t, s, fail("y", 0, int32(codes.DeadlineExceeded), "timeout"))
	if want := []Cancellation{{Operation: "y", Worker: "w", Lease: ly}}; !slices.Equal(r.Cancellations, want) {
		t.Fatalf("cancellations %+v, want %+v", r.Cancellations, want)
	}
	if op := mustOp(t, s, "y"); op.Status.GetCode() != int32(codes.DeadlineExceeded) || op.Status.GetMessage() != "timeout" {
		t.Fatalf("failed op %v", op)
	}
	if ws := s.Workers(); len(ws[0].Running) != 0 {
		t.Fatalf("worker still running %v", ws[0].Running)
	}
}

func TestDetach(t *testing.T) {
	s := New(Config{})
	apply(t, s,
		sub{name: "a", waiter: "c1", cancelOnDC: true}.cmd(),
		sub{name: "a2", hash: "h-a", waiter: "c2", cancelOnDC: true}.cmd(),
		sub{name: "b", waiter: "c1", cancelOnDC: true}.cmd(),
		sub{name: "b2", hash: "h-b", waiter: "c2", cancelOnDC: false}.cmd(),
	)
	apply(t, s, attach("a", "c3"))
	r := apply(t, s, detach("a", "c1"), detach("a", "c2"), detach("b", "c1"), detach("b", "c2"))
	for i, res := range r.Results {
		if res.Cancelled {
			t.Fatalf("result %d cancelled too early: %+v", i, r.Results)
		}
	}
	if len(r.Completions) != 0 {
		t.Fatalf("completions %+v", r.Completions)
	}
	// b had a submit without cancel_on_disconnect: it stays queued.
	if op := mustOp(t, s, "b"); op.Stage != schedulerpb.Stage_STAGE_QUEUED || len(op.Waiters) != 0 {
		t.Fatalf("b: %v", op)
	}
	// The last waiter of a leaves: a is cancelled. Executing, so its worker
	// is told.
	r = apply(t, s, register("w", 2))
	leaseA := r.Assignments[0].Lease
	r = apply(t, s, detach("a", "nobody"), detach("a", "c3"))
	if r.Results[0].Cancelled || !r.Results[1].Cancelled {
		t.Fatalf("results %+v", r.Results)
	}
	if want := []Cancellation{{Operation: "a", Worker: "w", Lease: leaseA}}; !slices.Equal(r.Cancellations, want) {
		t.Fatalf("cancellations %+v, want %+v", r.Cancellations, want)
	}
	if len(r.Completions) != 1 || r.Completions[0].Code != codes.Canceled || len(r.Completions[0].Waiters) != 0 {
		t.Fatalf("completions %+v", r.Completions)
	}
	// Queued, with cancel_on_disconnect: cancelled without a cancellation.
	apply(t, s, drain("w", true), sub{name: "c", waiter: "c9", cancelOnDC: true}.cmd())
	r = apply(t, s, detach("c", "c9"))
	if !r.Results[0].Cancelled || len(r.Cancellations) != 0 || len(r.Completions) != 1 {
		t.Fatalf("detach queued: %+v", r)
	}
}

func TestCompact(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 3), sub{name: "a"}.cmd(), sub{name: "b"}.cmd(), sub{name: "c"}.cmd(),
		sub{name: "q", platform: []string{"nix-system=none"}}.cmd())
	apply(t, s, complete("a", "w", r.Assignments[0].Lease, 10))
	apply(t, s, complete("b", "w", r.Assignments[1].Lease, 20))
	r = apply(t, s, compact(20))
	if r.Results[0].Removed != 1 {
		t.Fatalf("removed %d, want 1", r.Results[0].Removed)
	}
	var names []string
	for _, op := range s.Operations(schedulerpb.Stage_STAGE_UNSPECIFIED) {
		names = append(names, op.Name)
	}
	if want := []string{"b", "c", "q"}; !slices.Equal(names, want) {
		t.Fatalf("operations %v, want %v", names, want)
	}
	if r = apply(t, s, compact(21)); r.Results[0].Removed != 1 {
		t.Fatalf("removed %d, want 1", r.Results[0].Removed)
	}
	// The name of a compacted operation is unknown, and free again.
	if r = applyAny(t, s, complete("a", "w", 1, 30)); status.Code(r.Results[0].Err) != codes.NotFound {
		t.Fatalf("complete of compacted op: %v", r.Results[0].Err)
	}
	// Empty groups are dropped; a later submit recreates them.
	if len(s.groups) != 1 {
		t.Fatalf("%d groups after compaction, want 1", len(s.groups))
	}
	r = apply(t, s, sub{name: "a", hash: "new"}.cmd())
	if got := assignedOps(r); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("assignments %v", got)
	}
}

func TestOperationsAndQueries(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 1, "OSFamily=linux"), sub{name: "z", prio: 2, inv: "i", platform: []string{"OSFamily=linux"}}.cmd(),
		sub{name: "y", prio: 3, time: 7}.cmd())
	apply(t, s, complete("z", "w", r.Assignments[0].Lease, 9))
	stages := map[schedulerpb.Stage][]string{}
	for _, st := range []schedulerpb.Stage{schedulerpb.Stage_STAGE_QUEUED, schedulerpb.Stage_STAGE_EXECUTING, schedulerpb.Stage_STAGE_COMPLETED, schedulerpb.Stage_STAGE_UNSPECIFIED} {
		for _, op := range s.Operations(st) {
			stages[st] = append(stages[st], op.Name)
		}
	}
	if !slices.Equal(stages[schedulerpb.Stage_STAGE_UNSPECIFIED], []string{"z", "y"}) ||
		!slices.Equal(stages[schedulerpb.Stage_STAGE_COMPLETED], []string{"z"}) ||
		!slices.Equal(stages[schedulerpb.Stage_STAGE_EXECUTING], []string{"y"}) ||
		len(stages[schedulerpb.Stage_STAGE_QUEUED]) != 0 {
		t.Fatalf("operations by stage %v", stages)
	}
	z := mustOp(t, s, "z")
	if z.Priority != 2 || z.InvocationId != "i" || z.QueuedUnixNano != 1 || z.StartedUnixNano != 7 || z.CompletedUnixNano != 9 ||
		z.Attempts != 1 || z.InstanceName != "main" || z.DigestFunction != 1 || z.ActionDigest.GetHash() != "h-z" || len(z.Platform) != 1 {
		t.Fatalf("z = %v", z)
	}
	y := mustOp(t, s, "y")
	if y.Worker != "w" || y.Lease != 2 || y.StartedUnixNano != 9 || y.QueuedUnixNano != 7 {
		t.Fatalf("y = %v", y)
	}
	if _, ok := s.Operation("nope"); ok {
		t.Fatal("unknown operation found")
	}
	ws := s.Workers()
	if len(ws) != 1 || ws[0].Id != "w" || ws[0].Slots != 1 || !slices.Equal(ws[0].Running, []string{"y"}) || ws[0].Platform[0].GetValue() != "linux" {
		t.Fatalf("workers %v", ws)
	}
}

func TestUnsatisfiable(t *testing.T) {
	s := New(Config{})
	if k, v, ok := s.Unsatisfiable(nil); !ok || k != "" || v != "no workers are registered" {
		t.Fatalf("no workers: %q %q %v", k, v, ok)
	}
	if k, v, ok := s.Unsatisfiable(props("nix-system=x86_64-linux")); !ok || k != "nix-system" || v != "x86_64-linux" {
		t.Fatalf("no workers, with a property: %q %q %v", k, v, ok)
	}
	apply(t, s,
		register("x", 1, "nix-system=x86_64-linux", "nix-system=i686-linux", "nix-features=kvm"),
		register("a", 1, "nix-system=aarch64-linux", "nix-features=big-parallel"),
		drain("a", true),
	)
	for _, tc := range []struct {
		props      []string
		key, value string
		ok         bool
	}{
		{nil, "", "", false},
		{[]string{"nix-system=i686-linux"}, "", "", false},
		{[]string{"nix-system=aarch64-linux", "network=true"}, "", "", false}, // drained workers count
		{[]string{"nix-system=mips-linux"}, "nix-system", "mips-linux", true},
		{[]string{"OSFamily=linux", "nix-system=mips-linux"}, "OSFamily", "linux", true},
		{[]string{"nix-features=kvm,zzz,aaa", "nix-system=mips-linux"}, "nix-features", "aaa", true},
		{[]string{"nix-features=big-parallel,kvm"}, "", "no single worker offers all of nix-features=big-parallel,kvm", true},
		{[]string{"nix-system=aarch64-linux", "nix-features=kvm"}, "", "no single worker offers all of nix-features=kvm, nix-system=aarch64-linux", true},
	} {
		k, v, ok := s.Unsatisfiable(props(tc.props...))
		if k != tc.key || v != tc.value || ok != tc.ok {
			t.Errorf("Unsatisfiable(%v) = %q, %q, %v; want %q, %q, %v", tc.props, k, v, ok, tc.key, tc.value, tc.ok)
		}
	}
}

func TestInvalidCommands(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("w", 1), sub{name: "exists", platform: []string{"nix-system=none"}}.cmd())
	before := snapshotBytes(t, s)
	noDigest := sub{name: "x"}.cmd()
	noDigest.GetSubmit().ActionDigest = nil
	negSize := sub{name: "x"}.cmd()
	negSize.GetSubmit().ActionDigest.SizeBytes = -1
	for _, tc := range []struct {
		cmd  *schedulerpb.Command
		code codes.Code
	}{
		{&schedulerpb.Command{}, codes.InvalidArgument},
		{sub{}.cmd(), codes.InvalidArgument},
		{func() *schedulerpb.Command { c := sub{name: "x"}.cmd(); c.GetSubmit().Waiter = ""; return c }(), codes.InvalidArgument},
		{noDigest, codes.InvalidArgument},
		{negSize, codes.InvalidArgument},
		{sub{name: "x", platform: []string{"=v"}}.cmd(), codes.InvalidArgument},
		{sub{name: "exists", hash: "other"}.cmd(), codes.AlreadyExists},
		{register("", 1), codes.InvalidArgument},
		{register("w2", -1), codes.InvalidArgument},
		{register("w2", 1, "=x"), codes.InvalidArgument},
		{removeWorker("nobody", ""), codes.NotFound},
		{drain("nobody", true), codes.NotFound},
		{complete("nope", "w", 1, 1), codes.NotFound},
		{complete("", "w", 1, 1), codes.NotFound},
		{fail("nope", 0, 2, ""), codes.NotFound},
		{fail("exists", 0, 0, "ok is not a failure"), codes.InvalidArgument},
		{fail("exists", 0, 99, ""), codes.InvalidArgument},
		{&schedulerpb.Command{Command: &schedulerpb.Command_Fail{Fail: &schedulerpb.Fail{Operation: "exists"}}}, codes.InvalidArgument},
		{cancel("nope"), codes.NotFound},
		{attach("nope", "x"), codes.NotFound},
		{attach("exists", ""), codes.InvalidArgument},
		{detach("nope", "x"), codes.NotFound},
		{detach("exists", ""), codes.InvalidArgument},
	} {
		r := applyAny(t, s, tc.cmd)
		if got := status.Code(r.Results[0].Err); got != tc.code {
			t.Errorf("%v: code %v (%v), want %v", tc.cmd, got, r.Results[0].Err, tc.code)
		}
		if after := snapshotBytes(t, s); string(after) != string(before) {
			t.Fatalf("%v changed the state", tc.cmd)
		}
	}
	// A rejected command does not stop the rest of its batch.
	r := applyAny(t, s, cancel("nope"), sub{name: "ok"}.cmd())
	if r.Results[0].Err == nil || r.Results[1].Err != nil || r.Results[1].Operation != "ok" {
		t.Fatalf("results %+v", r.Results)
	}
	if !strings.Contains(r.Results[0].Err.Error(), `"nope"`) {
		t.Errorf("error %v does not name the operation", r.Results[0].Err)
	}
}

func TestTimeIsMonotonic(t *testing.T) {
	s := New(Config{})
	apply(t, s, sub{name: "a", time: 100}.cmd(), sub{name: "b", time: 50}.cmd())
	if op := mustOp(t, s, "b"); op.QueuedUnixNano != 100 {
		t.Fatalf("queued at %d, want the clock 100", op.QueuedUnixNano)
	}
}

func TestDelete(t *testing.T) {
	s := New(Config{})
	r := apply(t, s, register("w", 1), sub{name: "run"}.cmd(), sub{name: "wait"}.cmd(), sub{name: "keep"}.cmd())
	lease := r.Assignments[0].Lease
	// Unknown: NOT_FOUND, nothing changes.
	r = applyAny(t, s, deleteCmd("nope", 2))
	if status.Code(r.Results[0].Err) != codes.NotFound {
		t.Fatalf("delete of an unknown operation: %v", r.Results[0].Err)
	}
	// Executing and queued: marked, neither cancelled nor removed.
	r = apply(t, s, deleteCmd("run", 2), deleteCmd("wait", 2))
	if len(r.Cancellations) != 0 || len(r.Completions) != 0 || r.Results[0].Removed != 0 {
		t.Fatalf("delete of running operations: %+v", r)
	}
	if op := mustOp(t, s, "run"); op.Stage != schedulerpb.Stage_STAGE_EXECUTING || !op.Deleted {
		t.Fatalf("run: %v", op)
	}
	// A snapshot keeps the mark.
	c := restored(t, s, New(Config{}))
	if op := mustOp(t, c, "wait"); !op.Deleted {
		t.Fatalf("restored: %v", op)
	}
	// It completes: its waiters get the result, and it is gone.
	r = apply(t, s, complete("run", "w", lease, 5))
	if len(r.Completions) != 1 || r.Completions[0].Deleted == nil || !slices.Equal(r.Completions[0].Waiters, []string{"w-run"}) ||
		r.Completions[0].Deleted.Stage != schedulerpb.Stage_STAGE_COMPLETED || string(r.Completions[0].Deleted.Result) != "result-run" {
		t.Fatalf("completion of a deleted operation: %+v", r.Completions)
	}
	if _, ok := s.Operation("run"); ok {
		t.Fatal("a deleted operation is still there after it completed")
	}
	if got := assignedOps(r); !slices.Equal(got, []string{"wait"}) {
		t.Fatalf("assignments %v", got)
	}
	// A client that joins a deleted operation undoes the delete.
	lease = r.Assignments[0].Lease
	r = apply(t, s, sub{name: "wait2", hash: "h-wait", waiter: "again"}.cmd())
	if !r.Results[0].Deduplicated || mustOp(t, s, "wait").Deleted {
		t.Fatalf("join: %+v %v", r.Results[0], mustOp(t, s, "wait"))
	}
	apply(t, s, deleteCmd("wait", 6), attach("wait", "waiter"))
	if mustOp(t, s, "wait").Deleted {
		t.Fatal("attach did not undo the delete")
	}
	r = apply(t, s, complete("wait", "w", lease, 7))
	if r.Completions[0].Deleted != nil {
		t.Fatal("an undeleted operation was removed")
	}
	// Completed: removed at once, from the completed list too.
	r = apply(t, s, deleteCmd("wait", 8))
	if r.Results[0].Removed != 1 {
		t.Fatalf("delete of a completed operation: %+v", r.Results[0])
	}
	if _, ok := s.Operation("wait"); ok {
		t.Fatal("a deleted completed operation is still there")
	}
	r = applyAny(t, s, deleteCmd("wait", 9))
	if status.Code(r.Results[0].Err) != codes.NotFound {
		t.Fatalf("second delete: %v", r.Results[0].Err)
	}
	// Cancelled after the delete: removed when cancelled.
	apply(t, s, deleteCmd("keep", 10))
	r = apply(t, s, cancel("keep"))
	if len(r.Completions) != 1 || r.Completions[0].Deleted == nil || r.Completions[0].Code != codes.Canceled {
		t.Fatalf("cancel of a deleted operation: %+v", r.Completions)
	}
	if n := len(s.Operations(schedulerpb.Stage_STAGE_UNSPECIFIED)); n != 0 {
		t.Fatalf("%d operations left", n)
	}
	// Compaction after deletes.
	r = apply(t, s, compact(100))
	if r.Results[0].Removed != 0 {
		t.Fatalf("compact removed %d", r.Results[0].Removed)
	}
}

// A Submit's result says whether the batch's dispatch leased it, and Leased
// describes the action of a lease, do_not_cache included.
func TestSubmitExecutingAndLeased(t *testing.T) {
	s := New(Config{})
	apply(t, s, register("w1", 1))
	nc := sub{name: "op2"}.cmd()
	nc.GetSubmit().DoNotCache = true
	r := apply(t, s, sub{name: "op1"}.cmd(), nc)
	if !r.Results[0].Executing || r.Results[1].Executing {
		t.Fatalf("results %+v: want op1 executing, op2 queued", r.Results)
	}
	a, ok := s.Leased("op1", r.Assignments[0].Lease)
	if !ok || a.Instance != "main" || a.DigestFunction != 1 || a.Digest.GetHash() != "h-op1" || a.DoNotCache {
		t.Fatalf("Leased(op1) = %+v, %v", a, ok)
	}
	if _, ok := s.Leased("op1", r.Assignments[0].Lease+1); ok {
		t.Error("Leased with another lease")
	}
	if _, ok := s.Leased("op2", 0); ok {
		t.Error("Leased of a queued operation")
	}
	r = apply(t, s, complete("op1", "w1", r.Assignments[0].Lease, 2))
	if a, ok := s.Leased("op2", r.Assignments[0].Lease); !ok || !a.DoNotCache {
		t.Fatalf("Leased(op2) = %+v, %v", a, ok)
	}
	if op := mustOp(t, s, "op2"); !op.DoNotCache {
		t.Error("op2 lost do_not_cache")
	}
}
