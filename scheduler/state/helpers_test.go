package state

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
	"testing"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

// props parses "name=value" pairs.
func props(kvs ...string) []*schedulerpb.Property {
	var ps []*schedulerpb.Property
	for _, kv := range kvs {
		k, v, _ := strings.Cut(kv, "=")
		ps = append(ps, &schedulerpb.Property{Name: k, Value: v})
	}
	return ps
}

// sub is a Submit with defaults: the action's hash is its name's, the
// waiter "w-"+name, time 1.
type sub struct {
	name, inv, hash, waiter string
	prio                    int32
	platform                []string
	cancelOnDC              bool
	time                    int64
}

func (c sub) cmd() *schedulerpb.Command {
	if c.hash == "" {
		c.hash = "h-" + c.name
	}
	if c.waiter == "" {
		c.waiter = "w-" + c.name
	}
	if c.time == 0 {
		c.time = 1
	}
	return &schedulerpb.Command{Command: &schedulerpb.Command_Submit{Submit: &schedulerpb.Submit{
		Operation:          c.name,
		InstanceName:       "main",
		DigestFunction:     1,
		ActionDigest:       &schedulerpb.Digest{Hash: c.hash, SizeBytes: 10},
		Platform:           props(c.platform...),
		Priority:           c.prio,
		InvocationId:       c.inv,
		Waiter:             c.waiter,
		CancelOnDisconnect: c.cancelOnDC,
		TimeUnixNano:       c.time,
	}}}
}

func register(id string, slots int32, platform ...string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_RegisterWorker{RegisterWorker: &schedulerpb.RegisterWorker{
		Worker: id, Slots: slots, Platform: props(platform...), TimeUnixNano: 1,
	}}}
}

func reregister(id string, slots int32, running []string, platform ...string) *schedulerpb.Command {
	c := register(id, slots, platform...)
	c.GetRegisterWorker().Running = running
	return c
}

func removeWorker(id, reason string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_RemoveWorker{RemoveWorker: &schedulerpb.RemoveWorker{Worker: id, Reason: reason, TimeUnixNano: 2}}}
}

func drain(id string, drained bool) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Drain{Drain: &schedulerpb.Drain{Worker: id, Drained: drained}}}
}

func complete(op, worker string, lease uint64, t int64) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Complete{Complete: &schedulerpb.Complete{
		Operation: op, Worker: worker, Lease: lease, Result: []byte("result-" + op), TimeUnixNano: t,
	}}}
}

func fail(op string, lease uint64, code int32, msg string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Fail{Fail: &schedulerpb.Fail{
		Operation: op, Lease: lease, Status: &schedulerpb.Status{Code: code, Message: msg}, TimeUnixNano: 3,
	}}}
}

func cancel(op string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Cancel{Cancel: &schedulerpb.Cancel{Operation: op, TimeUnixNano: 3}}}
}

func attach(op, waiter string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Attach{Attach: &schedulerpb.Attach{Operation: op, Waiter: waiter}}}
}

func detach(op, waiter string) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Detach{Detach: &schedulerpb.Detach{Operation: op, Waiter: waiter, TimeUnixNano: 3}}}
}

func deleteCmd(op string, t int64) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Delete{Delete: &schedulerpb.Delete{Operation: op, TimeUnixNano: t}}}
}

func compact(before int64) *schedulerpb.Command {
	return &schedulerpb.Command{Command: &schedulerpb.Command_Compact{Compact: &schedulerpb.Compact{BeforeUnixNano: before}}}
}

// apply applies cmds as one batch, fails the test on a rejected command,
// and checks the state's invariants.
func apply(t testing.TB, s *State, cmds ...*schedulerpb.Command) *Response {
	t.Helper()
	r := applyAny(t, s, cmds...)
	for i, res := range r.Results {
		if res.Err != nil {
			t.Fatalf("command %d rejected: %v", i, res.Err)
		}
	}
	return r
}

// applyAny is apply that allows rejected commands.
func applyAny(t testing.TB, s *State, cmds ...*schedulerpb.Command) *Response {
	t.Helper()
	r := s.Apply(&schedulerpb.Batch{Commands: cmds})
	if len(r.Results) != len(cmds) {
		t.Fatalf("%d results for %d commands", len(r.Results), len(cmds))
	}
	if err := s.check(); err != nil {
		t.Fatalf("invariant: %v", err)
	}
	return r
}

// assigned returns the assignments as "op@worker".
func assigned(r *Response) []string {
	var out []string
	for _, a := range r.Assignments {
		out = append(out, a.Operation+"@"+a.Worker)
	}
	return out
}

func assignedOps(r *Response) []string {
	var out []string
	for _, a := range r.Assignments {
		out = append(out, a.Operation)
	}
	return out
}

func mustOp(t testing.TB, s *State, name string) *schedulerpb.Operation {
	t.Helper()
	op, ok := s.Operation(name)
	if !ok {
		t.Fatalf("operation %s not found", name)
	}
	return op
}

func snapshotBytes(t testing.TB, s *State) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := s.Snapshot(&b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// format renders a Response for comparison, errors as their text.
func format(r *Response) string {
	var b strings.Builder
	for i, res := range r.Results {
		fmt.Fprintf(&b, "result %d: err=%v op=%s dedup=%v stale=%v cancelled=%v removed=%d\n",
			i, res.Err, res.Operation, res.Deduplicated, res.Stale, res.Cancelled, res.Removed)
	}
	for _, a := range r.Assignments {
		fmt.Fprintf(&b, "assign %s %s %d %d %s %d %s/%d %d %d\n", a.Operation, a.Worker, a.Lease, a.Attempt,
			a.Instance, a.DigestFunction, a.ActionDigest.GetHash(), a.ActionDigest.GetSizeBytes(), a.Priority, a.QueuedUnixNano)
	}
	for _, c := range r.Cancellations {
		fmt.Fprintf(&b, "cancel %+v\n", c)
	}
	for _, c := range r.Completions {
		fmt.Fprintf(&b, "complete %s %q %v %q %v deleted=%v\n", c.Operation, c.Result, c.Code, c.Message, c.Waiters, c.Deleted != nil)
	}
	return b.String()
}

// check verifies the invariants that tie the indexes to the operations and
// workers.
func (s *State) check() error {
	inFlight := 0
	queued := make(map[*group]int)
	byPrio := make(map[int32]int)
	for name, op := range s.ops {
		if op.name != name {
			return fmt.Errorf("op %s stored as %s", op.name, name)
		}
		if op.stage != schedulerpb.Stage_STAGE_COMPLETED {
			inFlight++
			if s.inFlight[op.key] != op {
				return fmt.Errorf("op %s not in flight index", name)
			}
		}
		switch op.stage {
		case schedulerpb.Stage_STAGE_QUEUED:
			if op.inv == nil || op.worker != nil {
				return fmt.Errorf("queued op %s: inv %v worker %v", name, op.inv, op.worker)
			}
			q := op.inv
			if n := countValid(q, op); n != 1 || q.id != op.invocation || q.level.priority != op.priority {
				return fmt.Errorf("queued op %s misplaced", name)
			}
			_, kb := s.requirements(op.platform, nil, nil)
			key := string(kb)
			if q.level.group.key != key || s.groups[key] != q.level.group {
				return fmt.Errorf("queued op %s in group %q, want %q", name, q.level.group.key, key)
			}
			queued[q.level.group]++
			byPrio[op.priority]++
		case schedulerpb.Stage_STAGE_EXECUTING:
			if op.inv != nil || op.worker == nil || op.lease == 0 || !slices.Contains(op.worker.leased(), op) {
				return fmt.Errorf("executing op %s: bad lease", name)
			}
			if s.workers[op.worker.id] != op.worker {
				return fmt.Errorf("executing op %s on removed worker", name)
			}
		case schedulerpb.Stage_STAGE_COMPLETED:
			if op.inv != nil || op.worker != nil || op.deleted {
				return fmt.Errorf("completed op %s still queued, leased or marked deleted", name)
			}
		}
	}
	completed := 0
	for i, op := range s.done {
		if s.ops[op.name] != op || op.stage != schedulerpb.Stage_STAGE_COMPLETED || (i > 0 && s.done[i-1].doneAt > op.doneAt) {
			return fmt.Errorf("completed list broken at %d (%s)", i, op.name)
		}
		completed++
	}
	if completed+inFlight != len(s.ops) {
		return fmt.Errorf("%d completed and %d in flight of %d operations", completed, inFlight, len(s.ops))
	}
	if len(s.inFlight) != inFlight {
		return fmt.Errorf("in-flight index has %d entries, want %d", len(s.inFlight), inFlight)
	}
	if len(byPrio) != len(s.queued) {
		return fmt.Errorf("queue lengths %v, want %v", s.queued, byPrio)
	}
	for p, n := range byPrio {
		if s.queued[p] != n {
			return fmt.Errorf("queue lengths %v, want %v", s.queued, byPrio)
		}
	}
	var busy []string
	for key, g := range s.groups {
		if g.key != key {
			return fmt.Errorf("group %q stored as %q", g.key, key)
		}
		if g.queued != queued[g] {
			return fmt.Errorf("group %q: queued %d, want %d", key, g.queued, queued[g])
		}
		if g.queued > 0 {
			busy = append(busy, key)
		}
		var want []string
		free := 0
		for _, w := range s.sortedWorkers() {
			if w.offers.satisfy(g.reqs) {
				want = append(want, w.id)
				free += w.free()
				if !slices.Contains(w.groups, g) {
					return fmt.Errorf("worker %s does not list group %q", w.id, key)
				}
			}
		}
		var got []string
		for _, w := range g.workers {
			got = append(got, w.id)
		}
		if !slices.Equal(got, want) || g.free != free {
			return fmt.Errorf("group %q: workers %v free %d, want %v free %d", key, got, g.free, want, free)
		}
		var prios, sorted []int32
		for _, l := range g.sorted {
			sorted = append(sorted, l.priority)
		}
		n := 0
		for p, l := range g.levels {
			prios = append(prios, p)
			if l.priority != p || l.group != g || len(l.order) == 0 || len(l.order) != len(l.invs) {
				return fmt.Errorf("group %q: bad level %d", key, p)
			}
			if err := checkHeap(l.order); err != nil {
				return fmt.Errorf("group %q level %d: %w", key, p, err)
			}
			for id, q := range l.invs {
				if q.id != id || q.level != l || l.order[q.index] != q || len(q.ops) == 0 {
					return fmt.Errorf("group %q level %d: bad queue %q", key, p, id)
				}
				if err := checkHeap(q.ops); err != nil {
					return fmt.Errorf("group %q level %d queue %q: %w", key, p, id, err)
				}
				if !q.valid(q.ops[0]) || q.live != countValid(q, nil) {
					return fmt.Errorf("group %q level %d queue %q: stale top or live %d wrong", key, p, id, q.live)
				}
				n += q.live
			}
		}
		slices.Sort(prios)
		if !slices.Equal(prios, sorted) || n != g.queued {
			return fmt.Errorf("group %q: levels %v want %v, %d ops want %d", key, sorted, prios, n, g.queued)
		}
	}
	slices.Sort(busy)
	var gotBusy []string
	for _, g := range s.busy {
		gotBusy = append(gotBusy, g.key)
	}
	if !slices.Equal(busy, gotBusy) {
		return fmt.Errorf("busy groups %q, want %q", gotBusy, busy)
	}
	for id, w := range s.workers {
		leased := w.leased()
		if len(leased) != w.running {
			return fmt.Errorf("worker %s: %d leases, counted %d", id, len(leased), w.running)
		}
		for i, op := range leased {
			if op.worker != w || s.ops[op.name] != op || op.stage != schedulerpb.Stage_STAGE_EXECUTING ||
				(i > 0 && op.prev != leased[i-1]) || (i == 0 && op.prev != nil) {
				return fmt.Errorf("worker %s: bad running op %s", id, op.name)
			}
		}
		for _, g := range w.groups {
			if s.groups[g.key] != g || !slices.Contains(g.workers, w) {
				return fmt.Errorf("worker %s lists group %q that does not list it", id, g.key)
			}
		}
	}
	// Free workers never remain beside runnable operations.
	for _, g := range s.busy {
		if g.free > 0 {
			return fmt.Errorf("group %q has %d queued and %d free slots after dispatch", g.key, g.queued, g.free)
		}
	}
	return nil
}

// countValid counts the valid entries of q (for op, or all if op is nil).
func countValid(q *invQueue, op *operation) int {
	n := 0
	for _, e := range q.ops {
		if q.valid(e) && (op == nil || e.op == op) {
			n++
		}
	}
	return n
}

func checkHeap[T interface {
	before(T) bool
	setIndex(int)
}](h heap[T]) error {
	for i := 1; i < len(h); i++ {
		if h[i].before(h[(i-1)/2]) {
			return fmt.Errorf("heap order broken at %d", i)
		}
	}
	return nil
}
