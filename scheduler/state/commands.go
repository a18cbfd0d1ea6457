package state

import (
	"cmp"
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	schedulerpb "tvixfarm/proto/tvixfarm/scheduler/v1"
)

func invalid(format string, a ...any) Result {
	return Result{Err: status.Errorf(codes.InvalidArgument, format, a...)}
}

func unknownOp(cmd, name string) Result {
	return Result{Err: status.Errorf(codes.NotFound, "%s: unknown operation %q", cmd, name)}
}

func unknownWorker(cmd, id string) Result {
	return Result{Err: status.Errorf(codes.NotFound, "%s: unknown worker %q", cmd, id)}
}

func checkPlatform(cmd, name string, platform []*schedulerpb.Property) error {
	for _, p := range platform {
		if p.GetName() == "" {
			return status.Errorf(codes.InvalidArgument, "%s %s: platform property with an empty name", cmd, name)
		}
	}
	return nil
}

func (s *State) submit(c *schedulerpb.Submit) Result {
	d := c.GetActionDigest()
	switch {
	case c.GetOperation() == "":
		return invalid("submit: empty operation name")
	case c.GetWaiter() == "":
		return invalid("submit %s: empty waiter", c.GetOperation())
	case d.GetHash() == "" || d.GetSizeBytes() < 0:
		return invalid("submit %s: invalid action digest %q/%d", c.GetOperation(), d.GetHash(), d.GetSizeBytes())
	}
	if err := checkPlatform("submit", c.GetOperation(), c.GetPlatform()); err != nil {
		return Result{Err: err}
	}
	key := actionKey{instance: c.GetInstanceName(), fn: c.GetDigestFunction(), hash: d.GetHash(), size: d.GetSizeBytes()}
	if op := s.inFlight[key]; op != nil {
		s.tick(c.GetTimeUnixNano())
		op.addWaiter(c.GetWaiter())
		op.cancelOnDC = op.cancelOnDC && c.GetCancelOnDisconnect()
		op.deleted = false // a client is interested again
		if c.GetPriority() < op.priority {
			if op.stage == schedulerpb.Stage_STAGE_QUEUED {
				s.unqueue(op)
				op.priority = c.GetPriority()
				s.queue(op)
			} else {
				op.priority = c.GetPriority()
			}
		}
		return Result{Operation: op.name, Deduplicated: true}
	}
	if _, ok := s.ops[c.GetOperation()]; ok {
		return Result{Err: status.Errorf(codes.AlreadyExists, "submit: operation %q exists", c.GetOperation())}
	}
	now := s.tick(c.GetTimeUnixNano())
	op := &operation{
		name:       c.GetOperation(),
		key:        key,
		digest:     d,
		platform:   c.GetPlatform(),
		priority:   c.GetPriority(),
		invocation: c.GetInvocationId(),
		waiters:    []string{c.GetWaiter()},
		cancelOnDC: c.GetCancelOnDisconnect(),
		doNotCache: c.GetDoNotCache(),
		seq:        s.nextSeq,
		stage:      schedulerpb.Stage_STAGE_QUEUED,
		queuedAt:   now,
	}
	s.nextSeq++
	s.ops[op.name] = op
	s.inFlight[key] = op
	s.queue(op)
	return Result{Operation: op.name}
}

func (o *operation) addWaiter(w string) {
	if !slices.Contains(o.waiters, w) {
		o.waiters = append(o.waiters, w)
	}
}

func (s *State) registerWorker(c *schedulerpb.RegisterWorker) Result {
	switch {
	case c.GetWorker() == "":
		return invalid("register worker: empty worker id")
	case c.GetSlots() < 0:
		return invalid("register worker %s: negative slots %d", c.GetWorker(), c.GetSlots())
	}
	if err := checkPlatform("register worker", c.GetWorker(), c.GetPlatform()); err != nil {
		return Result{Err: err}
	}
	now := s.tick(c.GetTimeUnixNano())
	w := s.workers[c.GetWorker()]
	if w == nil {
		w = &worker{id: c.GetWorker()}
		s.workers[w.id] = w
	}
	// Reconcile the leases with what the worker runs.
	listed := make(map[string]bool, len(c.GetRunning()))
	for _, name := range c.GetRunning() {
		if listed[name] {
			continue
		}
		listed[name] = true
		if op := s.ops[name]; op == nil || op.worker != w {
			s.resp.Cancellations = append(s.resp.Cancellations, Cancellation{Operation: name, Worker: w.id})
		}
	}
	var lost []*operation
	for _, op := range w.leased() {
		if !listed[op.name] {
			lost = append(lost, op)
		}
	}
	s.lose(lost, w.id, "not running it after re-registering")
	// Update the platform and slots.
	s.leaveGroups(w)
	w.platform = c.GetPlatform()
	w.offers = s.offers(w.platform)
	w.slots = c.GetSlots()
	w.registered = now
	s.joinGroups(w)
	return Result{}
}

// lose ends the leases of ops, lost by worker for reason: each is requeued,
// or fails if it has been attempted MaxAttempts times.
func (s *State) lose(ops []*operation, worker, reason string) {
	slices.SortFunc(ops, func(a, b *operation) int { return cmp.Compare(a.lease, b.lease) })
	for _, op := range ops {
		s.release(op)
		if op.attempts >= s.maxAttempts {
			msg := fmt.Sprintf("lost %d times, last by worker %s: %s", op.attempts, worker, reason)
			s.finish(op, nil, codes.Unavailable, msg)
			continue
		}
		op.stage = schedulerpb.Stage_STAGE_QUEUED
		s.queue(op)
	}
}

func (s *State) removeWorker(c *schedulerpb.RemoveWorker) Result {
	w := s.workers[c.GetWorker()]
	if w == nil {
		return unknownWorker("remove worker", c.GetWorker())
	}
	s.tick(c.GetTimeUnixNano())
	reason := c.GetReason()
	if reason == "" {
		reason = "removed"
	}
	// Out of every group first, so requeued operations cannot come back
	// to it.
	s.leaveGroups(w)
	delete(s.workers, w.id)
	s.lose(w.leased(), w.id, reason)
	return Result{}
}

func (s *State) drain(c *schedulerpb.Drain) Result {
	w := s.workers[c.GetWorker()]
	if w == nil {
		return unknownWorker("drain", c.GetWorker())
	}
	s.tick(c.GetTimeUnixNano())
	before := w.free()
	w.drained = c.GetDrained()
	s.adjust(w, before)
	return Result{}
}

func (s *State) complete(c *schedulerpb.Complete) Result {
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("complete", c.GetOperation())
	}
	if op.stage != schedulerpb.Stage_STAGE_EXECUTING || op.lease != c.GetLease() ||
		(c.GetWorker() != "" && c.GetWorker() != op.worker.id) {
		return Result{Operation: op.name, Stale: true}
	}
	s.tick(c.GetTimeUnixNano())
	s.release(op)
	s.finish(op, c.GetResult(), codes.OK, "")
	return Result{Operation: op.name}
}

func (s *State) fail(c *schedulerpb.Fail) Result {
	code := codes.Code(c.GetStatus().GetCode())
	if code == codes.OK || code > codes.Unauthenticated {
		return invalid("fail %s: invalid status code %d", c.GetOperation(), c.GetStatus().GetCode())
	}
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("fail", c.GetOperation())
	}
	if op.stage == schedulerpb.Stage_STAGE_COMPLETED ||
		(c.GetLease() != 0 && (op.stage != schedulerpb.Stage_STAGE_EXECUTING || op.lease != c.GetLease())) {
		return Result{Operation: op.name, Stale: true}
	}
	s.tick(c.GetTimeUnixNano())
	if op.stage == schedulerpb.Stage_STAGE_QUEUED {
		s.unqueue(op)
	} else {
		lease := op.lease
		w := s.release(op)
		if c.GetLease() == 0 {
			s.resp.Cancellations = append(s.resp.Cancellations, Cancellation{Operation: op.name, Worker: w.id, Lease: lease})
		}
	}
	s.finish(op, nil, code, c.GetStatus().GetMessage())
	return Result{Operation: op.name}
}

func (s *State) cancel(c *schedulerpb.Cancel) Result {
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("cancel", c.GetOperation())
	}
	if op.stage == schedulerpb.Stage_STAGE_COMPLETED {
		return Result{Operation: op.name, Stale: true}
	}
	s.tick(c.GetTimeUnixNano())
	s.abort(op, "operation cancelled")
	return Result{Operation: op.name}
}

// abort completes the queued or executing op with CANCELLED, cancelling it
// on its worker.
func (s *State) abort(op *operation, msg string) {
	if op.stage == schedulerpb.Stage_STAGE_QUEUED {
		s.unqueue(op)
	} else {
		lease := op.lease
		w := s.release(op)
		s.resp.Cancellations = append(s.resp.Cancellations, Cancellation{Operation: op.name, Worker: w.id, Lease: lease})
	}
	s.finish(op, nil, codes.Canceled, msg)
}

// finish completes op, which is neither queued nor leased any more. An
// operation a Delete marked is removed at once.
func (s *State) finish(op *operation, result []byte, code codes.Code, msg string) {
	op.stage = schedulerpb.Stage_STAGE_COMPLETED
	op.doneAt = s.clock
	op.result, op.code, op.message = result, code, msg
	delete(s.inFlight, op.key)
	c := Completion{
		Operation: op.name,
		Result:    result,
		Code:      code,
		Message:   msg,
		Waiters:   slices.Clip(op.waiters), // never modified in place once completed
	}
	if op.deleted {
		op.deleted = false
		c.Deleted = op.proto()
		delete(s.ops, op.name)
	} else {
		s.done = append(s.done, op) // the clock never goes back: still sorted
	}
	s.resp.Completions = append(s.resp.Completions, c)
}

func (s *State) attach(c *schedulerpb.Attach) Result {
	if c.GetWaiter() == "" {
		return invalid("attach %s: empty waiter", c.GetOperation())
	}
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("attach", c.GetOperation())
	}
	if op.stage == schedulerpb.Stage_STAGE_COMPLETED {
		return Result{Operation: op.name, Stale: true}
	}
	s.tick(c.GetTimeUnixNano())
	op.addWaiter(c.GetWaiter())
	op.deleted = false // a client is interested again
	return Result{Operation: op.name}
}

func (s *State) detach(c *schedulerpb.Detach) Result {
	if c.GetWaiter() == "" {
		return invalid("detach %s: empty waiter", c.GetOperation())
	}
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("detach", c.GetOperation())
	}
	i := slices.Index(op.waiters, c.GetWaiter())
	if i < 0 {
		return Result{Operation: op.name}
	}
	s.tick(c.GetTimeUnixNano())
	// A new slice: a Completion may share the old one.
	op.waiters = slices.Concat(op.waiters[:i], op.waiters[i+1:])
	if len(op.waiters) > 0 || !op.cancelOnDC || op.stage == schedulerpb.Stage_STAGE_COMPLETED {
		return Result{Operation: op.name}
	}
	s.abort(op, "operation cancelled: every client disconnected")
	return Result{Operation: op.name, Cancelled: true}
}

func (s *State) compact(c *schedulerpb.Compact) Result {
	n := 0
	for n < len(s.done) && s.done[n].doneAt < c.GetBeforeUnixNano() {
		delete(s.ops, s.done[n].name)
		s.done[n] = nil
		n++
	}
	s.done = s.done[n:]
	for key, g := range s.groups {
		if g.queued > 0 {
			continue
		}
		for _, w := range g.workers {
			i := slices.Index(w.groups, g)
			w.groups = slices.Delete(w.groups, i, i+1)
		}
		delete(s.groups, key)
	}
	return Result{Removed: n}
}

// deleteOp removes a completed operation, and marks a queued or executing
// one to be removed when it completes. It never cancels anything.
func (s *State) deleteOp(c *schedulerpb.Delete) Result {
	op := s.ops[c.GetOperation()]
	if op == nil {
		return unknownOp("delete", c.GetOperation())
	}
	s.tick(c.GetTimeUnixNano())
	if op.stage != schedulerpb.Stage_STAGE_COMPLETED {
		op.deleted = true
		return Result{Operation: op.name}
	}
	// s.done is sorted by completion time: find op among those completed
	// at the same time.
	i, _ := slices.BinarySearchFunc(s.done, op.doneAt, func(o *operation, t int64) int { return cmp.Compare(o.doneAt, t) })
	for i < len(s.done) && s.done[i] != op {
		i++
	}
	if i < len(s.done) {
		s.done = slices.Delete(s.done, i, i+1)
	}
	delete(s.ops, op.name)
	return Result{Operation: op.name, Removed: 1}
}
